"""Writing files so that a kill or a full disk never leaves a half-written one, and checking folders before work.

Every file a program writes for a user (flags, configs, results, indexes) goes through atomic_write: the bytes go
to a temporary file beside the target, which then replaces it in one rename, so readers see the old file or the new
one, never a truncated one.
"""
import fcntl
import json
import os
import socket
import tempfile

from context_keras import errors

LOCK_FILE = ".lock"


def atomic_write(path, data):
  """Writes `data` (str or bytes) to `path` through a temporary file in the same folder and one rename."""
  folder = os.path.dirname(os.path.abspath(path))
  handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".partial")
  try:
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


def failure(what, where, error, then=""):
  """The WriteError for a failed write of `what` into `where`, saying what is intact in `then`."""
  return errors.WriteError(f"Could not write {what} to {where}: {errors.tf_error_message(error)}."
                           + (f" {then}" if then else ""))


class FolderLock:
  """Keeps a second process off a folder that one program writes: an flock on FOLDER/.lock, which names its holder.
  The kernel releases it when its process ends, even by kill -9, so a crashed run never leaves it stuck. (flock is
  per host: on a shared file system, processes on two hosts are not kept apart.)"""

  def __init__(self, folder, flag, holder, then="stop that one first, or choose another"):
    self.path = os.path.join(folder, LOCK_FILE)
    self._file = open(self.path, "a+", encoding="utf-8")  # pylint: disable=consider-using-with
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self._file.seek(0)
      other = self._file.read().strip() or "another process"
      self._file.close()
      raise errors.UsageError(f"--{flag}={folder} is in use by {other} (lock {self.path}); {then} "
                              f"--{flag}") from None
    self._file.seek(0)
    self._file.truncate()
    self._file.write(f"{holder} process {os.getpid()} on {socket.gethostname()}\n")
    self._file.flush()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def close(self):
    self._file.close()
