"""A trained run rebuilt from its directory: the networks of its recorded config with a checkpoint's weights, in
float32, for export and evaluation (run_dir.py says where things are; this builds and restores them)."""
import dataclasses

import tensorflow as tf

from context_keras import augment
from context_keras import errors
from context_keras import fold
from context_keras import model as model_lib
from context_keras import run_dir


def build_networks(model_config):
  """The networks of `model_config` in float32, whatever precision training used."""
  with fold.float32_policy():
    return model_lib.build(model_config)


def restore(networks, path):
  """Loads the tower and head of a training checkpoint (trainer.Trainer.checkpoint_items) into `networks`."""
  status = tf.train.Checkpoint(tower=networks.tower, head=networks.head).restore(path)
  try:
    status.assert_existing_objects_matched()
  except AssertionError as e:
    raise errors.UsageError(f"checkpoint {path} does not match the run's architecture: {str(e)[:300]}") from e
  status.expect_partial()  # the optimizer and the run's counters are not needed here


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
    return self.config.input.geometry

  @property
  def preprocessing(self):
    """The exported models' preprocessing of uint8 input (augment.preprocessing_mode)."""
    return augment.preprocessing_mode(self.geometry, self.color_mode)

  @property
  def pixelation(self):
    return self.config.input.pixelation

  def describe(self):
    return {"model_dir": self.model_dir, "checkpoint": self.checkpoint, "step": self.step,
            "backbone": self.model_config.backbone, "width_multiplier": self.model_config.width_multiplier,
            "head": self.model_config.head, "geometry": self.geometry, "color_mode": self.color_mode}


def load_run(model_dir, checkpoint=None):
  """Rebuilds a run's architecture from its recorded config and restores a checkpoint (default: the latest)."""
  config = run_dir.read_config(model_dir)
  path = run_dir.find_checkpoint(model_dir, checkpoint)
  networks = build_networks(config.model)
  restore(networks, path)
  return Run(model_dir=model_dir, checkpoint=path, step=run_dir.checkpoint_step(path), config=config,
             networks=networks)
