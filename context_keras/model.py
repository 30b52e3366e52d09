"""The network of method.md §3: one CaffeNet-style tower shared by both patches, and the pair head.

`build` returns the three Keras functional models that share the same layers:
  tower:         patches [N, 96, 96, 3] (+ per-patch validity) -> fc6 [N, 4096]
  head:          fc6 of both patches concatenated [M, 8192] (+ per-pair validity) -> num_classes (8) logits
  context_model: (patch_a, patch_b) -> num_classes logits, the pair classifier of the paper (the tower applied to
                 both inputs)
Training calls tower and head in grid form (tower once per patch, pairs gather their fc6 rows, method.md §3.3).
"""
import dataclasses

import keras
from keras import layers
import tensorflow as tf

from context_keras import caffe_layers
from context_keras import patches as patches_lib

BN_MOMENTUM = caffe_layers.BN_MOMENTUM


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  backbone: str = "alexnet_bn"
  width_multiplier: float = 1.0
  sync_batchnorm: bool = False
  bn_momentum: float = BN_MOMENTUM
  # The pretext task's classes: 8 directions, or 32 with --rotation_classes (shortcuts.num_classes, method.md §9.6).
  num_classes: int = patches_lib.NUM_CLASSES


# The ModelConfig fields that decide which variables the networks have and their shapes: a checkpoint can only be
# restored into networks built with the same values (the others may change between resumes).
ARCHITECTURE_FIELDS = ("backbone", "width_multiplier", "num_classes")


def _width(channels, multiplier):
  return max(1, int(round(channels * multiplier)))


def _dense_init():
  # Caffe's "xavier" filler is U(+-sqrt(3 / fan_in)): LeCun-uniform (method.md §3.5).
  return dict(kernel_initializer="lecun_uniform", bias_initializer="zeros")


def alexnet_bn_tower(config):
  """CaffeNet without groups (method.md §3.1): conv1 11x11/4 pad 5 -> pool -> LRN -> conv2 5x5 -> pool -> LRN ->
  conv3-5 3x3 with BN -> pool -> fc6 with BN. Pools use Caffe's ceil rounding, which 'same' padding reproduces at
  these sizes (24->12->6->3, method.md §3.6); exports of other sizes make them Caffe's (Backbone.caffe_pooling)."""
  m = config.width_multiplier
  size = patches_lib.PATCH_SIZE
  patches = keras.Input((size, size, 3), name="patches")
  valid = keras.Input((), name="valid")
  x = layers.ZeroPadding2D(5, name="pad1")(patches)
  x = layers.Conv2D(_width(96, m), 11, strides=4, activation="relu", name="conv1", **_dense_init())(x)
  x = layers.MaxPool2D(3, 2, padding="same", name="pool1")(x)
  x = caffe_layers.LocalResponseNorm(name="norm1")(x)
  x = layers.Conv2D(_width(256, m), 5, padding="same", activation="relu", name="conv2", **_dense_init())(x)
  x = layers.MaxPool2D(3, 2, padding="same", name="pool2")(x)
  x = caffe_layers.LocalResponseNorm(name="norm2")(x)
  for name, channels in (("conv3", 384), ("conv4", 384), ("conv5", 256)):
    x = layers.Conv2D(_width(channels, m), 3, padding="same", name=name, **_dense_init())(x)
    x = caffe_layers.CaffeBatchNorm(config.sync_batchnorm, config.bn_momentum, name="bn" + name[-1])([x, valid])
    x = layers.ReLU(name="relu" + name[-1])(x)
  x = layers.MaxPool2D(3, 2, padding="same", name="pool5")(x)
  x = layers.Flatten(name="flatten")(x)
  x = layers.Dense(_width(4096, m), name="fc6", **_dense_init())(x)
  x = caffe_layers.CaffeBatchNorm(config.sync_batchnorm, config.bn_momentum, name="bn6")([x, valid])
  x = layers.ReLU(name="relu6")(x)
  return keras.Model([patches, valid], x, name="tower")


@dataclasses.dataclass(frozen=True)
class Backbone:
  """A patch tower: `build(config)` gives the Keras model (patches [N, 96, 96, 3], valid [N]) -> features [N, D];
  `features` names its layers whose outputs the exported backbone returns, from input to output. `caffe_pooling`:
  its 'same' max pools stand for Caffe's ceil-mode pools, which exports reproduce at every input size
  (fold.fold_tower, method.md §11.4)."""
  build: object
  features: tuple
  caffe_pooling: bool = False


BACKBONES = {
    # Each conv/fc after its (folded) BN and ReLU, and the last pooling (method.md §3.1).
    "alexnet_bn": Backbone(alexnet_bn_tower, ("conv1", "conv2", "conv3", "conv4", "conv5", "pool5", "fc6"),
                           caffe_pooling=True),
}


def pair_head(config, feature_dim):
  """fc7 (BN) -> fc8 -> fc9 on the two concatenated fc6 vectors (method.md §3.4); no dropout."""
  m = config.width_multiplier
  pair = keras.Input((2 * feature_dim,), name="pair_features")
  valid = keras.Input((), name="valid")
  x = layers.Dense(_width(4096, m), name="fc7", **_dense_init())(pair)
  x = caffe_layers.CaffeBatchNorm(config.sync_batchnorm, config.bn_momentum, name="bn7")([x, valid])
  x = layers.ReLU(name="relu7")(x)
  x = layers.Dense(_width(4096, m), activation="relu", name="fc8", **_dense_init())(x)
  # Logits stay float32 under mixed precision, for a stable softmax.
  logits = layers.Dense(config.num_classes, name="fc9", dtype="float32", **_dense_init())(x)
  return keras.Model([pair, valid], logits, name="head")


@dataclasses.dataclass
class Networks:
  tower: keras.Model
  head: keras.Model
  context_model: keras.Model


def build(config):
  """The tower, the head, and the two-input context model made of exactly those layers."""
  if config.backbone not in BACKBONES:
    raise ValueError(f"--backbone={config.backbone} is not one of {sorted(BACKBONES)}")
  tower = BACKBONES[config.backbone].build(config)
  head = pair_head(config, tower.output.shape[-1])
  size = patches_lib.PATCH_SIZE
  patch_a = keras.Input((size, size, 3), name="patch_a")
  patch_b = keras.Input((size, size, 3), name="patch_b")
  ones = keras.ops.ones_like(patch_a[:, 0, 0, 0])
  # ONE tower applied to both inputs: the weights are shared by construction (method.md §3.3).
  features = layers.Concatenate(name="fc6_concat")([tower([patch_a, ones]), tower([patch_b, ones])])
  logits = head([features, ones])
  return Networks(tower, head, keras.Model([patch_a, patch_b], logits, name="context_model"))


def grid_logits(networks, batch, training):
  """Logits of every pair of a packed batch: the tower runs once per patch, and each pair gathers what it needs of
  its two patches (method.md §3.3), calling the head's own layers.

  fc7 is linear in the concatenation, W [a; b] = W_a a + W_b b, so every patch's fc6 is projected by W_a and W_b
  once and each pair gathers and adds two projections: the same numbers as fc7 on concatenated pairs, at about
  1/4.4 of its cost (a grid has 4.4-5.3 ordered pairs per patch).
  """
  patch_valid = tf.cast(batch["patch_mask"], tf.float32)
  pair_valid = tf.cast(batch["pair_mask"], tf.float32)
  features = networks.tower([tf.convert_to_tensor(batch["patches"]), patch_valid], training=training)
  head = networks.head
  fc7 = head.get_layer("fc7")
  # tf.split, not slicing: the gradient of a split is one concat, that of each slice a full-size padded copy.
  kernel_first, kernel_second = tf.split(tf.cast(fc7.kernel, features.dtype), 2)
  x = (tf.gather(tf.matmul(features, kernel_first), batch["first"]) +
       tf.gather(tf.matmul(features, kernel_second), batch["second"]) + tf.cast(fc7.bias, features.dtype))
  x = head.get_layer("bn7")([x, pair_valid], training=training)
  for name in ("relu7", "fc8", "fc9"):
    x = head.get_layer(name)(x)
  return x
