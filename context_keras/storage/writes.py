"""Writing files so that a kill or a full disk never leaves a half-written one, and checking folders before work, on
a local disk and on stores (gs://, s3://, hdfs://, ram://); docs/storage.md says what holds where.

Every file a program writes for a user (flags, configs, results, indexes) goes through atomic_write: the bytes go
to a temporary file beside the target (a hidden name, which readers ignore), which then replaces it in one rename,
so readers see the old file or the new one, never a truncated one; on an object store the rename is a server-side
copy, and an object appears only once whole. Folders that must be consistent as a whole (an export: SavedModels,
Keras files and their metadata from one checkpoint) go through atomic_folder, which builds them beside the target
and moves them into place: by two renames on a local disk; on a store, whose folders cannot be renamed at once, file
by file under a commit record that readers check (check_complete) and the next writer finishes.
"""
import contextlib
import json
import os
import re
import shutil
import tempfile
import uuid

import tensorflow as tf

from context_keras import errors
from context_keras.storage import locks
from context_keras.storage import paths as paths_lib

# The process's umask (read by setting it, so set it back): atomic_write gives its files the usual permissions.
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path, data):
  """Writes `data` (str or bytes) to `path` through a temporary file in the same folder and one rename."""
  data = data.encode("utf-8") if isinstance(data, str) else data
  path = paths_lib.normalise(path)
  if paths_lib.is_url(path):
    paths_lib.write_bytes(path, data)
    return
  folder = os.path.dirname(path)
  handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".partial")
  try:
    os.fchmod(handle, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide the file from other users
    with os.fdopen(handle, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())  # what tf.io.gfile cannot do: the bytes are on the disk before the rename
    os.replace(temporary, path)
  except BaseException:
    if os.path.exists(temporary):
      os.remove(temporary)
    raise


def atomic_write_json(path, value):
  atomic_write(path, json.dumps(value, indent=1) + "\n")


def check_folder(path, flag, create=True):
  """Stops with a UsageError naming `--flag=path` unless it is (or, with `create`, can become) a folder that this
  process can list and write in. Returns the path, normalised (paths_lib.normalise)."""
  if not path:
    raise errors.UsageError(f"--{flag} is required")
  given, path = path, paths_lib.normalise(path)
  if paths_lib.is_file(path):
    raise errors.UsageError(f"--{flag}={given} is a file, not a directory")
  try:
    if create:
      tf.io.gfile.makedirs(path)
    paths_lib.listdir(path)
    _probe(path)
  except (OSError, tf.errors.OpError) as e:
    raise errors.UsageError(f"--{flag}={given} is not usable (it must be readable and writable): "
                            f"{paths_lib.reason(e)}") from e
  return path


def _probe(folder):
  """Writes and removes a small hidden file in `folder`: whether this process may write there."""
  probe = os.path.join(folder, f".write_test_{os.getpid()}_{uuid.uuid4().hex[:8]}")
  with tf.io.gfile.GFile(probe, "w") as f:
    f.write("ok")
  tf.io.gfile.remove(probe)


def check_target(path, flag):
  """Stops with a UsageError naming `--flag=path` unless atomic_folder can write `path`: it is a folder or absent,
  and its parent is (or can become) a folder this process can write in. Returns the path, normalised."""
  if not path:
    raise errors.UsageError(f"--{flag} is required")
  given, path = path, paths_lib.normalise(path)
  if paths_lib.is_file(path):
    raise errors.UsageError(f"--{flag}={given} is a file, not a directory")
  parent = paths_lib.parent(path)
  try:
    tf.io.gfile.makedirs(parent)
    _probe(parent)
  except (OSError, tf.errors.OpError) as e:
    raise errors.UsageError(f"--{flag}={given}: its folder {parent} is not usable (it must be writable, as the new "
                            "folder is written beside the old one and renamed into place): "
                            f"{paths_lib.reason(e)}") from e
  return path


def failure(what, where, error, then=""):
  """The WriteError for a failed write of `what` into `where`, saying what is intact in `then`."""
  return errors.WriteError(f"Could not write {what} to {where}: {errors.tf_error_message(error)}."
                           + (f" {then}" if then else ""))


def remove_tree(path):
  """Removes a folder and everything in it, on any file system; a folder that is already gone is no error."""
  with contextlib.suppress(tf.errors.OpError):
    if tf.io.gfile.exists(path):
      tf.io.gfile.rmtree(path)


def copy_tree(source, target):
  """Copies the folder `source` (its files and sub-folders) to `target`, on any file systems."""
  tf.io.gfile.makedirs(target)
  for folder, _, files in paths_lib.walk(source):
    inside = os.path.join(target, paths_lib.relative(folder, source)) if not paths_lib.same(folder, source) else target
    tf.io.gfile.makedirs(inside)
    for name in files:
      tf.io.gfile.copy(os.path.join(folder, name), os.path.join(inside, name), overwrite=True)


# --------------------------------------------------------------------------------------------------------------
# Whole folders

# atomic_folder's names beside a folder PATH = DIR/NAME: DIR/.NAME.partial-T while it is written; locally
# DIR/.NAME.new-T once complete and DIR/.NAME.old-T for the folder it replaces while it is moved aside; on a store
# DIR/.NAME.commit-T, the commit record, while the complete DIR/.NAME.partial-T is moved into PATH file by file;
# DIR/.NAME.lock while a process writes.
_PARTIAL, _NEW, _OLD, _COMMIT = "partial", "new", "old", "commit"
_LEFTOVER = re.compile(rf"^\.(.+)\.(?:{_PARTIAL}|{_NEW}|{_OLD}|{_COMMIT})-([^.]+)$")


def _beside(path, kind, token):
  folder, name = paths_lib.split(path)
  return os.path.join(folder, f".{name}.{kind}-{token}")


def _leftovers(path, kind):
  folder, name = paths_lib.split(path)
  prefix = f".{name}.{kind}-"
  try:
    entries = paths_lib.listdir(folder)
  except tf.errors.NotFoundError:
    return []
  return sorted(os.path.join(folder, e.rstrip("/")) for e in entries if e.startswith(prefix))


def _token(leftover):
  return leftover.rsplit("-", 1)[1]


def _commit(path, token, owned):
  """Moves the complete DIR/.NAME.new-T into place on a local disk; every step can be repeated after a kill, so
  recover_folder finishes an interrupted commit with this same function."""
  new, old = _beside(path, _NEW, token), _beside(path, _OLD, token)
  if os.path.isdir(path):
    if owned is not None:
      # What the new folder does not own (say, evaluation results kept in an export) stays with it.
      for entry in os.listdir(path):
        if entry not in owned and not os.path.lexists(os.path.join(new, entry)):
          os.rename(os.path.join(path, entry), os.path.join(new, entry))
    os.rename(path, old)
  # Between these two renames PATH is missing, but the old and the new folder are both complete beside it, and
  # recover_folder (run by the next writer) completes the move.
  os.rename(new, path)
  shutil.rmtree(old, ignore_errors=True)


def _store_commit(path, token, owned, phase="clear"):
  """Moves the complete DIR/.NAME.partial-T into PATH on a store, under the commit record DIR/.NAME.commit-T, which
  says which step it is at: 'clear' (PATH's replaced entries are being removed) or 'move' (the new files are being
  moved in). Each step can be repeated after a kill: recover_folder resumes at the recorded step."""
  partial, record = _beside(path, _PARTIAL, token), _beside(path, _COMMIT, token)
  if phase == "clear":
    atomic_write_json(record, {"phase": "clear", "owned": None if owned is None else list(owned)})
    if owned is None:
      remove_tree(path)
    else:
      for entry in owned:
        target = os.path.join(path, entry)
        if tf.io.gfile.isdir(target):
          remove_tree(target)
        elif tf.io.gfile.exists(target):
          tf.io.gfile.remove(target)
    atomic_write_json(record, {"phase": "move", "owned": None if owned is None else list(owned)})
  tf.io.gfile.makedirs(path)
  for folder, subfolders, files in paths_lib.walk(partial):
    inside = path if paths_lib.same(folder, partial) else os.path.join(path, paths_lib.relative(folder, partial))
    for name in subfolders:
      tf.io.gfile.makedirs(os.path.join(inside, name.rstrip("/")))
    for name in files:
      tf.io.gfile.rename(os.path.join(folder, name), os.path.join(inside, name), overwrite=True)
  remove_tree(partial)
  tf.io.gfile.remove(record)


def recover_folder(path, owned=None):
  """Cleans up after an atomic_folder of `path` that was killed: a partly written folder is removed, a complete one
  whose move was interrupted is moved into place, and a replaced folder left beside it is removed (or, if PATH is
  missing, put back). Call it only while holding the folder's lock (atomic_folder does)."""
  path = paths_lib.normalise(path)
  if paths_lib.is_url(path):
    committing = {_token(record): record for record in _leftovers(path, _COMMIT)}
    for token, record in committing.items():
      recorded = json.loads(paths_lib.read_text(record))
      _store_commit(path, token, recorded["owned"], recorded["phase"])
    for partial in _leftovers(path, _PARTIAL):
      if _token(partial) not in committing:
        remove_tree(partial)
    return
  for partial in _leftovers(path, _PARTIAL):
    shutil.rmtree(partial, ignore_errors=True)
  for new in _leftovers(path, _NEW):
    _commit(path, _token(new), owned)
  for old in _leftovers(path, _OLD):
    if os.path.lexists(path):
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(old, path)


def check_complete(path, flag):
  """Stops with a UsageError when the folder `path`, or the export that holds it (OUT of OUT/backbone), is being
  replaced on a store: its files are then a mixture of the old and the new (atomic_folder's commit record)."""
  path = paths_lib.normalise(path)
  if paths_lib.is_local(path):
    return
  for folder in (path, paths_lib.parent(path)):
    records = _leftovers(folder, _COMMIT)
    if records:
      raise errors.UsageError(f"--{flag}={path}: {folder} is being replaced (commit record {records[0]}); wait for "
                              "the writer to finish, or if it was killed, run it again: it completes the "
                              "replacement first")


def _writing_lock(path):
  """atomic_folder's lock while a process writes DIR/NAME: DIR/.NAME.lock."""
  folder, name = paths_lib.split(path)
  lock_path = os.path.join(folder, f".{name}.lock")
  return locks.lock(lock_path, "", lambda other: errors.UsageError(
      f"{path} is being written by {other} (lock {lock_path}); wait for it to finish"))


@contextlib.contextmanager
def atomic_folder(path, owned=None):
  """Yields an empty folder beside `path` to write a whole folder into; when the block ends without an error, it
  replaces `path`: a kill at any moment leaves the old folder or the new one, each complete (locally: for the
  instant between its two renames, beside the missing `path`; on a store: during the file-by-file move, under a
  commit record that check_complete refuses), which the next atomic_folder or recover_folder of `path` completes.
  On an error the partial folder is removed and `path` is untouched.

  `owned`: None when the new folder replaces the old one wholly; else the names of entries the new folder owns:
  the old folder's other entries are carried over into it (an owned entry that the new folder lacks is dropped,
  so nothing stale survives)."""
  path = paths_lib.normalise(path)
  store = paths_lib.is_url(path)
  if not store:
    path = os.path.realpath(path)  # through a symbolic link: the folder is replaced where it lies, and the link stays
  tf.io.gfile.makedirs(paths_lib.parent(path))
  lock = _writing_lock(path)
  try:
    recover_folder(path, owned)
    token = uuid.uuid4().hex[:12]
    partial = _beside(path, _PARTIAL, token)
    tf.io.gfile.makedirs(partial)
    try:
      yield partial
      if not store:
        os.rename(partial, _beside(path, _NEW, token))  # now complete
    except BaseException:
      remove_tree(partial)
      raise
    if store:
      _store_commit(path, token, owned)
    else:
      _commit(path, token, owned)
  finally:
    lock.release()


def recover_folders(parent):
  """recover_folder for every folder of `parent` that an atomic_folder left unfinished (a writer killed midway)."""
  targets = set()
  for entry in paths_lib.listdir(parent):
    match = _LEFTOVER.match(entry)
    if match:
      targets.add(os.path.join(parent, match.group(1)))
  for target in sorted(targets):
    lock = _writing_lock(target)
    try:
      recover_folder(target)
    finally:
      lock.release()
