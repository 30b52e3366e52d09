"""The SavedModels a trained network is served as: the folded backbone and the pair classifier, each a tf.Module
with explicit signatures and the preprocessing built in, plus the metadata file that describes them.

An export folder OUT (python -m context_keras.export) holds
  OUT/backbone/            BackboneModule: features (uint8 images of any size >= one patch -> maps) and
                           patch_features
  OUT/backbone.keras       the same backbone as a Keras file of standard layers (plain_model.py)
  OUT/pair_classifier/     PairClassifierModule: logits (uint8 patch pairs -> 8 logits) and logits_preprocessed
  OUT/context_model.keras  the two-input training model (unfolded, with its BN statistics)
  OUT/rescale.json         with rescaling: rescale.py's report
  OUT/backbone*.tflite, OUT/backbone.onnx   on request: conversions of OUT/backbone (convert.py)
Training writes the same backbone module to RUN/export/backbone_<step> (export_backbone). Both SavedModels need only
TensorFlow: tf.saved_model.load works in a process that never imports context_keras.

The modules hold their weights as constants of the traced functions, not as variables (method.md §11.1): a module
that tracks a Keras model saves Keras's variable wrappers, which TensorFlow Lite's converter then leaves unfrozen
(its models read uninitialised variables: NaN). read_weights gets the weights back.
"""
import dataclasses
import json
import os

import keras
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from context_keras import errors
from context_keras.input import augment as augment_lib
from context_keras.input import geometry as geometry_lib
from context_keras.input import patches as patches_lib
from context_keras.model import caffe_layers
from context_keras.model import fold
from context_keras.model import networks as model_lib
from context_keras.storage import paths as paths_lib
from context_keras.storage import writes

BACKBONE_DIR = "backbone"
BACKBONE_KERAS_FILE = "backbone.keras"
PAIR_CLASSIFIER_DIR = "pair_classifier"
CONTEXT_MODEL_FILE = "context_model.keras"
RESCALE_FILE = "rescale.json"
# SavedModel's folder for files of higher-level libraries, which loaders ignore.
METADATA_FILE = os.path.join("assets.extra", "context_keras.json")
# Name scope of the weight constants in the serving functions: weights/<layer>/<weight>, e.g. weights/conv1/kernel.
WEIGHT_SCOPE = "weights"
_COLOR_PREPROCESSING = ("upright uint8 RGB (the caller applies any EXIF orientation, as training's decoding did) -> "
                        "float; per image, each channel's mean is subtracted; then, by the run's --color_mode "
                        "(method.md §2.4): drop/drop_gaussian: each channel scaled to RMS 50/sqrt(3) (the expected "
                        "conv1 input over the kept channel); project: the green-magenta projection, then RMS 50; "
                        "none, chroma_blur: RMS 50")
PREPROCESSING = {mode: _COLOR_PREPROCESSING for mode in augment_lib.COLOR_MODES}
PREPROCESSING[augment_lib.STANDARDIZATION] = (
    "upright uint8 RGB (the caller applies any EXIF orientation) -> float; per image, (x - mean) / max(std, "
    "1/sqrt(values)) over all its pixels and channels (tf.image.per_image_standardization; the revisiting geometry, "
    "method.md §8.2)")


def preprocess(images, mode):
  """What the SavedModels apply to their uint8 input (docs/deployment.md, Export): augment.standardize with the
  run's preprocessing mode (geometry.Geometry.preprocessing: its colour mode, or standardization)."""
  return augment_lib.standardize(tf.cast(images, tf.float32), mode)


def constant_function(model):
  """`model` in inference mode as a tf.function whose trace holds its weights as constants (weights/<variable path>):
  it calls the model through stateless_call with the weights' values, and keeps the model in a closure, which a
  tf.Module does not track. A module holding only such functions saves no variable; the signatures that call this
  one function share its single copy of the weights."""
  groups = [[(v.path, v.numpy()) for v in variables]
            for variables in (model.trainable_variables, model.non_trainable_variables)]

  def call(inputs):
    trainable, fixed = ([tf.constant(value, name=f"{WEIGHT_SCOPE}/{path}") for path, value in group]
                        for group in groups)
    outputs, _ = model.stateless_call(trainable, fixed, inputs, training=False)
    return outputs
  shape = [None] + list(model.input.shape[1:])
  # Graph code throughout this module: AutoGraph would only add tracing time to every export.
  return tf.function(call, input_signature=[tf.TensorSpec(shape, tf.float32, name=model.input.name)], autograph=False)


def _flat(maps, name):
  value = maps[name]
  return tf.reshape(value, [tf.shape(value)[0], value.shape[-1]])


def _patch_spec(size, dtype, name):
  return tf.TensorSpec([None, size, size, 3], dtype, name=name)


class BackboneModule(tf.Module):
  """The folded backbone behind two functions (also its signatures); P is the patch size of the run's geometry
  (96, or 64 for the revisiting geometry) and OUTPUT the tower's last feature (fc6, or a ResNet's pre_logits).

  features(images):      uint8 [N, H, W, 3], H and W >= P, upright (pixels carry no EXIF orientation: the caller
                         applies it, as decoding.decode does) -> the backbone's named maps (model.BACKBONES: after BN
                         and ReLU; pooling layers as they are), float32, the preprocessing built in.
  patch_features(patches): float32 [N, P, P, 3] already preprocessed as in training -> {OUTPUT: [N, C]}.
  """

  def __init__(self, folded, preprocessing, patch_size=patches_lib.PATCH_SIZE, output="fc6"):
    super().__init__()
    self._backbone = constant_function(folded)
    self.preprocessing = preprocessing
    self.patch_size = patch_size
    self.output = output
    self.features = tf.function(self._features, autograph=False, input_signature=[
        tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    self.patch_features = tf.function(self._patch_features, autograph=False, input_signature=[
        _patch_spec(patch_size, tf.float32, "patches")])

  def _features(self, images):
    size = tf.shape(images)[1:3]
    check = tf.debugging.assert_greater_equal(
        size, self.patch_size, message=f"images must be at least {self.patch_size}x{self.patch_size} pixels (one "
        "patch)")
    with tf.control_dependencies([check]):
      x = preprocess(images, self.preprocessing)
    return self._backbone(x)

  def _patch_features(self, patches):
    return {self.output: _flat(self._backbone(patches), self.output)}


class PairClassifierModule(tf.Module):
  """The context model, folded: where is patch B relative to patch A (labels as patches.NEIGHBOUR_OFFSETS).

  logits(patch_a, patch_b):              uint8 [N, P, P, 3] each, cut from upright images, preprocessing built
                                         in -> {"logits": [N, 8]}.
  logits_preprocessed(patch_a, patch_b): float32 patches preprocessed as in training -> {"logits": [N, 8]}.
  """

  def __init__(self, folded_tower, folded_head, preprocessing, patch_size=patches_lib.PATCH_SIZE, output="fc6"):
    super().__init__()
    self._tower = constant_function(folded_tower)
    self._head = constant_function(folded_head)
    self.preprocessing = preprocessing
    self.output = output
    self.logits = tf.function(self._logits, autograph=False, input_signature=[
        _patch_spec(patch_size, tf.uint8, name) for name in ("patch_a", "patch_b")])
    self.logits_preprocessed = tf.function(self._logits_preprocessed, autograph=False, input_signature=[
        _patch_spec(patch_size, tf.float32, name) for name in ("patch_a", "patch_b")])

  def _logits(self, patch_a, patch_b):
    return self.logits_preprocessed(preprocess(patch_a, self.preprocessing), preprocess(patch_b, self.preprocessing))

  def _logits_preprocessed(self, patch_a, patch_b):
    n = tf.shape(patch_a)[0]
    features = _flat(self._tower(tf.concat([patch_a, patch_b], 0)), self.output)
    return {"logits": self._head(tf.concat([features[:n], features[n:]], -1))}


def metadata(model_config, color_mode, folded=None, caffe_pooling=None, geometry=geometry_lib.DOERSCH.name,
             **extra):
  """What a SavedModel's assets.extra/context_keras.json says: enough to rebuild the architecture (evaluate.py's
  random-init baseline) and to use it. `color_mode`: the run's --color_mode; `geometry`: the name of its --geometry,
  which decides what the colour handling was (recorded as color_mode); `caffe_pooling`: how the backbone pools
  (fold.caffe_pooling)."""
  mode = geometry_lib.get(geometry).preprocessing(color_mode)
  info = {"backbone": model_config.backbone, "width_multiplier": model_config.width_multiplier,
          "model": dataclasses.asdict(model_config), "geometry": geometry, "color_mode": mode,
          "preprocessing_mode": mode, "preprocessing": PREPROCESSING[mode], "min_size": model_config.patch_size,
          "patch_size": model_config.patch_size, "output": model_lib.output_name(model_config.backbone),
          "neighbour_offsets_dx_dy": patches_lib.NEIGHBOUR_OFFSETS, "num_classes": model_config.num_classes}
  if caffe_pooling is not None:
    info["pooling"] = "caffe" if caffe_pooling else "trained"
  if folded is not None:
    info["features"] = {name: int(t.shape[-1]) for name, t in folded.output.items()}
  info.update(extra)
  return info


def provenance(step, checkpoint, input_config, rescaled=False, spans=()):
  """What an export's metadata says about where its weights came from and how they were trained: the step and
  checkpoint (None for a training export between checkpoints), the pixelation, what the pair classifier's classes
  mean (method.md §9.6: shortcuts.label_names of these), and `spans` (run_dir.RunConfig.spans: what each span of the
  steps up to `step` was trained with, when a resume changed it)."""
  info = {"checkpoint": checkpoint, "step": step, "pixelation": input_config.pixelation, "rescaled": rescaled,
          "rotation_classes": input_config.rotation_classes, "flip_relabel": input_config.flip_relabel}
  spans = [span for span in spans if span["from_step"] < step or span["from_step"] == 0]
  if len(spans) > 1:
    info["spans"] = spans
  return info


def write_metadata(path, info):
  tf.io.gfile.makedirs(os.path.join(path, os.path.dirname(METADATA_FILE)))
  writes.atomic_write_json(os.path.join(path, METADATA_FILE), info)


def read_metadata(path, flag="saved_model"):
  """What an export's assets.extra/context_keras.json says; a UsageError naming --flag when there is none, or when
  the export is being replaced on a store (writes.check_complete). Every reader of an export calls it first."""
  writes.check_complete(path, flag)
  try:
    return json.loads(paths_lib.read_text(os.path.join(path, METADATA_FILE)))
  except tf.errors.OpError as e:
    raise errors.UsageError(f"--{flag}={path}: no {METADATA_FILE}; not written by context_keras.export") from e


def is_pair_classifier(info):
  """Whether metadata describes a pair classifier (exports before `module` was recorded: by its default signature)."""
  return info.get("module", "pair_classifier" if info.get("serving_default") == "logits" else BACKBONE_DIR) != (
      BACKBONE_DIR)


def read_backbone_metadata(path, flag="saved_model"):
  """The metadata of an exported backbone (OUT/backbone, RUN/export/backbone_N); for the export folder OUT or its
  pair classifier, a UsageError naming the backbone to give instead."""
  path = paths_lib.normalise(path)
  backbone = os.path.join(path, BACKBONE_DIR)
  if paths_lib.is_file(os.path.join(backbone, METADATA_FILE)):
    raise errors.UsageError(f"--{flag}={path} is an export folder: give its backbone, --{flag}={backbone}")
  info = read_metadata(path, flag)
  if is_pair_classifier(info):
    beside = os.path.join(os.path.dirname(path), BACKBONE_DIR)
    raise errors.UsageError(f"--{flag}={path} is an export's pair classifier, which computes no features: give the "
                            f"backbone beside it, --{flag}={beside} (the pretext mode reads the pair classifier "
                            "beside the backbone)")
  return info


def read_weights(path):
  """{"conv1/kernel": array, ...}: the weights of a SavedModel written by context_keras, read from the constants of
  its functions (weights/<path>) without running or even loading it; those of exports of earlier versions, which
  held them as variables, from its variables."""
  proto = saved_model_pb2.SavedModel()
  proto.ParseFromString(paths_lib.read_bytes(os.path.join(path, "saved_model.pb")))
  prefix = WEIGHT_SCOPE + "/"
  weights = {}
  for function in proto.meta_graphs[0].graph_def.library.function:
    for node in function.node_def:
      if node.op == "Const" and node.name.startswith(prefix):
        weights.setdefault(node.name[len(prefix):], tf.make_ndarray(node.attr["value"].tensor))
  if not weights:
    loaded = tf.saved_model.load(path)
    for function in loaded.signatures.values():
      for variable in function.variables:
        weights.setdefault(variable.name.split(":")[0], variable.numpy())
  return weights


def save_backbone(folded, path, preprocessing, info, serving_default="features"):
  """Writes the folded backbone as a SavedModel with signatures features and patch_features; `serving_default`
  names the one that is also the default; `preprocessing` is the run's mode (geometry.Geometry.preprocessing) and
  `info` metadata()'s. (Signatures given as the tf.functions, not as their concrete functions, which tf.saved_model.save
  would trace a second time, with a second copy of the weights.)"""
  module = BackboneModule(folded, preprocessing, info["patch_size"], info["output"])
  signatures = {"features": module.features, "patch_features": module.patch_features}
  signatures["serving_default"] = signatures[serving_default]
  tf.saved_model.save(module, path, signatures=signatures)
  write_metadata(path, dict(info, serving_default=serving_default, module=BACKBONE_DIR))
  return path


def export_backbone(tower, model_config, path, color_mode="drop", geometry=geometry_lib.DOERSCH.name, **about):
  """The folded, fully convolutional backbone of `tower` as a SavedModel at `path` (train.py's exports), written
  whole or not at all (writes.atomic_folder); `about` joins its metadata (the step and checkpoint it holds, as the
  export command records them).

  The same module as the export command's OUT/backbone, both signatures included, but serving_default stays
  patch_features (preprocessed float32 patches -> {OUTPUT: [N, C]}, fc6 or pre_logits), the contract
  RUN/export/backbone_<step> has always had; features (uint8 images) is the other signature.
  """
  folded = fold.fold_tower(tower, model_config)
  info = metadata(model_config, color_mode, folded, fold.caffe_pooling(model_config), geometry, **about)
  with writes.atomic_folder(path) as staging:
    save_backbone(folded, staging, info["preprocessing_mode"], info, serving_default="patch_features")
  return path


def save_pair_classifier(networks, model_config, path, preprocessing, info):
  """The pair classifier of `networks` as a SavedModel at `path`: tower and head folded, on the training patches
  (96 px, where Caffe's and the training tower's pooling agree; 64 px in the revisiting geometry)."""
  module = PairClassifierModule(fold.fold_tower(networks.tower, model_config), fold.fold_batchnorm(networks.head),
                                preprocessing, model_config.patch_size, model_lib.output_name(model_config.backbone))
  signatures = {"logits": module.logits, "logits_preprocessed": module.logits_preprocessed}
  signatures["serving_default"] = signatures["logits"]
  tf.saved_model.save(module, path, signatures=signatures)
  write_metadata(path, dict(info, serving_default="logits", module=PAIR_CLASSIFIER_DIR))
  return path


def load_context_model(path):
  """OUT/context_model.keras as a Keras model: its custom layers are model.py's."""
  custom = {cls.__name__: cls for cls in (caffe_layers.CaffeBatchNorm, caffe_layers.LocalResponseNorm)}
  return keras.saving.load_model(path, custom_objects=custom)
