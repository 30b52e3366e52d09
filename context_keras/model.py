"""The network of spec section 3: one CaffeNet-style tower shared by both patches, and the pair head.

`build` returns the three Keras functional models that share the same layers:
  tower:         patches [N, 96, 96, 3] (+ per-patch validity) -> fc6 [N, 4096]
  head:          fc6 of both patches concatenated [M, 8192] (+ per-pair validity) -> 8 logits
  context_model: (patch_a, patch_b) -> 8 logits, the pair classifier of the paper (tower applied to both inputs)
Training calls tower and head in grid form (tower once per patch, pairs gather their fc6 rows, spec 3.3).
"""
import dataclasses

from absl import flags
import keras
from keras import layers
import numpy as np
import tensorflow as tf

from context_keras import patches as patches_lib

flags.DEFINE_enum("backbone", "alexnet_bn", ["alexnet_bn"],
                  "Patch tower: alexnet_bn = CaffeNet without groups, BN without scale/shift on conv3-5 and fc6 "
                  "(spec 3.1-3.2).")
flags.DEFINE_float("width_multiplier", 1.0,
                   "Scales every conv and fc width (1.0 = the original's 96-256-384-384-256 convs and 4096-d fc). "
                   "Small values make quick tests and demos.")
flags.DEFINE_float("bn_momentum", 0.999,
                   "Decay of the batch-norm moving statistics (Caffe's moving_average_fraction, 0.999 as the "
                   "original). Runs of a few thousand steps want less (0.99), or the statistics that export and "
                   "evaluation use lag behind the weights.")
flags.DEFINE_bool("sync_batchnorm", False,
                  "Batch statistics over all replicas instead of per replica. Off by default: each replica then "
                  "normalises over one batch of at most --batch_patches patches, as the original did on one GPU.")

FLAGS = flags.FLAGS

BN_EPSILON = 1e-5      # spec 3.2, Caffe's default
BN_MOMENTUM = 0.999    # spec 3.2, moving_average_fraction


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  backbone: str = "alexnet_bn"
  width_multiplier: float = 1.0
  sync_batchnorm: bool = False
  bn_momentum: float = BN_MOMENTUM


def config_from_flags():
  return ModelConfig(FLAGS.backbone, FLAGS.width_multiplier, FLAGS.sync_batchnorm, FLAGS.bn_momentum)


class CaffeBatchNorm(layers.Layer):
  """Batch normalisation as the original's Caffe layer (spec 3.2): no scale or shift, eps 1e-5, and Caffe's
  normalised moving average (s <- 0.999 s + 1, sum_mu <- mu + 0.999 sum_mu, sum_var <- m/(m-1) var + 0.999 sum_var;
  the estimate is sum / s), which has no start-up bias.

  Statistics are taken over the valid samples only (`valid`, [N] of 0/1), so batch padding never shifts them;
  with `synchronized` they are summed over all replicas first.
  """

  def __init__(self, synchronized=False, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, **kwargs):
    super().__init__(**kwargs)
    self.synchronized = synchronized
    self.momentum = momentum
    self.epsilon = epsilon

  def build(self, input_shape):
    channels = input_shape[0][-1]
    common = dict(trainable=False, initializer="zeros", aggregation="mean", autocast=False)
    self.mean_sum = self.add_weight(name="mean_sum", shape=(channels,), **common)
    self.variance_sum = self.add_weight(name="variance_sum", shape=(channels,), **common)
    self.scale_sum = self.add_weight(name="scale_sum", shape=(), **common)

  def moving_statistics(self):
    """(mean, variance) estimates for inference; mean 0 and variance 1 before any training step."""
    has_stats = self.scale_sum > 0
    scale = tf.where(has_stats, self.scale_sum, 1.0)
    mean = tf.where(has_stats, self.mean_sum / scale, 0.0)
    variance = tf.where(has_stats, self.variance_sum / scale, 1.0)
    return mean, variance

  def call(self, inputs, training=False):
    x, valid = inputs
    x32 = tf.cast(x, tf.float32)
    if training:
      weights = tf.cast(tf.reshape(valid, [-1] + [1] * (len(x.shape) - 1)), tf.float32)
      axes = list(range(len(x.shape) - 1))
      count = tf.reduce_sum(weights * tf.ones_like(x32[..., :1]))
      sums = tf.reduce_sum(weights * x32, axes)
      squares = tf.reduce_sum(weights * tf.square(x32), axes)
      if self.synchronized:
        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
          count, sums, squares = context.all_reduce(tf.distribute.ReduceOp.SUM, [count, sums, squares])
      count = tf.maximum(count, 1.0)
      mean = sums / count
      variance = tf.maximum(squares / count - tf.square(mean), 0.0)
      unbiased = variance * count / tf.maximum(count - 1.0, 1.0)
      self.scale_sum.assign(self.momentum * self.scale_sum + 1.0)
      self.mean_sum.assign(self.momentum * self.mean_sum + tf.stop_gradient(mean))
      self.variance_sum.assign(self.momentum * self.variance_sum + tf.stop_gradient(unbiased))
    else:
      mean, variance = self.moving_statistics()
    y = (x32 - mean) * tf.math.rsqrt(variance + self.epsilon)
    return tf.cast(y, x.dtype)

  def compute_output_shape(self, input_shape):
    return input_shape[0]

  def get_config(self):
    return dict(super().get_config(), synchronized=self.synchronized, momentum=self.momentum, epsilon=self.epsilon)


class LocalResponseNorm(layers.Layer):
  """Caffe's across-channel LRN (local_size 5, alpha 1e-4, beta 0.75, k 1; spec 3.1): x / (k + alpha/n * sum of
  x^2 over n neighbouring channels)^beta. Caffe divides alpha by local_size; TF's op does not.

  float32 uses TF's LRN op. TF has no reduced-precision LRN kernel on the CPU, and casting around it costs more than
  the layer itself (it breaks oneDNN's bf16 layouts), so in reduced precision the window sum is a banded matmul (in
  bfloat16, or float32 for float16) and the power is taken in float32."""

  def __init__(self, local_size=5, alpha=1e-4, beta=0.75, bias=1.0, **kwargs):
    super().__init__(**kwargs)
    self.local_size, self.alpha, self.beta, self.bias = local_size, alpha, beta, bias

  def call(self, x):
    radius = self.local_size // 2
    if x.dtype == tf.float32:
      return tf.nn.local_response_normalization(x, depth_radius=radius, bias=self.bias,
                                                alpha=self.alpha / self.local_size, beta=self.beta)
    # bfloat16 has float32's range; float16 would overflow on squares of activations above 256.
    dtype = x.dtype if x.dtype == tf.bfloat16 else tf.float32
    channels = np.arange(x.shape[-1])
    band = tf.constant(np.abs(channels[:, None] - channels[None, :]) <= radius, dtype)
    window = tf.cast(tf.einsum("nhwc,cd->nhwd", tf.square(tf.cast(x, dtype)), band), tf.float32)
    base = self.bias + (self.alpha / self.local_size) * window
    # b^-0.75 = b^-0.5 * b^-0.25: two square roots cost far less than pow's exp and log.
    scale = tf.math.rsqrt(base) * tf.math.rsqrt(tf.sqrt(base)) if self.beta == 0.75 else tf.pow(base, -self.beta)
    return tf.cast(tf.cast(x, tf.float32) * scale, x.dtype)

  def get_config(self):
    return dict(super().get_config(), local_size=self.local_size, alpha=self.alpha, beta=self.beta, bias=self.bias)


def _width(channels, multiplier):
  return max(1, int(round(channels * multiplier)))


def _dense_init():
  # Caffe's "xavier" filler is U(+-sqrt(3 / fan_in)): LeCun-uniform (spec 3.5).
  return dict(kernel_initializer="lecun_uniform", bias_initializer="zeros")


def alexnet_bn_tower(config):
  """CaffeNet without groups (spec 3.1): conv1 11x11/4 pad 5 -> pool -> LRN -> conv2 5x5 -> pool -> LRN ->
  conv3-5 3x3 with BN -> pool -> fc6 with BN. Pools use Caffe's ceil rounding, which 'same' padding reproduces at
  these sizes (24->12->6->3, spec 3.6)."""
  m = config.width_multiplier
  size = patches_lib.PATCH_SIZE
  patches = keras.Input((size, size, 3), name="patches")
  valid = keras.Input((), name="valid")
  x = layers.ZeroPadding2D(5, name="pad1")(patches)
  x = layers.Conv2D(_width(96, m), 11, strides=4, activation="relu", name="conv1", **_dense_init())(x)
  x = layers.MaxPool2D(3, 2, padding="same", name="pool1")(x)
  x = LocalResponseNorm(name="norm1")(x)
  x = layers.Conv2D(_width(256, m), 5, padding="same", activation="relu", name="conv2", **_dense_init())(x)
  x = layers.MaxPool2D(3, 2, padding="same", name="pool2")(x)
  x = LocalResponseNorm(name="norm2")(x)
  for name, channels in (("conv3", 384), ("conv4", 384), ("conv5", 256)):
    x = layers.Conv2D(_width(channels, m), 3, padding="same", name=name, **_dense_init())(x)
    x = CaffeBatchNorm(config.sync_batchnorm, config.bn_momentum, name="bn" + name[-1])([x, valid])
    x = layers.ReLU(name="relu" + name[-1])(x)
  x = layers.MaxPool2D(3, 2, padding="same", name="pool5")(x)
  x = layers.Flatten(name="flatten")(x)
  x = layers.Dense(_width(4096, m), name="fc6", **_dense_init())(x)
  x = CaffeBatchNorm(config.sync_batchnorm, config.bn_momentum, name="bn6")([x, valid])
  x = layers.ReLU(name="relu6")(x)
  return keras.Model([patches, valid], x, name="tower")


BACKBONES = {"alexnet_bn": alexnet_bn_tower}


def pair_head(config, feature_dim):
  """fc7 (BN) -> fc8 -> fc9 on the two concatenated fc6 vectors (spec 3.4); no dropout."""
  m = config.width_multiplier
  pair = keras.Input((2 * feature_dim,), name="pair_features")
  valid = keras.Input((), name="valid")
  x = layers.Dense(_width(4096, m), name="fc7", **_dense_init())(pair)
  x = CaffeBatchNorm(config.sync_batchnorm, config.bn_momentum, name="bn7")([x, valid])
  x = layers.ReLU(name="relu7")(x)
  x = layers.Dense(_width(4096, m), activation="relu", name="fc8", **_dense_init())(x)
  # Logits stay float32 under mixed precision, for a stable softmax.
  logits = layers.Dense(patches_lib.NUM_CLASSES, name="fc9", dtype="float32", **_dense_init())(x)
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
  tower = BACKBONES[config.backbone](config)
  head = pair_head(config, tower.output.shape[-1])
  size = patches_lib.PATCH_SIZE
  patch_a = keras.Input((size, size, 3), name="patch_a")
  patch_b = keras.Input((size, size, 3), name="patch_b")
  ones = keras.ops.ones_like(patch_a[:, 0, 0, 0])
  # ONE tower applied to both inputs: the weights are shared by construction (spec 3.3).
  features = layers.Concatenate(name="fc6_concat")([tower([patch_a, ones]), tower([patch_b, ones])])
  logits = head([features, ones])
  return Networks(tower, head, keras.Model([patch_a, patch_b], logits, name="context_model"))


def grid_logits(networks, batch, training):
  """Logits of every pair of a packed batch: the tower runs once per patch, and each pair gathers what it needs of
  its two patches (spec 3.3), calling the head's own layers.

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
