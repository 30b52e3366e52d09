"""Caffe's layers that Keras lacks, as the original network used them: its batch norm and its LRN
(method.md §3.1-3.2)."""
import contextlib
import threading

from keras import layers
import numpy as np
import tensorflow as tf

BN_EPSILON = 1e-5      # method.md §3.2, Caffe's default
BN_MOMENTUM = 0.999    # method.md §3.2, moving_average_fraction

_tracing = threading.local()  # what known_padding and held_statistics tell the layers traced inside them


@contextlib.contextmanager
def known_padding(padded):
  """Tells the CaffeBatchNorm layers called in training mode while a graph is traced inside this block whether their
  batch holds padding (True or False; None: not known, as outside any block). A layer that knows takes its path
  without testing its mask in the graph: the gradient of that test's tf.cond is the costliest part of tracing a
  training step (of a ResNet-50's 24 s, 15 s), so the trainer decides once per step instead (trainer.replica_step)."""
  outer = getattr(_tracing, "padded", None)
  _tracing.padded = padded
  try:
    yield
  finally:
    _tracing.padded = outer


@contextlib.contextmanager
def held_statistics():
  """Within this block, CaffeBatchNorm layers called in training mode do not update their moving statistics: each
  appends (layer, its batch's statistics) to the list the block yields, for `layer.update_statistics(*statistics)`
  outside the tf.cond or tf.function that computed them. Under MirroredStrategy that update averages over the replicas
  (the variables are mean-aggregated) in a merge_call, which neither may contain."""
  outer = getattr(_tracing, "held", None)
  _tracing.held = []
  try:
    yield _tracing.held
  finally:
    _tracing.held = outer


def chooses_per_batch(model):
  """Whether `model`'s CaffeBatchNorm layers, called in training mode in this replica context, pick their kernel by
  whether the batch holds padding (so that known_padding spares them a test in the graph)."""
  return any(isinstance(layer, CaffeBatchNorm) and layer._replicas() == 1  # pylint: disable=protected-access
             for layer in model._flatten_layers())  # pylint: disable=protected-access  # nested blocks' layers too


class CaffeBatchNorm(layers.Layer):
  """Batch normalisation over the valid samples of a padded batch, with Caffe's moving average (method.md §3.2).

  As the original's Caffe layer by default: no scale or shift, eps 1e-5, and Caffe's normalised moving average
  (s <- m s + 1, sum_mu <- mu + m sum_mu, sum_var <- n/(n-1) var + m sum_var with m the momentum; the estimate is
  sum / s), which has no start-up bias. The modern towers (method.md §8.5) add a learned scale and shift (`scale`,
  `center`), as standard batch norm; their other settings come from the tower.

  Statistics are taken over the valid samples only (`valid`, [N] of 0/1), so batch padding never shifts them; with
  `synchronized` they are summed over all replicas first. They are computed in two passes, the mean first and then
  the mean of the centred squares, in float32 whatever the compute precision: one pass (mean of squares minus the
  squared mean) loses every digit of the variance once the mean is some thousand times the standard deviation.
  A batch without padding whose statistics stay on this replica goes through TensorFlow's fused kernel instead
  (the same two-pass statistics, with a far cheaper gradient); padded or synchronised batches take the masked path.
  Which of the two a batch needs is tested in the graph, unless the caller knows it (known_padding).
  """

  def __init__(self, synchronized=False, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, center=False, scale=False,
               **kwargs):
    super().__init__(**kwargs)
    self.synchronized = synchronized
    self.momentum = momentum
    self.epsilon = epsilon
    self.center = center
    self.scale = scale

  def build(self, input_shape):
    channels = input_shape[0][-1]
    common = dict(trainable=False, initializer="zeros", aggregation="mean", autocast=False)
    self.mean_sum = self.add_weight(name="mean_sum", shape=(channels,), **common)
    self.variance_sum = self.add_weight(name="variance_sum", shape=(channels,), **common)
    self.scale_sum = self.add_weight(name="scale_sum", shape=(), **common)
    self.gamma = self.add_weight(name="gamma", shape=(channels,), initializer="ones",
                                 autocast=False) if self.scale else None
    self.beta = self.add_weight(name="beta", shape=(channels,), initializer="zeros",
                                autocast=False) if self.center else None

  def moving_statistics(self):
    """(mean, variance) estimates for inference; mean 0 and variance 1 before any training step."""
    has_stats = self.scale_sum > 0
    scale = tf.where(has_stats, self.scale_sum, 1.0)
    mean = tf.where(has_stats, self.mean_sum / scale, 0.0)
    variance = tf.where(has_stats, self.variance_sum / scale, 1.0)
    return mean, variance

  def affine(self):
    """(gamma, beta) of the learned scale and shift: ones and zeros where the layer has none."""
    channels = self.mean_sum.shape[0]
    gamma = tf.convert_to_tensor(self.gamma) if self.scale else tf.ones([channels])
    beta = tf.convert_to_tensor(self.beta) if self.center else tf.zeros([channels])
    return gamma, beta

  def _replicas(self):
    context = tf.distribute.get_replica_context()
    return context.num_replicas_in_sync if self.synchronized and context is not None else 1

  def _all_reduce(self, values):
    if self._replicas() > 1:
      return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, values)
    return values

  def batch_statistics(self, x32, valid):
    """(mean, biased variance, count) of the valid samples, over every axis but the last, in two passes."""
    weights = tf.cast(tf.reshape(valid, [-1] + [1] * (len(x32.shape) - 1)), tf.float32)
    axes = list(range(len(x32.shape) - 1))
    count = tf.reduce_sum(weights * tf.ones_like(x32[..., :1]))
    count, sums = self._all_reduce([count, tf.reduce_sum(weights * x32, axes)])
    count = tf.maximum(count, 1.0)
    mean = sums / count
    squares = self._all_reduce(tf.reduce_sum(weights * tf.square(x32 - mean), axes))
    return mean, squares / count, count

  def _normalize(self, x, mean, variance):
    multiplier = tf.math.rsqrt(variance + self.epsilon)
    if self.scale:
      multiplier *= self.gamma
    y = (tf.cast(x, tf.float32) - mean) * multiplier
    if self.center:
      y += self.beta
    return tf.cast(y, x.dtype)

  def _masked(self, x, valid):
    mean, variance, count = self.batch_statistics(tf.cast(x, tf.float32), valid)
    return self._normalize(x, mean, variance), mean, variance, count

  def _fused(self, x):
    """TensorFlow's fused batch norm (in the compute precision, statistics in float32) on a batch with no padding."""
    shape = tf.shape(x)
    x4 = x if len(x.shape) == 4 else tf.reshape(x, [shape[0], 1, 1, x.shape[-1]])
    gamma, beta = self.affine()
    y, mean, unbiased = tf.compat.v1.nn.fused_batch_norm(x4, gamma, beta, epsilon=self.epsilon, is_training=True)
    count = tf.cast(tf.size(x4) // x.shape[-1], tf.float32)
    # The kernel returns the variance with Bessel's correction; the normalisation used the biased one.
    return tf.reshape(y, shape), mean, unbiased * (count - 1.0) / tf.maximum(count, 1.0), count

  def call(self, inputs, training=False):
    x, valid = inputs
    if not training:
      return self._normalize(x, *self.moving_statistics())
    padded = getattr(_tracing, "padded", None)
    if len(x.shape) not in (2, 4) or self._replicas() > 1 or padded:
      y, mean, variance, count = self._masked(x, valid)
    elif padded is False:
      y, mean, variance, count = self._fused(x)
    else:
      y, mean, variance, count = tf.cond(tf.reduce_all(valid > 0), lambda: self._fused(x),
                                         lambda: self._masked(x, valid))
    statistics = tf.stop_gradient(mean), tf.stop_gradient(variance * count / tf.maximum(count - 1.0, 1.0))
    held = getattr(_tracing, "held", None)
    if held is None:
      self.update_statistics(*statistics)
    else:
      held.append((self, statistics))
    return y

  def update_statistics(self, mean, unbiased_variance):
    """Caffe's moving average (the class's docstring) takes one batch's statistics."""
    self.scale_sum.assign(self.momentum * self.scale_sum + 1.0)
    self.mean_sum.assign(self.momentum * self.mean_sum + mean)
    self.variance_sum.assign(self.momentum * self.variance_sum + unbiased_variance)

  def compute_output_shape(self, input_shape):
    return input_shape[0]

  def get_config(self):
    return dict(super().get_config(), synchronized=self.synchronized, momentum=self.momentum, epsilon=self.epsilon,
                center=self.center, scale=self.scale)


class LocalResponseNorm(layers.Layer):
  """Caffe's across-channel LRN (local_size 5, alpha 1e-4, beta 0.75, k 1; method.md §3.1): x / (k + alpha/n * sum of
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
