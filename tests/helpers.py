"""What the tests share that is not a fixture: running the programs in subprocesses and reading what they leave.

Fixtures (photos, the one small trained run, its export, an ordinary user) are in conftest.py.
"""
import contextlib
import ctypes
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import preloaded
import tensorflow as tf

from context_keras.deploy import serving
from context_keras.model import networks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A network of 1/16 the original width with small batches: a training step takes a fraction of a second here.
SMALL_MODEL = ["--width_multiplier=0.0625", "--batch_patches=64", "--batch_pairs=320"]
# A deterministic float32 demo run of the small network: 12 steps, a progress line and loss summary every step,
# checkpoints at 6 and 12 (the run test_pinned pins; conftest's deterministic_run). Run from the repository root.
DETERMINISTIC = ["context_keras.train", f"--flagfile={REPO}/flags/demo.cfg", "--deterministic",
                 "--mixed_precision=none", *SMALL_MODEL, "--train_steps=12", "--log_every=1", "--steps_per_loop=4",
                 "--checkpoint_every=6", "--image_summary_every=6", "--histogram_every=6"]
# Keras 3 names checkpoint entries by the optimizer's variable lists; the first trainable variable is conv1's kernel.
CONV1_KERNEL = "optimizer/_trainable_variables/0/.ATTRIBUTES/VARIABLE_VALUE"


INFORMATIVE_LAYERS = networks.BACKBONES["alexnet_bn"].features


class Informative(tf.Module):
  """A stand-in backbone: conv1 is the image's brightness on a 4x4 grid (it separates dark from bright images);
  every other layer is the same constant for every image (it separates nothing)."""

  @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
  def features(self, images):
    count = tf.shape(images)[0]
    brightness = tf.image.resize(tf.cast(images, tf.float32) / 255.0, [4, 4])
    constant = tf.ones([count, 2, 2, 8])
    return {name: brightness if name == "conv1" else constant for name in INFORMATIVE_LAYERS}


def save_informative(path):
  """Informative saved as an exported backbone (OUT/backbone) at `path`, with the metadata of an AlexNet-BN run."""
  tf.saved_model.save(Informative(), str(path))
  serving.write_metadata(str(path), serving.metadata(networks.ModelConfig(), "drop", step=0))
  return path
@contextlib.contextmanager
def made_once(tmp_path_factory, name):
  """For a product that every xdist worker's tests share (a trained run, an export): yields (FOLDER, whether to make
  it now). The first worker to ask makes it while the others wait, and they all use it; made once per session, not
  once per worker."""
  # Under xdist each worker's base folder lies in the session's; without it the session's is the base folder.
  root = tmp_path_factory.getbasetemp()
  root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root
  folder, done = root / name, root / f"{name}.done"
  with open(root / f"{name}.lock", "w", encoding="utf-8") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not done.exists():
      shutil.rmtree(folder, ignore_errors=True)  # what a worker that failed to make it left
      folder.mkdir()
      yield folder, True
      done.write_text("")
    else:
      yield folder, False


def skimage_photo_dir():
  import skimage.data  # pylint: disable=import-outside-toplevel  (test extra)
  return os.path.dirname(skimage.data.__file__)


def write_png(path, array):
  tf.io.write_file(str(path), tf.io.encode_png(array))


def demo_args(model_dir, *extra):
  """`python -m` arguments of a short demo training run of the small model."""
  return ["context_keras.train", f"--flagfile={REPO}/flags/demo.cfg", f"--data={REPO}/flags/demo_photos.txt",
          f"--model_dir={model_dir}", *SMALL_MODEL, "--log_every=5", "--steps_per_loop=5", *extra]


def module_env(extra=None):
  return dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), TF_CPP_MIN_LOG_LEVEL="2",
              **(extra or {}))


def python_module(args, cwd, stdout, stderr=subprocess.STDOUT, env=None, preexec=None, real=False):
  """`python -m ARGS` (`python ARGS` if ARGS[0] is a script) in the background, its stdout into the file at path
  `stdout` and its stderr into `stderr` (a path, or subprocess.STDOUT: the same file); returns its Popen. Forked
  from the preloaded server (tests/preloaded.py) unless `real`, a preexec function or what preloaded.forkable checks
  asks for a fresh interpreter. env: the whole environment (module_env's by default)."""
  env = module_env() if env is None else env
  err = stdout if stderr == subprocess.STDOUT else stderr
  if not real and preexec is None and preloaded.forkable(args, env):
    for path in {str(stdout), str(err)}:
      open(path, "a", encoding="utf-8").close()
    return preloaded.Forked(args, cwd, env, str(stdout), str(err))
  with open(stdout, "a", encoding="utf-8") as out, open(err, "a", encoding="utf-8") as error:
    return subprocess.Popen(preloaded.command(args), cwd=cwd, env=env, stdout=out,
                            stderr=subprocess.STDOUT if stderr == subprocess.STDOUT else error, preexec_fn=preexec)


def run_module(args, cwd, timeout=600, env=None, real=False, preexec=None):
  """Runs `python -m ...` (python_module) with this repository importable; returns the CompletedProcess. env: variables
  to add to module_env's."""
  with tempfile.TemporaryDirectory() as work:
    out, err = os.path.join(work, "out"), os.path.join(work, "err")
    process = python_module(args, cwd, out, err, env=module_env(env), preexec=preexec, real=real)
    try:
      code = process.wait(timeout=timeout)
    finally:
      if process.poll() is None:
        process.kill()
        process.wait()
    with open(out, encoding="utf-8", errors="replace") as o, open(err, encoding="utf-8", errors="replace") as e:
      return subprocess.CompletedProcess(preloaded.command(args), code, o.read(), e.read())


def log_of(result):
  return result.stdout + result.stderr


def last_json(result):
  return json.loads(result.stdout.strip().splitlines()[-1])


# Runs `python -m MODULE ARGS...` and prints the process's peak resident memory as it exits.
# VmHWM (resources.peak_rss_mb), not ru_maxrss: ru_maxrss survives fork and exec, so a child of a pytest process
# that has grown to 2 GB would report 2 GB.
MEASURED = ("import atexit, runpy, sys\n"
            "from context_keras.training.resources import peak_rss_mb\n"
            "atexit.register(lambda: print('PEAK_RSS_MB %d' % peak_rss_mb(), file=sys.stderr, flush=True))\n"
            "sys.argv = sys.argv[1:]\n"
            "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n")


def start_module(args, cwd, log_path, preexec=None, measure=False, env=None, real=False):
  """`python -m ARGS` in the background, its output into log_path (emptied first); returns its Popen
  (python_module). With `measure`, in a fresh interpreter whose output ends with a line 'PEAK_RSS_MB N'. env:
  variables to add to module_env's."""
  open(log_path, "w", encoding="utf-8").close()
  if not measure:
    return python_module(args, cwd, log_path, env=module_env(env), preexec=preexec, real=real)
  with open(log_path, "a", encoding="utf-8") as log:
    return subprocess.Popen([sys.executable, "-c", MEASURED, *args], cwd=cwd, env=module_env(env), stdout=log,
                            stderr=subprocess.STDOUT, preexec_fn=preexec)


def run_all(commands, cwd, timeout=300, measure=False, real=False):
  """Runs several `python -m` commands at once; for each, its exit code and output, which ends with its peak memory
  if `measure` (start_module). commands: [(args, preexec or None)], or (args, preexec, {environment variables to
  add}). real: each in a fresh interpreter (python_module)."""
  processes = []
  try:
    for i, (args, preexec, *env) in enumerate(commands):
      processes.append(start_module(args, cwd, cwd / f"parallel_{i}.txt", preexec, measure=measure,
                                    env=env[0] if env else None, real=real))
    codes = [p.wait(timeout=timeout) for p in processes]
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
        p.wait()
  return [(code, (cwd / f"parallel_{i}.txt").read_text()) for i, code in enumerate(codes)]


def run_cases(name, cases, cwd=REPO, preexec=None, flagfiles=(), real=None, timeout=600):
  """Each command line of `cases` (lists of arguments) of program NAME (train, evaluate, ...), as `python -m
  context_keras.NAME` runs it, all in ONE process (tests/program_cases.py: TensorFlow is imported once, not once
  per case); the case at index `real`, if given, meanwhile in a true `python -m` process of its own. Also checks the
  named flagfiles of flags/ against the program. Returns (every flag's help, {flagfile: problem or None}, a
  CompletedProcess per case), each case's stderr ending with a peak memory (peak_mb) that bounds that case's."""
  with tempfile.TemporaryDirectory() as work:
    request, results = os.path.join(work, "request.json"), os.path.join(work, "results.json")
    with open(request, "w", encoding="utf-8") as f:
      json.dump({"cases": [list(map(str, c)) for i, c in enumerate(cases) if i != real], "flagfiles": list(flagfiles)},
                f)
    alone = None
    if real is not None:
      args = [sys.executable, "-c", MEASURED, f"context_keras.{name}", *map(str, cases[real])]
      with open(os.path.join(work, "out"), "w") as out, open(os.path.join(work, "err"), "w") as err:
        alone = subprocess.Popen(args, cwd=cwd, env=module_env(), stdout=out, stderr=err, preexec_fn=preexec)
    try:
      batch = run_module([os.path.join(REPO, "tests", "program_cases.py"), name, request, results], cwd,
                         timeout=timeout, preexec=preexec)
      assert batch.returncode == 0, log_of(batch)[-5000:]
      report = json.loads(open(results, encoding="utf-8").read())
      outcomes = [subprocess.CompletedProcess(case["argv"], case["code"], case["stdout"], case["stderr"])
                  for case in report["cases"]]
      if alone is not None:
        code = alone.wait(timeout=timeout)
        outcomes.insert(real, subprocess.CompletedProcess(alone.args, code, open(os.path.join(work, "out")).read(),
                                                          open(os.path.join(work, "err")).read()))
    finally:
      if alone is not None and alone.poll() is None:
        alone.kill()
        alone.wait()
  return report["help"], report["flagfiles"], outcomes


def peak_mb(text):
  return int(re.findall(r"PEAK_RSS_MB (\d+)", text)[-1])


def wait_for(log_path, pattern, process, timeout=240, after=0):
  """The first match of `pattern` in the log (from character `after`), waiting while the process runs."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    match = re.search(pattern, log_path.read_text()[after:])
    if match:
      return match
    if process.poll() is not None:
      break
    time.sleep(0.05)
  raise AssertionError(f"no {pattern!r} in {log_path}:\n{log_path.read_text()[-3000:]}")


def checkpoint_steps(model_dir):
  return sorted(int(re.search(r"ckpt-(\d+)", p).group(1)) for p in glob.glob(str(model_dir / "ckpt-*.index")))


def run_state(model_dir):
  """sha256 of every file that makes a run resumable and usable: checkpoints, their state file, flags, config,
  exports."""
  digests = {}
  for path in sorted(glob.glob(str(model_dir / "**" / "*"), recursive=True)):
    name = os.path.relpath(path, model_dir)
    if os.path.isfile(path) and name.startswith(("ckpt-", "checkpoint", "flags.txt", "config.json", "export")):
      with open(path, "rb") as f:
        digests[name] = hashlib.sha256(f.read()).hexdigest()
  return digests


def assert_complete_checkpoint(model_dir, step):
  """Every tensor of ckpt-<step> reads back (the bundle reader checks each one's checksum), finite, at its step."""
  reader = tf.train.load_checkpoint(str(model_dir / f"ckpt-{step}"))
  for name in reader.get_variable_to_shape_map():
    value = np.asarray(reader.get_tensor(name))
    if np.issubdtype(value.dtype, np.floating):
      assert np.all(np.isfinite(value)), name
  from context_keras.training import run_dir  # pylint: disable=import-outside-toplevel
  assert run_dir.checkpoint_step(str(model_dir / f"ckpt-{step}")) == step


def scalars(folder, tag):
  """[(step, value)] of a TensorBoard scalar written with tf.summary into the event files of `folder`."""
  values = []
  for path in sorted(glob.glob(str(folder / "events.out.tfevents.*"))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == tag:
          values.append((event.step, float(tf.make_ndarray(value.tensor))))
  return values


CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, PR_CAPBSET_DROP = 1, 2, 24


def drop_dac_capabilities():
  """preexec_fn: root without the capabilities that bypass file permissions, as an ordinary user."""
  libc = ctypes.CDLL(None, use_errno=True)
  for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
    if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
      raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def random_subject(**model):
  """An evaluation subject (evaluation.subject.Subject) of a randomly initialised network built in this process: the
  small alexnet_bn tower unless `model` (ModelConfig fields) says otherwise. For in-process tests of the protocols."""
  from context_keras.evaluation import subject  # pylint: disable=import-outside-toplevel
  from context_keras.input import pipeline  # pylint: disable=import-outside-toplevel
  from context_keras.model import networks  # pylint: disable=import-outside-toplevel
  from context_keras.training import restore  # pylint: disable=import-outside-toplevel
  from context_keras.training import run_dir  # pylint: disable=import-outside-toplevel
  from context_keras.training import trainer  # pylint: disable=import-outside-toplevel
  config = networks.ModelConfig(**dict({"width_multiplier": 0.0625}, **model))
  geometry = "revisiting" if config.patch_size != networks.ModelConfig.patch_size else "doersch"
  recorded = run_dir.RunConfig(config, pipeline.InputConfig(data="unused", geometry=geometry), trainer.OptimConfig())
  return subject.from_run(restore.Run("unused", None, 0, recorded, restore.build_networks(config)))
