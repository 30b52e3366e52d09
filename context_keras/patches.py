"""Patch geometry and per-patch augmentation of context prediction, as pure TensorFlow functions.

Everything here is graph code with stateless randomness: the same seed gives the same grids, pairs and pixels,
whatever the parallelism of the input pipeline. Section numbers refer to deepcontext_spec.md.
"""
import functools

import tensorflow as tf

PATCH_SIZE = 96      # spec 2.1
GAP = 48             # spec 2.1: about half a patch, against boundary and texture continuation cues
JITTER = 7           # spec 2.1: +-7 px per cell and axis, against long straight lines
PITCH = PATCH_SIZE + GAP
GRIDS_PER_IMAGE = 4  # spec 2.2: grids cut from one resized image before the next is loaded
MIN_TARGET_PIXELS = 150_000  # spec 1.2, both ends included
MAX_TARGET_PIXELS = 450_000
# spec 1.2: an image is used only if both sides exceed this after resizing.
MIN_SIDE = 2 * PATCH_SIZE + GAP + JITTER
PIXELATE_PROBABILITY = 0.33  # spec 2.4 step 1
PIXELATE_MIN_SIDE = 10       # area uniform in [10^2, 95^2]
PIXELATE_MAX_SIDE = PATCH_SIZE - 1
RMS_TARGET = 50.0            # spec 2.4 step 3
COLOR_MODES = ("drop", "drop_gaussian", "project", "none")

# The one place for the label order (spec 2.3): (dx, dy) of the SECOND patch relative to the FIRST, y pointing down,
# in reading order, so label = index.
#   0 1 2
#   3 . 4
#   5 6 7
NEIGHBOUR_OFFSETS = ((-1, -1), (0, -1), (1, -1), (-1, 0), (1, 0), (-1, 1), (0, 1), (1, 1))
NUM_CLASSES = len(NEIGHBOUR_OFFSETS)


def split_seed(seed, num):
  """`num` independent stateless seeds, shape [num, 2], from one seed of shape [2]."""
  return tf.random.experimental.stateless_split(seed, num=num)


def resized_shape(height, width, target_pixels):
  """Size that holds about `target_pixels` with the aspect kept, truncated as in spec 1.2."""
  height = tf.cast(height, tf.float64)
  width = tf.cast(width, tf.float64)
  scale = tf.sqrt(tf.cast(target_pixels, tf.float64) / (height * width))
  return tf.cast(height * scale, tf.int32), tf.cast(width * scale, tf.int32)


def random_resize(image, seed):
  """Bilinear resize of an HxWx3 float image to a uniform random 150,000-450,000 pixels (spec 1.2).

  The original resized with zero padding outside the image (a boundary artefact, spec 1.2 and 7); TF's bilinear
  resize clamps at the border instead, which is the deviation README lists.
  """
  target = tf.random.stateless_uniform(
      [], seed, minval=MIN_TARGET_PIXELS, maxval=MAX_TARGET_PIXELS + 1, dtype=tf.int32)
  shape = tf.shape(image)
  new_h, new_w = resized_shape(shape[0], shape[1], target)
  # No anti-aliasing: the original's skimage resize had none either (spec 1.2).
  return tf.image.resize(image, tf.stack([new_h, new_w]), method="bilinear", antialias=False)


def sample_grids(seed, height, width, num_grids=GRIDS_PER_IMAGE):
  """Upper-left corners of the cells of `num_grids` random grids in an image of the given size (spec 2.2).

  Returns (ys, xs, grid_height, grid_width): ys and xs are int32 [num_patches], the cells of grid 0 in row-major
  order, then grid 1 and so on; grid_height and grid_width are int32 [num_grids]. The image must have both sides
  > MIN_SIDE, which guarantees at least one cell per grid.
  """
  start_seed, jitter_seed = tf.unstack(split_seed(seed, 2))
  starts = tf.random.stateless_uniform([num_grids, 2], start_seed, minval=0, maxval=PITCH, dtype=tf.int32)
  size = tf.stack([height, width])
  cells = (size[tf.newaxis, :] + GAP - starts) // PITCH  # [num_grids, 2]; every unjittered cell fits
  grid_h, grid_w = cells[:, 0], cells[:, 1]
  max_h = (height + GAP) // PITCH
  max_w = (width + GAP) // PITCH
  gy, gx = tf.meshgrid(tf.range(max_h), tf.range(max_w), indexing="ij")  # [max_h, max_w]
  valid = ((gy[tf.newaxis] < grid_h[:, tf.newaxis, tf.newaxis]) &
           (gx[tf.newaxis] < grid_w[:, tf.newaxis, tf.newaxis]))  # [num_grids, max_h, max_w], row-major per grid
  corner_y = starts[:, 0, tf.newaxis, tf.newaxis] + gy[tf.newaxis] * PITCH
  corner_x = starts[:, 1, tf.newaxis, tf.newaxis] + gx[tf.newaxis] * PITCH
  corners = tf.stack([tf.boolean_mask(corner_y, valid), tf.boolean_mask(corner_x, valid)], axis=-1)
  jitter = tf.random.stateless_uniform(tf.shape(corners), jitter_seed, minval=-JITTER, maxval=JITTER + 1,
                                       dtype=tf.int32)
  # Clamping is the original's only boundary treatment (spec 2.2); it moves a corner by at most JITTER.
  corners = tf.clip_by_value(corners + jitter, 0, tf.stack([height, width]) - PATCH_SIZE)
  return corners[:, 0], corners[:, 1], grid_h, grid_w


def crop_patches(image, ys, xs):
  """The PATCH_SIZE x PATCH_SIZE patches with upper-left corners (ys, xs) of an HxWxC image, exactly (a gather)."""
  width = tf.shape(image)[1]
  offsets = tf.range(PATCH_SIZE)
  rows = ys[:, tf.newaxis] + offsets  # [n, P]
  cols = xs[:, tf.newaxis] + offsets
  flat_index = rows[:, :, tf.newaxis] * width + cols[:, tf.newaxis, :]  # [n, P, P]
  flat = tf.reshape(image, [-1, tf.shape(image)[2]])
  return tf.gather(flat, flat_index)


def grid_pairs(grid_height, grid_width):
  """Every ordered pair of 8-neighbours in one grid (spec 2.3): (first, second, label), int32 [num_pairs] each.

  Indices are row-major cell indices of the grid; the label is the position of `second` relative to `first`.
  Both orders of each adjacency appear, with opposite labels.
  """
  y, x = tf.meshgrid(tf.range(grid_height), tf.range(grid_width), indexing="ij")
  y = tf.reshape(y, [-1, 1])
  x = tf.reshape(x, [-1, 1])
  offsets = tf.constant(NEIGHBOUR_OFFSETS, tf.int32)  # [8, 2] as (dx, dy)
  ny = y + offsets[tf.newaxis, :, 1]
  nx = x + offsets[tf.newaxis, :, 0]
  valid = (ny >= 0) & (ny < grid_height) & (nx >= 0) & (nx < grid_width)  # [cells, 8]
  first = tf.broadcast_to(y * grid_width + x, tf.shape(valid))
  second = ny * grid_width + nx
  label = tf.broadcast_to(tf.range(NUM_CLASSES)[tf.newaxis, :], tf.shape(valid))
  return tf.boolean_mask(first, valid), tf.boolean_mask(second, valid), tf.boolean_mask(label, valid)


def num_grid_pairs(grid_height, grid_width):
  """Number of ordered pairs grid_pairs() gives for a grid of at least one cell (ints or tensors)."""
  h, w = grid_height, grid_width
  return 2 * ((w - 1) * h + w * (h - 1) + 2 * (w - 1) * (h - 1))


def _bilinear_matrix(out_size, in_size, max_size):
  """Per-patch 1-D bilinear resampling matrices, [n, out_max, max_size], for resizing in_size -> out_size pixels.

  out_size, in_size: int32 [n] (each <= max_size). Rows beyond out_size and columns beyond in_size are zero, so
  the matrices of different sizes stack. Half-pixel centres and border clamping, as tf.image.resize's bilinear
  without anti-aliasing; the original's skimage resize (order 1) maps coordinates the same way.
  """
  out_f = tf.cast(out_size, tf.float32)[:, tf.newaxis]
  in_f = tf.cast(in_size, tf.float32)[:, tf.newaxis]
  i = tf.range(max_size, dtype=tf.float32)[tf.newaxis, :]
  source = tf.clip_by_value((i + 0.5) * in_f / out_f - 0.5, 0.0, in_f - 1.0)  # [n, max_size]
  low = tf.floor(source)
  frac = source - low
  low = tf.cast(low, tf.int32)
  high = tf.minimum(low + 1, tf.cast(in_f, tf.int32) - 1)
  matrix = (tf.one_hot(low, max_size) * (1.0 - frac)[..., tf.newaxis] +
            tf.one_hot(high, max_size) * frac[..., tf.newaxis])
  row_valid = tf.cast(tf.range(max_size)[tf.newaxis, :] < out_size[:, tf.newaxis], tf.float32)
  return matrix * row_valid[..., tf.newaxis]


def pixelate(patches, sides):
  """Bilinear downsampling of each patch to sides[i] x sides[i] and back to full size (spec 2.4 step 1).

  patches: float [n, P, P, C]; sides: int32 [n] in [1, P]. Both resizes are linear maps, so each patch's round trip
  is one P x P matrix M applied to rows and columns (M X M^T): one batched product for all sizes at once.
  """
  size = tf.shape(patches)[1]
  full = tf.fill(tf.shape(sides), size)
  down = _bilinear_matrix(sides, full, PATCH_SIZE)  # [n, P(max side), P]
  up = _bilinear_matrix(full, sides, PATCH_SIZE)    # [n, P, P(max side)]
  matrix = tf.matmul(up, down)                      # [n, P, P]
  shape = tf.shape(patches)
  rows = tf.matmul(matrix, tf.reshape(patches, [shape[0], shape[1], -1]))           # M X, [n, P, P*C]
  columns = tf.transpose(tf.reshape(rows, shape), [0, 3, 1, 2])                    # [n, C, P, P]
  return tf.transpose(tf.matmul(columns, matrix[:, tf.newaxis], transpose_b=True), [0, 2, 3, 1])  # (M X) M^T


def random_pixelate(patches, seed):
  """With probability 0.33 per patch, pixelate it to an area uniform in [100, 9025] px (spec 2.4 step 1)."""
  n = tf.shape(patches)[0]
  choose_seed, area_seed = tf.unstack(split_seed(seed, 2))
  chosen = tf.random.stateless_uniform([n], choose_seed) < PIXELATE_PROBABILITY
  u = tf.random.stateless_uniform([n], area_seed)
  sides = tf.cast(tf.sqrt(u * (PIXELATE_MAX_SIDE ** 2 - PIXELATE_MIN_SIDE ** 2) + PIXELATE_MIN_SIDE ** 2), tf.int32)
  # Only the chosen third is resampled. The original cast the patch to uint8 before resizing it (spec 2.4 step 1).
  index = tf.where(chosen)
  pixelated = pixelate(tf.floor(tf.gather_nd(patches, index)), tf.gather_nd(sides, index))
  return tf.tensor_scatter_nd_update(patches, index, pixelated)


# spec 2.4, paper's projection: B = I - a^T a / (a a^T) with a = [-1, 2, -1] removes the green-magenta axis.
_GREEN_MAGENTA = (-1.0, 2.0, -1.0)
PROJECTION = tuple(
    tuple((1.0 if r == c else 0.0) - _GREEN_MAGENTA[r] * _GREEN_MAGENTA[c] / sum(v * v for v in _GREEN_MAGENTA)
          for c in range(3)) for r in range(3))


def color_transform(patches, seed, mode):
  """Chromatic-aberration remedy of spec 2.4 step 2, by `mode`, on float [n, P, P, 3] patches in 0-255 units.

  drop:          keep one random channel minus its mean; the other two become uniform noise in [-0.5, 0.5)
                 (the validated code).
  drop_gaussian: as drop, but the noise is Gaussian with 1/100 of the kept channel's std (the paper's text).
  project:       per-channel means removed, then every pixel projected off the green-magenta axis (the paper).
  none:          per-channel means removed only.
  """
  if mode not in COLOR_MODES:
    raise ValueError(f"color mode {mode!r} is not one of {COLOR_MODES}")
  if mode in ("none", "project"):
    centred = patches - tf.reduce_mean(patches, axis=[1, 2], keepdims=True)
    return centred if mode == "none" else tf.einsum("nhwc,dc->nhwd", centred, tf.constant(PROJECTION, patches.dtype))
  keep_seed, noise_seed = tf.unstack(split_seed(seed, 2))
  shape = tf.shape(patches)
  keep = tf.one_hot(tf.random.stateless_uniform(shape[:1], keep_seed, minval=0, maxval=3, dtype=tf.int32), 3,
                    dtype=patches.dtype)  # [n, 3]
  pixels = tf.reshape(patches, [shape[0], -1, 3])
  kept = tf.matmul(pixels, keep[:, :, tf.newaxis])  # [n, HW, 1]: a matmul is the fastest channel selection here
  kept -= tf.reduce_mean(kept, axis=1, keepdims=True)
  if mode == "drop":
    noise = tf.random.stateless_uniform(tf.shape(pixels), noise_seed, dtype=patches.dtype) - 0.5
  else:
    noise = (tf.random.stateless_normal(tf.shape(pixels), noise_seed, dtype=patches.dtype) *
             tf.math.reduce_std(kept, axis=1, keepdims=True) / 100.0)
  return tf.reshape(noise + keep[:, tf.newaxis, :] * (kept - noise), shape)


def rms_normalize(patches):
  """Scale every patch to a root-mean-square of 50 over all its values (spec 2.4 step 3)."""
  rms = tf.sqrt(tf.reduce_mean(tf.square(patches), axis=[1, 2, 3], keepdims=True))
  return tf.math.divide_no_nan(patches, rms) * RMS_TARGET


def augment(patches, seed, color_mode="drop", pixelation=True):
  """The per-patch preprocessing of spec 2.4, in order: pixelation, colour handling, RMS normalisation."""
  pixel_seed, color_seed = tf.unstack(split_seed(seed, 2))
  if pixelation:
    patches = random_pixelate(patches, pixel_seed)
  return rms_normalize(color_transform(patches, color_seed, color_mode))


def standardize(images, color_mode="drop"):
  """The deterministic counterpart of color_transform + rms_normalize, for inference (spec 2.4 steps 2-3).

  images: float [n, H, W, 3] in 0-255 units (patches, or whole images for the fully convolutional backbone); the
  statistics are per image. project and none are the training transforms exactly. For drop (and drop_gaussian),
  training kept one random channel, alone carrying the patch's RMS, so it reached RMS 50*sqrt(3); averaging the
  first layer's (linear) response over the three equally likely kept channels gives every channel centred and
  scaled to RMS 50/sqrt(3): the expected conv1 pre-activation, with the near-zero noise channels left out.
  """
  if color_mode not in COLOR_MODES:
    raise ValueError(f"color mode {color_mode!r} is not one of {COLOR_MODES}")
  centred = images - tf.reduce_mean(images, axis=[1, 2], keepdims=True)
  if color_mode in ("drop", "drop_gaussian"):
    channel_rms = tf.sqrt(tf.reduce_mean(tf.square(centred), axis=[1, 2], keepdims=True))
    return tf.math.divide_no_nan(centred, channel_rms) * (RMS_TARGET / 3 ** 0.5)
  if color_mode == "project":
    centred = tf.einsum("nhwc,dc->nhwd", centred, tf.constant(PROJECTION, images.dtype))
  return rms_normalize(centred)


def grid_patches(image, seed, num_grids=1):
  """Un-augmented patches of `num_grids` random grids of one image, with the training geometry (spec 1.2, 2.2).

  image: [H, W, 3] of any dtype in 0-255 units. Returns (patches float32 [n, 96, 96, 3] in 0-255, grid_height and
  grid_width int32 [num_grids]); an image too small for a grid after its random resize gives no patch and 0x0 grids.
  For evaluation and rescaling, which need real patches but not the training augmentation.
  """
  resize_seed, grid_seed = tf.unstack(split_seed(seed, 2))
  resized = random_resize(tf.cast(image, tf.float32), resize_seed)
  height, width = tf.shape(resized)[0], tf.shape(resized)[1]

  def cut():
    ys, xs, grid_h, grid_w = sample_grids(grid_seed, height, width, num_grids)
    return crop_patches(resized, ys, xs), grid_h, grid_w

  def nothing():
    return tf.zeros([0, PATCH_SIZE, PATCH_SIZE, 3]), tf.zeros([num_grids], tf.int32), tf.zeros([num_grids], tf.int32)

  return tf.cond((height > MIN_SIDE) & (width > MIN_SIDE), cut, nothing)


def _resized_shape_py(height, width, target_pixels):
  scale = (target_pixels / (height * width)) ** 0.5
  return int(height * scale), int(width * scale)


def can_hold_grid(height, width):
  """Whether an image of this size can ever be resized to both sides > MIN_SIDE (its aspect is not too extreme)."""
  h, w = _resized_shape_py(height, width, MAX_TARGET_PIXELS)
  return h > MIN_SIDE and w > MIN_SIDE


@functools.lru_cache(maxsize=None)
def _largest_grids():
  """(cells, pairs) of the largest grid any usable resized image can give, over every aspect ratio."""
  best_cells = best_pairs = 0
  for height in range(MIN_SIDE + 1, MAX_TARGET_PIXELS // (MIN_SIDE + 1) + 1):
    width = MAX_TARGET_PIXELS // height
    gh, gw = (height + GAP) // PITCH, (width + GAP) // PITCH
    best_cells = max(best_cells, gh * gw)
    best_pairs = max(best_pairs, num_grid_pairs(gh, gw))
  return best_cells, best_pairs


def max_grid_cells():
  return _largest_grids()[0]


def max_grid_pairs():
  return _largest_grids()[1]
