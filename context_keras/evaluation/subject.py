"""What is evaluated: a trained run or an exported backbone, behind the two functions the protocols need."""
import dataclasses
import os

import keras
import tensorflow as tf

from context_keras import errors
from context_keras.deploy import serving
from context_keras.input import geometry as geometry_lib
from context_keras.model import fold
from context_keras.model import networks as model_lib
from context_keras.storage import paths as paths_lib
from context_keras.training import restore
from context_keras.training import run_dir


@dataclasses.dataclass
class Subject:
  """A trained run or an exported backbone, behind the functions the protocols need.

  features:    uint8 images [N, H, W, 3] -> the backbone's named maps (serving.BackboneModule.features)
  pair_logits: (patches preprocessed as in training [N, P, P, 3], first [M], second [M]) -> logits
               [M, model_config.num_classes], or
               None when there is no pair classifier
  """
  about: dict
  step: int
  model_config: model_lib.ModelConfig
  color_mode: str
  pixelation: bool
  features: object
  pair_logits: object = None
  owners: tuple = ()  # what `features` and `pair_logits` are bound to: tf.function methods hold only weak references
  geometry: str = geometry_lib.DOERSCH.name  # the name of its --geometry; patch_geometry is the Geometry
  pooling: str = "auto"  # fold.POOLINGS: how the backbone pools, which the random-init baseline repeats
  # How the pretext labels were made (method.md §9.6): grids rotated with rotation classes, mirrored and relabelled.
  rotation_classes: bool = False
  flip_relabel: bool = False

  @property
  def feature_layers(self):
    return model_lib.BACKBONES[self.model_config.backbone].features

  @property
  def patch_geometry(self):
    return geometry_lib.get(self.geometry)

  @property
  def patch_size(self):
    return self.model_config.patch_size

  @property
  def preprocessing(self):
    """What the backbone applies to uint8 input: the colour handling it was trained with (Geometry.preprocessing)."""
    return self.patch_geometry.preprocessing(self.color_mode)

  @property
  def rescaled(self):
    return bool(self.about.get("rescaled", False))

  def trainable_backbone(self):
    """A new float32 Keras copy of the folded backbone (fold.fold_tower: uint8-free, preprocessed input -> the
    named maps) holding the subject's weights, to fine-tune without touching `features`."""
    networks = next((owner for owner in self.owners if isinstance(owner, model_lib.Networks)), None)
    if networks is not None:  # a run or a random-init network, built in this process: fold it again
      return fold.fold_tower(networks.tower, self.model_config, self.pooling)
    folded = fold.fold_tower(restore.build_networks(self.model_config).tower, self.model_config, self.pooling)
    # An exported backbone: its weights, by the layer and weight names of the model it was saved from.
    saved = serving.read_weights(self.about["saved_model"])
    for variable in folded.weights:
      source = saved.get(variable.path)
      if source is None or tuple(source.shape) != tuple(variable.shape):
        raise errors.UsageError(f"{self.about.get('saved_model')}: holds no weight {variable.path} of shape "
                                f"{tuple(variable.shape)}; it does not match its metadata's architecture")
      variable.assign(source)
    return folded

  def random_init(self, seed):
    """The same architecture as it starts training (its initialisers, BN statistics mean 0, variance 1)."""
    keras.utils.set_random_seed(seed)
    networks = restore.build_networks(self.model_config)
    module = _backbone_module(networks.tower, self.model_config, self.preprocessing, self.pooling)
    return Subject(about={"random_init_seed": seed}, step=self.step, model_config=self.model_config,
                   color_mode=self.color_mode, pixelation=self.pixelation, features=module.features,
                   pair_logits=_run_pair_logits(networks, self.model_config.patch_size), owners=(module, networks),
                   geometry=self.geometry, pooling=self.pooling, rotation_classes=self.rotation_classes,
                   flip_relabel=self.flip_relabel)


def _backbone_module(tower, model_config, preprocessing, pooling="auto"):
  return serving.BackboneModule(fold.fold_tower(tower, model_config, pooling), preprocessing, model_config.patch_size,
                                model_lib.output_name(model_config.backbone))


def _run_pair_logits(networks, patch_size):
  """Pair logits of the training networks in inference mode: the tower once per patch (method.md §3.3)."""
  @tf.function(input_signature=[tf.TensorSpec([None, patch_size, patch_size, 3], tf.float32),
                                tf.TensorSpec([None], tf.int32), tf.TensorSpec([None], tf.int32)], autograph=False)
  def pair_logits(patches, first, second):
    fc6 = networks.tower([patches, tf.ones(tf.shape(patches)[:1])], training=False)
    pairs = tf.concat([tf.gather(fc6, first), tf.gather(fc6, second)], -1)
    return networks.head([pairs, tf.ones(tf.shape(first))], training=False)
  return pair_logits


def from_run(run):
  """The subject of a restored run (restore.Run)."""
  module = _backbone_module(run.networks.tower, run.model_config, run.preprocessing)
  return Subject(about=run.describe(), step=run.step, model_config=run.model_config, color_mode=run.color_mode,
                 pixelation=run.pixelation, features=module.features,
                 pair_logits=_run_pair_logits(run.networks, run.model_config.patch_size),
                 owners=(module, run.networks), geometry=run.geometry,
                 rotation_classes=run.config.input.rotation_classes, flip_relabel=run.config.input.flip_relabel)


def from_saved_model(path):
  """The subject of an exported backbone (OUT/backbone), with OUT/pair_classifier when it is beside it."""
  if run_dir.recorded_in(path):
    exports = run_dir.exports(path)
    raise errors.UsageError(f"--saved_model={path} is a training run: give --model_dir={path}"
                            + (f", or one of its exports, --saved_model={exports[-1]}" if exports else ""))
  info = serving.read_backbone_metadata(path)
  try:
    backbone = tf.saved_model.load(path)
  except (OSError, ValueError) as e:
    raise errors.UsageError(f"--saved_model={path}: cannot load it: {str(e)[:200]}") from e
  pair_dir = os.path.join(paths_lib.parent(path), serving.PAIR_CLASSIFIER_DIR)
  classifier = tf.saved_model.load(pair_dir) if tf.io.gfile.isdir(pair_dir) else None

  def pair_logits(patches, first, second):
    return classifier.logits_preprocessed(tf.gather(patches, first), tf.gather(patches, second))["logits"]
  # Exports written before the model config was recorded are of the original's architecture (8 classes).
  model_config = model_lib.ModelConfig(**info.get("model", {"backbone": info["backbone"],
                                                              "width_multiplier": info["width_multiplier"]}))
  # Exports of earlier versions are of the doersch geometry, and recorded a revisiting run's unused --color_mode.
  geometry = info.get("geometry", geometry_lib.DOERSCH.name)
  return Subject(about={"saved_model": path, "checkpoint": info.get("checkpoint"), "step": info.get("step", 0),
                        "backbone": info["backbone"], "width_multiplier": info["width_multiplier"],
                        "head": model_config.head, "geometry": geometry,
                        "color_mode": geometry_lib.get(geometry).preprocessing(info["color_mode"]),
                        "rescaled": info.get("rescaled", False)},
                 step=int(info.get("step") or 0), model_config=model_config, color_mode=info["color_mode"],
                 pixelation=info.get("pixelation", True), features=backbone.features,
                 pair_logits=pair_logits if classifier else None, owners=(backbone, classifier), geometry=geometry,
                 # Exports of earlier versions pooled as the training tower does.
                 pooling=info.get("pooling", "trained"), rotation_classes=info.get("rotation_classes", False),
                 flip_relabel=info.get("flip_relabel", False))
