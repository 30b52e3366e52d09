"""Frozen features for the probes (method.md §10.2): each named layer's map pooled to at most `max_dims` values, of
whole images, or, in Kolesnikov et al.'s patch protocol, of a grid of patches cut from the image and averaged.

Pooling, per layer, from the map's shape (H, W, C) at the probe's input size:
  avg  adaptive average pooling to the largest grid of side s with s * s * C <= max_dims (s <= H, W; bins as
       PyTorch's AdaptiveAvgPool2d): the "about 9,000 dimensions" of Zhang et al. 2017 and Goyal et al. 2019, who
       average-pool every layer with fixed kernels to 8,192-9,600 values; ours stay at or below the bound.
  max  Kolesnikov et al. 2019: max pooling with kernel = stride = ceil(sqrt(H * W * C / max_dims)), VALID.
A map that already has at most max_dims values is flattened as it is; a layer wider than max_dims (C > max_dims)
keeps C values (global pooling), the least any spatial pooling can give.
"""
import dataclasses
import math

from absl import logging
import numpy as np
import tensorflow as tf

from context_keras import errors
from context_keras.training import progress as progress_lib

POOL_MODES = ("avg", "max")
PROBE_DIMS = 9000        # Zhang et al. 2017; Goyal et al. 2019; Kolesnikov et al. 2019
PATCH_GRID = 3           # Kolesnikov et al. 2019: a 3x3 grid of patches from the centre crop


@dataclasses.dataclass(frozen=True)
class LayerPool:
  """How one layer's map becomes a vector: mode 'flat' (as it is), 'avg' to rows x cols, or 'max' with a kernel."""
  mode: str
  height: int
  width: int
  channels: int
  rows: int
  cols: int
  kernel: int = 1

  @property
  def dims(self):
    return self.rows * self.cols * self.channels


def plan_layer(height, width, channels, max_dims, mode="avg"):
  """The LayerPool of a [height, width, channels] map for at most max_dims values."""
  if mode not in POOL_MODES:
    raise ValueError(f"pooling {mode!r} is not one of {POOL_MODES}")
  if height * width * channels <= max_dims:
    return LayerPool("flat", height, width, channels, height, width)
  if mode == "avg":
    side = max(1, math.isqrt(max_dims // channels))
    return LayerPool("avg", height, width, channels, min(side, height), min(side, width))
  kernel = min(max(1, math.ceil(math.sqrt(height * width * channels / max_dims))), min(height, width))
  return LayerPool("max", height, width, channels, height // kernel, width // kernel, kernel)


def _bins(size, parts):
  """[parts, size] averaging matrix: bin i covers [floor(i * size / parts), ceil((i + 1) * size / parts))."""
  i = np.arange(parts)
  start, end = (i * size) // parts, -((-(i + 1) * size) // parts)
  position = np.arange(size)
  mask = ((position[None, :] >= start[:, None]) & (position[None, :] < end[:, None])).astype(np.float32)
  return mask / mask.sum(1, keepdims=True)


def pool(maps, plan):
  """[N, plan.dims] of maps [N, H, W, C] (H, W, C as planned)."""
  maps = tf.ensure_shape(maps, [None, plan.height, plan.width, plan.channels])
  if plan.mode == "avg":
    maps = tf.einsum("rh,nhwc,sw->nrsc", _bins(plan.height, plan.rows), maps, _bins(plan.width, plan.cols))
  elif plan.mode == "max":
    maps = tf.nn.max_pool2d(maps, plan.kernel, plan.kernel, "VALID")
  return tf.reshape(maps, [-1, plan.dims])


def cut_patch_grid(images, grid=PATCH_GRID):
  """[N * grid * grid, c, c, 3] patches (c = side // grid, row-major per image) of square images [N, side, side, 3]."""
  side = images.shape[1] if images.shape[1] is not None else tf.shape(images)[1]
  cell = side // grid
  # Slices, not a reshape and tf.transpose: where TensorFlow uses oneDNN, its graph rewrite logs an error-level line
  # for a Transpose of uint8 (see exif._transposed).
  cells = [images[:, r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] for r in range(grid) for c in range(grid)]
  return tf.reshape(tf.stack(cells, axis=1), [-1, cell, cell, 3])


class Extractor:
  """Pooled features of uint8 square images of one size: {layer: [N, dims]}; with `patch_grid`, each layer's pooled
  features of the grid's patches, averaged over them (Kolesnikov et al.'s combination). `plans` come from `plan`.
  `owner`: what features_fn is bound to (a Subject), kept alive here: tf.function methods hold weak references."""

  def __init__(self, features_fn, plans, patch_grid=0, owner=None):
    self.features_fn, self.plans, self.patch_grid, self.owner = features_fn, plans, patch_grid, owner
    self.layers = tuple(plans)

  @property
  def dims(self):
    return {name: plan.dims for name, plan in self.plans.items()}

  def __call__(self, images):
    count = tf.shape(images)[0]
    inputs = cut_patch_grid(images, self.patch_grid) if self.patch_grid else images
    maps = self.features_fn(inputs)
    out = {}
    for name, plan in self.plans.items():
      pooled = pool(maps[name], plan)
      if self.patch_grid:
        pooled = tf.reduce_mean(tf.reshape(pooled, [count, self.patch_grid ** 2, plan.dims]), 1)
      out[name] = pooled
    return out


def plan(features_fn, layers, image_size, max_dims=PROBE_DIMS, mode="avg", patch_grid=0):
  """{layer: LayerPool} for square inputs of image_size (or for the patches of its grid), from the shapes of one
  forward pass of a blank image."""
  side = image_size // patch_grid if patch_grid else image_size
  maps = features_fn(tf.zeros([1, side, side, 3], tf.uint8))
  plans = {}
  for name in layers:
    shape = maps[name].shape
    if len(shape) == 2:
      shape = [shape[0], 1, 1, shape[1]]
    plans[name] = plan_layer(int(shape[1]), int(shape[2]), int(shape[3]), max_dims, mode)
  return plans


def extract(extractors, examples, total=None, what="features", batch_size=64):
  """Features of a dataset of (uint8 image, label, usable) that fits in memory (images_lib.labelled_squares), every
  extractor on each batch (one decoding for all), with progress lines: ({key: {layer: np [N, dims]}} by the keys of
  `extractors`, labels [N], the number of examples left out as not usable)."""
  out = {key: {name: [] for name in e.layers} for key, e in extractors.items()}
  labels = []
  unusable = 0
  progress = progress_lib.Progress(what, total)
  calls = {key: tf.function(e, autograph=False) for key, e in extractors.items()}  # graph code: no AutoGraph needed
  for images, batch_labels, usable in examples.batch(batch_size).prefetch(1):
    usable = usable.numpy()
    for key, call in calls.items():
      for name, value in call(images).items():
        out[key][name].append(value.numpy()[usable])
    labels.append(batch_labels.numpy()[usable])
    unusable += int((~usable).sum())
    progress.add(len(usable))
  progress.finish()
  if unusable:
    logging.warning("%s: %d unreadable images (records of damaged TFRecord shards) left out.", what, unusable)
  if not sum(len(batch) for batch in labels):
    raise errors.DataError(f"{what}: the labelled set holds no {'readable ' if unusable else ''}image")
  return ({key: {name: np.concatenate(v) for name, v in layers.items()} for key, layers in out.items()},
          np.concatenate(labels), unusable)
