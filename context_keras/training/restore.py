"""A trained run rebuilt from its directory: the networks of its recorded config with a checkpoint's weights, in
float32, for export and evaluation (run_dir.py says where things are; this builds and restores them)."""
import dataclasses
import logging as std_logging
import os
import tempfile

from absl import logging
import tensorflow as tf
from tensorflow.core.protobuf import trackable_object_graph_pb2

from context_keras import errors
from context_keras.model import fold
from context_keras.model import networks as model_lib
from context_keras.storage import paths as paths_lib
from context_keras.training import run_dir


def build_networks(model_config):
  """The networks of `model_config` in float32, whatever precision training used."""
  with fold.float32_policy():
    return model_lib.build(model_config)


def restore(networks, path):
  """Loads the tower and head of a training checkpoint (trainer.Trainer.checkpoint_items) into `networks`."""
  try:
    status = tf.train.Checkpoint(tower=networks.tower, head=networks.head).restore(path)
    status.assert_existing_objects_matched()
  except (AssertionError, ValueError) as e:  # variables missing, or of other shapes
    raise errors.UsageError(f"checkpoint {path} does not match the run's architecture: "
                            f"{str(e).splitlines()[0][:300]}") from e
  status.expect_partial()  # the optimizer and the run's counters are not needed here


def _recorded_names(path):
  """{checkpoint key: the name its value was saved under} of the values of checkpoint `path`."""
  graph = trackable_object_graph_pb2.TrackableObjectGraph()
  graph.ParseFromString(tf.train.load_checkpoint(path).get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
  return {a.checkpoint_key: a.full_name or a.checkpoint_key.split("/.ATTRIBUTES")[0] for node in graph.nodes
          for a in node.attributes if a.name == "VARIABLE_VALUE"}


def _mismatch(path, items):
  """(names of the values of checkpoint `path` that `items` have no place for, names of the variables of `items` that
  it holds no value for). The keys `items` would be saved under come from writing them to a temporary folder: only
  when a restore has already failed."""
  with tempfile.TemporaryDirectory(prefix="context_keras_resume_") as probe:
    ours = _recorded_names(tf.train.Checkpoint(**items).write(os.path.join(probe, "probe")))
  theirs = _recorded_names(path)
  extra, missing = sorted(theirs.keys() - ours.keys()), sorted(ours.keys() - theirs.keys())
  # A name found on both sides (the BN statistics of another head) says more as its place in the checkpoint.
  ambiguous = {theirs[k] for k in extra} & {ours[k] for k in missing}

  def name(names, key):
    return key.split("/.ATTRIBUTES")[0] if names[key] in ambiguous else names[key]
  return [name(theirs, k) for k in extra], [name(ours, k) for k in missing]


def _some(names):
  return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


class _UnrestoredValueWarnings(std_logging.Filter):
  """Drops TensorFlow's warning per checkpoint value left unrestored (several hundred for a ResNet), which it logs when
  the objects of a failed restore are collected, often at exit: `resume` has said what is wrong in one line."""

  def filter(self, record):
    message = record.getMessage()
    return not message.startswith(("Value in checkpoint could not be found", "Detecting that an object or model or "
                                                                              "tf.train.Checkpoint is being deleted"))


def resume(path, items):
  """Restores a training checkpoint into `items` (trainer.Trainer.checkpoint_items and the run's counters), every
  value of it into its place and every variable of `items` from it: a resume that left out either (the momentum slots
  of a run resumed without momentum) would go on silently from another state. A UsageError says which
  (run_dir.check_resume names the flags, before this, wherever config.json can tell)."""
  status = None
  try:
    status = tf.train.Checkpoint(**items).restore(path)
    status.assert_existing_objects_matched()
    status.assert_consumed()
  except (ValueError, AssertionError, tf.errors.InvalidArgumentError) as e:  # shapes, places or types that differ
    std_logging.getLogger("tensorflow").addFilter(_UnrestoredValueWarnings())
    if status is not None:
      status.expect_partial()
    extra, missing = _mismatch(path, items)
    problems = ([f"{len(extra)} of its values have no place in their networks and optimizer (e.g. {_some(extra)})"]
                if extra else []) + (
        [f"it holds no value for {len(missing)} of their variables (e.g. {_some(missing)})"] if missing else [])
    detail = "; ".join(problems) or errors.tf_error_message(e, 300)
    raise errors.UsageError(f"--model_dir: checkpoint {path} does not fit the networks and optimizer of these flags: "
                            f"{detail}. A flag that decides what they hold differs from the run's "
                            "(--flagfile=RUN/flags.txt repeats the run's flags)") from e


def check_checkpoint_origin(model_dir, config, path):
  """A --checkpoint from another run directory must hold the architecture that --model_dir's config describes: a
  UsageError naming the fields that differ."""
  origin = paths_lib.parent(path)
  if paths_lib.same(origin, model_dir) or not run_dir.recorded_in(origin):
    return
  differences = run_dir.architecture_differences(config, run_dir.read_config(origin).model)
  if differences:
    named = ", ".join(f"--{name}={theirs} (--model_dir's run: {ours})" for name, ours, theirs in differences)
    raise errors.UsageError(f"--checkpoint={path} belongs to the run in {origin}, trained with {named}: give a "
                            f"checkpoint of --model_dir={model_dir}, or that run's own directory as --model_dir")


@dataclasses.dataclass
class Run:
  """A trained run, restored: everything export and evaluation need to rebuild and describe it."""
  model_dir: str
  checkpoint: str
  step: int
  config: run_dir.RunConfig
  networks: model_lib.Networks

  @property
  def model_config(self):
    return self.config.model

  @property
  def color_mode(self):
    return self.config.input.color_mode

  @property
  def geometry(self):
    """The name of the run's --geometry."""
    return self.config.input.geometry

  @property
  def patch_geometry(self):
    return self.config.input.patch_geometry

  @property
  def preprocessing(self):
    """The exported models' preprocessing of uint8 input, and the run's colour handling as reports name it
    (geometry.Geometry.preprocessing)."""
    return self.patch_geometry.preprocessing(self.color_mode)

  @property
  def pixelation(self):
    return self.config.input.pixelation

  def describe(self):
    return {"model_dir": self.model_dir, "checkpoint": self.checkpoint, "step": self.step,
            "backbone": self.model_config.backbone, "width_multiplier": self.model_config.width_multiplier,
            "head": self.model_config.head, "geometry": self.geometry, "color_mode": self.preprocessing}


# How often a run's latest checkpoint may vanish while it is read before load_run gives up.
ATTEMPTS = 5


def _complete(path):
  """Whether all files of checkpoint `path` are still there (its index and data shards)."""
  data = tf.io.gfile.glob(f"{path}.data-*")
  shards = data[0].rsplit("-of-", 1)[-1] if data else ""
  return tf.io.gfile.exists(f"{path}.index") and bool(data) and shards.isdigit() and len(data) == int(shards)


def load_run(model_dir, checkpoint=None):
  """Rebuilds a run's architecture from its recorded config and restores a checkpoint (default: the latest).

  A trainer with --keep_checkpoints deletes its oldest checkpoint whenever it writes one, which can be the one being
  read here: the latest is then looked up again and read, and a `checkpoint` chosen by the caller is named in a
  UsageError with the checkpoints that remain."""
  config = run_dir.read_config(model_dir)
  networks = build_networks(config.model)
  for _ in range(ATTEMPTS):
    path = run_dir.find_checkpoint(model_dir, checkpoint)
    check_checkpoint_origin(model_dir, config, path)
    try:
      restore(networks, path)
      step = run_dir.checkpoint_step(path)
    except tf.errors.OpError as e:
      if _complete(path):
        raise errors.UsageError(f"checkpoint {path} cannot be read: {errors.tf_error_message(e)}") from e
      if checkpoint:
        remaining = ", ".join(run_dir.checkpoint_paths(model_dir)) or "none"
        raise errors.UsageError(f"--checkpoint={checkpoint}: {path} disappeared while it was being read (a training "
                                "run's --keep_checkpoints removes old checkpoints); the run now holds: "
                                f"{remaining}") from e
      logging.warning("%s disappeared while it was being read (the trainer removes old checkpoints); reading the "
                      "latest again: %s", path, errors.tf_error_message(e, 200))
      continue
    return Run(model_dir=model_dir, checkpoint=path, step=step, config=config, networks=networks)
  raise errors.UsageError(f"--model_dir={model_dir}: its latest checkpoint ({path}) disappeared {ATTEMPTS} times "
                          "while it was being read; is the run's --keep_checkpoints very small?")
