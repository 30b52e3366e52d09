"""Keeping a second process off a folder that one program writes (a run directory, prepare's output, an export
being replaced), on a local disk and on a store (docs/storage.md, Locks).

Local paths: an exclusive flock on the lock file, which names its holder. The kernel releases it when its process
ends, even by kill -9, so a crashed writer never leaves it stuck; NFS (v4, or v3 with lockd) carries it to other hosts.

Stores (gs://, s3://, hdfs://, ram://) have no flock and nothing ends with the process: the lock is an object that
names its holder (program, host, process, a token) and the time it was last refreshed. The holder rewrites it every
REFRESH_SECONDS; a lock not refreshed for STALE_SECONDS, or whose holder ran on this host and is gone, is stale
and is taken over with a warning. Without a conditional write in tf.io.gfile, taking it is write, wait
SETTLE_SECONDS, read back: of two processes that write it at once, the one whose token is read back holds it.
"""
import contextlib
import datetime
import fcntl
import json
import os
import signal
import socket
import threading
import time
import uuid

from absl import logging
import tensorflow as tf

from context_keras import errors
from context_keras.storage import paths as paths_lib

LOCK_FILE = ".lock"
REFRESH_SECONDS = 30.0
STALE_SECONDS = 300.0
SETTLE_SECONDS = 1.0


class FileLock:
  """An exclusive flock on the local file `path`, which names its holder; a second process that tries it stops with
  a UsageError made by `busy(holder)`."""

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


def _alive_here(record):
  """Whether the holder named by a lock record is a live process of this host (unknown elsewhere: None)."""
  if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
    return None
  try:
    os.kill(record["pid"], 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, another user's
    return True
  return True


def describe(record):
  """'training process 12 on host-a, refreshed 40 s ago': who holds a lock, as a message names it."""
  if "pid" not in record or "refreshed" not in record:
    return "a process whose lock cannot be read"
  holder = record.get("holder") or ""
  return (f"{holder + ' ' if holder else ''}process {record['pid']} on {record.get('host', '?')}, refreshed "
          f"{max(time.time() - float(record['refreshed']), 0):.0f} s ago")


class StoreLock:
  """A lock object at `path` on a store (module docstring): taken on construction, refreshed by a thread while
  held, removed by release(); a second process stops with the UsageError `busy(description)`."""

  def __init__(self, path, holder, busy):
    self.path = path
    self.record = {"holder": holder, "host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex,
                   "since": datetime.datetime.now().isoformat(timespec="seconds")}
    existing = self._read()
    if existing is not None:
      if not self._stale(existing):
        raise busy(describe(existing))
      logging.warning("Taking over the stale lock %s of %s (a lock is stale when not refreshed for %.0f s, or when "
                      "its process on this host is gone).", path, describe(existing), STALE_SECONDS)
    self._write()
    time.sleep(SETTLE_SECONDS)
    current = self._read()
    if current is None or current.get("token") != self.record["token"]:
      raise busy(describe(current or {"holder": "another process"}))
    self._done = threading.Event()
    self._thread = threading.Thread(target=self._refresh, daemon=True, name="store-lock")
    self._thread.start()

  def _read(self):
    """The lock's record, None when there is none; an unreadable one counts as stale (refreshed at 0)."""
    try:
      with tf.io.gfile.GFile(self.path, "rb") as f:
        text = f.read()
    except tf.errors.NotFoundError:
      return None
    try:
      record = json.loads(text)
      return record if isinstance(record, dict) else {}
    except ValueError:
      return {}

  def _stale(self, record):
    if record.get("token") == self.record["token"]:
      return True
    if _alive_here(record) is False:
      return True
    return time.time() - float(record.get("refreshed", 0)) > STALE_SECONDS

  def _write(self):
    self.record["refreshed"] = time.time()
    paths_lib.write_bytes(self.path, json.dumps(self.record).encode("utf-8"))

  def _refresh(self):
    while not self._done.wait(REFRESH_SECONDS):
      try:
        current = self._read()
        if current is not None and current.get("token") != self.record["token"]:
          logging.error("Lost the lock %s to %s (this process did not refresh it for %.0f s): stopping, as two "
                        "writers would mix their files.", self.path, describe(current), STALE_SECONDS)
          os.kill(os.getpid(), signal.SIGTERM)  # the programs' graceful stop: checkpoint and exit
          return
        self._write()
      except tf.errors.OpError as e:  # a passing store error: the next refresh tries again
        logging.warning("Could not refresh the lock %s: %s", self.path, errors.tf_error_message(e, 200))

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()

  def close(self):
    self.release()

  def release(self):
    """Stops refreshing and removes the lock object if it is still this process's."""
    self._done.set()
    with contextlib.suppress(tf.errors.OpError):
      current = self._read()
      if current is not None and current.get("token") == self.record["token"]:
        tf.io.gfile.remove(self.path)


def lock(path, holder, busy):
  """The lock at `path`: a FileLock on a local path, a StoreLock elsewhere."""
  return (FileLock if paths_lib.is_local(path) else StoreLock)(path, holder, busy)


def folder_lock(folder, flag, holder, then="stop that one first, or choose another"):
  """Keeps a second process off a folder that one program writes (a run directory, prepare's output): FOLDER/.lock,
  naming `holder`; the second one stops with a message naming --flag."""
  path = os.path.join(folder, LOCK_FILE)
  stale = "" if paths_lib.is_local(folder) else f"; a lock not refreshed for {STALE_SECONDS:.0f} s is taken over"
  return lock(path, holder, lambda other: errors.UsageError(
      f"--{flag}={folder} is in use by {other} (lock {path}{stale}); {then} --{flag}"))
