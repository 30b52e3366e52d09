"""Runs many command lines of ONE program in one process, each as `python -m context_keras.PROGRAM ARGS` would:
absl's start-up, the scaffold's parsing and checks, the program's run(), its exit code and everything it wrote to
stdout and stderr (captured at the file descriptors, TensorFlow's C++ lines included). A fresh process per command
line costs 4-8 s of importing TensorFlow; here it is paid once per program, or not at all where helpers.run_cases
forks this script from the preloaded server (tests/preloaded.py).

  python tests/program_cases.py PROGRAM REQUEST.json RESULTS.json

REQUEST: {"cases": [[ARG, ...], ...], "flagfiles": [NAME of flags/, ...]}. RESULTS: {"help": {flag: its help},
"flagfiles": {NAME: problem or null}, "cases": [{"argv", "code": exit code, "stdout", "stderr"}, ...]}; each case's
stderr ends with "PEAK_RSS_MB N", the process's peak so far (an upper bound of what that case alone would reach).
"""
import importlib
import json
import os
import sys
import tempfile
import traceback

from absl import app
from absl import flags

from context_keras.cli import data as data_flags
from context_keras.cli import model as model_flags
from context_keras.cli import program
from context_keras.training.resources import peak_rss_mb

FLAGS = flags.FLAGS
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def captured(function):
  """(function's result, what the process wrote to file descriptor 1, and to 2, meanwhile)."""
  sys.stdout.flush()
  sys.stderr.flush()
  saved = os.dup(1), os.dup(2)
  with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
    os.dup2(out.fileno(), 1)
    os.dup2(err.fileno(), 2)
    try:
      result = function()
    finally:
      sys.stdout.flush()
      sys.stderr.flush()
      os.dup2(saved[0], 1)
      os.dup2(saved[1], 2)
      for fd in saved:
        os.close(fd)
    texts = []
    for f in (out, err):
      f.seek(0)
      texts.append(f.read().decode("utf-8", errors="replace"))
  return result, *texts


def run_command_line(name, main, argv):
  """The exit code of `python -m context_keras.NAME ARGV...`. absl's one-time start-up (the help flags, verbosity
  INFO unless given) is redone for each, and every flag is back at its default."""
  FLAGS.unparse_flags()
  app._run_init.done = False  # pylint: disable=protected-access
  app._register_and_parse_flags_with_usage.done = False  # pylint: disable=protected-access
  sys.argv = argv
  try:
    program.run(main)
  except SystemExit as e:
    return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  except BaseException:  # pylint: disable=broad-except  # what the interpreter would print, and its exit code
    traceback.print_exc()
    return 1
  return 0


def flagfile_problem(name, module, flagfile):
  """None if the repository's flags/FLAGFILE uses only the program's flags, with values that parse, keep their
  bounds and make the program's configuration; else what is wrong."""
  ours = program.defined_flags()
  FLAGS.unparse_flags()
  try:
    path = os.path.join(REPO, "flags", flagfile)
    args = FLAGS.read_flags_from_files([f"--flagfile={path}"], force_gnu=False)
    if not args:
      return "no flags"
    for arg in args:
      flag = arg[2:].split("=")[0]
      flag = flag[2:] if flag not in ours and flag.startswith("no") else flag
      if flag not in ours:
        return f"unknown flag {arg} for {name}"
    FLAGS([name, f"--flagfile={path}"])
    program.check_bounds()
    if name == "train":
      model_flags.model_config(data_flags.input_config(0).num_classes)
    elif name == "linear_eval":
      module.job_config()
    elif name == "detect":
      module.detector_config()
  except Exception as e:  # pylint: disable=broad-except  # reported to the test
    return f"{type(e).__name__}: {e}"
  return None


def main(name, request_path, results_path):
  # The filter process on fd 2 is a whole program's plumbing (test_faults checks it in real processes): here it would
  # start once per case and pass a case's last lines on after captured() has read them.
  program.hold_back_native_lines = lambda: None
  request = json.loads(open(request_path, encoding="utf-8").read())
  module = importlib.import_module(f"context_keras.{name}")
  sys.modules["__main__"].__doc__ = module.__doc__  # what --help prints first
  module.define_flags()
  entry = getattr(module, "run", None) or module.main
  results = {"help": {flag: FLAGS[flag].help for flag in program.defined_flags()},
             "flagfiles": {f: flagfile_problem(name, module, f) for f in request.get("flagfiles", [])}, "cases": []}
  for argv in request.get("cases", []):
    code, out, err = captured(lambda argv=argv: run_command_line(name, entry, [f"context_keras.{name}", *argv]))
    results["cases"].append({"argv": argv, "code": code, "stdout": out,
                             "stderr": f"{err}PEAK_RSS_MB {int(peak_rss_mb())}\n"})
  with open(results_path, "w", encoding="utf-8") as f:
    json.dump(results, f)


if __name__ == "__main__":
  main(*sys.argv[1:])
