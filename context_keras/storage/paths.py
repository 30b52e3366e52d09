"""User paths on any file system TensorFlow reaches: a local path, or a URL (gs://, s3://, hdfs://, ram://).

One home for what a path means before anything reads or writes it (docs/storage.md):
- normalise(): a local path made absolute with `..` and `.` resolved (lexically, as `cd` does); a URL keeps its
  scheme and has only its `..`, `.` and doubled slashes resolved. os.path.normpath and abspath would turn
  `gs://bucket/run` into a local folder `gs:/bucket/run`, which is why nothing else in the package calls them on a
  user path. A check and the write it guards then look at the same folder.
- resolve(): a path as a user may give it for reading: `~`, and `flags/NAME`, the flagfiles and lists that ship
  with context_keras, found in the working directory first, else in the installed package (docs/storage.md).
- files_under(): the image files of a folder, recursively, in one listing per folder.
- listdir, walk, glob, identity, read_bytes, write_bytes: tf.io.gfile's, with what differs between stores absorbed
  (a trailing '/' on sub-folders, hidden temporary names, ram://'s quirks: docs/storage.md).
"""
import contextlib
import os
import posixpath
import re
import uuid

import tensorflow as tf

# A URL's scheme, as TensorFlow's file systems register them (gs, s3, hdfs, ram, file ...).
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
FILE_SCHEME = "file://"
# The repository's folders that ship inside the package (setup.py maps context_keras/flags to flags/).
SHIPPED = ("flags", "benchmarks")
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def is_url(path):
  """Whether `path` names a file system by a scheme (gs://, s3://, hdfs://, ram://); file:// is local."""
  match = _SCHEME.match(str(path))
  return bool(match) and match.group(1).lower() != "file"


def is_local(path):
  return not is_url(path)


def normalise(path):
  """The absolute form of a local path (`..` resolved lexically), or a URL with its path part tidied; empty stays
  empty. Every user path goes through this before its checks (docs/storage.md)."""
  if not path:
    return path
  path = str(path)
  if path.startswith(FILE_SCHEME):
    path = path[len(FILE_SCHEME):] or "/"
  if is_local(path):
    return os.path.abspath(os.path.expanduser(path))
  scheme = _SCHEME.match(path).group(0)
  rest = path[len(scheme):]
  tidied = posixpath.normpath("/" + rest).lstrip("/") if rest else ""
  if rest.startswith(".."):
    tidied = rest  # nothing above the bucket: left for the file system to refuse
  return scheme + tidied


def parent(path):
  """The folder that holds `path` (normalised): os.path.dirname without mangling a URL's `//`."""
  path = normalise(path)
  if is_local(path):
    return os.path.dirname(path)
  scheme = _SCHEME.match(path).group(0)
  head = posixpath.dirname(path[len(scheme):])
  return scheme + head


def split(path):
  """(parent(path), the last name of path): os.path.split without turning `ram://out` into ('ram:', 'out')."""
  path = normalise(path)
  return parent(path), posixpath.basename(path.rstrip("/"))


def same(a, b):
  """Whether two user paths name the same file or folder (after normalise)."""
  return normalise(a) == normalise(b)


def relative(path, root):
  """`path` relative to the folder `root` that holds it (both normalised)."""
  path, root = normalise(path), normalise(root)
  if is_local(path):
    return os.path.relpath(path, root)
  prefix = root.rstrip("/") + "/"
  return path[len(prefix):] if path.startswith(prefix) else path


def common_folder(paths):
  """The deepest folder that holds every one of `paths` (normalised); a single path's own folder. A file that is
  also a prefix of the others is not a folder: its folder is taken."""
  paths = [normalise(p) for p in paths]
  if all(is_local(p) for p in paths):
    root = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
  else:
    parts = [p.split("/") for p in paths]
    common = []
    for pieces in zip(*parts):
      if len(set(pieces)) > 1:
        break
      common.append(pieces[0])
    root = "/".join(common) if len(paths) > 1 else parent(paths[0])
    root += "/" if root.endswith(":/") else ""  # paths in different buckets: the scheme alone
  return parent(root) if root in paths else root


# --------------------------------------------------------------------------------------------------------------
# Files shipped with the package


def shipped(relative_path):
  """The shipped copy of a repository file (`flags/demo.cfg`, `benchmarks/torch_baseline.py`): inside the installed
  package (context_keras/flags/...), or in a source checkout beside the package; None when there is none. (The
  package's own files are local by construction, so os.path serves.)"""
  parts = relative_path.replace("\\", "/").split("/")
  if parts[0] not in SHIPPED or ".." in parts:
    return None
  roots = [_PACKAGE]
  if os.path.exists(os.path.join(os.path.dirname(_PACKAGE), "setup.py")):  # a source checkout
    roots.append(os.path.dirname(_PACKAGE))
  for root in roots:
    candidate = os.path.join(root, *parts)
    if os.path.exists(candidate):
      return candidate
  return None


def shipped_names(folder="flags"):
  """The file names in a shipped folder (the flagfiles a user can name as flags/NAME)."""
  found = shipped(folder)
  return sorted(os.listdir(found)) if found and os.path.isdir(found) else []


def resolve(path):
  """A path as given for reading, with `~` expanded; `flags/NAME` (a relative path in flags/) that does not exist
  in the working directory is the copy shipped with context_keras, so that the README's commands work from any
  folder once the package is installed."""
  if not path or is_url(path):
    return path
  path = os.path.expanduser(path)
  if not os.path.isabs(path) and not tf.io.gfile.exists(path):
    return shipped(path) or path
  return path


# --------------------------------------------------------------------------------------------------------------
# Listing


def _listing(folder):
  """(name, whether the store marked it as a folder) of each entry of a folder. Object stores list sub-folders
  with a trailing '/'. ram:// also lists, under a folder `a/b`, the entries of every name that starts with it
  (`a/b.c`): those that are not in the folder are dropped."""
  entries = [(entry.rstrip("/"), entry.endswith("/")) for entry in tf.io.gfile.listdir(folder)]
  if str(folder).startswith("ram://"):
    entries = [(name, marked) for name, marked in entries if tf.io.gfile.exists(os.path.join(folder, name))]
  return [(name, marked) for name, marked in entries if name]


def listdir(folder):
  """The names in a folder, through tf.io.gfile (_listing)."""
  return [name for name, _ in _listing(folder)]


def walk(top):
  """(folder, sub-folder names, file names) of `top` and every folder below it, top first, as tf.io.gfile.walk
  but listed by listdir (above)."""
  pending = [top]
  while pending:
    folder = pending.pop(0)
    subfolders, files = [], []
    for name in listdir(folder):
      (subfolders if tf.io.gfile.isdir(os.path.join(folder, name)) else files).append(name)
    yield folder, subfolders, files
    pending[:0] = [os.path.join(folder, name) for name in subfolders]


def files_under(folder, suffixes):
  """Files under `folder`, recursively, whose names end (case-insensitively) with one of `suffixes`, sorted.

  Local folders: os.walk, following symlinked folders once (no loops). Elsewhere: one listing per folder; an entry
  named like a wanted file is taken as a file without asking (on an object store every question is a request, and
  ImageNet has 1.28 million files), an entry ending in '/' as a folder, and only the others are asked about."""
  if is_local(folder):
    return _local_files_under(folder, suffixes)
  found, pending = [], [folder.rstrip("/")]
  while pending:
    current = pending.pop()
    for name, marked in _listing(current):
      if name.startswith("."):  # hidden names: temporary files of writers (writes.py)
        continue
      path = f"{current}/{name}"
      if marked:
        pending.append(path)
      elif name.lower().endswith(suffixes):
        found.append(path)
      elif tf.io.gfile.isdir(path):
        pending.append(path)
  return sorted(found)


def _local_files_under(folder, suffixes):
  found, seen = [], set()
  for root, dirs, files in os.walk(folder, followlinks=True):
    real = os.path.realpath(root)
    if real in seen:
      dirs[:] = []
      continue
    seen.add(real)
    dirs.sort()
    found.extend(os.path.join(root, f) for f in files if f.lower().endswith(suffixes))
  return sorted(found)


def glob(pattern):
  """The paths matching a glob pattern, sorted, through tf.io.gfile (any file system), without hidden names (as
  Python's glob: writers' temporary files start with '.'); [] when its folder does not exist."""
  try:
    matches = tf.io.gfile.glob(pattern)
  except tf.errors.NotFoundError:
    return []
  return sorted(m for m in matches if not posixpath.basename(m.rstrip("/")).startswith("."))


def is_file(path):
  """Whether `path` exists and is not a folder."""
  return tf.io.gfile.exists(path) and not tf.io.gfile.isdir(path)


def identity(path):
  """What changes when a file is created anew or touched, or None when there is none: locally its inode and
  modification time in nanoseconds (tf.io.gfile's stat has whole seconds), elsewhere its modification time and
  size."""
  if is_local(path):
    try:
      stat = os.stat(path)
    except OSError:
      return None
    return stat.st_ino, stat.st_mtime_ns
  try:
    stat = tf.io.gfile.stat(path)
  except tf.errors.OpError:
    return None
  return stat.mtime_nsec, stat.length


def size(path):
  """The size of a file in bytes."""
  return tf.io.gfile.stat(path).length


def read_bytes(path):
  """The contents of a file (tf.errors.NotFoundError, PermissionDeniedError ... when it cannot be read)."""
  with tf.io.gfile.GFile(path, "rb") as f:
    return f.read()


def read_text(path, encoding="utf-8", errors="strict"):
  return read_bytes(path).decode(encoding, errors)


def write_bytes(path, data):
  """Writes a whole file through tf.io.gfile: under a hidden temporary name beside it, then renamed over it. On an
  object store the rename is a copy, whose object appears only once whole; and ram:// appends to a file that is
  opened again for writing instead of replacing it. (writes.atomic_write adds fsync for local files.)"""
  folder, name = split(path)
  temporary = os.path.join(folder, f".{name}.writing-{uuid.uuid4().hex[:12]}")
  try:
    with tf.io.gfile.GFile(temporary, "wb") as f:
      f.write(data)
    tf.io.gfile.rename(temporary, path, overwrite=True)
  except BaseException:
    with contextlib.suppress(tf.errors.OpError):
      if tf.io.gfile.exists(temporary):
        tf.io.gfile.remove(temporary)
    raise


def reason(error):
  """Why a file operation failed, in a few words: an OSError's strerror, or the part of a TensorFlow error message
  after its path ('/a/b; Permission denied' -> 'Permission denied')."""
  if isinstance(error, OSError):
    return error.strerror or str(error)
  message = getattr(error, "message", None) or str(error) or type(error).__name__
  return message.rsplit("; ", 1)[-1] if "; " in message else message
