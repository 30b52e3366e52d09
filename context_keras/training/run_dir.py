"""The run directory: its layout, its writing side (training) and its reading side (export, evaluate, training's
resume), so that every path in it and every way of reading it back has one home.

  RUN/flags.txt          the flags of the latest training invocation; itself a flagfile (--flagfile=RUN/flags.txt)
  RUN/config.json        the model, input and optimisation configs as data: what export and evaluate rebuild from
  RUN/checkpoint, ckpt-N tf.train checkpoints (tf.train.CheckpointManager's state file and checkpoints)
  RUN/train.log          the log of every training invocation, appended
  RUN/skipped.txt        the images the input pipeline skipped, each once: step, reason, path (actions.SkippedImages)
  RUN/.lock              held by the training process while it runs (locks.folder_lock: flock, or a lock object on a
                         store)
  RUN/train_quit, RUN/train_pause  control files of this run alone (besides --quit_file and --pause_file)
  RUN/train/             TensorBoard logs of training
  RUN/export/backbone_N/ SavedModels of the backbone written by training
  RUN/eval/              evaluation results (evaluate's default --eval_dir)
  RUN/workertemp_<task>/ scratch of a non-chief worker of multi-worker training, removed at its end
"""
import dataclasses
import json
import os
import re

from absl import logging
import tensorflow as tf

from context_keras import errors
from context_keras.input import geometry as geometry_lib
from context_keras.input import pipeline as data_lib
from context_keras.model import networks as model_lib
from context_keras.storage import locks
from context_keras.storage import logs
from context_keras.storage import paths as paths_lib
from context_keras.storage import writes
from context_keras.training import trainer as trainer_lib

FLAGS_FILE = "flags.txt"
CONFIG_FILE = "config.json"
LOG_FILE = "train.log"
SKIPPED_FILE = "skipped.txt"
LOCK_FILE = locks.LOCK_FILE
TRAIN_DIR = "train"
EXPORT_DIR = "export"
EVAL_DIR = "eval"
CHECKPOINT_PREFIX = "ckpt"
_CHECKPOINT_INDEX = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d+)\.index$")
QUIT_FILE = "train_quit"    # control files of this run alone (control.py)
PAUSE_FILE = "train_pause"
# Where the training step lives in a checkpoint (Keras' optimizer iterations, under trainer.checkpoint_items): float16's
# loss-scale optimizer counts it in the optimizer it wraps (its own `_iterations` stays 0), so that one comes first.
STEP_KEYS = ("optimizer/inner_optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE",
             "optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE")


def train_dir(model_dir):
  return os.path.join(model_dir, TRAIN_DIR)


def export_path(model_dir, step):
  return os.path.join(model_dir, EXPORT_DIR, f"backbone_{step}")


def exports(model_dir):
  """The backbone exports training wrote in RUN/export, by step."""
  folder = os.path.join(model_dir, EXPORT_DIR)
  steps = [int(m.group(1)) for m in map(re.compile(r"^backbone_(\d+)/?$").match,
                                        paths_lib.listdir(folder) if tf.io.gfile.isdir(folder) else []) if m]
  return [export_path(model_dir, step) for step in sorted(steps)]


def eval_dir(model_dir):
  return os.path.join(model_dir, EVAL_DIR)


def worker_scratch(model_dir, task):
  return os.path.join(model_dir, f"workertemp_{task}")


# --------------------------------------------------------------------------------------------------------------
# Writing


def create(model_dir):
  """Checks (and makes) RUN before any other work; a UsageError naming --model_dir when it cannot be used. Returns
  it normalised (paths_lib.normalise), the form every later use takes."""
  if not model_dir:
    raise errors.UsageError("--model_dir is required: the run directory for checkpoints, logs and exports")
  return writes.check_folder(model_dir, "model_dir")


def lock(model_dir, flag="model_dir", holder="training"):
  """Keeps a second trainer (or linear evaluation job) off a run directory: RUN/.lock (locks.folder_lock)."""
  return locks.folder_lock(model_dir, flag, holder, then="stop that run first, or choose another")


class LogFile:
  """Appends this process's log lines to RUN/train.log (or folder/name) while in use (a context manager), on a
  local disk or a store (storage/logs.py)."""

  def __init__(self, model_dir, name=LOG_FILE):
    self.handler = logs.handler(os.path.join(model_dir, name))

  def __enter__(self):
    logging.get_absl_logger().addHandler(self.handler)
    return self

  def __exit__(self, *exc):
    logging.get_absl_logger().removeHandler(self.handler)
    self.handler.close()


def write_flags(model_dir, lines):
  """RUN/flags.txt from serialised flags (--name=value lines): --flagfile=RUN/flags.txt repeats the run."""
  writes.atomic_write(os.path.join(model_dir, FLAGS_FILE), "\n".join(sorted(lines)) + "\n")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """What a run was trained with, as RUN/config.json records it; `init_from`, what the run started from
  (warm_start.initialise's record), or None for a run from random initialisation. `spans`: what each span of its
  steps was trained with, [{"from_step", "input", "optimisation"}] in step order, one more whenever a resume changed
  them (continued); `input` and `optimisation` are the last span's."""
  model: model_lib.ModelConfig
  input: data_lib.InputConfig
  optimisation: trainer_lib.OptimConfig
  init_from: dict = None
  spans: tuple = ()

  @property
  def train_steps(self):
    return self.optimisation.train_steps

  def span_from(self, step):
    """This config's input and optimisation as the span that begins at `step`."""
    return {"from_step": step, **_as_json({"input": self.input, "optimisation": self.optimisation})}


def _as_json(value):
  """A config (or dict of configs) as config.json stores it: tuples become lists, dataclasses dicts."""
  return json.loads(json.dumps(value, default=dataclasses.asdict))


def continued(recorded, config, step):
  """(`config` with the spans of the run's `recorded` config, plus a span from `step` on when its input or
  optimisation differ from the last span's; the flags that differ, [(name, then, now)]). Training at `step` (0 for
  a new run, which gets its first span)."""
  spans = list(recorded.spans) if recorded is not None else []
  if recorded is not None and not spans:  # a run recorded before spans were: one span of what it recorded
    spans.append(recorded.span_from(0))
  now = config.span_from(step)
  last = spans[-1] if spans else None
  differences = [] if last is None else [
      (name, last[part].get(name), value) for part in ("input", "optimisation") for name, value in now[part].items()
      if value != last[part].get(name)]
  if last is None or differences:
    spans.append(now)
  return dataclasses.replace(config, spans=tuple(spans)), differences


def write_config(model_dir, config):
  writes.atomic_write_json(os.path.join(model_dir, CONFIG_FILE), dataclasses.asdict(config))


def write_failure(what, directory, error, previous):
  """The WriteError for a failed write into the run directory (a full disk, a folder made read-only)."""
  return writes.failure(what, directory, error, f"The previous checkpoint {previous or '(none)'} is intact; free "
                        "space or fix the folder, then re-run to resume from it.")


# --------------------------------------------------------------------------------------------------------------
# Reading


def _check_exists(model_dir):
  if not tf.io.gfile.isdir(model_dir):
    raise errors.UsageError(f"--model_dir={model_dir} does not exist")


def read_flags(model_dir):
  """The flags recorded in RUN/flags.txt, {name: value as written}; booleans as 'true'/'false'."""
  values = {}
  for line in paths_lib.read_text(os.path.join(model_dir, FLAGS_FILE)).splitlines():
    line = line.strip()
    if not line.startswith("--"):
      continue
    name, sep, value = line[2:].partition("=")
    if not sep:  # a boolean: --name or --noname
      name, value = (name[2:], "false") if name.startswith("no") and name not in _BOOLEAN_FIELDS else (name, "true")
    values[name] = value
  return values


def _config_fields(cls):
  return {f.name: f for f in dataclasses.fields(cls)}


_BOOLEAN_FIELDS = {name for cls in (model_lib.ModelConfig, data_lib.InputConfig, trainer_lib.OptimConfig)
                   for name, field in _config_fields(cls).items() if isinstance(field.default, bool)}


def _from_values(cls, values):
  """An instance of config class `cls` from {field: value}: JSON values as they are, flags.txt strings converted
  to the type of the field's default; absent fields keep their defaults."""
  kwargs = {}
  for name, field in _config_fields(cls).items():
    if name not in values:
      continue
    value, default = values[name], field.default
    if isinstance(value, str) and isinstance(default, (bool, int, float)):
      value = {"true": True, "false": False}[value] if isinstance(default, bool) else type(default)(value)
    kwargs[name] = value
  return cls(**kwargs)


def read_config(model_dir):
  """The RunConfig of a run: from RUN/config.json, or for runs written before it existed, from RUN/flags.txt."""
  _check_exists(model_dir)
  path = os.path.join(model_dir, CONFIG_FILE)
  try:
    if paths_lib.is_file(path):
      recorded = json.loads(paths_lib.read_text(path))
      parts = (recorded["model"], recorded["input"], recorded["optimisation"])
      init_from, spans = recorded.get("init_from"), tuple(recorded.get("spans", ()))
    elif paths_lib.is_file(os.path.join(model_dir, FLAGS_FILE)):
      parts, init_from, spans = (read_flags(model_dir),) * 3, None, ()
    else:
      raise errors.UsageError(f"--model_dir={model_dir} has no {CONFIG_FILE} or {FLAGS_FILE}: not a run directory "
                              "of context_keras.train")
    return RunConfig(_from_values(model_lib.ModelConfig, parts[0]), _from_values(data_lib.InputConfig, parts[1]),
                     _from_values(trainer_lib.OptimConfig, parts[2]), init_from, spans)
  except (OSError, tf.errors.OpError, ValueError, KeyError, TypeError) as e:
    raise errors.UsageError(f"--model_dir={model_dir}: cannot read its recorded configuration: "
                            f"{paths_lib.reason(e) if isinstance(e, (OSError, tf.errors.OpError)) else e}") from e


def recorded_in(model_dir):
  """Where a run records its configuration (config.json, or flags.txt of older runs), or None."""
  for name in (CONFIG_FILE, FLAGS_FILE):
    if paths_lib.is_file(os.path.join(model_dir, name)):
      return os.path.join(model_dir, name)
  return None


def as_flag(field, value):
  """(flag, value as the flag is written) of the training flag that sets a ModelConfig field to `value`
  (cli/model.py): most have the field's name; the patch size is --geometry's, the class count --rotation_classes's
  (method.md §8.2, §9.6)."""
  if field == "patch_size":
    geometry = geometry_lib.with_patch_size(value)
    return "geometry", geometry.name if geometry else f"(patches of {value} px)"
  if field == "num_classes":
    return "rotation_classes", value > model_lib.ModelConfig.num_classes
  if field == "resnet_strides":
    return field, ",".join(str(s) for s in value)
  return field, value


def model_differences(before, after, fields):
  """(flag, value in `before`, value in `after`) of each of `fields` that differs between two ModelConfigs, named as
  the flags that set them (as_flag)."""
  differences = []
  for name in fields:
    if getattr(before, name) != getattr(after, name):
      flag, then = as_flag(name, getattr(before, name))
      differences.append((flag, then, as_flag(name, getattr(after, name))[1]))
  return differences


def architecture_differences(recorded, model_config):
  """(flag, recorded value, value of `model_config`) of every architecture field (model.ARCHITECTURE_FIELDS) that
  differs between the RunConfig `recorded` and `model_config`, named by the flag that sets it."""
  return model_differences(recorded.model, model_config, model_lib.ARCHITECTURE_FIELDS)


def optimizer_state_differences(recorded, optimisation):
  """(flag, recorded value, value of `optimisation`) of the optimisation flags that decide which state the optimizer
  keeps in a checkpoint: momentum slots (none at --momentum=0) and float16's loss scale (trainer.make_optimizer)."""
  then, given = recorded.optimisation, optimisation
  return [(name, getattr(then, name), getattr(given, name)) for name, holds in (
      ("momentum", lambda c: c.momentum > 0), ("mixed_precision", lambda c: c.mixed_precision == "float16"))
          if holds(then) != holds(given)]


def check_resume(model_dir, model_config, optimisation=None):
  """Stops with a UsageError naming the flags, before anything is built, when `model_config` (and `optimisation`, a
  trainer.OptimConfig) would change what the checkpoints of the run in `model_dir` hold or mean, as its recorded
  configuration says: they could not be restored, or only in part."""
  where = recorded_in(model_dir)
  if not where:
    return
  recorded = read_config(model_dir)
  architecture = architecture_differences(recorded, model_config)
  state = optimizer_state_differences(recorded, optimisation) if optimisation is not None else []
  if architecture or state:
    named = ", ".join(f"--{name}={given} (the run: {then})" for name, then, given in architecture + state)
    what = " and ".join(w for w, d in (("architecture", architecture), ("optimizer state", state)) if d)
    raise errors.UsageError(f"Invalid flags: {named}: --model_dir={model_dir} holds a run of another {what} "
                            f"({where}), which its checkpoints cannot be restored into. Give the run's values "
                            f"(--flagfile={os.path.join(model_dir, FLAGS_FILE)} repeats them), or another "
                            "--model_dir")


def find_checkpoint(model_dir, choice=None):
  """Path of RUN's checkpoint to use: `choice` (a path, or a step number N for RUN/ckpt-N), else the latest."""
  if choice:
    path = os.path.join(model_dir, f"{CHECKPOINT_PREFIX}-{choice}") if str(choice).isdigit() else choice
    if not tf.io.gfile.exists(path + ".index"):
      remaining = ", ".join(checkpoint_paths(model_dir)) if tf.io.gfile.isdir(model_dir) else ""
      raise errors.UsageError(f"--checkpoint={choice}: no checkpoint {path} (no {path}.index)"
                              + (f"; the run holds: {remaining}" if remaining else ""))
    return path
  _check_exists(model_dir)
  path = tf.train.latest_checkpoint(model_dir)
  if not path:
    raise errors.UsageError(f"--model_dir={model_dir} holds no checkpoint ({CHECKPOINT_PREFIX}-N) yet")
  return path


def checkpoint_paths(model_dir):
  """RUN/ckpt-N of every checkpoint in RUN (its .index file present), by step."""
  found = []
  for name in paths_lib.listdir(model_dir):
    match = _CHECKPOINT_INDEX.match(name)
    if match:
      found.append((int(match.group(1)), os.path.join(model_dir, name[:-len(".index")])))
  return [path for _, path in sorted(found)]



def checkpoint_reader(path):
  """A reader of the tensors of checkpoint `path` (RUN/ckpt-N). tf.train.load_checkpoint first asks whether the
  path is a folder, which a file system that answers by name prefix (ram://: ckpt-9 is a prefix of ckpt-9.index)
  affirms; the reader itself takes the checkpoint's prefix on every file system."""
  return tf.compat.v1.train.NewCheckpointReader(path)


def checkpoint_step(path):
  """The training step a checkpoint was written at, whatever the precision: the one place that reads it (export,
  evaluate and its --watch, linear_eval, --init_from and training's resume all ask here)."""
  reader = checkpoint_reader(path)
  for key in STEP_KEYS:
    if reader.has_tensor(key):
      return int(reader.get_tensor(key))
  suffix = path.rsplit("-", 1)[-1]
  return int(suffix) if suffix.isdigit() else 0
