"""The networks of method.md §3 and §8: one patch tower shared by both patches of a pair, and the pair head.

`build` returns the three Keras functional models that share the same layers:
  tower:         patches [N, P, P, 3] (+ per-patch validity) -> features [N, D] (fc6, or a ResNet's pre_logits)
  head:          the features of both patches concatenated [M, 2D] (+ per-pair validity) -> num_classes (8) logits
  context_model: (patch_a, patch_b) -> num_classes logits, the pair classifier of the paper (the tower applied to
                 both inputs)
Training calls tower and head in grid form (tower once per patch, pairs gather their feature rows, method.md §3.3).
Towers: alexnet_bn (the original's), vgg16_bn (the paper's VGG-style tower), resnet18/34/50 v1 or v2 (Kolesnikov et
al.'s); heads: doersch (fc7-fc9 of the original) and revisiting (Kolesnikov et al.'s embedding and fc head).
"""
import dataclasses

import keras
from keras import layers
import tensorflow as tf

from context_keras.input import geometry as geometry_lib
from context_keras.input import patches as patches_lib
from context_keras.model import caffe_layers

BN_MOMENTUM = caffe_layers.BN_MOMENTUM
RESNET_VERSIONS = (1, 2)
# method.md §8.1: Kolesnikov et al.'s reduced down-sampling for patch tasks (stem conv stride 1, the max-pool kept).
RESNET_STEM_STRIDE = 1
RESNET_STRIDES = (1, 2, 2, 1)
# method.md §8.1: TF1's tf.layers.batch_normalization defaults, which their ResNet uses (momentum comes from
# --bn_momentum; their 0.99 is in flags/revisiting_resnet50.cfg).
RESNET_BN_EPSILON = 1e-3
# method.md §8.2: their pair head (patch_utils.fully_connected).
REVISITING_EMBEDDING = 1000
REVISITING_HIDDEN = 4096
REVISITING_HEAD_BN_MOMENTUM = 0.997
REVISITING_HEAD_BN_EPSILON = 1e-5
REVISITING_DROPOUT = 0.5
REVISITING_HEAD_INIT_STDDEV = 0.005
REVISITING_HEAD_BIAS = 0.1
# The first layer of both heads that sees a pair; grid_logits applies it per patch (method.md §3.3).
PAIR_LAYER = "fc7"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  backbone: str = "alexnet_bn"
  width_multiplier: float = 1.0
  sync_batchnorm: bool = False
  bn_momentum: float = BN_MOMENTUM
  head: str = geometry_lib.DOERSCH.head
  patch_size: int = geometry_lib.DOERSCH.patch_size  # the geometry's (cli/model.py)
  resnet_version: int = 1
  resnet_stem_stride: int = RESNET_STEM_STRIDE
  resnet_strides: tuple = RESNET_STRIDES
  # The pretext task's classes: 8 directions, or 32 with --rotation_classes (shortcuts.num_classes, method.md §9.6).
  num_classes: int = patches_lib.NUM_CLASSES

  def __post_init__(self):
    # config.json stores the strides as a list.
    object.__setattr__(self, "resnet_strides", tuple(int(s) for s in self.resnet_strides))


# The ModelConfig fields that decide which variables the networks have, their shapes, or what they compute (a
# ResNet's weights mean other things in other units or at other strides; the patch size is the geometry's): a
# checkpoint is restored only into networks built with the same values (the others may change between resumes).
ARCHITECTURE_FIELDS = ("backbone", "width_multiplier", "num_classes", "head", "patch_size", "resnet_version",
                       "resnet_stem_stride", "resnet_strides")


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
  size = config.patch_size
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
  return keras.Model([patches, valid], _fc6(config, x, valid), name="tower")


def _fc6(config, x, valid):
  """fc6 of method.md §3.1 on the last pooled map: flatten, dense 4096, BN without scale or shift, ReLU."""
  x = layers.Flatten(name="flatten")(x)
  x = layers.Dense(_width(4096, config.width_multiplier), name="fc6", **_dense_init())(x)
  x = caffe_layers.CaffeBatchNorm(config.sync_batchnorm, config.bn_momentum, name="bn6")([x, valid])
  return layers.ReLU(name="relu6")(x)


VGG16_STAGES = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))


def vgg16_bn_tower(config):
  """The paper's VGG-style tower (method.md §8.3): VGG-16's thirteen 3x3 convolutions in five stages, each conv
  followed by batch norm with scale and shift and a ReLU, each stage by a 2x2/2 max-pool, then the same fc6 as
  alexnet_bn. On 96-px patches pool5 is 3x3, as alexnet_bn's."""
  m = config.width_multiplier
  size = config.patch_size
  patches = keras.Input((size, size, 3), name="patches")
  valid = keras.Input((), name="valid")
  x = patches
  for stage, (channels, convs) in enumerate(VGG16_STAGES, start=1):
    for index in range(1, convs + 1):
      name = f"conv{stage}_{index}"
      # No bias: the batch norm's shift replaces it.
      x = layers.Conv2D(_width(channels, m), 3, padding="same", use_bias=False, name=name,
                        kernel_initializer="lecun_uniform")(x)
      x = caffe_layers.CaffeBatchNorm(config.sync_batchnorm, config.bn_momentum, center=True, scale=True,
                                      name=f"{name}_bn")([x, valid])
      x = layers.ReLU(name=f"{name}_relu")(x)
    x = layers.MaxPool2D(2, 2, name=f"pool{stage}")(x)
  return keras.Model([patches, valid], _fc6(config, x, valid), name="tower")


# --------------------------------------------------------------------------------------------------------------
# ResNets as Kolesnikov et al.'s models/resnet.py (method.md §8.1)

RESNET_UNITS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet34": ("basic", (3, 4, 6, 3)),
                "resnet50": ("bottleneck", (3, 4, 6, 3))}


class _ResNetBuilder:
  """The layers of one ResNet, named so that a unit's layers read block<stage>_unit<k>_<layer>; the last unit of
  each stage is called block<stage>, the endpoint names of their code."""

  def __init__(self, config, valid):
    self.config, self.valid = config, valid

  def pad(self, x, kernel, name):
    # Their fixed_padding: kernel - 1 zeros split evenly (the extra one after), then a VALID convolution or pool.
    total = kernel - 1
    return layers.ZeroPadding2D(((total // 2, total - total // 2),) * 2, name=name)(x) if total else x

  def conv(self, x, channels, kernel, stride, name):
    # At stride 1 an odd kernel's even split is TF's 'same' padding, which spares a padded copy of the input.
    padding = "same" if stride == 1 else "valid"
    if kernel > 1 and stride > 1:
      x = self.pad(x, kernel, f"{name}_pad")
    return layers.Conv2D(channels, kernel, strides=stride, padding=padding, use_bias=False, name=name,
                         kernel_initializer="glorot_uniform")(x)

  def norm(self, x, name, relu=True):
    x = caffe_layers.CaffeBatchNorm(self.config.sync_batchnorm, self.config.bn_momentum, RESNET_BN_EPSILON,
                                    center=True, scale=True, name=f"{name}_bn")([x, self.valid])
    return layers.ReLU(name=f"{name}_relu")(x) if relu else x

  def unit(self, x, kind, channels, stride, name, out_name):
    """One residual unit: v1 post-activation (conv-BN-ReLU ..., add, ReLU) or v2 pre-activation (BN-ReLU-conv ...,
    add), with the stride on the 3x3 convolution (the first 1x1 never strides) and a 1x1 projection shortcut when
    the stride or the width changes."""
    version = self.config.resnet_version
    project = stride > 1 or x.shape[-1] != channels
    if kind == "bottleneck":
      inner = max(1, channels // 4)
      convs = ((inner, 1, 1), (inner, 3, stride), (channels, 1, 1))
    else:
      convs = ((channels, 3, stride), (channels, 3, 1))
    if version == 1:
      shortcut = x
      if project:
        shortcut = self.norm(self.conv(x, channels, 1, stride, f"{name}_shortcut"), f"{name}_shortcut", relu=False)
      y = x
      for k, (width, kernel, conv_stride) in enumerate(convs, start=1):
        y = self.conv(y, width, kernel, conv_stride, f"{name}_conv{k}")
        y = self.norm(y, f"{name}_conv{k}", relu=k < len(convs))
      y = layers.Add(name=f"{name}_add")([y, shortcut])
      return layers.ReLU(name=out_name)(y)
    pre = self.norm(x, f"{name}_preact")
    shortcut = self.conv(pre, channels, 1, stride, f"{name}_shortcut") if project else x
    y = pre
    for k, (width, kernel, conv_stride) in enumerate(convs, start=1):
      if k > 1:
        y = self.norm(y, f"{name}_conv{k - 1}")
      y = self.conv(y, width, kernel, conv_stride, f"{name}_conv{k}")
    return layers.Add(name=out_name)([y, shortcut])


def resnet_tower(config):
  """ResNet-18/34/50 v1 or v2 (method.md §8.1): widths 64-256-512-1024-2048 (bottleneck) or 64-64-128-256-512
  (basic) times --width_multiplier; root 7x7 conv with --resnet_stem_stride, 3x3/2 max-pool (after_root), four
  stages whose first units stride by --resnet_strides, global average pool (pre_logits). Batch norm with scale and
  shift, eps 1e-3, over the valid patches."""
  kind, units = RESNET_UNITS[config.backbone]
  m = config.width_multiplier
  size = config.patch_size
  patches = keras.Input((size, size, 3), name="patches")
  valid = keras.Input((), name="valid")
  builder = _ResNetBuilder(config, valid)
  x = builder.conv(patches, _width(64, m), 7, config.resnet_stem_stride, "root_conv")
  if config.resnet_version == 1:
    x = builder.norm(x, "root_conv")  # v2's first unit pre-activates instead
  x = layers.MaxPool2D(3, 2, padding="valid", name="after_root")(builder.pad(x, 3, "root_pool_pad"))
  base = 256 if kind == "bottleneck" else 64
  for stage, (count, stride) in enumerate(zip(units, config.resnet_strides), start=1):
    channels = _width(base * 2 ** (stage - 1), m)
    for k in range(1, count + 1):
      x = builder.unit(x, kind, channels, stride if k == 1 else 1, f"block{stage}_unit{k}",
                       f"block{stage}" if k == count else f"block{stage}_unit{k}_out")
  if config.resnet_version == 2:
    x = builder.norm(x, "postnorm")
  x = layers.GlobalAveragePooling2D(name="pre_logits")(x)
  return keras.Model([patches, valid], x, name="tower")


@dataclasses.dataclass(frozen=True)
class Backbone:
  """A patch tower: `build(config)` gives the Keras model (patches [N, P, P, 3], valid [N]) -> features [N, D];
  `features` names its layers whose outputs the exported backbone returns, from input to output (a conv or dense
  layer after its BN and ReLU). `caffe_pooling`: its 'same' max pools stand for Caffe's ceil-mode pools, which
  exports reproduce at every input size (fold.fold_tower, method.md §11.4)."""
  build: object
  features: tuple
  caffe_pooling: bool = False


_RESNET = Backbone(resnet_tower, ("after_root", "block1", "block2", "block3", "block4", "pre_logits"))
BACKBONES = {
    # Each conv/fc after its (folded) BN and ReLU, and the last pooling (method.md §3.1).
    "alexnet_bn": Backbone(alexnet_bn_tower, ("conv1", "conv2", "conv3", "conv4", "conv5", "pool5", "fc6"),
                           caffe_pooling=True),
    "vgg16_bn": Backbone(vgg16_bn_tower, tuple(f"conv{s}_{i}" for s, (_, n) in enumerate(VGG16_STAGES, start=1)
                                               for i in range(1, n + 1)) + ("pool5", "fc6")),
    "resnet18": _RESNET,
    "resnet34": _RESNET,
    "resnet50": _RESNET,
}


def output_name(backbone):
  """The name of a backbone's last feature, the tower's output (fc6 or pre_logits)."""
  return BACKBONES[backbone].features[-1]


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


def revisiting_head(config, feature_dim):
  """Kolesnikov et al.'s pair head (method.md §8.2): each patch's features to a 1000-d embedding (their trunk's
  logits layer), the two embeddings concatenated, fc 4096 -> BN (scale and shift) -> ReLU -> dropout 0.5 ->
  num_classes (8) logits. Narrow towers (--width_multiplier < 1) get a head narrowed by the same factor; wider ones
  keep theirs."""
  m = min(config.width_multiplier, 1.0)
  pair = keras.Input((2 * feature_dim,), name="pair_features")
  valid = keras.Input((), name="valid")
  x = layers.Reshape((2, feature_dim), name="pair_split")(pair)
  x = layers.Dense(_width(REVISITING_EMBEDDING, m), name="embed", kernel_initializer="glorot_uniform")(x)
  x = layers.Flatten(name="pair_concat")(x)
  init = keras.initializers.TruncatedNormal(stddev=REVISITING_HEAD_INIT_STDDEV)
  x = layers.Dense(_width(REVISITING_HIDDEN, m), name=PAIR_LAYER, kernel_initializer=init,
                   bias_initializer=keras.initializers.Constant(REVISITING_HEAD_BIAS))(x)
  x = caffe_layers.CaffeBatchNorm(config.sync_batchnorm, REVISITING_HEAD_BN_MOMENTUM, REVISITING_HEAD_BN_EPSILON,
                                  center=True, scale=True, name="bn7")([x, valid])
  x = layers.ReLU(name="relu7")(x)
  x = layers.Dropout(REVISITING_DROPOUT, name="dropout7")(x)
  logits = layers.Dense(config.num_classes, name="fc8", dtype="float32", kernel_initializer=init)(x)
  return keras.Model([pair, valid], logits, name="head")


# Each geometry's recipe has its own head, named after it (geometry.Geometry.head).
HEAD_BUILDERS = {geometry_lib.DOERSCH.head: pair_head, geometry_lib.REVISITING.head: revisiting_head}
HEADS = tuple(HEAD_BUILDERS)


@dataclasses.dataclass
class Networks:
  tower: keras.Model
  head: keras.Model
  context_model: keras.Model


def check(config):
  """ValueError naming the flag when a ModelConfig cannot be built."""
  if config.backbone not in BACKBONES:
    raise ValueError(f"--backbone={config.backbone} is not one of {sorted(BACKBONES)}")
  if config.head not in HEAD_BUILDERS:
    raise ValueError(f"--head={config.head} is not one of {sorted(HEAD_BUILDERS)}")
  if config.resnet_version not in RESNET_VERSIONS:
    raise ValueError(f"--resnet_version={config.resnet_version} is not one of {RESNET_VERSIONS}")
  if len(config.resnet_strides) != 4 or min(config.resnet_strides) < 1 or config.resnet_stem_stride < 1:
    raise ValueError(f"--resnet_strides={','.join(map(str, config.resnet_strides))} must be 4 strides >= 1 (one per "
                     "stage) and --resnet_stem_stride >= 1")


def build(config):
  """The tower, the head, and the two-input context model made of exactly those layers."""
  check(config)
  tower = BACKBONES[config.backbone].build(config)
  head = HEAD_BUILDERS[config.head](config, tower.output.shape[-1])
  size = config.patch_size
  patch_a = keras.Input((size, size, 3), name="patch_a")
  patch_b = keras.Input((size, size, 3), name="patch_b")
  ones = keras.ops.ones_like(patch_a[:, 0, 0, 0])
  # ONE tower applied to both inputs: the weights are shared by construction (method.md §3.3).
  features = layers.Concatenate(name="pair_concat_features")([tower([patch_a, ones]), tower([patch_b, ones])])
  logits = head([features, ones])
  return Networks(tower, head, keras.Model([patch_a, patch_b], logits, name="context_model"))


def regularised_kernels(networks):
  """(tower kernels, head kernels) that L2 weight decay applies to, as in Kolesnikov et al.'s code: every conv and
  dense kernel, no bias or batch-norm parameter. The revisiting head's embedding is their trunk's logits layer, so
  it counts with the tower."""
  def kernels(model, skip=()):
    return [layer.kernel for layer in model.layers
            if isinstance(layer, (layers.Conv2D, layers.Dense)) and layer.name not in skip]
  head_layers = {layer.name for layer in networks.head.layers}
  embed = [networks.head.get_layer("embed").kernel] if "embed" in head_layers else []
  return kernels(networks.tower) + embed, kernels(networks.head, skip=("embed",))


def _dropout(x, rate, seed):
  """Inverted dropout with a stateless mask: a pure function of the step's seed, so resuming is exact."""
  keep = tf.random.stateless_uniform(tf.shape(x), seed) >= rate
  return tf.where(keep, x / tf.cast(1.0 - rate, x.dtype), tf.zeros_like(x))


def grid_logits(networks, batch, training, seed=None, patches_padded=None):
  """Logits of every pair of a packed batch: the tower runs once per patch, and each pair gathers what it needs of
  its two patches (method.md §3.3), calling the head's own layers.

  fc7 (the head's first layer on a pair) is linear in the concatenation, W [a; b] = W_a a + W_b b, so every patch's
  features are projected by W_a and W_b once and each pair gathers and adds two projections: the same numbers as
  fc7 on concatenated pairs, at about 1/4.4 of its cost for a grid (4.4-5.3 ordered pairs per patch). The
  revisiting head's embedding, applied to each patch alone, also runs once per patch. `seed` (shape [2]) keys the
  dropout masks of a training step. patches_padded: whether the batch's patches hold padding, if the caller knows
  (caffe_layers.known_padding).
  """
  patch_valid = tf.cast(batch["patch_mask"], tf.float32)
  pair_valid = tf.cast(batch["pair_mask"], tf.float32)
  with caffe_layers.known_padding(patches_padded):
    features = networks.tower([tf.convert_to_tensor(batch["patches"]), patch_valid], training=training)
  head = networks.head
  names = [layer.name for layer in head.layers]
  if "embed" in names:
    features = head.get_layer("embed")(features)
  fc7 = head.get_layer(PAIR_LAYER)
  # tf.split, not slicing: the gradient of a split is one concat, that of each slice a full-size padded copy.
  kernel_first, kernel_second = tf.split(tf.cast(fc7.kernel, features.dtype), 2)
  x = (tf.gather(tf.matmul(features, kernel_first), batch["first"]) +
       tf.gather(tf.matmul(features, kernel_second), batch["second"]) + tf.cast(fc7.bias, features.dtype))
  for layer in head.layers[names.index(PAIR_LAYER) + 1:]:
    if isinstance(layer, layers.InputLayer):
      continue
    if isinstance(layer, caffe_layers.CaffeBatchNorm):
      x = layer([x, pair_valid], training=training)
    elif isinstance(layer, layers.Dropout):
      if training:
        x = _dropout(x, layer.rate, tf.zeros([2], tf.int64) if seed is None else seed)
    else:
      x = layer(x)
  return x
