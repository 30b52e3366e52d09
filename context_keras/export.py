"""SavedModels of a trained tower that load with plain `tf.saved_model.load`, without context_keras."""
import contextlib

import keras
import tensorflow as tf

from context_keras import model as model_lib
from context_keras import patches as patches_lib


@contextlib.contextmanager
def float32_policy():
  """Builds serving copies in float32 whatever precision training used."""
  previous = keras.config.dtype_policy()
  keras.config.set_dtype_policy("float32")
  try:
    yield
  finally:
    keras.config.set_dtype_policy(previous)


class BackboneModule(tf.Module):
  """The tower in inference mode (moving BN statistics) behind one signature."""

  def __init__(self, tower):
    super().__init__()
    self.tower = tower

  @tf.function(input_signature=[tf.TensorSpec([None, patches_lib.PATCH_SIZE, patches_lib.PATCH_SIZE, 3],
                                              tf.float32, name="patches")])
  def serve(self, patches):
    """patches: preprocessed as in training (spec 2.4: colour handling, RMS 50). Returns fc6 after its ReLU."""
    valid = tf.ones(tf.shape(patches)[:1])
    return {"fc6": self.tower([patches, valid], training=False)}


def export_backbone(tower, model_config, path):
  """Writes a float32 copy of `tower` as a SavedModel at `path` (serving_default: patches -> {"fc6"})."""
  with float32_policy():
    serving_tower = model_lib.BACKBONES[model_config.backbone](model_config)
  serving_tower.set_weights([tf.convert_to_tensor(w) for w in tower.get_weights()])
  module = BackboneModule(serving_tower)
  tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
  return path
