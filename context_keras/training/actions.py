"""The periodic work of a training job, as small objects with an interval, which the controller's loop runs
(controller.py; a job's program reads in one screen because each of these is one line there).

Each action has `every` (steps; 0 = never on an interval) and is called after every compiled call of the trainer
with the step reached and what the call returned (`LoopOutput`); it acts when the step is a multiple of its interval.
The loop ends every call at the next step where some action is due (`steps_to_next`), so intervals are honoured at
exact steps whatever --steps_per_loop is. `before(step)` runs before each call, `end(step, finished)` once when the
job ends: at its last step (finished) or on a quit.
"""
import contextlib
import dataclasses
import os
import time

from absl import logging
import numpy as np
import tensorflow as tf

from context_keras import errors
from context_keras.deploy import serving
from context_keras.input import patches as patches_lib
from context_keras.input import pipeline as data_lib
from context_keras.storage import paths as paths_lib
from context_keras.storage import writes
from context_keras.training import control
from context_keras.training import progress as progress_lib
from context_keras.training import run_dir
from context_keras.training import trainer as trainer_lib


@dataclasses.dataclass
class LoopOutput:
  """One compiled call of Trainer.train_loop: its outputs (numpy), wall time and the step it reached."""
  step: int
  steps: int
  status: int
  values: dict
  seconds: float


def steps_to_next(step, train_steps, actions, steps_per_loop):
  """Steps of the next compiled call: up to steps_per_loop, ending where an action is due or training ends."""
  distances = [steps_per_loop]
  for action in actions:
    distances.extend(d for d in action.due_in(step) if d > 0)
  if train_steps:
    distances.append(train_steps - step)
  return min(distances)


class Action:
  """The interval logic every action shares; subclasses add __call__(output)."""
  every = 0
  every_call = False  # called even after a call that did not move the step (train.py)

  def due_in(self, step):
    """Distances to the steps at which this action must run (the loop stops there)."""
    return [self.every - step % self.every] if self.every else []

  def is_due(self, step):
    return bool(self.every) and step > 0 and step % self.every == 0

  def before(self, step):
    """Before the compiled call that starts at `step`."""

  def end(self, step, finished):
    """When the job ends at `step`: finished (its total steps reached) or stopped by a quit request."""


class Counters(Action):
  """Adds what each call counted (images, unreadable ones...) to the checkpointed counters: {output key: variable}."""
  every_call = True

  def __init__(self, variables):
    self.variables = variables

  def __call__(self, output):
    for key, variable in self.variables.items():
      variable.assign_add(tf.cast(output.values[key], variable.dtype))


class SummaryWriter:
  """A tf.summary writer whose failed writes (a full disk) stop the run with a WriteError naming the step and the
  checkpoint that is still intact."""

  def __init__(self, writer, where, latest_checkpoint):
    self.writer, self.where, self.latest_checkpoint = writer, where, latest_checkpoint

  @contextlib.contextmanager
  def at(self, step):
    try:
      with self.writer.as_default(step=step):
        yield
    except (OSError, tf.errors.OpError) as e:
      raise run_dir.write_failure(f"the TensorBoard summaries of step {step}", self.where, e,
                                  self.latest_checkpoint()) from e


class Summaries(Action):
  """Scalars after every call (loss, accuracy, rate, input wait, learning rate, image counters), and the progress
  line every `every` steps, at the last step, and whenever a call stopped early; never twice for one step. The line
  ends with the time since this invocation began and, with --train_steps, an estimate of the time left (from the
  steps after the first call, whose tracing would skew it). float16's loss scaling skips the updates whose
  gradients overflow, so the step stands still meanwhile; the line counts those updates."""
  every_call = True

  def __init__(self, writer, every, trainer, counters, train_steps):
    self.writer, self.every, self.trainer, self.counters = writer, every, trainer, counters
    self.train_steps = train_steps
    self.start = time.monotonic()
    self.previous_step = self.logged_step = trainer.current_step()
    self.rate_origin = None  # (time, step) at the end of the first call
    self.skipped = 0

  def __call__(self, output):
    if not output.steps:
      return
    self.skipped += output.steps - (output.step - self.previous_step)
    self.previous_step = output.step
    now = time.monotonic()
    if self.rate_origin is None:
      self.rate_origin = (now, output.step)
    values = output.values
    pairs = float(values["pairs"])
    loss = float(values["loss_sum"]) / max(pairs, 1.0)
    accuracy = float(values["correct"]) / max(pairs, 1.0)
    schedule = self.trainer.optimizer.learning_rate
    rate = float(schedule(self.trainer.step)) if callable(schedule) else float(schedule)
    input_share = float(values["input_seconds"]) / max(output.seconds, 1e-9)
    with self.writer.at(output.step):
      tf.summary.scalar("loss_per_pair", loss)
      tf.summary.scalar("pretext_accuracy", accuracy)
      tf.summary.scalar("learning_rate", rate)
      tf.summary.scalar("pairs_per_second", pairs / output.seconds)
      tf.summary.scalar("input_wait_share", input_share)
      for k, variable in self.counters.items():
        tf.summary.scalar(f"images/{k}", int(variable))
    last = bool(self.train_steps) and output.step >= self.train_steps
    if output.step != self.logged_step and (self.is_due(output.step) or last or
                                            output.status != control.STATUS_OK):
      self.logged_step = output.step
      total = f"/{self.train_steps}" if self.train_steps else ""
      logging.info("step %d%s  loss/pair %.4f  accuracy %.3f  %.0f pairs/s  input wait %.0f%%  lr %.3g  "
                   "images %d (too small %d, unreadable %d)  %s", output.step, total, loss, accuracy,
                   pairs / output.seconds, 100 * input_share, rate, int(self.counters["images"]),
                   int(self.counters["too_small"]), int(self.counters["unreadable"]), self.timing(output.step, now))

  def timing(self, step, now):
    parts = [f"elapsed {progress_lib.duration(now - self.start)}"]
    if self.train_steps:
      origin_time, origin_step = self.rate_origin
      left = self.train_steps - step
      if not left:
        parts.append("ETA 0:00:00")
      elif step > origin_step:
        parts.append(f"ETA {progress_lib.duration(left * (now - origin_time) / (step - origin_step))}")
      else:
        parts.append("ETA ?")
    if self.skipped:
      parts.append(f"float16 overflows skipped {self.skipped} updates")
    return "  ".join(parts)


class PairImages(Action):
  """A few pairs as the model sees them (after augmentation), each drawn as a 3x3 board with the first patch in the
  centre and the second in the cell its label names (method.md §2.3), so the labels can be checked by eye."""

  def __init__(self, writer, every):
    self.writer, self.every = writer, every

  def __call__(self, output):
    if not (output.steps and self.is_due(output.step)):
      return
    image = preview_image({k: v.numpy() for k, v in output.values["preview"].items()})
    if image is not None:
      with self.writer.at(output.step):
        tf.summary.image("pairs_first_centre_second_at_label", image, max_outputs=trainer_lib.PREVIEW_PAIRS)


class Histograms(Action):
  """Histograms of every trainable variable."""

  def __init__(self, writer, every, variables):
    self.writer, self.every, self.variables = writer, every, variables

  def __call__(self, output):
    if output.steps and self.is_due(output.step):
      with self.writer.at(output.step):
        for variable in self.variables:
          tf.summary.histogram(variable.path, variable)


class Checkpoints(Action):
  """tf.train checkpoints every `every` steps, and on request (stop, pause, end); never twice for one step."""

  def __init__(self, manager, every, trainer):
    self.manager, self.every, self.trainer = manager, every, trainer
    self.last_step = trainer.current_step()

  def __call__(self, output):
    if self.is_due(output.step):
      self.save("interval")

  def end(self, step, finished):
    if finished:
      self.save("end of training")

  @property
  def latest(self):
    return self.manager.latest_checkpoint

  def save(self, reason):
    step = self.trainer.current_step()
    if step == self.last_step:
      return
    previous = self.manager.latest_checkpoint
    try:
      path = self.manager.save(checkpoint_number=step)
    except (OSError, tf.errors.OpError) as e:
      raise run_dir.write_failure(f"the checkpoint of step {step}", self.manager.directory, e, previous) from e
    self.last_step = step
    logging.info("Checkpoint %s written (%s).", path, reason)


class Exports(Action):
  """The folded backbone as a SavedModel at RUN/export/backbone_<step>, every `every` steps and at the end, each
  written whole or not at all (writes.atomic_folder); what a killed run left half-written is cleaned up first."""

  def __init__(self, write_dir, every, trainer, model_config, input_config, latest_checkpoint, spans=()):
    self.write_dir, self.every, self.trainer = write_dir, every, trainer
    self.model_config, self.input_config, self.latest_checkpoint = model_config, input_config, latest_checkpoint
    self.spans = spans  # run_dir.RunConfig.spans: what each span of the run's steps was trained with
    folder = os.path.dirname(run_dir.export_path(write_dir, 0))
    if tf.io.gfile.isdir(folder):
      writes.recover_folders(folder)

  def __call__(self, output):
    if output.steps and self.is_due(output.step):
      self.export()

  def end(self, step, finished):
    if finished:
      self.export()

  def export(self):
    step = self.trainer.current_step()
    path = run_dir.export_path(self.write_dir, step)
    latest = self.latest_checkpoint()
    checkpoint = latest if latest and run_dir.checkpoint_step(latest) == step else None
    try:
      serving.export_backbone(self.trainer.networks.tower, self.model_config, path,
                              color_mode=self.input_config.color_mode, geometry=self.input_config.geometry,
                              **serving.provenance(step, checkpoint, self.input_config, spans=self.spans))
    except (OSError, tf.errors.OpError) as e:
      raise run_dir.write_failure(f"the backbone SavedModel of step {step}", path, e,
                                  self.latest_checkpoint()) from e
    logging.info("Backbone SavedModel written to %s.", path)


class SkippedImages(Action):
  """Names the images the input pipeline skipped (the trainer's `skipped` rows of stream index and reason,
  data._Packer): each one once, in `path` (RUN/skipped.txt: step, reason and name, tab-separated; a resumed run
  keeps the names it holds), the first LOGGED of an invocation in the log too. `name_of` turns a stream index into
  the image's name (train.skipped_names); only the chief (`write`) writes the file."""
  every_call = True
  LOGGED = 5

  def __init__(self, path, name_of, write=True, latest_checkpoint=lambda: None):
    self.path, self.name_of, self.write, self.latest_checkpoint = path, name_of, write, latest_checkpoint
    self.named, self.logged = set(), 0
    if paths_lib.is_file(path):
      self.named = {line.split("\t", 2)[-1] for line in paths_lib.read_text(path, errors="replace").splitlines()}

  def __call__(self, output):
    rows = np.asarray(output.values.get("skipped", np.zeros([0, 2])))
    new = []
    for index, reason in rows:
      name = self.name_of(int(index))
      if name not in self.named:
        self.named.add(name)
        new.append((data_lib.SKIPPED_REASONS[int(reason)], name))
    if not new:
      return
    if self.write:
      try:
        # GFile's append: a local file is appended to, an object on a store rewritten whole.
        with tf.io.gfile.GFile(self.path, "a") as f:
          f.write("".join(f"{output.step}\t{reason}\t{name}\n" for reason, name in new))
      except (OSError, tf.errors.OpError) as e:
        raise run_dir.write_failure(f"the names of the images skipped by step {output.step}", self.path, e,
                                    self.latest_checkpoint()) from e
    for reason, name in new[:max(0, self.LOGGED - self.logged)]:
      logging.warning("Skipped %s: %s (by step %d).", name, reason, output.step)
    if self.logged < self.LOGGED <= self.logged + len(new):
      logging.warning("More skipped images are named in %s only.", self.path)
    self.logged += len(new)


class Profile(Action):
  """A tf.profiler trace of steps first to last (--profile_steps), into the TensorBoard log folder."""

  def __init__(self, first, last, logdir):
    self.first, self.last, self.logdir = first, last, logdir
    self.active = False

  def due_in(self, step):
    return [b - step for b in (self.first, self.last) if self.last and b > step]

  def before(self, step):
    """Starts the trace when the next call begins at the first step."""
    if self.last and step == self.first and not self.active:
      tf.profiler.experimental.start(self.logdir)
      self.active = True

  def __call__(self, output):
    if self.active and output.step >= self.last:
      self.stop()

  def end(self, step, finished):
    self.stop()

  def stop(self):
    if self.active:
      tf.profiler.experimental.stop()
      self.active = False
      logging.info("Profile of steps %d-%d written under %s.", self.first, self.last, self.logdir)


def preview_image(preview):
  """Pairs as a picture: each pair is a 3x3 board with the first patch in the centre and the second patch in the
  cell its label names (method.md §2.3; with rotation classes the label's direction part, label mod 8, which names
  where the second patch lies as the network sees it, method.md §9.6)."""
  size, gap = preview["first"].shape[1], 8
  cell = size + gap
  boards = []
  for first, second, label, valid in zip(preview["first"], preview["second"], preview["label"], preview["valid"]):
    if not valid:
      continue
    board = np.full((3 * cell, 3 * cell, 3), 0.5, np.float32)
    dx, dy = patches_lib.NEIGHBOUR_OFFSETS[int(label) % len(patches_lib.NEIGHBOUR_OFFSETS)]
    for patch, (cx, cy) in ((first, (1, 1)), (second, (1 + dx, 1 + dy))):
      lo, hi = patch.min(), patch.max()
      board[cy * cell:cy * cell + size, cx * cell:cx * cell + size] = (patch - lo) / max(hi - lo, 1e-6)
    boards.append(board)
  return np.stack(boards) if boards else None


def close_writer(writer):
  try:
    writer.close()
  except (OSError, tf.errors.OpError) as e:  # a full disk: already reported, or the run finished before it
    logging.warning("Could not flush the TensorBoard summaries: %s", errors.tf_error_message(e, 200))


def write_hparams(flag_values):
  """The flags as TensorBoard text, and in the HParams dashboard when the tensorboard package is installed, into the
  default summary writer."""
  try:
    from tensorboard.plugins.hparams import api as hparams_api  # pylint: disable=import-outside-toplevel
  except ImportError:
    pass
  else:
    hparams_api.hparams({k: v for k, v in flag_values.items() if isinstance(v, (bool, int, float, str))})
  tf.summary.text("flags", "\n".join(f"    --{k}={v}" for k, v in sorted(flag_values.items())), step=0)
