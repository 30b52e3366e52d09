"""The SavedModels a trained network is served as: the folded backbone and the pair classifier, each a tf.Module
with explicit signatures and the preprocessing built in, plus the metadata file that describes them.

An export folder OUT (python -m context_keras.export) holds
  OUT/backbone/            BackboneModule: features (uint8 images of any size >= 96 px -> maps) and patch_features
  OUT/pair_classifier/     PairClassifierModule: logits (uint8 patch pairs -> 8 logits) and logits_preprocessed
  OUT/context_model.keras  the two-input training model (unfolded, with its BN statistics)
  OUT/rescale.json         with rescaling: rescale.py's report
Training writes the same backbone module to RUN/export/backbone_<step> (export_backbone). Both SavedModels need only
TensorFlow: tf.saved_model.load works in a process that never imports context_keras.
"""
import json
import os

import keras
import tensorflow as tf

from context_keras import augment as augment_lib
from context_keras import caffe_layers
from context_keras import errors
from context_keras import fold
from context_keras import patches as patches_lib
from context_keras import writes

BACKBONE_DIR = "backbone"
PAIR_CLASSIFIER_DIR = "pair_classifier"
CONTEXT_MODEL_FILE = "context_model.keras"
RESCALE_FILE = "rescale.json"
# SavedModel's folder for files of higher-level libraries, which loaders ignore.
METADATA_FILE = os.path.join("assets.extra", "context_keras.json")
PREPROCESSING = ("upright uint8 RGB (the caller applies any EXIF orientation, as training's decoding did) -> float; "
                 "per image, each channel's mean is subtracted; then, by the run's --color_mode (method.md §2.4): "
                 "drop/drop_gaussian: each channel scaled to RMS 50/sqrt(3) (the expected conv1 input over the kept "
                 "channel); project: the green-magenta projection, then RMS 50; none: RMS 50")


def preprocess(images, color_mode):
  """What the SavedModels apply to their uint8 input (README 'Export and evaluation'): patches.standardize."""
  return augment_lib.standardize(tf.cast(images, tf.float32), color_mode)


def _flat_fc6(maps):
  fc6 = maps["fc6"]
  return tf.reshape(fc6, [tf.shape(fc6)[0], fc6.shape[-1]])


class BackboneModule(tf.Module):
  """The folded backbone behind two functions (also its signatures).

  features(images):      uint8 [N, H, W, 3], H and W >= 96, upright (pixels carry no EXIF orientation: the caller
                         applies it, as decoding.decode does) -> {conv1 ... conv5, pool5, fc6} float32 maps (after
                         ReLU; pool5 after pooling), the preprocessing built in.
  patch_features(patches): float32 [N, 96, 96, 3] already preprocessed as in training -> {"fc6": [N, C]}.
  """

  def __init__(self, folded, color_mode):
    super().__init__()
    self.model = folded
    self.color_mode = color_mode

  @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
  def features(self, images):
    size = tf.shape(images)[1:3]
    check = tf.debugging.assert_greater_equal(
        size, patches_lib.PATCH_SIZE, message=f"images must be at least {patches_lib.PATCH_SIZE}x"
        f"{patches_lib.PATCH_SIZE} pixels (one patch)")
    with tf.control_dependencies([check]):
      x = preprocess(images, self.color_mode)
    return self.model(x, training=False)

  @tf.function(input_signature=[tf.TensorSpec([None, patches_lib.PATCH_SIZE, patches_lib.PATCH_SIZE, 3],
                                              tf.float32, name="patches")])
  def patch_features(self, patches):
    return {"fc6": _flat_fc6(self.model(patches, training=False))}


class PairClassifierModule(tf.Module):
  """The context model, folded: where is patch B relative to patch A (labels as patches.NEIGHBOUR_OFFSETS).

  logits(patch_a, patch_b):              uint8 [N, 96, 96, 3] each, cut from upright images, preprocessing built
                                         in -> {"logits": [N, 8]}.
  logits_preprocessed(patch_a, patch_b): float32 patches preprocessed as in training -> {"logits": [N, 8]}.
  """

  def __init__(self, folded_tower, folded_head, color_mode):
    super().__init__()
    self.tower = folded_tower
    self.head = folded_head
    self.color_mode = color_mode

  @tf.function(input_signature=[tf.TensorSpec([None, patches_lib.PATCH_SIZE, patches_lib.PATCH_SIZE, 3], tf.uint8,
                                              name=name) for name in ("patch_a", "patch_b")])
  def logits(self, patch_a, patch_b):
    return self.logits_preprocessed(preprocess(patch_a, self.color_mode), preprocess(patch_b, self.color_mode))

  @tf.function(input_signature=[tf.TensorSpec([None, patches_lib.PATCH_SIZE, patches_lib.PATCH_SIZE, 3],
                                              tf.float32, name=name) for name in ("patch_a", "patch_b")])
  def logits_preprocessed(self, patch_a, patch_b):
    n = tf.shape(patch_a)[0]
    fc6 = _flat_fc6(self.tower(tf.concat([patch_a, patch_b], 0), training=False))
    return {"logits": self.head(tf.concat([fc6[:n], fc6[n:]], -1), training=False)}


def metadata(model_config, color_mode, folded=None, **extra):
  """What a SavedModel's assets.extra/context_keras.json says: enough to rebuild the architecture (evaluate.py's
  random-init baseline) and to use it."""
  info = {"backbone": model_config.backbone, "width_multiplier": model_config.width_multiplier,
          "color_mode": color_mode, "preprocessing": PREPROCESSING, "min_size": patches_lib.PATCH_SIZE,
          "neighbour_offsets_dx_dy": patches_lib.NEIGHBOUR_OFFSETS}
  if folded is not None:
    info["features"] = {name: int(t.shape[-1]) for name, t in folded.output.items()}
  info.update(extra)
  return info


def write_metadata(path, info):
  os.makedirs(os.path.join(path, os.path.dirname(METADATA_FILE)), exist_ok=True)
  writes.atomic_write_json(os.path.join(path, METADATA_FILE), info)


def read_metadata(path):
  try:
    with open(os.path.join(path, METADATA_FILE), encoding="utf-8") as f:
      return json.load(f)
  except OSError as e:
    raise errors.UsageError(f"--saved_model={path}: no {METADATA_FILE}; not written by context_keras.export") from e


def save_backbone(folded, path, color_mode, info, serving_default="features"):
  """Writes the folded backbone as a SavedModel with signatures features and patch_features; `serving_default`
  names the one that is also the default."""
  module = BackboneModule(folded, color_mode)
  signatures = {"features": module.features.get_concrete_function(),
                "patch_features": module.patch_features.get_concrete_function()}
  signatures["serving_default"] = signatures[serving_default]
  tf.saved_model.save(module, path, signatures=signatures)
  write_metadata(path, dict(info, serving_default=serving_default))
  return path


def export_backbone(tower, model_config, path, color_mode="drop"):
  """The folded, fully convolutional backbone of `tower` as a SavedModel at `path` (train.py's end-of-training export).

  The same module as the export command's OUT/backbone, both signatures included, but serving_default stays
  patch_features (preprocessed float32 patches -> {"fc6": [N, C]}), the contract RUN/export/backbone_<step> has
  always had; features (uint8 images) is the other signature.
  """
  folded = fold.fold_tower(tower, model_config)
  return save_backbone(folded, path, color_mode, metadata(model_config, color_mode, folded),
                       serving_default="patch_features")


def save_pair_classifier(networks, model_config, path, color_mode, info):
  module = PairClassifierModule(fold.fold_tower(networks.tower, model_config), fold.fold_batchnorm(networks.head),
                                color_mode)
  signatures = {"logits": module.logits.get_concrete_function(),
                "logits_preprocessed": module.logits_preprocessed.get_concrete_function()}
  signatures["serving_default"] = signatures["logits"]
  tf.saved_model.save(module, path, signatures=signatures)
  write_metadata(path, dict(info, serving_default="logits"))
  return path


def load_context_model(path):
  """OUT/context_model.keras as a Keras model: its custom layers are model.py's."""
  custom = {cls.__name__: cls for cls in (caffe_layers.CaffeBatchNorm, caffe_layers.LocalResponseNorm)}
  return keras.saving.load_model(path, custom_objects=custom)
