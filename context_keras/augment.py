"""Per-patch augmentation and inference preprocessing of context prediction, as small TensorFlow ops.

Training applies augment() to every cut patch (pixelation, colour handling, RMS normalisation: method.md §2.4);
the exported models apply standardize(), its deterministic counterpart. All randomness is stateless, keyed by the
seed given, so the same seed gives the same pixels whatever the parallelism of the input pipeline.
"""
import tensorflow as tf

from context_keras import patches as patches_lib
from context_keras import shortcuts

PIXELATE_PROBABILITY = 0.33  # method.md §2.4 step 1
PIXELATE_MIN_SIDE = 10       # area uniform in [10^2, 95^2]
PIXELATE_MAX_SIDE = patches_lib.PATCH_SIZE - 1
RMS_TARGET = 50.0            # method.md §2.4 step 3
COLOR_MODES = ("drop", "drop_gaussian", "project", "none", "chroma_blur")


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
  """Bilinear downsampling of each patch to sides[i] x sides[i] and back to full size (method.md §2.4 step 1).

  patches: float [n, P, P, C]; sides: int32 [n] in [1, P]. Both resizes are linear maps, so each patch's round trip
  is one P x P matrix M applied to rows and columns (M X M^T): one batched product for all sizes at once.
  """
  size = tf.shape(patches)[1]
  full = tf.fill(tf.shape(sides), size)
  down = _bilinear_matrix(sides, full, patches_lib.PATCH_SIZE)  # [n, P(max side), P]
  up = _bilinear_matrix(full, sides, patches_lib.PATCH_SIZE)    # [n, P, P(max side)]
  matrix = tf.matmul(up, down)                      # [n, P, P]
  shape = tf.shape(patches)
  rows = tf.matmul(matrix, tf.reshape(patches, [shape[0], shape[1], -1]))           # M X, [n, P, P*C]
  columns = tf.transpose(tf.reshape(rows, shape), [0, 3, 1, 2])                    # [n, C, P, P]
  return tf.transpose(tf.matmul(columns, matrix[:, tf.newaxis], transpose_b=True), [0, 2, 3, 1])  # (M X) M^T


def random_pixelate(patches, seed):
  """With probability 0.33 per patch, pixelate it to an area uniform in [100, 9025] px (method.md §2.4 step 1)."""
  n = tf.shape(patches)[0]
  choose_seed, area_seed = tf.unstack(patches_lib.split_seed(seed, 2))
  chosen = tf.random.stateless_uniform([n], choose_seed) < PIXELATE_PROBABILITY
  u = tf.random.stateless_uniform([n], area_seed)
  sides = tf.cast(tf.sqrt(u * (PIXELATE_MAX_SIDE ** 2 - PIXELATE_MIN_SIDE ** 2) + PIXELATE_MIN_SIDE ** 2), tf.int32)
  # Only the chosen third is resampled. The original cast the patch to uint8 before resizing it (method.md §2.4 step 1).
  index = tf.where(chosen)
  pixelated = pixelate(tf.floor(tf.gather_nd(patches, index)), tf.gather_nd(sides, index))
  return tf.tensor_scatter_nd_update(patches, index, pixelated)


# method.md §2.4, paper's projection: B = I - a^T a / (a a^T) with a = [-1, 2, -1] removes the green-magenta axis.
_GREEN_MAGENTA = (-1.0, 2.0, -1.0)
PROJECTION = tuple(
    tuple((1.0 if r == c else 0.0) - _GREEN_MAGENTA[r] * _GREEN_MAGENTA[c] / sum(v * v for v in _GREEN_MAGENTA)
          for c in range(3)) for r in range(3))


def color_transform(patches, seed, mode, chroma_blur_size=shortcuts.CHROMA_BLUR_SIZE):
  """Chromatic-aberration remedy of method.md §2.4 step 2, by `mode`, on float [n, P, P, 3] patches in 0-255 units.

  drop:          keep one random channel minus its mean; the other two become uniform noise in [-0.5, 0.5)
                 (the validated code).
  drop_gaussian: as drop, but the noise is Gaussian with 1/100 of the kept channel's std (the paper's text).
  project:       per-channel means removed, then every pixel projected off the green-magenta axis (the paper).
  none:          per-channel means removed only.
  chroma_blur:   the a and b channels of Lab blurred (chroma_blur_size, shortcuts.blur_chroma), then as none
                 (Mundhenk et al., method.md §9.3).
  """
  if mode not in COLOR_MODES:
    raise ValueError(f"color mode {mode!r} is not one of {COLOR_MODES}")
  if mode == "chroma_blur":
    patches = shortcuts.blur_chroma(patches, chroma_blur_size)
    mode = "none"
  if mode in ("none", "project"):
    centred = patches - tf.reduce_mean(patches, axis=[1, 2], keepdims=True)
    return centred if mode == "none" else tf.einsum("nhwc,dc->nhwd", centred, tf.constant(PROJECTION, patches.dtype))
  keep_seed, noise_seed = tf.unstack(patches_lib.split_seed(seed, 2))
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
  """Scale every patch to a root-mean-square of 50 over all its values (method.md §2.4 step 3)."""
  rms = tf.sqrt(tf.reduce_mean(tf.square(patches), axis=[1, 2, 3], keepdims=True))
  return tf.math.divide_no_nan(patches, rms) * RMS_TARGET


def augment(patches, seed, color_mode="drop", pixelation=True):
  """The per-patch preprocessing of method.md §2.4, in order: pixelation, colour handling, RMS normalisation."""
  pixel_seed, color_seed = tf.unstack(patches_lib.split_seed(seed, 2))
  if pixelation:
    patches = random_pixelate(patches, pixel_seed)
  return rms_normalize(color_transform(patches, color_seed, color_mode))


def standardize(images, color_mode="drop"):
  """The deterministic counterpart of color_transform + rms_normalize, for inference (method.md §2.4 steps 2-3).

  images: float [n, H, W, 3] in 0-255 units (patches, or whole images for the fully convolutional backbone); the
  statistics are per image. project and none are the training transforms exactly. For drop (and drop_gaussian),
  training kept one random channel, alone carrying the patch's RMS, so it reached RMS 50*sqrt(3); averaging the
  first layer's (linear) response over the three equally likely kept channels gives every channel centred and
  scaled to RMS 50/sqrt(3): the expected conv1 pre-activation, with the near-zero noise channels left out.
  chroma_blur is none here: the blur removes a cue of the pretext task, which the uses of a backbone do not need
  removed (method.md §9.3).
  """
  if color_mode not in COLOR_MODES:
    raise ValueError(f"color mode {color_mode!r} is not one of {COLOR_MODES}")
  centred = images - image_mean(images)
  if color_mode in ("drop", "drop_gaussian"):
    channel_rms = tf.sqrt(image_mean(tf.square(centred)))
    return tf.math.divide_no_nan(centred, channel_rms) * (RMS_TARGET / 3 ** 0.5)
  if color_mode == "project":
    centred = tf.einsum("nhwc,dc->nhwd", centred, tf.constant(PROJECTION, images.dtype))
  rms = tf.sqrt(tf.reduce_mean(image_mean(tf.square(centred)), axis=3, keepdims=True))
  return tf.math.divide_no_nan(centred, rms) * RMS_TARGET


def image_mean(images):
  """Each image's and channel's mean [n, 1, 1, C], as the mean over rows of the row means. One reduction over H*W
  loses float32 precision as images grow (in standardize, 1.3e-4 of the result at 480x640 against 3e-7 for the
  nested form, method.md §11.5); every row has the same width, so the two are the same mean."""
  return tf.reduce_mean(tf.reduce_mean(images, axis=2, keepdims=True), axis=1, keepdims=True)

