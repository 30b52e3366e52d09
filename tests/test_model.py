"""The network of method.md §3: shapes, shared weights, Caffe batch norm and LRN semantics."""
import contextlib

import numpy as np
import pytest
import tensorflow as tf

from context_keras.model import caffe_layers as CL
from context_keras.model import networks as M


@pytest.fixture(scope="module")
def networks():
  return M.build(M.ModelConfig(width_multiplier=0.25))


def test_full_width_shapes_match_spec():
  tower = M.alexnet_bn_tower(M.ModelConfig())
  sizes = {layer.name: tuple(layer.output.shape[1:]) for layer in tower.layers}
  assert sizes["conv1"] == (24, 24, 96)
  assert sizes["pool1"] == (12, 12, 96)
  assert sizes["conv2"] == (12, 12, 256)
  assert sizes["pool2"] == (6, 6, 256)
  assert sizes["conv3"] == (6, 6, 384) and sizes["conv4"] == (6, 6, 384) and sizes["conv5"] == (6, 6, 256)
  assert sizes["pool5"] == (3, 3, 256)
  assert sizes["fc6"] == (4096,)
  # BN without scale or shift: only its three statistics, none trainable.
  bn = tower.get_layer("bn6")
  assert not bn.trainable_weights and len(bn.non_trainable_weights) == 3


def test_context_model_shares_one_tower(networks):
  model = networks.context_model
  towers = [layer for layer in model.layers if layer.name == "tower"]
  assert len(towers) == 1, "one tower layer object, applied to both inputs"
  expected = {id(v) for v in networks.tower.trainable_variables + networks.head.trainable_variables}
  assert {id(v) for v in model.trainable_variables} == expected
  rng = np.random.default_rng(0)
  a = rng.normal(size=(3, 96, 96, 3)).astype(np.float32)
  b = rng.normal(size=(3, 96, 96, 3)).astype(np.float32)
  logits = model([a, b]).numpy()
  assert logits.shape == (3, 8)
  # Swapping the inputs changes the logits (the head sees an ordered pair), from the same tower features.
  features_a = networks.tower([a, np.ones(3, np.float32)]).numpy()
  direct = networks.head([np.concatenate([features_a, networks.tower([b, np.ones(3, np.float32)]).numpy()], 1),
                          np.ones(3, np.float32)]).numpy()
  np.testing.assert_allclose(logits, direct, rtol=1e-5, atol=1e-5)


def test_grid_logits_gather_pairs(networks):
  rng = np.random.default_rng(1)
  patches = rng.normal(size=(5, 96, 96, 3)).astype(np.float32)
  batch = {"patches": patches, "patch_mask": np.ones(5, bool), "first": np.array([0, 2, 4], np.int32),
           "second": np.array([1, 3, 0], np.int32), "pair_mask": np.ones(3, bool)}
  grid = M.grid_logits(networks, batch, training=False).numpy()
  pairwise = networks.context_model([patches[[0, 2, 4]], patches[[1, 3, 0]]]).numpy()
  np.testing.assert_allclose(grid, pairwise, rtol=1e-5, atol=1e-5)


def test_batchnorm_ignores_padding_and_follows_caffe_average():
  layer = CL.CaffeBatchNorm()
  rng = np.random.default_rng(2)
  x = rng.normal(3.0, 2.0, size=(6, 4, 4, 5)).astype(np.float32)
  padded = np.concatenate([x, 1000 * np.ones((3, 4, 4, 5), np.float32)])
  valid = np.array([1] * 6 + [0] * 3, np.float32)
  y = layer([padded, valid], training=True).numpy()[:6]
  mean = x.mean(axis=(0, 1, 2))
  var = x.var(axis=(0, 1, 2))
  np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-4)
  # Caffe: s = 1 after one step, sum_mu = mu, sum_var = m/(m-1) var, so the estimate is the unbiased one.
  m = 6 * 4 * 4
  est_mean, est_var = (t.numpy() for t in layer.moving_statistics())
  np.testing.assert_allclose(est_mean, mean, rtol=1e-5)
  np.testing.assert_allclose(est_var, var * m / (m - 1), rtol=1e-4)
  layer([padded, valid], training=True)
  assert float(layer.scale_sum) == pytest.approx(1.999)
  # Inference uses the moving estimate, not the batch.
  out = layer([x[:1], np.ones(1, np.float32)], training=False).numpy()
  np.testing.assert_allclose(out, (x[:1] - est_mean) / np.sqrt(est_var + 1e-5), rtol=1e-4, atol=1e-4)


def test_batchnorm_statistics_survive_a_large_mean():
  """Two-pass statistics: at mean/std = 1000 the variance of float32 values keeps its digits (one pass, the mean of
  squares minus the squared mean, gives output stds of 0.7-2.8 here)."""
  rng = np.random.default_rng(4)
  x = (1000.0 + rng.normal(size=(64, 6, 6, 8))).astype(np.float32)
  # All valid: TensorFlow's fused kernel; one padding sample: the masked path.
  for valid in (np.ones(64, np.float32), np.array([1.0] * 63 + [0.0], np.float32)):
    y = CL.CaffeBatchNorm()([x, valid], training=True).numpy()[valid > 0]
    np.testing.assert_allclose(y.std(axis=(0, 1, 2)), 1.0, rtol=0.01)
  one_pass = (x ** 2).mean(axis=(0, 1, 2), dtype=np.float32) - x.mean(axis=(0, 1, 2), dtype=np.float32) ** 2
  assert np.abs(np.sqrt(np.maximum(one_pass, 0) / x.var(axis=(0, 1, 2), dtype=np.float64)) - 1).max() > 0.1


@pytest.mark.parametrize("valid", [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], ids=["masked", "fused"])
@pytest.mark.parametrize("rank", [2, 4])
@pytest.mark.parametrize("told", [False, True], ids=["tested", "told"])
def test_batchnorm_with_scale_and_shift(valid, rank, told):
  """Both paths (padded batches: masked sums; full ones: TensorFlow's fused kernel) give the same outputs, moving
  statistics and gradients, whether the layer tests the mask or the caller tells it whether the batch is padded and
  updates the statistics that the layer held back (as the trainer does: caffe_layers.known_padding,
  held_statistics)."""
  layer = CL.CaffeBatchNorm(center=True, scale=True, momentum=0.99, epsilon=1e-3)
  rng = np.random.default_rng(5)
  x = rng.normal(2.0, 3.0, size=(5, 3, 3, 4) if rank == 4 else (5, 4)).astype(np.float32)
  valid = np.array(valid, np.float32)
  layer([x, valid])
  gamma, beta = np.array([1.0, 2.0, -1.0, 0.5], np.float32), np.array([0.0, 1.0, 2.0, -3.0], np.float32)
  layer.gamma.assign(gamma)
  layer.beta.assign(beta)
  with (CL.known_padding(bool(valid.min() == 0) if told else None), CL.held_statistics() if told else
        contextlib.nullcontext([]) as held, tf.GradientTape() as tape):
    inputs = tf.constant(x)
    tape.watch(inputs)
    y = layer([inputs, valid], training=True)
    loss = tf.reduce_sum(tf.sin(y) * valid.reshape([-1] + [1] * (rank - 1)))
  assert [entry[0] for entry in held] == ([layer] if told else [])
  for _, statistics in held:
    layer.update_statistics(*statistics)
  grads = tape.gradient(loss, [inputs, layer.gamma, layer.beta])
  kept = x[valid > 0]
  axes = tuple(range(rank - 1))
  mean, var = kept.mean(axis=axes), kept.var(axis=axes)
  np.testing.assert_allclose(y.numpy(), (x - mean) / np.sqrt(var + 1e-3) * gamma + beta, rtol=1e-4, atol=1e-4)
  m = kept.size // 4
  np.testing.assert_allclose(layer.moving_statistics()[1].numpy(), var * m / (m - 1), rtol=1e-4)
  assert {w.name for w in layer.trainable_weights} == {"gamma", "beta"}
  # The gradient of the batch statistics, as autodiff of the formula in float64 gives it.
  x64 = tf.constant(x, tf.float64)
  with tf.GradientTape() as tape:
    tape.watch(x64)
    w = tf.constant(valid.reshape([-1] + [1] * (rank - 1)), tf.float64)
    mu = tf.reduce_sum(x64 * w, axes) / m
    sigma2 = tf.reduce_sum(tf.square(x64 - mu) * w, axes) / m
    y64 = (x64 - mu) / tf.sqrt(sigma2 + 1e-3) * gamma.astype(np.float64) + beta.astype(np.float64)
    reference = tf.reduce_sum(tf.sin(y64) * w)
  np.testing.assert_allclose(grads[0].numpy(), tape.gradient(reference, x64).numpy(), rtol=1e-3, atol=1e-5)


def test_batchnorm_before_training_is_identity():
  layer = CL.CaffeBatchNorm()
  x = np.arange(12, dtype=np.float32).reshape(3, 4)
  np.testing.assert_allclose(layer([x, np.ones(3, np.float32)], training=False).numpy(), x / np.sqrt(1 + 1e-5))


def test_lrn_matches_caffe_formula():
  x = np.random.default_rng(3).uniform(0, 100, size=(2, 3, 3, 7)).astype(np.float32)
  got = CL.LocalResponseNorm()(x).numpy()
  # Caffe across-channel LRN: x / (k + alpha / n * sum over n neighbouring channels of x^2) ^ beta
  padded = np.pad(x ** 2, [(0, 0), (0, 0), (0, 0), (2, 2)])
  window = sum(padded[..., i:i + 7] for i in range(5))
  expected = x / (1 + 1e-4 / 5 * window) ** 0.75
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  # Reduced precision takes another path (a banded matmul); bfloat16 keeps 8 bits of mantissa.
  low = CL.LocalResponseNorm()(tf.constant(x, tf.bfloat16))
  np.testing.assert_allclose(tf.cast(low, tf.float32).numpy(), expected, rtol=2e-2)
  # float16: activations above 256 would overflow when squared in float16.
  big = 4 * x
  half = CL.LocalResponseNorm()(tf.constant(big, tf.float16))
  padded = np.pad(big ** 2, [(0, 0), (0, 0), (0, 0), (2, 2)])
  window = sum(padded[..., i:i + 7] for i in range(5))
  np.testing.assert_allclose(tf.cast(half, tf.float32).numpy(), big / (1 + 1e-4 / 5 * window) ** 0.75, rtol=2e-3)


def test_lecun_uniform_init_and_zero_bias():
  tower = M.alexnet_bn_tower(M.ModelConfig())
  kernel, bias = tower.get_layer("conv2").get_weights()
  limit = np.sqrt(3.0 / (5 * 5 * 96))
  assert np.abs(kernel).max() <= limit * (1 + 1e-6) and np.abs(kernel).max() > 0.9 * limit  # float32 rounding
  assert not bias.any()


def test_unknown_backbone():
  with pytest.raises(ValueError, match="backbone"):
    M.build(M.ModelConfig(backbone="resnet9000"))
