"""The later fixes for context prediction's shortcuts (Mundhenk, Ho & Chen, CVPR 2018; method.md §9), as graph ops.

Two kinds: grid transforms that change what the label says (a left-right flip and a rotation by k x 90 degrees of a
whole grid, with the label remapped so that it still names where the second patch lies), applied where grids are cut;
and per-patch ops whose random draws are shared by the patches of one grid (yoked rescale and crop, the aperture
window) or need none (chroma blur), applied by augment.augment. All are exact functions of their inputs and draws,
so a patch gets the same pixels wherever they run.
"""
import dataclasses

import numpy as np
import tensorflow as tf

from context_keras.input import patches as patches_lib

ROTATIONS = 4
# method.md §9.4: Mundhenk et al. rescale the 96-px patch to a side uniform in [96, 128] and crop 96 px back out.
YOKED_MAX_SCALE = 128 / 96
INTERPOLATIONS = ("bilinear", "area", "bicubic", "lanczos")
# method.md §9.5: the aperture window's side is uniform in [64, 96] px of a 96-px patch (2/3 of the side to all).
APERTURE_MIN_SHARE = 64 / 96
# Each patch is masked with this probability, independently: a pair then has on average one masked patch, and
# whether a patch is masked says nothing about where it lies (method.md §9.5).
APERTURE_PROBABILITY = 0.5
CHROMA_BLUR_SIZE = 13  # method.md §9.3: the 13x13 a/b blur of their patch set


@dataclasses.dataclass(frozen=True)
class PatchOps:
  """The per-patch fixes augment.augment applies (the chroma blur is a colour mode; its size is here)."""
  yoked_jitter: bool = False
  yoked_interpolation: str = "random"
  random_aperture: bool = False
  chroma_blur_size: int = CHROMA_BLUR_SIZE


# --------------------------------------------------------------------------------------------------------------
# Labels under flips and rotations

def num_classes(rotation_classes=False):
  """Classes of the pretext task: the 8 directions, times the 4 rotations with --rotation_classes."""
  return len(patches_lib.NEIGHBOUR_OFFSETS) * (ROTATIONS if rotation_classes else 1)


def transformed_offset(offset, flip, k):
  """Where a neighbour at `offset` (dx, dy; y down) lies after the grid is mirrored left-right (if flip) and then
  rotated by k quarter turns counter-clockwise as displayed (tf.image.rot90's sense: the top row becomes the left
  column)."""
  dx, dy = offset
  if flip:
    dx = -dx
  for _ in range(k % ROTATIONS):
    dx, dy = dy, -dx
  return dx, dy


def label_table(rotation_classes=False):
  """int32 [2, 4, 8]: the label of direction d after (flip, k), both drawn per grid. The direction part names where
  the second patch lies in what the network sees (after the transform); with rotation_classes, 8k is added, so the
  label also names the rotation (method.md §9.6)."""
  table = np.zeros([2, ROTATIONS, len(patches_lib.NEIGHBOUR_OFFSETS)], np.int32)
  for flip in (0, 1):
    for k in range(ROTATIONS):
      for d, offset in enumerate(patches_lib.NEIGHBOUR_OFFSETS):
        seen = patches_lib.NEIGHBOUR_OFFSETS.index(transformed_offset(offset, flip, k))
        table[flip, k, d] = seen + (len(patches_lib.NEIGHBOUR_OFFSETS) * k if rotation_classes else 0)
  return table


def relabel(label, flip, k, rotation_classes=False):
  """Labels [m] of pairs of grids transformed by (flip, k) (scalars, or [m] per pair)."""
  flip = tf.broadcast_to(tf.cast(flip, tf.int32), tf.shape(label))
  k = tf.broadcast_to(tf.cast(k, tf.int32), tf.shape(label))
  return tf.gather_nd(tf.constant(label_table(rotation_classes)), tf.stack([flip, k, label], axis=-1))


def label_names(rotation_classes=False):
  """'up-left', 'up', ... for the 8 directions (patches.NEIGHBOUR_OFFSETS: where the second patch is), and with
  rotation_classes '... r90' etc. for the rotations."""
  vertical = {-1: "up", 0: "", 1: "down"}
  horizontal = {-1: "left", 0: "", 1: "right"}
  directions = ["-".join(p for p in (vertical[dy], horizontal[dx]) if p) for dx, dy in patches_lib.NEIGHBOUR_OFFSETS]
  if not rotation_classes:
    return directions
  return [f"{d} r{90 * k}" for k in range(ROTATIONS) for d in directions]


def grid_transforms(seed, num_grids, flip_relabel, rotation_classes):
  """Per grid: flip (bool [g], a fair coin with flip_relabel, else False) and k (int32 [g], uniform in 0-3 with
  rotation_classes, else 0), from a stateless seed [2]."""
  flip_seed, rotation_seed = tf.unstack(patches_lib.split_seed(seed, 2))
  flip = tf.zeros([num_grids], tf.bool)
  k = tf.zeros([num_grids], tf.int32)
  if flip_relabel:
    flip = tf.random.stateless_uniform([num_grids], flip_seed) < 0.5
  if rotation_classes:
    k = tf.random.stateless_uniform([num_grids], rotation_seed, minval=0, maxval=ROTATIONS, dtype=tf.int32)
  return flip, k


def _transform_table(size):
  """int32 [2 * ROTATIONS, size * size]: row flip * ROTATIONS + k holds, for every pixel of a size x size patch
  mirrored left-right (if flip) and then turned by k quarter turns counter-clockwise (tf.image.rot90's sense), the
  flat index of the pixel it comes from: the transform applied to an image of indices."""
  index = np.arange(size * size, dtype=np.int32).reshape(size, size)
  return np.stack([np.rot90(index[:, ::-1] if flip else index, k).reshape(-1)
                   for flip in (False, True) for k in range(ROTATIONS)])


def transform_patches(patches, flip, k):
  """Each square patch [n, P, P, C] (P known when traced) mirrored left-right where flip[i], then rotated by k[i]
  quarter turns as tf.image.rot90 does: one gather of whole pixels, an exact permutation for any dtype.

  Not tf.transpose (rot90's way): where TensorFlow uses oneDNN, its graph rewrite logs an error-level line for a
  Transpose of any dtype but float32, and the patches are uint8 (docs/method.md §4.2)."""
  size = patches.shape[1]
  if size is None or patches.shape[2] != size:
    raise ValueError(f"transform_patches needs square patches of a static size, got shape {patches.shape}")
  choice = tf.cast(flip, tf.int32) * ROTATIONS + tf.cast(k, tf.int32) % ROTATIONS
  source = tf.gather(tf.constant(_transform_table(size)), choice)  # [n, P * P]
  flat = tf.reshape(patches, tf.stack([tf.shape(patches)[0], size * size, tf.shape(patches)[3]]))
  return tf.reshape(tf.gather(flat, source, batch_dims=1), tf.shape(patches))


# --------------------------------------------------------------------------------------------------------------
# Chroma blur (method.md §9.3)

# sRGB (D65) to CIE XYZ, and the D65 white point.
_RGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                        [0.2126729, 0.7151522, 0.0721750],
                        [0.0193339, 0.1191920, 0.9503041]])
_WHITE = _RGB_TO_XYZ.sum(1)
_DELTA = 6 / 29


def _colour_matrix(values, matrix):
  """matrix [3, 3] applied to every colour of values [..., 3], as one matmul (an einsum is 4x slower here)."""
  flat = tf.matmul(tf.reshape(values, [-1, 3]), tf.constant(matrix.T, tf.float32))
  return tf.reshape(flat, tf.shape(values))


def rgb_to_lab(rgb):
  """CIE L*a*b* (D65) of sRGB values in 0-255 units, [..., 3] float32.

  Constants divide by multiplying with their reciprocals here: graph optimisers turn a division by a constant into
  such a product in some graphs (tf.data's) and not in others, which would make host and device pixels differ."""
  c = rgb * (1 / 255.0)
  linear = tf.where(c <= 0.04045, c * (1 / 12.92), tf.pow(tf.maximum(c + 0.055, 1e-6) * (1 / 1.055), 2.4))
  xyz = _colour_matrix(linear, _RGB_TO_XYZ / _WHITE[:, None])
  f = tf.where(xyz > _DELTA ** 3, tf.pow(tf.maximum(xyz, _DELTA ** 3), 1 / 3), xyz * (1 / (3 * _DELTA ** 2)) + 4 / 29)
  fx, fy, fz = tf.unstack(f, axis=-1)
  return tf.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], axis=-1)


def lab_to_rgb(lab):
  """sRGB in 0-255 units of CIE L*a*b* (D65) values, [..., 3] float32; not clipped (out-of-gamut values stay)."""
  lightness, a, b = tf.unstack(lab, axis=-1)
  fy = (lightness + 16) * (1 / 116)
  f = tf.stack([fy + a * (1 / 500), fy, fy - b * (1 / 200)], axis=-1)
  xyz = tf.where(f > _DELTA, f * f * f, 3 * _DELTA ** 2 * (f - 4 / 29))
  linear = _colour_matrix(xyz, np.linalg.inv(_RGB_TO_XYZ / _WHITE[:, None]))
  c = tf.where(linear <= 0.0031308, 12.92 * linear, 1.055 * tf.pow(tf.maximum(linear, 0.0031308), 1 / 2.4) - 0.055)
  return c * 255.0


def blur_chroma(patches, size=CHROMA_BLUR_SIZE, clip=True):
  """Patches [n, P, P, 3] (0-255 units) converted to Lab, their a and b channels blurred by a size x size box
  (the mean over the part of the window inside the patch), L kept, and converted back; clipped to [0, 255] unless
  clip is False. Colour stays, the colour fringes of chromatic aberration go (method.md §9.3)."""
  lab = rgb_to_lab(tf.cast(patches, tf.float32))
  lightness, chroma = lab[..., :1], lab[..., 1:]
  if size > 1:
    # The mean over the part of the window inside the patch: box sums over the zero-padded chroma, one axis at a
    # time (2 x size products per value instead of size^2), times the reciprocal of the window's count (avg_pool
    # would divide, see rgb_to_lab).
    rows = tf.ones([size, 1, 2, 1], chroma.dtype)
    cols = tf.ones([1, size, 2, 1], chroma.dtype)
    sums = tf.nn.depthwise_conv2d(tf.nn.depthwise_conv2d(chroma, rows, [1, 1, 1, 1], "SAME"), cols, [1, 1, 1, 1],
                                  "SAME")
    ones = tf.ones_like(chroma[:1])
    counts = tf.nn.depthwise_conv2d(tf.nn.depthwise_conv2d(ones, rows, [1, 1, 1, 1], "SAME"), cols, [1, 1, 1, 1],
                                    "SAME")
    chroma = sums * tf.math.reciprocal(counts)
  rgb = lab_to_rgb(tf.concat([lightness, chroma], -1))
  return tf.clip_by_value(rgb, 0.0, 255.0) if clip else rgb


# --------------------------------------------------------------------------------------------------------------
# Yoked rescale and crop (method.md §9.4)

def _kernel(method, d, ratio):
  """Weight of an input pixel whose centre is d pixels from the sampling point, for each interpolation; ratio is
  input pixels per output pixel (< 1: the patch is enlarged)."""
  a = tf.abs(d)
  if method == "bilinear":
    return tf.maximum(1.0 - a, 0.0)
  if method == "bicubic":  # Keys' cubic with a = -0.75, as OpenCV's INTER_CUBIC
    c = -0.75
    return tf.where(a <= 1, ((c + 2) * a - (c + 3)) * a * a + 1,
                    tf.where(a < 2, ((a - 5) * a + 8) * a * c - 4 * c, 0.0))
  if method == "lanczos":  # 8 taps, as OpenCV's INTER_LANCZOS4
    x = tf.where(a < 1e-6, 1e-6, a) * np.pi
    return tf.where(a < 4, 4 * tf.sin(x) * tf.sin(x / 4) / (x * x), 0.0)
  # area: the share of the output pixel's footprint (ratio wide, centred on the sampling point) that the input
  # pixel covers.
  return tf.maximum(tf.minimum(d + ratio / 2, 0.5) - tf.maximum(d - ratio / 2, -0.5), 0.0) / ratio


def yoked_matrices(scale, offset, method, size):
  """1-D resampling matrices [n, size, size]: row j of patch i samples the patch enlarged to scale[i] pixels
  (int32, >= size) at output pixel offset[i] + j, with interpolation INTERPOLATIONS[method[i]], half-pixel centres,
  the border replicated and each row's weights summing to 1."""
  scale_f = tf.cast(scale, tf.float32)[:, tf.newaxis, tf.newaxis]
  ratio = size / scale_f
  j = tf.cast(tf.range(size), tf.float32)[tf.newaxis, :, tf.newaxis]
  centre = (j + tf.cast(offset, tf.float32)[:, tf.newaxis, tf.newaxis] + 0.5) * ratio - 0.5  # [n, size, 1]
  taps = tf.floor(centre) + tf.range(-3.0, 5.0)  # [n, size, 8]: lanczos's 8 taps, enough for every kernel here
  d = centre - taps
  choice = tf.one_hot(method, len(INTERPOLATIONS))[:, tf.newaxis, tf.newaxis, :]
  weights = sum(choice[..., m] * _kernel(name, d, ratio) for m, name in enumerate(INTERPOLATIONS))
  weights /= tf.reduce_sum(weights, -1, keepdims=True)
  index = tf.clip_by_value(tf.cast(taps, tf.int32), 0, size - 1)
  return tf.einsum("nst,nsti->nsi", weights, tf.one_hot(index, size))


def yoked_rescale(patches, scale, offset_y, offset_x, method):
  """Each patch [n, P, P, C] enlarged to scale[i] x scale[i] and cropped back to P x P at (offset_y[i],
  offset_x[i]), as whole grey levels in [0, 255] (the patch as a uint8 image would hold it). One product per axis."""
  size = patches.shape[1] or tf.shape(patches)[1]
  rows = yoked_matrices(scale, offset_y, method, size)
  cols = yoked_matrices(scale, offset_x, method, size)
  out = tf.einsum("nyi,nijc,nxj->nyxc", rows, tf.cast(patches, tf.float32), cols)
  return tf.clip_by_value(tf.round(out), 0.0, 255.0)


def yoked_draws(draws, size):
  """Scale, offsets and interpolation from 4 uniform draws in [0, 1) per patch ([n, 4]; the patches of one grid get
  the same draws): scale uniform in [P, round(P * 4/3)], each offset uniform in [0, scale - P], the interpolation
  one of INTERPOLATIONS with equal odds (method.md §9.4)."""
  largest = int(round(size * YOKED_MAX_SCALE))
  scale = size + tf.minimum(tf.cast(draws[:, 0] * (largest - size + 1), tf.int32), largest - size)
  room = scale - size + 1
  offset_y = tf.minimum(tf.cast(draws[:, 1] * tf.cast(room, tf.float32), tf.int32), room - 1)
  offset_x = tf.minimum(tf.cast(draws[:, 2] * tf.cast(room, tf.float32), tf.int32), room - 1)
  method = tf.minimum(tf.cast(draws[:, 3] * len(INTERPOLATIONS), tf.int32), len(INTERPOLATIONS) - 1)
  return scale, offset_y, offset_x, method


# --------------------------------------------------------------------------------------------------------------
# Random aperture (method.md §9.5)

def aperture_window(draws, size):
  """(side, top, left) int32 [n] of the aperture window from 3 uniform draws per patch ([n, 3]): side uniform in
  [round(2P/3), P], the corner uniform where the window fits."""
  smallest = int(round(size * APERTURE_MIN_SHARE))
  side = smallest + tf.minimum(tf.cast(draws[:, 0] * (size - smallest + 1), tf.int32), size - smallest)
  room = size - side + 1
  top = tf.minimum(tf.cast(draws[:, 1] * tf.cast(room, tf.float32), tf.int32), room - 1)
  left = tf.minimum(tf.cast(draws[:, 2] * tf.cast(room, tf.float32), tf.int32), room - 1)
  return side, top, left


def aperture(patches, masked, side, top, left):
  """Where masked[i], patch i outside its window (side x side at top, left) is filled with the mean colour of the
  window, so that per-patch centring makes it exactly zero (method.md §9.5). patches: float [n, P, P, C]."""
  size = tf.shape(patches)[1]
  pos = tf.range(size)[tf.newaxis, :]
  inside_rows = (pos >= top[:, tf.newaxis]) & (pos < (top + side)[:, tf.newaxis])     # [n, P]
  inside_cols = (pos >= left[:, tf.newaxis]) & (pos < (left + side)[:, tf.newaxis])
  window = tf.cast(inside_rows[:, :, tf.newaxis] & inside_cols[:, tf.newaxis, :], patches.dtype)[..., tf.newaxis]
  mean = tf.reduce_sum(patches * window, [1, 2], keepdims=True) / tf.reduce_sum(window, [1, 2], keepdims=True)
  keep = tf.maximum(window, 1.0 - tf.cast(masked, patches.dtype)[:, tf.newaxis, tf.newaxis, tf.newaxis])
  return patches * keep + mean * (1.0 - keep)


# A stream of an image's seed for the grid transforms, folded in so that the other draws stay as they were.
TRANSFORM_STREAM = 0x11


def transform_grids(grids, seed, flip_relabel, rotation_classes):
  """patches.cut_grids's dict with every grid mirrored and/or rotated as a whole (grid_transforms, drawn from
  the image's `seed`): patches transformed, and per grid `flip` (bool [g]) and `rotation` (int32 [g]), which the
  labels of its pairs must follow (relabel)."""
  num_grids = tf.shape(grids["grid_height"])[0]
  flip, k = grid_transforms(tf.random.experimental.stateless_fold_in(seed, TRANSFORM_STREAM), num_grids,
                            flip_relabel, rotation_classes)
  cells = grids["grid_height"] * grids["grid_width"]
  patches = transform_patches(grids["patches"], tf.repeat(flip, cells), tf.repeat(k, cells))
  return dict(grids, patches=patches, flip=flip, rotation=k)
