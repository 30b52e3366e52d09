"""Program processes that start without importing TensorFlow: each is forked from a server process (one per test
process, multiprocessing's forkserver) that has imported the programs' modules once.

A forked program is a process of its own (its pid, its signals, its exit code, its cwd, environment and file
descriptors 0-2) and runs as `python -m context_keras.PROGRAM ARGS` does: the module run as __main__ by runpy, then
the interpreter's exit (other threads joined, atexit functions). What it skips is the 4-7 s import that every program
process pays here (docs/testing.md, Where the time goes). What it cannot see is what happens at import: TensorFlow's
start-up lines, and the environment read then. So `forkable` sends a command to a fresh interpreter when its
environment differs from the server's where TensorFlow reads it, or when it asks for TensorFlow's own lines (-v).

The server is started from the test process with TensorFlow imported but not started (no op has run: no thread
pools, no devices set up; importing context_keras only lists the physical devices), so forking it is safe.
"""
import atexit
import multiprocessing
import os
import runpy
import subprocess
import sys
import threading
import traceback

import context_keras
from context_keras.cli import commands

# Preloaded: the programs (cli.commands.PROGRAMS), and what they import when they need it where that takes a second
# or more and defines no absl flag (tensorflow_datasets defines one, so it is left to the programs); a module that is
# not installed is passed over.
LATER = ("keras_hub", "keras_hub.src.models.retinanet.feature_pyramid", "tensorboard.plugins.hparams.api", "tf2onnx",
         "matplotlib.figure")
_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload([*(f"context_keras.{name}" for name in commands.PROGRAMS), *LATER])
# Variables that TensorFlow (or Python) reads while it loads, so that a forked process would not see a change of them.
# Variables read later (TF_CONFIG, when the strategy is made) may differ; PYTHONPATH only adds this repository, which
# the test process already imports.
_READ_AT_IMPORT = ("TF_", "TF2_", "KMP_", "OMP_", "MKL", "DNNL_", "ONEDNN_", "CUDA", "LD_", "PYTHON", "KERAS_")
_READ_LATER = frozenset({"TF_CONFIG", "PYTHONPATH"})
_server_env = None


def _matters_at_import(key):
  return key.startswith(_READ_AT_IMPORT) and key not in _READ_LATER


def forkable(args, env):
  """Whether `python -m ARGS` (or `python ARGS` of a script) with environment `env` may run forked from the server:
  ARGS name a module of ours or a script and ask for no TensorFlow log lines, and env agrees with the server's on
  every variable read at import."""
  if (not args or not (args[0].startswith("context_keras.") or args[0].endswith(".py"))
      or context_keras.verbosity(["", *args[1:]]) >= 1):
    return False
  server_env = _server_env if _server_env is not None else os.environ
  keys = {k for k in (*env, *server_env) if _matters_at_import(k)}
  return all(env.get(k) == server_env.get(k) for k in keys)


class Forked:
  """subprocess.Popen's interface (pid, poll, wait, send_signal, terminate, kill, returncode, args) for a forked
  program; its exit code is negative when a signal ended it, as Popen's."""

  def __init__(self, args, cwd, env, stdout, stderr):
    global _server_env
    if _server_env is None:
      _server_env = dict(os.environ)  # what the server inherits when the first start starts it
    self.args = command(args)
    self.returncode = None
    # A daemon: ended, not waited for, if the test process exits first.
    self._process = _CONTEXT.Process(target=_run, args=(list(args), str(cwd), dict(env), stdout, stderr),
                                     name=args[0], daemon=True)
    self._process.start()
    self.pid = self._process.pid

  def poll(self):
    if self.returncode is None and self._process.exitcode is not None:
      self.returncode = self._process.exitcode
    return self.returncode

  def wait(self, timeout=None):
    self._process.join(timeout)
    if self.poll() is None:
      raise subprocess.TimeoutExpired(self.args, timeout)
    return self.returncode

  def send_signal(self, signal_number):
    if self.poll() is None:
      os.kill(self.pid, signal_number)

  def terminate(self):
    self._process.terminate()

  def kill(self):
    self._process.kill()


def command(args):
  """The command line that runs ARGS in a fresh interpreter: `python SCRIPT ...` or `python -m MODULE ...`."""
  return [sys.executable, *args] if args[0].endswith(".py") else [sys.executable, "-m", *args]


def _run(args, cwd, env, stdout, stderr):
  """In the forked process: command(ARGS) in cwd with env, fd 1 appending to the file `stdout` and fd 2 to
  `stderr` (the same file, or None: the null device). Ends the process with the program's exit code."""
  os.chdir(cwd)
  os.environ.clear()
  os.environ.update(env)
  null = os.open(os.devnull, os.O_RDWR)
  out = os.open(stdout, os.O_WRONLY | os.O_APPEND) if stdout else null
  err = out if stderr == stdout else (os.open(stderr, os.O_WRONLY | os.O_APPEND) if stderr else null)
  for source, target in ((null, 0), (out, 1), (err, 2)):
    os.dup2(source, target)
  sys.stdin = open(0, encoding="utf-8", closefd=False)
  sys.stdout = open(1, "w", encoding="utf-8", closefd=False)
  sys.stderr = open(2, "w", encoding="utf-8", closefd=False, buffering=1)
  sys.argv = list(args)
  code = 0
  try:
    if args[0].endswith(".py"):
      runpy.run_path(args[0], run_name="__main__")
    else:
      # As under `python -m`, the program's module runs as __main__ only: the server's copy is set aside.
      sys.modules.pop(args[0], None)
      runpy.run_module(args[0], run_name="__main__", alter_sys=True)
  except SystemExit as e:
    if e.code is None or isinstance(e.code, int):
      code = e.code or 0
    else:
      print(e.code, file=sys.stderr)
      code = 1
  except BaseException:  # pylint: disable=broad-except  # what the interpreter prints of an uncaught exception
    sys.excepthook(*sys.exc_info())
    code = 1
  # The interpreter's exit: other threads joined, then the atexit functions (the program's fd-2 filter, flushes).
  try:
    threading._shutdown()  # pylint: disable=protected-access
    atexit._run_exitfuncs()  # pylint: disable=protected-access
    sys.stdout.flush()
    sys.stderr.flush()
  except BaseException:  # pylint: disable=broad-except
    traceback.print_exc()
  os._exit(code)
