"""Per-patch augmentation and inference preprocessing of context prediction, as small TensorFlow ops.

Training applies augment() to every cut patch of the doersch geometry (pixelation, colour handling, RMS normalisation:
method.md §2.4) and revisiting_augment() to those of the revisiting geometry (grayscale, per-patch standardisation:
method.md §8.2); the exported models apply standardize(), the deterministic counterpart.

Every patch carries a key (patch_keys: its image's key, its own and its grid's) and every random number of its
augmentation is a hash of that key and a counter (uniform), so a patch gets the same pixels wherever it is augmented:
in the input pipeline (--augment_on=host) or in the training step on the replica's device (--augment_on=device),
alone or in any batch, whatever the parallelism. A new per-patch op goes into augment() (or revisiting_augment()) and
draws from its own stream of the keys; both modes then apply it.
"""
import tensorflow as tf

from context_keras.input import patches as patches_lib
from context_keras.input import shortcuts

PIXELATE_PROBABILITY = 0.33  # method.md §2.4 step 1
PIXELATE_MIN_SIDE = 10       # area uniform in [10^2, 95^2]
PIXELATE_MAX_SIDE = patches_lib.PATCH_SIZE - 1
RMS_TARGET = 50.0            # method.md §2.4 step 3
COLOR_MODES = ("drop", "drop_gaussian", "project", "none", "chroma_blur")
GRAYSCALE_PROBABILITY = 0.66  # method.md §8.2: per image, Kolesnikov et al.'s config
# The inference preprocessing of the revisiting geometry: tf.image.per_image_standardization, per image or patch.
STANDARDIZATION = "standardization"
PREPROCESSING_MODES = COLOR_MODES + (STANDARDIZATION,)

# The streams of a patch's random numbers, one per kind of draw, so that adding a draw changes no other.
(STREAM_PIXELATION, STREAM_KEPT_CHANNEL, STREAM_NOISE, STREAM_GRAYSCALE, STREAM_YOKE, STREAM_WINDOW,
 STREAM_MASKED) = range(7)
_STREAM_LENGTH = 1 << 24  # counters per stream: more than the values of any patch
_PER_IMAGE = 0x5BD1E995   # stands in for the patch's own key in draws shared by the patches of an image
_PER_GRID = 0x2545F491    # a stream of the image's seed for its grids' keys


def patch_keys(seed, num_patches, grid_cells=None):
  """Keys of the num_patches patches of one image, uint32 [n, 3], from a stateless seed [2]: column 0 is the
  image's key (every row the same), column 1 each patch's own, column 2 its grid's (grid_cells: int32 [g], the
  patches of each grid, which come grid after grid; without it, one grid). The grid's key keys the draws that the
  patches of a grid share (the yoked jitter and the aperture window, method.md §9.2); columns 0 and 1 are drawn as
  before it existed, so the other draws did not change."""
  bits = tf.random.stateless_uniform([num_patches + 1], seed, minval=None, maxval=None, dtype=tf.uint32)
  if grid_cells is None:
    grid_bits = tf.fill([num_patches], _mix(bits[0] ^ tf.constant(_PER_GRID, tf.uint32)))
  else:
    grid_seed = tf.random.experimental.stateless_fold_in(seed, _PER_GRID)
    grid_bits = tf.repeat(tf.random.stateless_uniform(tf.shape(grid_cells), grid_seed, minval=None, maxval=None,
                                                      dtype=tf.uint32), grid_cells)
  return tf.stack([tf.fill([num_patches], bits[0]), bits[1:], grid_bits], axis=1)


def _mix(x):
  """A bijective 32-bit integer hash (xor-shift-multiply; constants from Wellons' search for low-bias hashes): each
  input bit flips each output bit with probability close to 1/2."""
  def shift(value, bits):
    return tf.bitwise.right_shift(value, tf.constant(bits, tf.uint32))

  x ^= shift(x, 16)
  x *= tf.constant(0x7FEB352D, tf.uint32)
  x ^= shift(x, 15)
  x *= tf.constant(0x846CA68B, tf.uint32)
  return x ^ shift(x, 16)


def uniform(keys, stream, count, per_image=False, per_grid=False):
  """float32 [n, count], uniform in [0, 1) with 16 random bits: draw j of `stream` of patch i comes from a hash of
  the patch's seed (its two key words, hashed once per patch) xor'ed with a hash of the counter (stream, j) (hashed
  once per batch), so it depends on nothing else (a counter-based generator, vectorised over patches).

  Each 32-bit hash gives two draws, its high and low halves: the noise of colour dropping takes 18,432 draws per
  patch, and hashing them was most of the host's augmentation time (one hash per value instead of two halves it).

  keys: uint32 [n, 3] (patch_keys). With per_image the draws depend on the image's key only, so that every patch of
  an image gets the same values; with per_grid on the image's and the grid's keys, the same for a grid's patches.
  """
  hashes = (count + 1) // 2
  counter = _mix(tf.cast(tf.range(hashes, dtype=tf.int64) + stream * _STREAM_LENGTH, tf.uint32))[tf.newaxis, :]
  own = tf.constant(_PER_IMAGE, tf.uint32) if per_image else keys[:, 2] if per_grid else keys[:, 1]
  seed = _mix(_mix(keys[:, 0]) ^ own)[:, tf.newaxis]  # [n, 1]
  bits = _mix(seed ^ counter)  # [n, hashes]
  halves = tf.concat([tf.bitwise.right_shift(bits, tf.constant(16, tf.uint32)),
                      tf.bitwise.bitwise_and(bits, tf.constant(0xFFFF, tf.uint32))], axis=1)[:, :count]
  return tf.cast(halves, tf.float32) * (1.0 / (1 << 16))


def _bilinear_matrix(out_size, in_size, max_size):
  """Per-patch 1-D bilinear resampling matrices, [n, out_max, max_size], for resizing in_size -> out_size pixels.

  out_size, in_size: int32 [n] (each <= max_size). Rows beyond out_size and columns beyond in_size are zero, so
  the matrices of different sizes stack. Half-pixel centres and border clamping, as tf.image.resize's bilinear
  without anti-aliasing; the original's skimage resize (order 1) maps coordinates the same way.

  Output pixel i samples the input at (i + 1/2) in/out - 1/2 = N/D with integers N = (2i + 1) in - out and
  D = 2 out: the integer part is exact, and the fraction is one product by 1/D, which graph optimisers and XLA leave
  as it is (a division by a constant they would turn into such a product), so the weights come out the same
  eagerly, in graphs of static or dynamic shapes and under XLA: a patch is pixelated alike in every mode.
  """
  i = tf.range(max_size)[tf.newaxis, :]
  numerator = (2 * i + 1) * in_size[:, tf.newaxis] - out_size[:, tf.newaxis]  # [n, max_size]
  denominator = 2 * out_size[:, tf.newaxis]
  # Clamped at the border: before the first input pixel, and after the last.
  beyond = numerator >= 2 * (in_size[:, tf.newaxis] - 1) * out_size[:, tf.newaxis]
  low = tf.where(beyond, in_size[:, tf.newaxis] - 1, tf.maximum(numerator, 0) // denominator)
  remainder = tf.where(beyond | (numerator < 0), 0, numerator - low * denominator)
  frac = tf.cast(remainder, tf.float32) * tf.math.reciprocal(tf.cast(denominator, tf.float32))
  high = tf.minimum(low + 1, in_size[:, tf.newaxis] - 1)
  matrix = (tf.one_hot(low, max_size) * (1.0 - frac)[..., tf.newaxis] +
            tf.one_hot(high, max_size) * frac[..., tf.newaxis])
  row_valid = tf.cast(i < out_size[:, tf.newaxis], tf.float32)
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


def random_pixelate(patches, keys, static_shapes=False):
  """With probability 0.33 per patch, pixelate it to an area uniform in [100, 9025] px (method.md §2.4 step 1).

  patches: float [n, P, P, C] of whole grey levels (the original cast to uint8 before resizing); keys: uint32 [n, 3].
  Only the chosen third is resampled, unless static_shapes: then every patch goes through the matrices, the others
  at full size, whose matrix is the identity (exact), so that no shape depends on the draws (no device-to-host wait
  on an accelerator, and XLA can compile it).
  """
  draws = uniform(keys, STREAM_PIXELATION, 2)
  chosen = draws[:, 0] < PIXELATE_PROBABILITY
  sides = tf.cast(tf.sqrt(draws[:, 1] * (PIXELATE_MAX_SIDE ** 2 - PIXELATE_MIN_SIDE ** 2) + PIXELATE_MIN_SIDE ** 2),
                  tf.int32)
  if static_shapes:
    return pixelate(patches, tf.where(chosen, sides, tf.shape(patches)[1]))
  index = tf.where(chosen)
  pixelated = pixelate(tf.gather_nd(patches, index), tf.gather_nd(sides, index))
  return tf.tensor_scatter_nd_update(patches, index, pixelated)


# method.md §2.4, paper's projection: B = I - a^T a / (a a^T) with a = [-1, 2, -1] removes the green-magenta axis.
_GREEN_MAGENTA = (-1.0, 2.0, -1.0)
PROJECTION = tuple(
    tuple((1.0 if r == c else 0.0) - _GREEN_MAGENTA[r] * _GREEN_MAGENTA[c] / sum(v * v for v in _GREEN_MAGENTA)
          for c in range(3)) for r in range(3))


def color_transform(patches, keys, mode, chroma_blur_size=shortcuts.CHROMA_BLUR_SIZE):
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
  shape = tf.shape(patches)
  kept_channel = tf.minimum(tf.cast(uniform(keys, STREAM_KEPT_CHANNEL, 1)[:, 0] * 3, tf.int32), 2)
  keep = tf.one_hot(kept_channel, 3, dtype=patches.dtype)  # [n, 3]
  pixels = tf.reshape(patches, [shape[0], -1, 3])
  kept = tf.matmul(pixels, keep[:, :, tf.newaxis])  # [n, HW, 1]: a matmul is the fastest channel selection here
  kept -= tf.reduce_mean(kept, axis=1, keepdims=True)
  # Noise for the two dropped channels only: [n, HW, 2], placed by a [n, 2, 3] matrix into the channels after the
  # kept one, cyclically.
  area = shape[1] * shape[2]
  draws = uniform(keys, STREAM_NOISE, 2 * area)
  if mode == "drop":
    noise = draws - 0.5
  else:  # Box-Muller: two normals from two uniforms; 1 - u is in (0, 1], so the log is finite
    radius = tf.sqrt(-2.0 * tf.math.log(1.0 - draws[:, :area]))
    angle = (2.0 * 3.141592653589793) * draws[:, area:]
    noise = tf.concat([radius * tf.cos(angle), radius * tf.sin(angle)], 1) * tf.math.reduce_std(kept, axis=1) / 100.0
  place = tf.stack([tf.one_hot((kept_channel + 1) % 3, 3), tf.one_hot((kept_channel + 2) % 3, 3)], axis=1)
  noise = tf.matmul(tf.reshape(noise, [shape[0], 2, area]), place, transpose_a=True)  # [n, HW, 3]
  return tf.reshape(noise + kept * keep[:, tf.newaxis, :], shape)


def rms_normalize(patches, valid=None):
  """Scale every patch to a root-mean-square of 50 over all its values (method.md §2.4 step 3); with `valid` (bool
  [n]), the others become zero (the padding of a batch)."""
  rms = tf.sqrt(tf.reduce_mean(tf.square(patches), axis=[1, 2, 3], keepdims=True))
  scale = tf.math.divide_no_nan(tf.constant(RMS_TARGET, patches.dtype), rms)
  if valid is not None:
    scale *= tf.cast(valid, patches.dtype)[:, tf.newaxis, tf.newaxis, tf.newaxis]
  return patches * scale


def augment(patches, keys, color_mode="drop", pixelation=True, static_shapes=False, valid=None, ops=None):
  """The per-patch preprocessing of method.md §2.4, in order: pixelation, colour handling, RMS normalisation; with
  `ops` (shortcuts.PatchOps, method.md §9), the yoked rescale first and the aperture after the pixelation.

  patches: uint8 [n, P, P, 3] (or floats of whole grey levels); keys: uint32 [n, 3] (patch_keys). Returns float32
  patches in RMS-50 units; each depends on its own pixels and key only. static_shapes: see random_pixelate; valid:
  see rms_normalize.
  """
  ops = ops or shortcuts.PatchOps()
  patches = tf.cast(patches, tf.float32)
  size = patches.shape[1]
  if ops.yoked_jitter:
    scale, offset_y, offset_x, method = shortcuts.yoked_draws(uniform(keys, STREAM_YOKE, 4, per_grid=True), size)
    if ops.yoked_interpolation != "random":
      method = tf.fill(tf.shape(method), shortcuts.INTERPOLATIONS.index(ops.yoked_interpolation))
    patches = shortcuts.yoked_rescale(patches, scale, offset_y, offset_x, method)
  if pixelation:
    patches = random_pixelate(patches, keys, static_shapes)
  if ops.random_aperture:
    window = shortcuts.aperture_window(uniform(keys, STREAM_WINDOW, 3, per_grid=True), size)
    masked = uniform(keys, STREAM_MASKED, 1)[:, 0] < shortcuts.APERTURE_PROBABILITY
    patches = shortcuts.aperture(patches, masked, *window)
  return rms_normalize(color_transform(patches, keys, color_mode, ops.chroma_blur_size), valid)


def grayscale(patches, chosen):
  """The chosen patches (bool [n]) replaced by the mean of their R, G and B in all three channels, as Kolesnikov et
  al.'s to_gray; the others unchanged."""
  gray = tf.broadcast_to(tf.reduce_mean(patches, axis=-1, keepdims=True), tf.shape(patches))
  return tf.where(chosen[:, tf.newaxis, tf.newaxis, tf.newaxis], gray, patches)


def per_patch_standardization(patches):
  """Each patch to mean 0 and standard deviation 1 over all its values, (x - mean) / max(std, 1/sqrt(values)):
  tf.image.per_image_standardization, which Kolesnikov et al. apply to every patch (method.md §8.2)."""
  return tf.image.per_image_standardization(patches)


def revisiting_augment(patches, keys, probability=GRAYSCALE_PROBABILITY, valid=None):
  """The augmentation of the revisiting geometry (method.md §8.2): with probability 0.66 per image all of its
  patches become grayscale (one draw per image from its key, as their to_gray on the whole image: the mean of the
  channels commutes with resizing and cropping), then every patch is standardised.

  patches: uint8 [n, P, P, 3] (or floats in 0-255 units); keys: uint32 [n, 3] (patch_keys). Returns float32; each
  patch depends on its own pixels and its image's key only. With `valid` (bool [n]) the others become zero (the
  padding of a batch).
  """
  patches = tf.cast(patches, tf.float32)
  chosen = uniform(keys, STREAM_GRAYSCALE, 1, per_image=True)[:, 0] < probability
  patches = per_patch_standardization(grayscale(patches, chosen))
  if valid is not None:
    patches *= tf.cast(valid, tf.float32)[:, tf.newaxis, tf.newaxis, tf.newaxis]
  return patches


def standardize(images, color_mode="drop"):
  """The deterministic counterpart of color_transform + rms_normalize, for inference (method.md §2.4 steps 2-3), or
  with color_mode "standardization" (the revisiting geometry's, geometry.Geometry.preprocessing) per-image
  standardisation, the revisiting augmentation without its random grayscale.

  images: float [n, H, W, 3] in 0-255 units (patches, or whole images for the fully convolutional backbone); the
  statistics are per image. project and none are the training transforms exactly. For drop (and drop_gaussian),
  training kept one random channel, alone carrying the patch's RMS, so it reached RMS 50*sqrt(3); averaging the
  first layer's (linear) response over the three equally likely kept channels gives every channel centred and
  scaled to RMS 50/sqrt(3): the expected conv1 pre-activation, with the near-zero noise channels left out.
  chroma_blur is none here: the blur removes a cue of the pretext task, which the uses of a backbone do not need
  removed (method.md §9.3).
  """
  if color_mode == STANDARDIZATION:
    return per_patch_standardization(images)
  if color_mode not in COLOR_MODES:
    raise ValueError(f"color mode {color_mode!r} is not one of {PREPROCESSING_MODES}")
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

