"""The scaffold every program (train, prepare, export, evaluate, benchmark, service) shares.

  if __name__ == "__main__":
    program.run(main, define_flags)

- Flags are defined in groups (`with program.flag_group("data"): ...`), by the program itself or by the shared
  groups of context_keras.flagsets, so that `--help` lists exactly the flags the program defined, under their group.
- A numeric flag's bounds are declared with its definition (define_integer / define_float), and a check that
  involves several flags is registered beside them (define_check); all are checked in one place after parsing and
  every violation is reported at once, "Invalid flags: --x=v must be >= 0; ...". A float must also be finite, an
  integer at most MAX_INTEGER (TensorFlow counts steps and sizes in int32 in places).
- A mistyped flag, a bad value, a violated bound or a errors.UsageError raised by the program: one line, exit 2, no
  traceback. errors.WriteError: one line, exit 1.
- At the default verbosity the output holds our own lines, warnings and errors: library chatter is dropped and what
  C++ libraries print that is no news is held back (quiet_library_logs, hold_back_native_lines; docs/method.md §4.2).
- --flagfile=FILE is read through tf.io.gfile (a flagfile may be on a store), and FILE = flags/NAME that the working
  directory does not hold is the flagfile shipped with the package (expand_flagfiles; docs/storage.md).
"""
import atexit
import contextlib
import logging as std_logging
import math
import os
import subprocess
import sys
import textwrap

from absl import app
from absl import flags
from absl import logging
import tensorflow as tf

import context_keras
from context_keras import errors
from context_keras.input import decoding
from context_keras.storage import paths as paths_lib

FLAGS = flags.FLAGS

HELP_FLAGS = ("--help", "-help", "-h", "--helpshort", "-helpshort", "-?")

MAX_INTEGER = 2**31 - 1
PACKAGE_DIR = os.path.dirname(os.path.abspath(context_keras.__file__)) + os.sep

_GROUPS = {}   # group title -> names of the flags defined in it, in order
_BOUNDS = {}   # flag name -> [(holds(value), "must be ...")]
_CHECKS = []   # callables of no argument returning a problem ("--a=x ...") or None


@contextlib.contextmanager
def flag_group(title):
  """Records the flags defined inside the block as the group `title` of --help."""
  before = set(FLAGS)
  yield
  names = _GROUPS.setdefault(title, [])
  names.extend(name for name in FLAGS if name not in before and len(name) > 1 and name not in names
               and FLAGS[name].name == name)


def _caller_module():
  return sys._getframe(2).f_globals.get("__name__", "__main__")  # pylint: disable=protected-access


def _bounded(name, lower=None, upper=None, above=None, below=None):
  checks = []
  if lower is not None:
    checks.append((lambda v, b=lower: v >= b, f"must be >= {lower}"))
  if upper is not None:
    checks.append((lambda v, b=upper: v <= b, f"must be <= {upper}"))
  if above is not None:
    checks.append((lambda v, b=above: v > b, f"must be > {above}"))
  if below is not None:
    checks.append((lambda v, b=below: v < b, f"must be < {below}"))
  _BOUNDS[name] = checks


def define_integer(name, default, help_text, lower=None, upper=None):
  """An integer flag whose bounds (inclusive; upper at most MAX_INTEGER) are checked by check_bounds."""
  flags.DEFINE_integer(name, default, help_text, module_name=_caller_module())
  _bounded(name, lower=lower, upper=MAX_INTEGER if upper is None else min(upper, MAX_INTEGER))


def define_float(name, default, help_text, lower=None, upper=None, above=None, below=None):
  """A finite float flag whose bounds (lower/upper inclusive, above/below exclusive) are checked by check_bounds."""
  flags.DEFINE_float(name, default, help_text, module_name=_caller_module())
  _bounded(name, lower=lower, upper=upper, above=above, below=below)
  _BOUNDS[name].insert(0, (math.isfinite, "must be a finite number"))


def define_check(check):
  """Registers a check that involves several flags: `check()` returns the problem ('--a=x needs --b ...') or None.
  Defined with the flags it reads, run by check_bounds with the bounds."""
  _CHECKS.append(check)
  return check


def bound_problems():
  """'--name=value must be ...' for every defined flag whose value breaks its declared bounds (the first broken
  bound of each), then the problems of the registered checks whose flags are all valid."""
  problems, broken = [], set()
  for name, checks in _BOUNDS.items():
    if name not in FLAGS or FLAGS[name].value is None:
      continue
    value = FLAGS[name].value
    failed = next((message for holds, message in checks if not holds(value)), None)
    if failed:
      problems.append(f"--{name}={value} {failed}")
      broken.add(name)
  if not broken:
    problems.extend(problem for problem in (check() for check in _CHECKS) if problem)
  return problems


def check_bounds():
  problems = bound_problems()
  if problems:
    raise errors.UsageError("Invalid flags: " + "; ".join(problems))


# --help prints a flag's help indented under its name, in lines of at most this many characters; a help is at most
# MAX_HELP_LINES of them, its details in docs/flags.md (tests/test_flags.py holds every flag to it).
HELP_WIDTH = 110
HELP_INDENT = "      "
MAX_HELP_LINES = 2


def help_lines(text):
  """`text` as --help prints it: whitespace collapsed, in lines of HELP_WIDTH (a path or link is never split)."""
  return textwrap.wrap(" ".join(text.split()), width=HELP_WIDTH, break_on_hyphens=False, break_long_words=False)


def help_text(program_doc=""):
  """The program's docstring, then each group's flags with their help and defaults."""
  lines = [textwrap.dedent(program_doc or "").strip(), ""] if program_doc else []
  for title, names in _GROUPS.items():
    lines.append(f"{title}:")
    for name in names:
      flag = FLAGS[name]
      default = flag.default_as_str if flag.default is not None else "none"
      lines.append(f"  --{name}")
      lines.extend(HELP_INDENT + line for line in help_lines(f"{flag.help} (default: {default})"))
    lines.append("")
  lines.append("--flagfile=FILE reads flags from FILE (one per line; flags/NAME is the flagfile shipped with the "
               "package when the working directory has none: docs/storage.md). --helpfull lists absl's own flags too.")
  return "\n".join(lines)


FLAGFILE_FLAGS = ("--flagfile", "-flagfile")


def expand_flagfiles(args, within=()):
  """`args` with every --flagfile=FILE (or --flagfile FILE) replaced by FILE's flags, recursively, as absl's own
  reading does (blank lines and lines starting with # or // skipped), except that FILE is read through tf.io.gfile
  and found by paths.resolve: flags/NAME that is not in the working directory is the shipped copy, so that a
  flagfile naming another (ablation_demo.cfg: --flagfile=flags/demo.cfg) works from any folder. absl reads only
  local files relative to the working directory, hence this. `within`: the flagfiles being read (loops)."""
  expanded, rest = [], list(args)
  while rest:
    arg = rest.pop(0)
    name, sep, value = arg.partition("=")
    if name not in FLAGFILE_FLAGS:
      expanded.append(arg)
      if arg == "--":
        return expanded + rest
      continue
    if not sep:
      if not rest:
        raise flags.IllegalFlagValueError("--flagfile with no argument")
      value = rest.pop(0)
    expanded.extend(_flagfile_lines(value.strip(), within))
  return expanded


def _flagfile_lines(name, within):
  path = paths_lib.resolve(name)
  if path in within:
    sys.stderr.write(f"Warning: --flagfile={name} includes itself (through {' -> '.join(within)}); not read again.\n")
    return []
  try:
    text = paths_lib.read_text(path)
  except (tf.errors.OpError, UnicodeDecodeError) as e:
    shipped = ", ".join(f"flags/{n}" for n in paths_lib.shipped_names() if n.endswith(".cfg"))
    raise flags.CantOpenFlagFileError(f"--flagfile={name}: cannot read it ({paths_lib.reason(e)}); the flagfiles "
                                      f"shipped with context_keras: {shipped or 'none found'}") from e
  lines = []
  for line in text.splitlines():
    line = line.strip()
    if not line or line.startswith(("#", "//")):
      continue
    flag, sep, value = line.partition("=")
    if flag in FLAGFILE_FLAGS and sep:
      lines.extend(_flagfile_lines(value.strip(), within + (path,)))
    else:
      lines.append(line)
  return lines


def parse_flags(argv):
  """absl's parsing, except that --help lists our groups, a mistyped flag or bad value exits 2 (absl: 1), and
  flagfiles are read by expand_flagfiles."""
  if any(arg in HELP_FLAGS for arg in argv[1:]):
    try:
      print(help_text(sys.modules["__main__"].__doc__), flush=True)
    except BrokenPipeError:  # --help | head: the reader left; nothing more to say (Python's signal docs)
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(0)
  try:
    return FLAGS([argv[0]] + expand_flagfiles(argv[1:]))
  except flags.Error as e:
    sys.stderr.write(f"FATAL Flags parsing error: {e}\nPass --help to see the flags.\n")
    sys.exit(errors.EXIT_USAGE)


class _OwnLines(std_logging.Filter):
  """Keeps the package's own log records, and warnings and errors from anywhere."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or record.pathname.startswith(PACKAGE_DIR)


def quiet_library_logs():
  """At the default verbosity, the log (stderr and RUN/train.log) holds our own lines: TensorFlow's and Keras's
  INFO chatter (checkpoint sharding durations, SavedModel input renaming, fingerprints, collective all-reduce
  set-ups) is dropped; their warnings stay. -v 1 shows everything."""
  if FLAGS.verbosity >= 1 or context_keras.shows_tensorflow_logs():
    return
  logging.get_absl_logger().addFilter(_OwnLines())
  std_logging.getLogger("tensorflow").setLevel(std_logging.WARNING)


# The filter of hold_back_native_lines: a separate interpreter (-I -S: no site, no environment, no TensorFlow), so
# that it outlives a program that crashes and still passes on its last lines (a fatal CHECK, a traceback). It reads
# the program's file descriptor 2 line by line, drops the lines that match argv[1], says argv[2] in their place the
# first time, and passes everything else on at once (a partial line after a pause of 0.2 s).
_FILTER = r"""
import os, re, select, sys
held, note = re.compile(sys.argv[1].encode()), sys.argv[2].encode() + b"\n"
pending = b""
while True:
  if pending and not select.select([0], [], [], 0.2)[0]:
    os.write(1, pending)
    pending = b""
  chunk = os.read(0, 65536)
  if not chunk:
    break
  *lines, pending = (pending + chunk).split(b"\n")
  out = []
  for line in lines:
    if not held.search(line):
      out.append(line + b"\n")
    elif note:
      out.append(note)
      note = b""
  os.write(1, b"".join(out))
os.write(1, pending)
"""
HELD_BACK_NOTE = ("context_keras: corrupt JPEG data met: such images are skipped and counted as unreadable; "
                  "libjpeg's own messages are held back (-v 1 shows them)")


def hold_back_native_lines():
  """At the default verbosity, sends file descriptor 2 through a filter process for the rest of the program, which
  holds back what C++ libraries print there that is no news: a corrupt JPEG makes libjpeg print raw lines
  ("Corrupt JPEG data: ...", "Improper call to JPEG library in state 203") from the input pipeline's threads while
  the pipeline skips and counts the image (decoding.DECODER_MESSAGES), and TensorFlow's late start-up banners
  (context_keras.BANNERS). Python's own output goes the same way, so the order of the lines is kept. The first held
  line is replaced by HELD_BACK_NOTE. -v 1 (or TF_CPP_MIN_LOG_LEVEL < 2) shows everything (docs/method.md §4.2).

  Filtering the stream is the one way that holds for every corrupt stream: which JPEG libjpeg will complain about
  is known only by decoding it, and it writes with fprintf from the decoding thread, past Python and TensorFlow's
  logging."""
  if FLAGS.verbosity >= 1 or context_keras.shows_tensorflow_logs() or not sys.executable:
    return
  held = f"{decoding.DECODER_MESSAGES.pattern}|{context_keras.BANNERS.pattern}"
  try:
    sys.stderr.flush()
    original = os.dup(2)
  except (OSError, ValueError):  # no file descriptor 2 to filter
    return
  read, write = os.pipe()
  try:
    # A session of its own: Ctrl-C stops the program, whose exit then ends the filter (end of its input).
    filtering = subprocess.Popen([sys.executable, "-I", "-S", "-c", _FILTER, held, HELD_BACK_NOTE], stdin=read,
                                 stdout=original, stderr=original, start_new_session=True)
  except OSError:
    for fd in (read, write, original):
      os.close(fd)
    return
  os.close(read)
  os.dup2(write, 2)
  os.close(write)

  def restore():
    """At exit, fd 2 back to the original, and the filter's last lines out before the program ends (it reads to the
    end of its input: no copy of the pipe is left unless a child of ours still runs)."""
    try:
      sys.stderr.flush()
    except (OSError, ValueError):
      pass
    os.dup2(original, 2)
    os.close(original)
    try:
      filtering.wait(timeout=2)
    except subprocess.TimeoutExpired:
      pass

  atexit.register(restore)


def _guarded(main):
  def guarded(argv):
    quiet_library_logs()
    hold_back_native_lines()
    try:
      if len(argv) > 1:
        raise errors.UsageError(f"Unexpected arguments: {' '.join(argv[1:])} (flags are written --name=value)")
      check_bounds()
      code = main()
    except errors.UsageError as e:
      logging.error("%s", e)
      sys.exit(errors.EXIT_USAGE)
    except errors.WriteError as e:
      logging.error("%s", e)
      sys.exit(errors.EXIT_WRITE_FAILED)
    except tf.errors.UnimplementedError as e:
      if not errors.tf_error_message(e).startswith("File system scheme"):
        raise
      # A path of a store that this TensorFlow cannot reach, wherever it was first touched (docs/storage.md).
      logging.error("%s: TensorFlow has no file system for it here (gs:// is built in; s3://, hdfs:// and others "
                    "come with tensorflow-io's file systems; docs/storage.md)", errors.tf_error_message(e))
      sys.exit(errors.EXIT_USAGE)
    sys.exit(code or 0)
  return guarded


def run(main, define_flags=None):
  """Defines the program's flags, parses them and calls main() (no arguments; it returns an exit code or None)."""
  if define_flags:
    define_flags()
  app.run(_guarded(main), flags_parser=parse_flags)


def defined_flags():
  """{name: absl Flag} of every flag defined in a group of this program, in group order."""
  return {name: FLAGS[name] for names in _GROUPS.values() for name in names}
