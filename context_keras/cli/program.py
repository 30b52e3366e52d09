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
"""
import contextlib
import logging as std_logging
import math
import os
import sys
import textwrap

from absl import app
from absl import flags
from absl import logging

import context_keras
from context_keras import errors

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


def help_text(program_doc=""):
  """The program's docstring, then each group's flags with their help and defaults."""
  lines = [textwrap.dedent(program_doc or "").strip(), ""] if program_doc else []
  for title, names in _GROUPS.items():
    lines.append(f"{title}:")
    for name in names:
      flag = FLAGS[name]
      default = flag.default_as_str if flag.default is not None else "none"
      body = textwrap.fill(f"{flag.help} (default: {default})", width=116, initial_indent="      ",
                           subsequent_indent="      ")
      lines.extend([f"  --{name}", body])
    lines.append("")
  lines.append("--flagfile=FILE reads flags from FILE (one per line). --helpfull lists absl's own flags too.")
  return "\n".join(lines)


def parse_flags(argv):
  """absl's parsing, except that --help lists our groups, and a mistyped flag or bad value exits 2 (absl: 1)."""
  if any(arg in HELP_FLAGS for arg in argv[1:]):
    print(help_text(sys.modules["__main__"].__doc__))
    sys.exit(0)
  try:
    return FLAGS(argv)
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


def _guarded(main):
  def guarded(argv):
    quiet_library_logs()
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
