"""The errors a program reports as one line, and how a TensorFlow error reads in that line.

Programs (program.py) turn a UsageError into its message and exit code 2: a flag, path or input to fix. A
WriteError becomes exit code 1: a write failed midway (a full disk, a folder made read-only) and what was written
before is intact. Library modules raise them; only the program scaffold catches them.
"""
import re

# Exit codes, one home for what they mean: a write failed midway (what was written before is intact); a flag, path or
# input to fix; a worker of a multi-worker job was lost, so restart the whole job (sysexits.h's EX_TEMPFAIL).
EXIT_WRITE_FAILED = 1
EXIT_USAGE = 2
EXIT_WORKER_LOST = 75


class UsageError(Exception):
  """A flag, path or input that a program cannot use; the message names it."""


class DataError(UsageError):
  """--data (or another image source) names nothing that can be used; the message names the path."""


class WriteError(Exception):
  """A file could not be written; the message names it and what is still intact."""


def tf_error_message(error, limit=300):
  """The first line of an error, without TensorFlow's '{{function_node ...}}' prefix and '[Op:...]' suffix."""
  lines = (getattr(error, "message", None) or str(error)).splitlines()
  if not lines:
    return type(error).__name__
  return re.sub(r"^\{\{function_node [^}]*\}\}\s*|\s*\[Op:\w+\].*$", "", lines[0])[:limit]
