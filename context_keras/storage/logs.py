"""A program's log file (RUN/train.log), appended by every invocation, on a local disk or on a store.

Locally a logging.FileHandler appends each line as it comes. Object stores cannot append: an object is written
whole. There the handler keeps the log's text (the earlier invocations' lines, read at start, and this one's) and
rewrites the object through writes.atomic_write every UPLOAD_SECONDS when lines came, and when it closes; a process
killed hard loses at most the last UPLOAD_SECONDS of lines from the file (they went to stderr too). docs/storage.md.
"""
import logging
import sys
import threading

import tensorflow as tf

from context_keras.storage import paths as paths_lib
from context_keras.storage import writes

UPLOAD_SECONDS = 10.0
FORMAT = "%(asctime)s %(levelname)s %(message)s"


class _Failures:
  """Says once that the log file cannot be written, rather than print a traceback per message; the messages still
  reach stderr, and the run's own writes (summaries, checkpoints) stop it with a clear error."""

  failed = False

  def say(self, path, error):
    if not self.failed:
      self.failed = True
      sys.stderr.write(f"Could not append to {path}: {paths_lib.reason(error)}; messages go to stderr only.\n")


class LocalLogHandler(logging.FileHandler):
  """Appends to a local file."""

  def __init__(self, path):
    super().__init__(path)
    self._failures = _Failures()

  def handleError(self, record):
    self._failures.say(self.baseFilename, sys.exc_info()[1])

  def close(self):
    try:  # closing flushes: on a full disk that fails too, after the run has said why it stopped
      super().close()
    except OSError as e:
      self._failures.say(self.baseFilename, e)


class StoreLogHandler(logging.Handler):
  """Appends to an object on a store by rewriting it whole (module docstring)."""

  def __init__(self, path):
    super().__init__()
    self.path = path
    self._failures = _Failures()
    try:
      earlier = paths_lib.read_bytes(path).decode("utf-8", "replace") if tf.io.gfile.exists(path) else ""
    except tf.errors.OpError as e:
      earlier = ""
      self._failures.say(path, e)
    self._parts = [earlier]
    self._pending = False
    self._guard = threading.Lock()
    self._uploading = threading.Lock()
    self._done = threading.Event()
    self._thread = threading.Thread(target=self._uploads, daemon=True, name="log-upload")
    self._thread.start()

  def emit(self, record):
    try:
      line = self.format(record) + "\n"
    except Exception:  # pylint: disable=broad-except  # a bad format argument: logging's own policy
      self.handleError(record)
      return
    with self._guard:
      self._parts.append(line)
      self._pending = True

  def flush(self):
    """Rewrites the object with every line so far, if lines came since the last time (one rewrite at a time, so
    that an older text never lands after a newer one)."""
    with self._uploading:
      with self._guard:
        if not self._pending:
          return
        text, self._pending = "".join(self._parts), False
        self._parts = [text]
      try:
        writes.atomic_write(self.path, text)
      except (OSError, tf.errors.OpError) as e:
        self._failures.say(self.path, e)

  def _uploads(self):
    while not self._done.wait(UPLOAD_SECONDS):
      self.flush()

  def close(self):
    self._done.set()
    self.flush()
    super().close()


def handler(path):
  """The handler that appends a program's log lines to `path`, formatted with FORMAT."""
  made = LocalLogHandler(path) if paths_lib.is_local(path) else StoreLogHandler(path)
  made.setFormatter(logging.Formatter(FORMAT))
  return made
