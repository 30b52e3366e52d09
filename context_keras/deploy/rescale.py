"""Krähenbühl et al.'s data-dependent rescaling of an exported backbone (method.md §5.2; philkr/magic_init), which the
original recommends before fine-tuning because folding BN alone leaves badly scaled weights (method.md §5.1, 7).

Works in place on a folded backbone (fold.fold_tower: conv/dense layers with linear outputs, activations split
off) with a batch of preprocessed patches:
  within-layer (Algorithm 1): layer by layer in feed-forward order, every output channel's pre-activation gets mean
    beta and standard deviation 1 on the data: W <- W / sigma, b <- (b - mu) / sigma + beta.
  between-layer (Algorithm 2, magic_init -cs): back-propagate N(0, 1) top diffs from the last output; for every
    conv/fc layer r_k = sqrt(mean(dW^2) / mean(W^2)); target r* = geomean(r_k) * output_std^(1/L); every layer's
    weights and biases are multiplied by sqrt(r_k / r*), its biases first by the change of mean |input| that the
    earlier layers caused (which keeps a ReLU network's function up to a scale); repeated until every
    |log r_k / log r* - 1| < tolerance, at most `iterations` times. Then all layers learn at about the same relative
    rate when fine-tuned.
magic_init draws one set of top diffs per iteration, so its ratios jump by some 10 % between iterations and a 1 %
tolerance is met by chance; here every iteration uses the same `draws` sets (r_k from their mean square gradient),
which makes the calibration a deterministic fixed-point iteration that converges.
"""
import dataclasses
import math

from absl import logging
import keras
from keras import layers
import numpy as np
import tensorflow as tf

from context_keras import errors
from context_keras.input import decoding
from context_keras.input import geometry as geometry_lib
from context_keras.input import sources

NUM_PATCHES = 160   # magic_init: -nit 10 batches of -bs 16
BIAS = 0.1          # magic_init --bias: the mean of every pre-activation after the within-layer step
ITERATIONS = 10     # magic_init's calibration loop
TOLERANCE = 0.01    # magic_init: stop once every |log r_k / log r* - 1| < 0.01
DRAWS = 4           # sets of random top diffs whose mean square gradient gives r_k
DRIFT_WARNING = 0.25  # magic_init warns when an iteration moves the output std by more than e^0.25
_TINY = 1e-12


def parameter_layers(model):
  return [layer for layer in model.layers if isinstance(layer, (layers.Conv2D, layers.Dense))]


def _channel_stats(values):
  values = np.asarray(values, np.float64).reshape(-1, values.shape[-1])
  return values.mean(0), values.std(0)


def _set(layer, kernel, bias):
  layer.set_weights([np.asarray(kernel, np.float32), np.asarray(bias, np.float32)])


def within_layer(model, patches, bias=BIAS):
  """Algorithm 1 on every conv/fc layer of `model`, in order; returns per-layer statistics before the step."""
  report = {}
  for layer in parameter_layers(model):
    pre_activation = keras.Model(model.input, layer.output)(patches, training=False).numpy()
    mean, std = _channel_stats(pre_activation)
    dead = std <= _TINY
    safe = np.where(dead, 1.0, std)  # a constant unit keeps its scale; its bias still moves it to beta
    kernel, old_bias = (np.asarray(w, np.float64) for w in layer.get_weights())
    _set(layer, kernel / safe, (old_bias - mean) / safe + bias)
    report[layer.name] = {"mean_before": float(mean.mean()), "std_before": float(std.mean()),
                          "std_min_before": float(std.min()), "std_max_before": float(std.max()),
                          "constant_units": int(dead.sum())}
  return report


class _Probe:
  """Forward and backward passes of the model on the fixed patches."""

  def __init__(self, model, patches):
    self.params = parameter_layers(model)
    self.patches = patches
    self.final = keras.Model(model.input, model.layers[-1].output)
    self.inputs = keras.Model(model.input, [layer.input for layer in self.params])

  def output_std(self):
    return float(_channel_stats(self.final(self.patches, training=False).numpy())[1].mean())

  def mean_abs_input(self, index):
    return float(tf.reduce_mean(tf.abs(self.inputs(self.patches, training=False)[index])))

  def ratios(self, seed, draws=DRAWS):
    kernels = [layer.kernel for layer in self.params]
    with tf.GradientTape(persistent=True) as tape:
      out = self.final(self.patches, training=False)
      losses = [tf.reduce_sum(out * tf.random.stateless_normal(tf.shape(out), s))
                for s in tf.unstack(tf.random.experimental.stateless_split(seed, draws))]
    square = [0.0] * len(kernels)
    for loss in losses:
      square = [a + float(tf.reduce_mean(tf.square(g))) / draws for a, g in zip(square, tape.gradient(loss, kernels))]
    del tape
    return np.array([math.sqrt(g / float(tf.reduce_mean(tf.square(w)))) for g, w in zip(square, kernels)])

  def state(self, seed, output_std):
    """Ratios, target and magic_init's convergence measure |log r_k / log r* - 1|, per layer."""
    ratios = self.ratios(seed)
    target = math.exp(np.mean(np.log(ratios))) * output_std ** (1.0 / len(ratios))
    with np.errstate(divide="ignore", invalid="ignore"):
      deviation = np.abs(np.log(ratios) / math.log(target) - 1.0)
    names = [layer.name for layer in self.params]
    return {"ratios": dict(zip(names, ratios.tolist())), "target": target,
            "deviation": dict(zip(names, deviation.tolist())), "max_deviation": float(deviation.max()),
            "output_std": output_std}


def between_layer(model, patches, iterations=ITERATIONS, tolerance=TOLERANCE, seed=0, probe=None):
  """Algorithm 2 (magic_init's calibrateGradientRatio); returns the states before and after, and the history."""
  probe = probe or _Probe(model, patches)
  bottom = [probe.mean_abs_input(k) for k in range(len(probe.params))]
  output_std = probe.output_std()
  history, before, updates = [], None, 0
  while True:
    state = probe.state(tf.constant([seed, 0], tf.int64), output_std)
    before = before or state
    history.append({"iteration": updates, "max_deviation": state["max_deviation"], "output_std": output_std})
    logging.info("Rescale iteration %d: max |log r/log r* - 1| = %.4f, output std %.4g.", updates,
                 state["max_deviation"], output_std)
    if state["max_deviation"] < tolerance or updates == iterations:
      break
    for k, layer in enumerate(probe.params):
      current = probe.mean_abs_input(k)
      adjust = current / bottom[k] if bottom[k] > _TINY else 1.0
      bottom[k] = current
      scale = math.sqrt(state["ratios"][layer.name] / state["target"])
      kernel, bias = layer.get_weights()
      _set(layer, kernel * scale, bias * adjust * scale)
    updates += 1
    new_std = probe.output_std()
    if abs(math.log(max(new_std, _TINY)) - math.log(max(output_std, _TINY))) > DRIFT_WARNING:
      logging.warning("Rescale: the output std moved from %.4g to %.4g in one iteration; some layer is not "
                      "homogeneous (LRN, biases), as magic_init warns.", output_std, new_std)
    output_std = new_std
  return {"iterations": updates, "converged": state["max_deviation"] < tolerance, "tolerance": tolerance,
          "before": before, "after": state, "history": history}


def rescale(model, patches, bias=BIAS, within_layer_step=True, iterations=ITERATIONS, tolerance=TOLERANCE, seed=0):
  """Both steps on `model` in place; the report of OUT/rescale.json.

  between_layer.before is measured on the network as exported (before either step), after_within_layer after
  Algorithm 1, after at the end; each gives every layer's ratio r_k, the target r* and |log r_k / log r* - 1|.
  """
  patches = tf.convert_to_tensor(patches, tf.float32)
  probe = _Probe(model, patches)
  exported = probe.state(tf.constant([seed, 0], tf.int64), probe.output_std())
  report = {"bias": bias, "within_layer": None}
  if within_layer_step:
    report["within_layer"] = within_layer(model, patches, bias)
  calibration = between_layer(model, patches, iterations, tolerance, seed, probe)
  calibration["after_within_layer"] = calibration["before"]
  calibration["before"] = exported
  report["between_layer"] = calibration
  for name in exported["ratios"]:
    logging.info("Rescale %s: gradient/weight ratio %.4g -> %.4g (target %.4g -> %.4g).", name,
                 exported["ratios"][name], calibration["after"]["ratios"][name], exported["target"],
                 calibration["after"]["target"])
  if not calibration["converged"]:
    logging.warning("Rescale: not within tolerance %.3g after %d iterations (max deviation %.4f).", tolerance,
                    iterations, calibration["after"]["max_deviation"])
  return report


def sample_patches(source, num_patches, seed, geometry=geometry_lib.DOERSCH):
  """About num_patches real patches (float32 0-255, un-augmented) from the images of a sources.Source, one random
  grid per image with the training geometry (geometry.Geometry.evaluation_patches), images in a seeded order,
  cycling until there are enough. Returns float32 [n, P, P, 3]."""
  order = np.random.default_rng(seed).permutation(len(source.paths)) if source.kind == "files" else None
  if order is not None:
    source = dataclasses.replace(source, paths=tuple(source.paths[i] for i in order))
  chunks, total = [], 0
  for rounds in range(10):
    def cut(index, contents, rounds=rounds):
      image_seed = tf.random.experimental.stateless_fold_in(tf.constant([seed, rounds], tf.int64), index)
      return tf.cast(geometry.evaluation_patches(decoding.decode(contents), image_seed)["patches"], tf.float32)
    for patches in sources.finite_images(source).map(cut).ignore_errors():
      chunks.append(patches.numpy())
      total += len(chunks[-1])
      if total >= num_patches:
        return np.concatenate(chunks)[:num_patches]
    if not total:
      break
  if not total:
    raise errors.DataError(f"{source.description}: no image could be decoded and cut into "
                           f"{geometry.patch_size}-px patches")
  return np.concatenate(chunks)
