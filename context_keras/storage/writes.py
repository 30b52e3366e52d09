"""Writing files so that a kill or a full disk never leaves a half-written one, and checking folders before work.

Every file a program writes for a user (flags, configs, results, indexes) goes through atomic_write: the bytes go
to a temporary file beside the target, which then replaces it in one rename, so readers see the old file or the new
one, never a truncated one. Folders that must be consistent as a whole (an export: SavedModels, Keras files and
their metadata from one checkpoint) go through atomic_folder, which builds them beside the target and moves them
into place.
"""
import contextlib
import fcntl
import glob
import json
import os
import shutil
import socket
import tempfile
import uuid

from context_keras import errors

LOCK_FILE = ".lock"

# The process's umask (read by setting it, so set it back): atomic_write gives its files the usual permissions.
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path, data):
  """Writes `data` (str or bytes) to `path` through a temporary file in the same folder and one rename."""
  folder = os.path.dirname(os.path.abspath(path))
  handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".partial")
  try:
    os.fchmod(handle, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide the file from other users
    with os.fdopen(handle, "wb") as f:
      f.write(data.encode("utf-8") if isinstance(data, str) else data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(temporary, path)
  except BaseException:
    if os.path.exists(temporary):
      os.remove(temporary)
    raise


def atomic_write_json(path, value):
  atomic_write(path, json.dumps(value, indent=1) + "\n")


def check_folder(path, flag, create=True):
  """Stops with a UsageError naming `--flag=path` unless it is (or, with `create`, can become) a folder that this
  process can list and write in. Returns the path."""
  if not path:
    raise errors.UsageError(f"--{flag} is required")
  if os.path.exists(path) and not os.path.isdir(path):
    raise errors.UsageError(f"--{flag}={path} is a file, not a directory")
  try:
    if create:
      os.makedirs(path, exist_ok=True)
    os.listdir(path)
    probe = os.path.join(path, f".write_test_{os.getpid()}")
    with open(probe, "w", encoding="ascii") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise errors.UsageError(f"--{flag}={path} is not usable (it must be readable and writable): "
                            f"{e.strerror or e}") from e
  return path


def check_target(path, flag):
  """Stops with a UsageError naming `--flag=path` unless atomic_folder can write `path`: it is a folder or absent,
  and its parent is (or can become) a folder this process can write in. Returns the path."""
  if not path:
    raise errors.UsageError(f"--{flag} is required")
  if os.path.exists(path) and not os.path.isdir(path):
    raise errors.UsageError(f"--{flag}={path} is a file, not a directory")
  parent = os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryFile(dir=parent):
      pass
  except OSError as e:
    raise errors.UsageError(f"--{flag}={path}: its folder {parent} is not usable (it must be writable, as the new "
                            f"folder is written beside the old one and renamed into place): {e.strerror or e}") from e
  return path


def failure(what, where, error, then=""):
  """The WriteError for a failed write of `what` into `where`, saying what is intact in `then`."""
  return errors.WriteError(f"Could not write {what} to {where}: {errors.tf_error_message(error)}."
                           + (f" {then}" if then else ""))


# atomic_folder's names beside a folder PATH = DIR/NAME: DIR/.NAME.partial-T while it is written, DIR/.NAME.new-T once
# complete, DIR/.NAME.old-T for the folder it replaces while it is moved aside; DIR/.NAME.lock while a process writes.
_PARTIAL, _NEW, _OLD = "partial", "new", "old"


def _beside(path, kind, token):
  folder, name = os.path.split(path)
  return os.path.join(folder, f".{name}.{kind}-{token}")


def _leftovers(path, kind):
  folder, name = os.path.split(path)
  return sorted(glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(name)}.{kind}-*")))


def _token(leftover):
  return leftover.rsplit("-", 1)[1]


def _commit(path, token, owned):
  """Moves the complete DIR/.NAME.new-T into place; every step can be repeated after a kill, so recover_folder
  finishes an interrupted commit with this same function."""
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


def recover_folder(path, owned=None):
  """Cleans up after an atomic_folder of `path` that was killed: a partly written folder is removed, a complete one
  whose move was interrupted is moved into place, and a replaced folder left beside it is removed (or, if PATH is
  missing, put back). Call it only while holding the folder's lock (atomic_folder does)."""
  path = os.path.abspath(path)
  for partial in _leftovers(path, _PARTIAL):
    shutil.rmtree(partial, ignore_errors=True)
  for new in _leftovers(path, _NEW):
    _commit(path, _token(new), owned)
  for old in _leftovers(path, _OLD):
    if os.path.lexists(path):
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(old, path)


class FileLock:
  """An exclusive flock on the file `path`, which names its holder; a second process that tries it stops with a
  UsageError made by `busy(holder)`. The kernel releases it when its process ends, even by kill -9, so a crashed
  writer never leaves it stuck. (flock is per host: on a shared file system, processes on two hosts are not kept
  apart.)"""

  def __init__(self, path, holder, busy):
    self.path = path
    self._file = open(self.path, "a+", encoding="utf-8")  # pylint: disable=consider-using-with
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self._file.seek(0)
      other = self._file.read().strip() or "another process"
      self._file.close()
      raise busy(other) from None
    self._file.seek(0)
    self._file.truncate()
    self._file.write(f"{holder + ' ' if holder else ''}process {os.getpid()} on {socket.gethostname()}\n")
    self._file.flush()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def close(self):
    self._file.close()

  def release(self):
    """Closes and removes the lock file. Removed while still held: a process that opened it meanwhile fails to lock
    it and stops; one that opens it later creates a new lock file."""
    with contextlib.suppress(OSError):
      os.remove(self.path)
    self._file.close()


def folder_lock(folder, flag, holder, then="stop that one first, or choose another"):
  """Keeps a second process off a folder that one program writes (a run directory, prepare's output): FOLDER/.lock,
  naming `holder`; the second one stops with a message naming --flag."""
  return FileLock(os.path.join(folder, LOCK_FILE), holder, lambda other: errors.UsageError(
      f"--{flag}={folder} is in use by {other} (lock {os.path.join(folder, LOCK_FILE)}); {then} --{flag}"))


def _writing_lock(path):
  """atomic_folder's lock while a process writes DIR/NAME: DIR/.NAME.lock."""
  folder, name = os.path.split(path)
  return FileLock(os.path.join(folder, f".{name}.lock"), "", lambda other: errors.UsageError(
      f"{path} is being written by {other} (lock {os.path.join(folder, f'.{name}.lock')}); wait for it to finish"))


@contextlib.contextmanager
def atomic_folder(path, owned=None):
  """Yields an empty folder beside `path` to write a whole folder into; when the block ends without an error, it
  replaces `path`: a kill at any moment leaves the old folder or the new one, each complete (for the instant between
  its two renames, beside the missing `path`, where the next atomic_folder or recover_folder of `path` puts the new
  one). On an error the partial folder is removed and `path` is untouched.

  `owned`: None when the new folder replaces the old one wholly; else the names of entries the new folder owns:
  the old folder's other entries are carried over into it (an owned entry that the new folder lacks is dropped,
  so nothing stale survives)."""
  # Through a symbolic link: the folder is replaced where it lies, and the link stays.
  path = os.path.realpath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  lock = _writing_lock(path)
  try:
    recover_folder(path, owned)
    token = uuid.uuid4().hex[:12]
    partial = _beside(path, _PARTIAL, token)
    os.makedirs(partial)
    try:
      yield partial
      os.rename(partial, _beside(path, _NEW, token))  # now complete
    except BaseException:
      shutil.rmtree(partial, ignore_errors=True)
      raise
    _commit(path, token, owned)
  finally:
    lock.release()


def recover_folders(parent):
  """recover_folder for every folder of `parent` that an atomic_folder left unfinished (a writer killed midway)."""
  targets = set()
  for kind in (_PARTIAL, _NEW, _OLD):
    for leftover in glob.glob(os.path.join(glob.escape(parent), f".*.{kind}-*")):
      name = os.path.basename(leftover)[1:].rsplit(f".{kind}-", 1)[0]
      targets.add(os.path.join(parent, name))
  for target in sorted(targets):
    lock = _writing_lock(target)
    try:
      recover_folder(target)
    finally:
      lock.release()
