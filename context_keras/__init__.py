"""context_keras: self-supervised learning by context prediction (Doersch, Gupta & Efros, ICCV 2015) in TF2/Keras 3.

Importing the package imports TensorFlow without its start-up banners (quiet_tensorflow), so that every program's
output holds its own lines; `-v 1` (or TF_CPP_MIN_LOG_LEVEL=0 or 1) shows them, with TensorFlow's other log lines.
"""
import os
import re
import sys
import tempfile

# The one home of the package's version: setup.py reads this line without importing the package (which imports
# TensorFlow), CITATION.cff repeats it, and tests/test_structure.py checks that the three agree.
__version__ = "0.2.0"

# TensorFlow's C++ INFO and WARNING lines (CUDA probing on CPU hosts, libpng's colour-profile notes on every
# sample photo) drown the training log; errors still show. TF_CPP_MIN_LOG_LEVEL=0 brings them back.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Lines TensorFlow's libraries print while they load and probe for CUDA, before absl::InitializeLog() has run, so
# that TF_CPP_MIN_LOG_LEVEL cannot hold them back: they go to file descriptor 2 whatever it says.
BANNERS = re.compile(r"All log messages before absl::InitializeLog\(\) is called|cudart_stub\.cc|"
                     r"cuda_platform\.cc:\d+\] failed call to cuInit|cpu_feature_guard\.cc|"
                     r"^To enable the following instructions|oneDNN custom operations are on|"
                     r"Unable to register cu(DNN|FFT|BLAS) factory|TF-TRT Warning|"
                     r"computation placer already registered|cuda_(dnn|fft|blas)\.cc")


def verbosity(argv):
  """The -v / --verbosity that absl will parse from argv (0 when not given or not a number)."""
  for i, arg in enumerate(argv[1:], 1):
    name, sep, value = arg.partition("=")
    if name in ("-v", "--v", "-verbosity", "--verbosity"):
      value = value if sep else (argv[i + 1] if i + 1 < len(argv) else "")
      try:
        return int(value)
      except ValueError:
        return 0
  return 0


def shows_tensorflow_logs(argv=None):
  """Whether TensorFlow's own log lines are wanted: -v 1 or more, or TF_CPP_MIN_LOG_LEVEL below 2."""
  level = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")
  return verbosity(sys.argv if argv is None else argv) >= 1 or (level.isdigit() and int(level) < 2)


def quiet_tensorflow():
  """Imports TensorFlow and probes its devices (where CUDA prints) with file descriptor 2 sent to a temporary
  file, then writes back every captured line that is not a known banner: real errors still show."""
  if shows_tensorflow_logs():
    import tensorflow  # noqa: F401  # pylint: disable=import-outside-toplevel,unused-import
    return
  try:
    sys.stderr.flush()
    saved = os.dup(2)
  except (OSError, ValueError):  # no file descriptor 2 to borrow
    import tensorflow  # noqa: F401  # pylint: disable=import-outside-toplevel,unused-import,redefined-outer-name
    return
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      import tensorflow as tf  # pylint: disable=import-outside-toplevel
      tf.config.list_physical_devices()
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      lines = captured.read().decode("utf-8", "replace").splitlines(keepends=True)
      sys.stderr.write("".join(line for line in lines if not BANNERS.search(line)))
      sys.stderr.flush()


quiet_tensorflow()
