"""Trains context prediction: python -m context_keras.train --flagfile=flags/deepcontext.cfg --data=... --model_dir=...

Reads top to bottom: flags -> run directory and control files -> strategy -> data -> model and optimizer ->
restore -> loop of compiled multi-step calls (log, summaries, checkpoint, export, pause/quit) -> final export.
"""
import dataclasses
import fcntl
import json
import logging as std_logging
import math
import os
import re
import resource
import shutil
import signal
import socket
import sys
import threading
import time

from absl import app
from absl import flags
from absl import logging
import keras
import numpy as np
import tensorflow as tf

from context_keras import data as data_lib
from context_keras import export as export_lib
from context_keras import model as model_lib
from context_keras import patches as patches_lib

flags.DEFINE_string("model_dir", None, "Run directory: checkpoints, TensorBoard logs, flags, exports. A run "
                    "resumes from its latest checkpoint here.")
flags.DEFINE_integer("train_steps", 0, "Total steps of the run (a resumed run stops there); 0 = until told to "
                     "stop (quit file, SIGINT or SIGTERM). The original ran 1.7M steps.")
flags.DEFINE_integer("seed", 0, "Seed of all randomness: data order, grids, augmentation and initialisation.")
flags.DEFINE_float("learning_rate", 1e-5, "SGD learning rate (1e-5 in the validated code).")
flags.DEFINE_float("momentum", 0.0, "SGD momentum (0 in the validated code, 0.999 in the paper).")
flags.DEFINE_float("weight_decay", 0.0, "Decoupled weight decay per step, times the learning rate (0 originally).")
flags.DEFINE_enum("lr_schedule", "constant", ["constant", "cosine"],
                  "constant (the original) or cosine decay to 0 over --train_steps.")
flags.DEFINE_integer("warmup_steps", 0, "Linear learning-rate warm-up from 0 over this many steps.")
flags.DEFINE_enum("loss_reduction", "sum", ["sum", "mean"],
                  "Softmax cross-entropy summed over the pairs of the global batch (the original's "
                  "normalization: NONE) or averaged over them.")
flags.DEFINE_enum("mixed_precision", "none", ["none", "bfloat16", "float16"],
                  "Compute precision; variables stay float32. float16 uses dynamic loss scaling.")
flags.DEFINE_bool("jit_compile", False, "Compile the forward and backward pass with XLA.")
flags.DEFINE_integer("steps_per_loop", 10, "Training steps per compiled call. Checkpoints, logs and control "
                     "files are honoured at exact steps whatever this is.")
flags.DEFINE_integer("log_every", 20, "Steps between progress lines and scalar summaries.")
flags.DEFINE_integer("checkpoint_every", 2000, "Steps between checkpoints (2000 as the original).")
flags.DEFINE_integer("keep_checkpoints", 5, "Checkpoints kept in --model_dir.")
flags.DEFINE_integer("export_every", 0, "Steps between SavedModel exports of the backbone (0 = only at the end).")
flags.DEFINE_integer("image_summary_every", 1000, "Steps between TensorBoard images of pairs as the model sees them.")
flags.DEFINE_integer("histogram_every", 1000, "Steps between weight histograms.")
flags.DEFINE_float("divergence_factor", 10.0,
                   "Stop when a step's gradient norm exceeds this many times its running average (after 100 "
                   "steps), as the original's 10x update guard; 0 disables. NaN/Inf always stops.")
flags.DEFINE_string("quit_file", "train_quit", "When this file appears the run finishes its step, writes a "
                    "checkpoint and exits 0. Relative paths are in the working directory, as the original's.")
flags.DEFINE_string("pause_file", "train_pause", "When this file appears the run writes a checkpoint and waits, "
                    "idle, until it is removed.")
flags.DEFINE_enum("strategy", "auto", ["auto", "mirrored", "multi_worker", "one_device"],
                  "auto: MultiWorkerMirroredStrategy when TF_CONFIG names a cluster of several tasks, else "
                  "MirroredStrategy over the visible GPUs (CUDA_VISIBLE_DEVICES picks them) or over --cpu_replicas "
                  "CPU devices, else the default strategy.")
flags.DEFINE_integer("cpu_replicas", 1, "Split the CPU into this many logical devices, one replica each (for "
                     "testing MirroredStrategy without GPUs).")

flags.DEFINE_bool("deterministic", False, "TensorFlow's op determinism on top of the seeded input: the same seed "
                  "gives the same losses (slower; GPU kernels without a deterministic version raise).")
flags.DEFINE_integer("inject_nan_at_step", 0, "Fault injection for tests of the divergence guard: the loss of "
                     "this step (counted from 1) becomes NaN. 0 = never.")
flags.DEFINE_list("profile_steps", [], "A,B: write a tf.profiler trace of steps A to B to RUN/train/plugins/profile "
                  "(view it in TensorBoard's Profile tab, from the tensorboard-plugin-profile package).")

FLAGS = flags.FLAGS

RUN_FLAGS_FILE = "flags.txt"
LOCK_FILE = ".lock"
EXPORT_DIR = "export"
DIVERGENCE_WARMUP_STEPS = 100
PREVIEW_PAIRS = 8

# Why a compiled loop stopped early.
STATUS_OK, STATUS_STOP_REQUESTED, STATUS_NOT_FINITE, STATUS_EXPLODED = 0, 1, 2, 3
# What a worker asks of all (Trainer.request, set by Control); every step sums the requests of all replicas, so that all workers
# stop at the same step, which collective ops need.
REQUEST_NONE, REQUEST_PAUSE, REQUEST_QUIT = 0, 1, 2
COUNTERS = ("images", "too_small", "unreadable")


class SetupError(Exception):
  """Bad flags or run directory; stops the run at start with this message and no traceback."""


# --------------------------------------------------------------------------------------------------------------
# Optimisation


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  learning_rate: float = 1e-5
  momentum: float = 0.0
  weight_decay: float = 0.0
  lr_schedule: str = "constant"
  warmup_steps: int = 0
  train_steps: int = 0
  loss_reduction: str = "sum"
  mixed_precision: str = "none"
  jit_compile: bool = False
  divergence_factor: float = 10.0
  inject_nan_at_step: int = 0


class LearningRate(keras.optimizers.schedules.LearningRateSchedule):
  """Constant or cosine-to-zero, with optional linear warm-up."""

  def __init__(self, base, warmup_steps=0, decay_steps=0):
    self.base, self.warmup_steps, self.decay_steps = base, warmup_steps, decay_steps

  def __call__(self, step):
    step = tf.cast(step, tf.float32)
    rate = tf.constant(self.base, tf.float32)
    if self.warmup_steps:
      rate *= tf.minimum(1.0, (step + 1.0) / self.warmup_steps)
    if self.decay_steps:
      progress = tf.minimum(step, self.decay_steps) / self.decay_steps
      rate *= 0.5 * (1.0 + tf.cos(math.pi * progress))
    return rate

  def get_config(self):
    return {"base": self.base, "warmup_steps": self.warmup_steps, "decay_steps": self.decay_steps}


def make_optimizer(config):
  decay_steps = config.train_steps if config.lr_schedule == "cosine" else 0
  optimizer = keras.optimizers.SGD(
      LearningRate(config.learning_rate, config.warmup_steps, decay_steps), momentum=config.momentum,
      weight_decay=config.weight_decay or None)
  if config.mixed_precision == "float16":
    optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
  return optimizer


class Trainer:
  """Networks, optimizer and the compiled multi-step loop, all built in `strategy`'s scope."""

  def __init__(self, strategy, model_config, optim_config, time_input=True):
    self.strategy = strategy
    self.config = optim_config
    # tf.timestamp is refused under op determinism, so the input wait is then not measured.
    self.time_input = time_input
    with strategy.scope():
      self.networks = model_lib.build(model_config)
      self.optimizer = make_optimizer(optim_config)
      self.optimizer.build(self.trainable_variables)
      # Running mean of the gradient norm, for the divergence guard; checkpointed with the run.
      self.grad_norm_average = tf.Variable(0.0, trainable=False, name="grad_norm_average")
    self.request = tf.Variable(REQUEST_NONE, trainable=False, name="request")
    # Per replica, the stream position (image, grid) after its last batch: where its pipeline resumes
    # (data.make_dataset). Its shape follows the replica count, so a run can resume on another topology.
    self.input_positions = tf.Variable(tf.zeros([strategy.num_replicas_in_sync, 2], tf.int64), trainable=False,
                                       shape=tf.TensorShape([None, 2]), name="input_positions")
    # XLA compiles the forward and backward pass only: the optimizer's cross-replica update stays outside it.
    self._gradients = (tf.function(self._gradients_impl, jit_compile=True) if optim_config.jit_compile
                       else self._gradients_impl)
    if optim_config.jit_compile and model_config.sync_batchnorm and strategy.num_replicas_in_sync > 1:
      raise SetupError("--jit_compile and --sync_batchnorm cannot be combined with several replicas: the batch "
                       "statistics' all-reduce cannot run inside a compiled function")
    self.train_loop = tf.function(self._train_loop_impl)

  @property
  def trainable_variables(self):
    return self.networks.tower.trainable_variables + self.networks.head.trainable_variables

  @property
  def step(self):
    return self.optimizer.iterations

  def current_step(self):
    return int(self.optimizer.iterations.numpy())

  def checkpoint_items(self):
    return {"tower": self.networks.tower, "head": self.networks.head, "optimizer": self.optimizer,
            "grad_norm_average": self.grad_norm_average, "input_positions": self.input_positions}

  def _gradients_impl(self, batch, global_pairs):
    with tf.GradientTape() as tape:
      logits = model_lib.grid_logits(self.networks, batch, training=True)
      valid = tf.cast(batch["pair_mask"], tf.float32)
      per_pair = keras.losses.sparse_categorical_crossentropy(batch["label"], logits, from_logits=True)
      loss_sum = tf.reduce_sum(per_pair * valid)
      if self.config.inject_nan_at_step:
        nan = tf.equal(self.step + 1, self.config.inject_nan_at_step)
        loss_sum += tf.where(nan, tf.constant(float("nan")), 0.0)
      # Gradients are summed over replicas, so each replica's share of the global objective is its own sum
      # (or its sum over the global pair count): correct for any number of replicas.
      loss = loss_sum if self.config.loss_reduction == "sum" else loss_sum / tf.maximum(global_pairs, 1.0)
      if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
        loss = self.optimizer.scale_loss(loss)
    gradients = tape.gradient(loss, self.trainable_variables)
    correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), batch["label"]),
                                    tf.float32) * valid)
    return gradients, {"loss_sum": loss_sum, "pairs": tf.reduce_sum(valid), "correct": correct}

  def replica_step(self, batch):
    context = tf.distribute.get_replica_context()
    global_pairs = context.all_reduce(tf.distribute.ReduceOp.SUM, tf.reduce_sum(tf.cast(batch["pair_mask"],
                                                                                        tf.float32)))
    gradients, stats = self._gradients(batch, global_pairs)
    # For the divergence guard: summed over replicas, this is the squared norm of the gradients they computed.
    norm = tf.linalg.global_norm(gradients)
    if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
      norm /= tf.cast(self.optimizer.dynamic_scale, norm.dtype)
    stats["grad_norm_squared"] = tf.square(norm)
    self.optimizer.apply_gradients(zip(gradients, self.trainable_variables))
    # Values whose sum over replicas the loop needs (strategy.reduce has no max or gather).
    replicas = context.num_replicas_in_sync
    stats["positions"] = tf.one_hot(context.replica_id_in_sync_group, replicas, dtype=tf.int64)[:, tf.newaxis] * (
        batch["resume"][tf.newaxis, :])
    stats["pause_votes"] = tf.cast(tf.equal(self.request, REQUEST_PAUSE), tf.int32)
    stats["quit_votes"] = tf.cast(tf.equal(self.request, REQUEST_QUIT), tf.int32)
    for k in COUNTERS:
      stats[k] = batch[k]
    return stats

  def _preview(self, batch):
    """The first pairs of a batch as the model sees them, for the image summary (pair capacity >= 8 always)."""
    size = patches_lib.PATCH_SIZE
    head = {k: tf.ensure_shape(batch[k][:PREVIEW_PAIRS], [PREVIEW_PAIRS])
            for k in ("first", "second", "label", "pair_mask")}
    return {"first": tf.ensure_shape(tf.gather(batch["patches"], head["first"]), [PREVIEW_PAIRS, size, size, 3]),
            "second": tf.ensure_shape(tf.gather(batch["patches"], head["second"]), [PREVIEW_PAIRS, size, size, 3]),
            "label": head["label"], "valid": head["pair_mask"]}

  def _train_loop_impl(self, iterator, num_steps):
    """Runs up to num_steps steps. Stops early, on every worker at the same step, when a worker asks for a pause
    or quit, or on divergence (the host then writes no checkpoint)."""
    totals = {k: tf.constant(0.0, tf.float64) for k in ("loss_sum", "pairs", "correct", "input_seconds")}
    counts = {k: tf.constant(0, tf.int64) for k in COUNTERS}
    status = tf.constant(STATUS_OK)
    request = tf.constant(REQUEST_NONE)
    steps = tf.constant(0)
    preview = self._preview(self._empty_batch())
    while steps < num_steps and status == STATUS_OK:
      start = tf.timestamp() if self.time_input else tf.constant(0.0, tf.float64)
      with tf.control_dependencies([start]):
        batch = next(iterator)
      local = self.strategy.experimental_local_results(batch)
      with tf.control_dependencies(tf.nest.flatten(local)):
        waited = tf.timestamp() - start if self.time_input else start
      stats = self.strategy.run(self.replica_step, args=(batch,))
      stats = {k: self.strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for k, v in stats.items()}
      stats["input_seconds"] = waited
      totals = {k: totals[k] + tf.cast(stats[k], tf.float64) for k in totals}
      counts = {k: counts[k] + stats[k] for k in counts}
      preview = self._preview(local[0])
      self.input_positions.assign(stats["positions"])
      steps += 1
      status = self._check_divergence(stats["loss_sum"], tf.sqrt(stats["grad_norm_squared"]))
      if status == STATUS_OK:
        if stats["quit_votes"] > 0:
          request = tf.constant(REQUEST_QUIT)
        elif stats["pause_votes"] > 0:
          request = tf.constant(REQUEST_PAUSE)
        if request != REQUEST_NONE:
          status = tf.constant(STATUS_STOP_REQUESTED)
    return {"steps": steps, "status": status, "request": request, "preview": preview, **totals, **counts}

  def _check_divergence(self, loss_sum, grad_norm):
    if not tf.math.is_finite(loss_sum):
      return tf.constant(STATUS_NOT_FINITE)
    if not tf.math.is_finite(grad_norm):
      # float16 overflows are expected: the loss-scale optimizer skipped that update and lowers its scale.
      if self.config.mixed_precision == "float16":
        return tf.constant(STATUS_OK)
      return tf.constant(STATUS_NOT_FINITE)
    average = self.grad_norm_average
    if (self.config.divergence_factor > 0 and self.step > DIVERGENCE_WARMUP_STEPS and
        grad_norm > self.config.divergence_factor * average):
      return tf.constant(STATUS_EXPLODED)
    rate = tf.maximum(0.01, 1.0 / tf.cast(self.step, tf.float32))  # a plain mean at first, then an EMA
    average.assign(average + rate * (grad_norm - average))
    return tf.constant(STATUS_OK)

  def _empty_batch(self):
    size = patches_lib.PATCH_SIZE
    pairs = tf.zeros([PREVIEW_PAIRS], tf.int32)
    return {"patches": tf.zeros([1, size, size, 3]), "first": pairs, "second": pairs, "label": pairs,
            "pair_mask": tf.zeros([PREVIEW_PAIRS], tf.bool)}


# --------------------------------------------------------------------------------------------------------------
# Strategy


def names_cluster():
  """Whether TF_CONFIG describes a cluster of more than one task."""
  try:
    cluster = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
  except json.JSONDecodeError as e:
    raise SetupError(f"TF_CONFIG is not valid JSON: {e}") from e
  return sum(len(tasks) for tasks in cluster.values()) > 1


def make_strategy(name, cpu_replicas):
  """MultiWorkerMirroredStrategy for a TF_CONFIG cluster, MirroredStrategy over the GPUs or over logical CPU
  devices if asked, else the default strategy."""
  if name == "multi_worker" or (name == "auto" and names_cluster()):
    return tf.distribute.MultiWorkerMirroredStrategy()
  gpus = tf.config.list_physical_devices("GPU")
  if cpu_replicas > 1 and not gpus:
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
      tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_replicas)
    except RuntimeError:
      pass  # already configured in this process (tests); the devices are listed below
    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:cpu_replicas]
    return tf.distribute.MirroredStrategy(devices)
  if name == "one_device":
    return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
  if gpus or name == "mirrored":
    return tf.distribute.MirroredStrategy()
  return tf.distribute.get_strategy()


def worker_role(strategy):
  """(is_chief, task name) of this process: the chief writes the run; other workers write to temporary places."""
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not resolver.task_type:
    return True, "chief"
  cluster = resolver.cluster_spec().as_dict()
  chief = resolver.task_type == "chief" or (resolver.task_type == "worker" and resolver.task_id == 0 and
                                           "chief" not in cluster)
  return chief, f"{resolver.task_type}_{resolver.task_id}"


def distributed_batches(strategy, input_config, source, positions):
  """One input pipeline per worker; its replicas take consecutive batches of it, so it resumes where its last
  replica's last batch ended. Without a position for every replica (another topology), or through the tf.data
  service, a resumed run reads a fresh stream instead."""
  positions = positions.tolist()
  exact = len(positions) == strategy.num_replicas_in_sync and not input_config.data_service

  def dataset_fn(context):
    replicas_per_pipeline = strategy.num_replicas_in_sync // context.num_input_pipelines
    start = tuple(positions[(context.input_pipeline_id + 1) * replicas_per_pipeline - 1]) if exact else (0, 0)
    return data_lib.make_dataset(input_config, source, context.input_pipeline_id, context.num_input_pipelines,
                                 start=start)
  return strategy.distribute_datasets_from_function(dataset_fn)


# --------------------------------------------------------------------------------------------------------------
# Run directory, control files, signals


def prepare_model_dir(path):
  if not path:
    raise SetupError("--model_dir is required: the run directory for checkpoints, logs and exports")
  if os.path.exists(path) and not os.path.isdir(path):
    raise SetupError(f"--model_dir={path} is a file, not a directory")
  try:
    os.makedirs(path, exist_ok=True)
    os.listdir(path)
    probe = os.path.join(path, f".write_test_{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise SetupError(f"--model_dir={path} is not usable (it must be readable and writable): {e.strerror}") from e


class RunLock:
  """Keeps a second trainer off a run directory. An flock on RUN/.lock: the kernel releases it when its process
  ends, even by kill -9, so a crashed run never leaves it stuck. (flock is per host: on a shared file system, runs
  on two hosts are not kept apart.)"""

  def __init__(self, model_dir):
    self.path = os.path.join(model_dir, LOCK_FILE)
    self._file = open(self.path, "a+")  # pylint: disable=consider-using-with
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self._file.seek(0)
      holder = self._file.read().strip() or "another process"
      self._file.close()
      raise SetupError(f"--model_dir={model_dir} is in use by {holder} (lock {self.path}); stop that run first, "
                       "or choose another --model_dir") from None
    self._file.seek(0)
    self._file.truncate()
    self._file.write(f"training process {os.getpid()} on {socket.gethostname()}\n")
    self._file.flush()

  def release(self):
    self._file.close()


class RunLogFile(std_logging.FileHandler):
  """RUN/train.log. When a write fails (a full disk) it says so once, rather than print a traceback per message;
  the messages still reach stderr, and the run's own writes (summaries, checkpoints) stop it with a clear error."""

  failed = False

  def handleError(self, record):
    if not self.failed:
      self.failed = True
      sys.stderr.write(f"Could not append to {self.baseFilename}: {sys.exc_info()[1]}; messages go to stderr only.\n")


class CheckpointError(Exception):
  """A checkpoint (or another file of the run: summaries, flags, export) could not be written; the run stops (exit
  code 1) and the previous checkpoint stays intact."""


def write_failure(what, directory, error, previous):
  """The CheckpointError for a failed write into the run directory (a full disk, a folder made read-only)."""
  lines = (getattr(error, "message", None) or str(error)).splitlines()
  first = re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", lines[0]) if lines else type(error).__name__
  return CheckpointError(f"Could not write {what} to {directory}: {first}. The previous checkpoint "
                         f"{previous or '(none)'} is intact; free space or fix the folder, then re-run to resume "
                         "from it.")


class Control:
  """Quit and pause requests from control files and signals, turned into the trainer's `request` variable.

  A watcher thread polls the files twice a second; every step reads the variable, so a request stops the
  compiled loop after the step in flight (or the one after it, if it came late in that step).
  """
  POLL_SECONDS = 0.5

  def __init__(self, quit_file, pause_file, request):
    self.quit_file, self.pause_file = quit_file, pause_file
    self.request = request
    self.quit_reason = None
    self._done = threading.Event()
    for stale in (quit_file, pause_file):
      if os.path.exists(stale):
        logging.warning("Removing control file %s left from an earlier run (not obeyed).", os.path.abspath(stale))
        os.remove(stale)
    self._thread = threading.Thread(target=self._watch, daemon=True, name="control-files")
    self._thread.start()
    self._previous_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

  def _on_signal(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.quit_reason:
      logging.warning("%s again: already stopping (%s).", name, self.quit_reason)
      return
    logging.info("%s received: finishing the current step, then checkpoint and exit.", name)
    self.quit_reason = name
    self.request.assign(REQUEST_QUIT)

  def _watch(self):
    while not self._done.wait(self.POLL_SECONDS):
      if os.path.exists(self.quit_file) and not self.quit_reason:
        self.quit_reason = f"quit file {self.quit_file}"
      if self.quit_reason:
        self.request.assign(REQUEST_QUIT)
      elif self.pause_requested():
        self.request.assign(REQUEST_PAUSE)

  def pause_requested(self):
    return os.path.exists(self.pause_file)

  def wait_while_paused(self):
    """Blocks, sleeping, until the pause file is gone or a quit is requested."""
    logging.info("Paused: remove %s to continue (or create %s / send SIGTERM to quit).",
                 os.path.abspath(self.pause_file), self.quit_file)
    while self.pause_requested() and not self.quit_reason:
      time.sleep(1.0)
    if not self.quit_reason:
      logging.info("Pause file removed: continuing.")
      self.request.assign(REQUEST_NONE)

  def close(self):
    self._done.set()
    for s, handler in self._previous_handlers.items():
      signal.signal(s, handler)


# --------------------------------------------------------------------------------------------------------------
# Summaries


def preview_image(preview):
  """Pairs as a picture: each pair is a 3x3 board with the first patch in the centre and the second patch in the
  cell its label names (spec 2.3), so the labels can be checked by eye."""
  size, gap = patches_lib.PATCH_SIZE, 8
  cell = size + gap
  boards = []
  for first, second, label, valid in zip(preview["first"], preview["second"], preview["label"], preview["valid"]):
    if not valid:
      continue
    board = np.full((3 * cell, 3 * cell, 3), 0.5, np.float32)
    dx, dy = patches_lib.NEIGHBOUR_OFFSETS[int(label)]
    for patch, (cx, cy) in ((first, (1, 1)), (second, (1 + dx, 1 + dy))):
      lo, hi = patch.min(), patch.max()
      board[cy * cell:cy * cell + size, cx * cell:cx * cell + size] = (patch - lo) / max(hi - lo, 1e-6)
    boards.append(board)
  return np.stack(boards) if boards else None


def write_hparams(writer, flag_values):
  """The flags as TensorBoard text, and in the HParams dashboard when the tensorboard package is installed."""
  with writer.as_default():
    try:
      from tensorboard.plugins.hparams import api as hparams_api  # pylint: disable=import-outside-toplevel
    except ImportError:
      pass
    else:
      hparams_api.hparams({k: v for k, v in flag_values.items() if isinstance(v, (bool, int, float, str))})
    tf.summary.text("flags", "\n".join(f"    --{k}={v}" for k, v in sorted(flag_values.items())), step=0)


# --------------------------------------------------------------------------------------------------------------
# The run


def our_flag_values():
  """The values of every flag defined by context_keras modules."""
  values = {}
  for module, module_flags in FLAGS.flags_by_module_dict().items():
    if "context_keras" in module:
      values.update({f.name: f.value for f in module_flags})
  return values


def write_run_flags(model_dir):
  """flags.txt is a flagfile: --flagfile=RUN/flags.txt repeats the run."""
  lines = []
  for module, module_flags in sorted(FLAGS.flags_by_module_dict().items()):
    if "context_keras" in module:
      lines.extend(f.serialize() for f in module_flags if f.value is not None)
  path = os.path.join(model_dir, RUN_FLAGS_FILE)
  with open(path + ".partial", "w") as f:  # renamed into place: a kill never leaves a truncated flags.txt
    f.write("\n".join(sorted(lines)) + "\n")
  os.replace(path + ".partial", path)


def validate_flags():
  problems = []
  for name in ("train_steps", "warmup_steps", "export_every"):
    if FLAGS[name].value < 0:
      problems.append(f"--{name}={FLAGS[name].value} must be >= 0")
  for name in ("steps_per_loop", "log_every", "checkpoint_every", "keep_checkpoints", "image_summary_every",
               "histogram_every", "cpu_replicas"):
    if FLAGS[name].value < 1:
      problems.append(f"--{name}={FLAGS[name].value} must be >= 1")
  if FLAGS.learning_rate <= 0:
    problems.append(f"--learning_rate={FLAGS.learning_rate} must be > 0")
  if FLAGS.lr_schedule == "cosine" and FLAGS.train_steps == 0:
    problems.append("--lr_schedule=cosine needs --train_steps > 0 to know where the cosine ends")
  if FLAGS.profile_steps and (len(FLAGS.profile_steps) != 2 or not all(v.isdigit() for v in FLAGS.profile_steps)
                              or int(FLAGS.profile_steps[0]) >= int(FLAGS.profile_steps[1])):
    problems.append(f"--profile_steps={','.join(FLAGS.profile_steps)} must be two step numbers A,B with A < B")
  if not 0 < FLAGS.width_multiplier <= 4:
    problems.append(f"--width_multiplier={FLAGS.width_multiplier} must be in (0, 4]")
  if problems:
    raise SetupError("Invalid flags: " + "; ".join(problems))


def next_stop(step, train_steps, *intervals):
  """Steps until the next multiple of any interval, or the end of training."""
  distances = [interval - step % interval for interval in intervals if interval]
  if train_steps:
    distances.append(train_steps - step)
  return min(distances)


def run():
  validate_flags()
  model_dir = FLAGS.model_dir
  prepare_model_dir(model_dir)
  # MultiWorkerMirroredStrategy must exist before other TensorFlow work.
  strategy = make_strategy(FLAGS.strategy, FLAGS.cpu_replicas)
  is_chief, task = worker_role(strategy)
  # The chief writes the run; another worker writes its checkpoints and exports to a scratch folder (all workers
  # must save, because saving distributed variables can involve every worker) that it removes at the end.
  write_dir = model_dir if is_chief else os.path.join(model_dir, f"workertemp_{task}")
  lock = RunLock(model_dir) if is_chief else None
  if is_chief:
    log_file = RunLogFile(os.path.join(model_dir, "train.log"))
    log_file.setFormatter(std_logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.get_absl_logger().addHandler(log_file)
  name = ("MultiWorkerMirroredStrategy" if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
          else type(strategy).__name__)
  logging.info("Strategy: %s with %d replica(s)%s.", name, strategy.num_replicas_in_sync,
               "" if task == "chief" else f"; this is {task}{' (chief)' if is_chief else ''}")
  if FLAGS.deterministic:
    tf.config.experimental.enable_op_determinism()
  if FLAGS.mixed_precision != "none":
    keras.mixed_precision.set_global_policy("mixed_" + FLAGS.mixed_precision)
  keras.utils.set_random_seed(FLAGS.seed)

  try:
    input_config = data_lib.config_from_flags(FLAGS.seed)
  except ValueError as e:
    raise SetupError(str(e)) from e
  source = data_lib.find_source(input_config.data, input_config.data_root)
  data_lib.check_readable(source)
  logging.info("Data: %s%s.", source.description,
               f", processed by the tf.data service at {input_config.data_service}" if input_config.data_service
               else "")

  optim_config = OptimConfig(
      learning_rate=FLAGS.learning_rate, momentum=FLAGS.momentum, weight_decay=FLAGS.weight_decay,
      lr_schedule=FLAGS.lr_schedule, warmup_steps=FLAGS.warmup_steps, train_steps=FLAGS.train_steps,
      loss_reduction=FLAGS.loss_reduction, mixed_precision=FLAGS.mixed_precision, jit_compile=FLAGS.jit_compile,
      divergence_factor=FLAGS.divergence_factor, inject_nan_at_step=FLAGS.inject_nan_at_step)
  model_config = model_lib.config_from_flags()
  trainer = Trainer(strategy, model_config, optim_config, time_input=not FLAGS.deterministic)
  counters = {k: tf.Variable(0, dtype=tf.int64, trainable=False, name=k) for k in COUNTERS}
  with strategy.scope():
    checkpoint = tf.train.Checkpoint(**trainer.checkpoint_items(), **counters)
    manager = tf.train.CheckpointManager(checkpoint, write_dir, max_to_keep=FLAGS.keep_checkpoints)
    # Every worker restores the chief's latest checkpoint.
    latest = tf.train.latest_checkpoint(model_dir)
    if latest:
      checkpoint.restore(latest).assert_existing_objects_matched()
      logging.info("Resumed from %s at step %d.", latest, trainer.current_step())
    else:
      logging.info("Starting a new run in %s.", model_dir)
    # The input restarts where the last trained batches ended: the positions are in the checkpoint, the buffers of
    # a tf.data iterator (hundreds of MB of patches) are not. A fresh stream must not repeat the first one.
    positions = trainer.input_positions.numpy()
    if latest and (len(positions) != strategy.num_replicas_in_sync or input_config.data_service):
      logging.warning("The input cannot resume at its exact position (%s): reading a fresh stream.",
                      "tf.data service" if input_config.data_service else "the replica count changed")
      input_config = dataclasses.replace(input_config, seed=input_config.seed + trainer.current_step())
    iterator = iter(distributed_batches(strategy, input_config, source, positions))

  if is_chief:
    try:
      write_run_flags(model_dir)
      writer = tf.summary.create_file_writer(os.path.join(model_dir, "train"))
      write_hparams(writer, our_flag_values())
    except (OSError, tf.errors.OpError) as e:
      raise write_failure("the flags and TensorBoard log", model_dir, e, latest) from e
  else:
    writer = tf.summary.create_noop_writer()
  control = Control(FLAGS.quit_file, FLAGS.pause_file, trainer.request)
  try:
    return train_loop(trainer, iterator, manager, writer, control, counters, model_config, write_dir)
  finally:
    control.close()
    try:
      writer.close()
    except (OSError, tf.errors.OpError) as e:  # a full disk: already reported, or the run finished before it
      logging.warning("Could not flush the TensorBoard summaries: %s", str(e).splitlines()[-1][:200])
    if lock:
      lock.release()
    if not is_chief:
      shutil.rmtree(write_dir, ignore_errors=True)


def save(manager, trainer, reason):
  previous = manager.latest_checkpoint
  try:
    path = manager.save(checkpoint_number=trainer.current_step())
  except (OSError, tf.errors.OpError) as e:
    raise write_failure(f"the checkpoint of step {trainer.current_step()}", manager.directory, e, previous) from e
  logging.info("Checkpoint %s written (%s).", path, reason)


def export(trainer, model_config, write_dir, latest_checkpoint):
  path = os.path.join(write_dir, EXPORT_DIR, f"backbone_{trainer.current_step()}")
  try:
    export_lib.export_backbone(trainer.networks.tower, model_config, path, color_mode=FLAGS.color_mode)
  except (OSError, tf.errors.OpError) as e:
    raise write_failure(f"the backbone SavedModel of step {trainer.current_step()}", path, e,
                        latest_checkpoint) from e
  logging.info("Backbone SavedModel written to %s.", path)


class Profiler:
  """Traces steps A to B of --profile_steps with tf.profiler, into the TensorBoard log folder."""

  def __init__(self, steps, logdir):
    self.first, self.last = (int(s) for s in steps) if steps else (0, 0)
    self.logdir = logdir
    self.active = False

  def boundaries(self):
    return (self.first, self.last) if self.last else ()

  def at(self, step):
    if self.last and step == self.first and not self.active:
      tf.profiler.experimental.start(self.logdir)
      self.active = True
    elif self.active and step >= self.last:
      tf.profiler.experimental.stop()
      self.active = False
      logging.info("Profile of steps %d-%d written under %s.", self.first, self.last, self.logdir)


def peak_rss_mb():
  """This process's peak resident memory. Linux's VmHWM, because ru_maxrss is inherited across fork and exec (a
  child started by a big process would report its parent's peak)."""
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def weights_digest(trainer):
  """One number that differs when any weight differs: lets workers and runs be compared from their logs."""
  return float(sum(tf.reduce_sum(tf.square(tf.cast(v, tf.float64))) for v in trainer.trainable_variables))


def train_loop(trainer, iterator, manager, writer, control, counters, model_config, write_dir):
  step = trainer.current_step()
  train_steps = FLAGS.train_steps
  if train_steps and step >= train_steps:
    logging.info("Step %d already reaches --train_steps=%d: nothing to train.", step, train_steps)
    return 0
  profiler = Profiler(FLAGS.profile_steps, os.path.join(write_dir, "train"))
  last_checkpoint_step = step
  while not train_steps or step < train_steps:
    profiler.at(step)
    until = [b - step for b in profiler.boundaries() if b > step]
    num_steps = min([FLAGS.steps_per_loop, *until,
                     next_stop(step, train_steps, FLAGS.log_every, FLAGS.checkpoint_every, FLAGS.export_every,
                               FLAGS.image_summary_every, FLAGS.histogram_every)])
    start = time.perf_counter()
    out = trainer.train_loop(iterator, tf.constant(num_steps))
    seconds = time.perf_counter() - start
    done, status = int(out["steps"]), int(out["status"])
    step = trainer.current_step()
    for k, variable in counters.items():
      variable.assign_add(out[k])
    if status in (STATUS_NOT_FINITE, STATUS_EXPLODED):
      what = "loss or gradient is NaN/Inf" if status == STATUS_NOT_FINITE else (
          f"gradient norm exceeded {FLAGS.divergence_factor}x its running average")
      logging.error("Diverged at step %d: %s. Nothing was checkpointed after step %d; lower --learning_rate or "
                    "examine the run, then re-run to resume from %s.", step, what, last_checkpoint_step,
                    manager.latest_checkpoint or "scratch")
      return 1
    if done:
      try:
        write_summaries(writer, trainer, out, seconds, step, counters)
      except (OSError, tf.errors.OpError) as e:
        raise write_failure(f"the TensorBoard summaries of step {step}", os.path.join(write_dir, "train"), e,
                            manager.latest_checkpoint) from e
    if step % FLAGS.checkpoint_every == 0 and step != last_checkpoint_step:
      save(manager, trainer, "interval")
      last_checkpoint_step = step
    if FLAGS.export_every and step % FLAGS.export_every == 0 and done:
      export(trainer, model_config, write_dir, manager.latest_checkpoint)
    if status == STATUS_STOP_REQUESTED:
      request = int(out["request"])
      if step != last_checkpoint_step:
        save(manager, trainer, "quit" if request == REQUEST_QUIT else "pause")
        last_checkpoint_step = step
      if request == REQUEST_QUIT:
        logging.info("Stopped at step %d (%s).", step, control.quit_reason or "another worker asked to quit")
        logging.info("Weights digest: %.10e", weights_digest(trainer))
        return 0
      if control.pause_requested():
        control.wait_while_paused()  # a quit while paused stops everyone after one more step
      else:
        logging.info("Another worker paused the run: waiting for it in the next step.")
  profiler.at(step)
  if step != last_checkpoint_step:
    save(manager, trainer, "end of training")
  export(trainer, model_config, write_dir, manager.latest_checkpoint)
  logging.info("Training finished at step %d. Peak memory: %.0f MB.", step, peak_rss_mb())
  logging.info("Weights digest: %.10e", weights_digest(trainer))
  return 0


def write_summaries(writer, trainer, out, seconds, step, counters):
  pairs = float(out["pairs"])
  loss = float(out["loss_sum"]) / max(pairs, 1.0)
  accuracy = float(out["correct"]) / max(pairs, 1.0)
  rate = float(trainer.optimizer.learning_rate) if not callable(trainer.optimizer.learning_rate) else float(
      trainer.optimizer.learning_rate(trainer.step))
  input_share = float(out["input_seconds"]) / max(seconds, 1e-9)
  with writer.as_default(step=step):
    tf.summary.scalar("loss_per_pair", loss)
    tf.summary.scalar("pretext_accuracy", accuracy)
    tf.summary.scalar("learning_rate", rate)
    tf.summary.scalar("pairs_per_second", pairs / seconds)
    tf.summary.scalar("input_wait_share", input_share)
    for k, variable in counters.items():
      tf.summary.scalar(f"images/{k}", int(variable))
    if step % FLAGS.image_summary_every == 0:
      preview = {k: v.numpy() for k, v in out["preview"].items()}
      image = preview_image(preview)
      if image is not None:
        tf.summary.image("pairs_first_centre_second_at_label", image, max_outputs=PREVIEW_PAIRS)
    if step % FLAGS.histogram_every == 0:
      for variable in trainer.trainable_variables:
        tf.summary.histogram(variable.path, variable)
  if step % FLAGS.log_every == 0 or int(out["status"]) != STATUS_OK:
    total = f"/{FLAGS.train_steps}" if FLAGS.train_steps else ""
    logging.info("step %d%s  loss/pair %.4f  accuracy %.3f  %.0f pairs/s  input wait %.0f%%  lr %.3g  "
                 "images %d (too small %d, unreadable %d)", step, total, loss, accuracy, pairs / seconds,
                 100 * input_share, rate, int(counters["images"]), int(counters["too_small"]),
                 int(counters["unreadable"]))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  try:
    sys.exit(run())
  except (SetupError, data_lib.DataError) as e:
    logging.error("%s", e)
    sys.exit(2)
  except CheckpointError as e:
    logging.error("%s", e)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=data_lib.parse_flags)
