"""A trained run rebuilt from its directory: the networks of its recorded config with a checkpoint's weights, in
float32, for export and evaluation (run_dir.py says where things are; this builds and restores them)."""
import dataclasses

from absl import logging
import tensorflow as tf

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
