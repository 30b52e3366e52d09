"""Patch geometry of context prediction, as pure TensorFlow functions: resizing, grids, patches, pairs, labels.

The cutters of both geometries (--geometry; geometry.py picks among them): doersch, the original's random grids of
96-px patches with every 8-neighbour pair (method.md §2.1-2.3), and revisiting, Kolesnikov et al.'s 3x3 grid of 64-px
patches with the 8 (neighbour, centre) pairs (method.md §8.2). Everything here is graph code with stateless
randomness: the same seed gives the same grids, pairs and pixels, whatever the parallelism of the input pipeline.
cut_grids and cut_revisiting are the one cutter of each geometry: training (pipeline.py), the pretext and neighbours
evaluations and rescaling all call them (geometry.Geometry.evaluation_patches), so they cannot drift from the training
geometry. Per-patch augmentation is augment.py's.
"""
import functools

import tensorflow as tf

PATCH_SIZE = 96      # method.md §2.1
GAP = 48             # method.md §2.1: about half a patch, against boundary and texture continuation cues
JITTER = 7           # method.md §2.1: +-7 px per cell and axis, against long straight lines
PITCH = PATCH_SIZE + GAP
GRIDS_PER_IMAGE = 4  # method.md §2.2: grids cut from one resized image before the next is loaded
MIN_TARGET_PIXELS = 150_000  # method.md §1.2, both ends included
MAX_TARGET_PIXELS = 450_000
# method.md §1.2: an image is used only if both sides exceed this after resizing.
MIN_SIDE = 2 * PATCH_SIZE + GAP + JITTER

# The one place for the label order (method.md §2.3): (dx, dy) of the SECOND patch relative to the FIRST, y pointing
# down, in reading order, so label = index.
#   0 1 2
#   3 . 4
#   5 6 7
NEIGHBOUR_OFFSETS = ((-1, -1), (0, -1), (1, -1), (-1, 0), (1, 0), (-1, 1), (0, 1), (1, 1))
NUM_CLASSES = len(NEIGHBOUR_OFFSETS)

# method.md §8.2: Kolesnikov et al.'s geometry (their config/relative_patch_location/imagenet.sh and
# self_supervision/patch_model_preprocess.py).
REVISITING_RESIZE = 292   # both sides, the aspect not kept
REVISITING_CROP = 255     # a random square of the resized image
REVISITING_SIDE = 3       # cells per side
REVISITING_CELL = REVISITING_CROP // REVISITING_SIDE  # 85
REVISITING_PATCH = 64
REVISITING_JITTER = REVISITING_CELL - REVISITING_PATCH  # 21: the patch's offset in its cell is uniform in [0, 21]
REVISITING_CENTRE = (REVISITING_SIDE ** 2) // 2
REVISITING_PATCHES = REVISITING_SIDE ** 2
REVISITING_PAIRS = REVISITING_PATCHES - 1


def split_seed(seed, num):
  """`num` independent stateless seeds, shape [num, 2], from one seed of shape [2]."""
  return tf.random.experimental.stateless_split(seed, num=num)


def resized_shape(height, width, target_pixels):
  """Size that holds about `target_pixels` with the aspect kept, truncated as in method.md §1.2."""
  height = tf.cast(height, tf.float64)
  width = tf.cast(width, tf.float64)
  scale = tf.sqrt(tf.cast(target_pixels, tf.float64) / (height * width))
  return tf.cast(height * scale, tf.int32), tf.cast(width * scale, tf.int32)


def resize_target(seed):
  """The pixel count of an image's random resize, uniform in [150,000, 450,000] (method.md §1.2)."""
  return tf.random.stateless_uniform([], seed, minval=MIN_TARGET_PIXELS, maxval=MAX_TARGET_PIXELS + 1, dtype=tf.int32)


# tf.image.resize's bilinear kernel runs faster on float input than on uint8, so images up to this size are cast
# first; larger ones (those the JPEG decoder could not reduce, decoding.decode) are resized from uint8, so that no
# float copy of a big image is made.
FLOAT_RESIZE_MAX_PIXELS = 4 * MAX_TARGET_PIXELS


def resize_uint8(image, height, width):
  """Bilinear resize of a uint8 HxWxC image to height x width, rounded to uint8: within half a grey level of the
  float result, which is the same either way (the kernel computes in float32).

  No anti-aliasing: the original's skimage resize had none either (method.md §1.2). The original resized with zero
  padding outside the image (a boundary artefact, method.md §1.2 and 7); TF's bilinear resize clamps at the border
  instead, a deviation (method.md §7.1).
  """
  size = tf.stack([height, width])
  small = tf.size(image) <= FLOAT_RESIZE_MAX_PIXELS * 3
  resized = tf.cond(small, lambda: tf.image.resize(tf.cast(image, tf.float32), size, antialias=False),
                    lambda: tf.image.resize(image, size, antialias=False))
  return tf.cast(tf.round(resized), tf.uint8)  # bilinear weights are convex: the values stay in [0, 255]


def random_resize(image, seed):
  """An HxWx3 uint8 image resized to a uniform random 150,000-450,000 pixels with its aspect kept (method.md §1.2),
  as uint8 (resize_uint8)."""
  shape = tf.shape(image)
  new_h, new_w = resized_shape(shape[0], shape[1], resize_target(seed))
  return resize_uint8(image, new_h, new_w)


def sample_grids(seed, height, width, num_grids=GRIDS_PER_IMAGE, jitter=JITTER):
  """Upper-left corners of the cells of `num_grids` random grids in an image of the given size (method.md §2.2),
  each cell moved by up to +-jitter px per axis (0 with --yoked_jitter, method.md §9.4).

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
  if jitter:
    corners += tf.random.stateless_uniform(tf.shape(corners), jitter_seed, minval=-jitter, maxval=jitter + 1,
                                           dtype=tf.int32)
  # Clamping is the original's only boundary treatment (method.md §2.2); it moves a corner by at most JITTER.
  corners = tf.clip_by_value(corners, 0, tf.stack([height, width]) - PATCH_SIZE)
  return corners[:, 0], corners[:, 1], grid_h, grid_w


_CROPS_PER_ITERATION = 16


def crop_patches(image, ys, xs, size=PATCH_SIZE):
  """The size x size patches with upper-left corners (ys, xs) of an HxWxC image, exactly.

  Slices, _CROPS_PER_ITERATION per loop iteration (the last one's spare slices cut the corner (0, 0) and are
  dropped), each taking its begin from one unstacked row of corners: a gather of every pixel (one index per 3-byte
  pixel) took about half of the host's time per image in --augment_on=device, three times what the slices take; one
  slice per patch unrolled made the graph slow to build; and every op per patch costs the pipeline's executor time.
  """
  count = tf.shape(ys)[0]
  k = _CROPS_PER_ITERATION
  padded = (count + k - 1) // k * k
  begins = tf.stack([ys, xs, tf.zeros_like(ys)], axis=1)
  begins = tf.reshape(tf.pad(begins, [[0, padded - count], [0, 0]]), [-1, k, 3])
  channels = image.shape[2]
  shape = [size, size, channels if channels is not None else -1]

  def cut(chunk):
    return tf.stack([tf.slice(image, begin, shape) for begin in tf.unstack(chunk, num=k)])

  chunks = tf.map_fn(cut, begins, fn_output_signature=tf.TensorSpec([k, size, size, channels], image.dtype))
  return tf.reshape(chunks, [-1, size, size, channels if channels is not None else -1])[:count]


def grid_pairs(grid_height, grid_width):
  """Every ordered pair of 8-neighbours in one grid (method.md §2.3): (first, second, label), int32 [num_pairs] each.

  Indices are row-major cell indices of the grid; the label is the position of `second` relative to `first`.
  Both orders of each adjacency appear, with opposite labels.
  """
  first, second, label, _ = pairs_of_grids(tf.reshape(grid_height, [1]), tf.reshape(grid_width, [1]))
  return first, second, label


def num_grid_pairs(grid_height, grid_width):
  """Number of ordered pairs grid_pairs() gives for a grid of at least one cell (ints or tensors)."""
  h, w = grid_height, grid_width
  return 2 * ((w - 1) * h + w * (h - 1) + 2 * (w - 1) * (h - 1))


def resize_for_grids(image, seed):
  """The random resize of one image before its grids are cut (method.md §1.2), and whether the result is usable: both
  sides must exceed MIN_SIDE, which guarantees at least one cell per grid. image: uint8 [H, W, 3]."""
  resized = random_resize(image, seed)
  height, width = tf.shape(resized)[0], tf.shape(resized)[1]
  return resized, (height > MIN_SIDE) & (width > MIN_SIDE)


def cut_grids(image, resize_seed, grid_seed, num_grids=GRIDS_PER_IMAGE, jitter=JITTER):
  """Resize one image, check it is usable and cut `num_grids` random grids of patches (method.md §1.2, 2.2).

  Returns a dict: patches uint8 [n, 96, 96, 3] (un-augmented), grid_height and grid_width int32
  [num_grids] (the cells of grid 0 in row-major order come first, then grid 1 ...), usable bool. An image too small
  for a grid after its resize gives no patch and num_grids 0x0 grids.
  """
  resized, usable = resize_for_grids(image, resize_seed)

  def cut():
    ys, xs, grid_h, grid_w = sample_grids(grid_seed, tf.shape(resized)[0], tf.shape(resized)[1], num_grids, jitter)
    return crop_patches(resized, ys, xs), grid_h, grid_w

  def nothing():
    empty = tf.zeros([num_grids], tf.int32)
    return tf.zeros([0, PATCH_SIZE, PATCH_SIZE, 3], tf.uint8), empty, empty

  grid_patches, grid_h, grid_w = tf.cond(usable, cut, nothing)
  return {"patches": grid_patches, "grid_height": grid_h, "grid_width": grid_w, "usable": usable}


def grid_patches(image, seed, num_grids=1):
  """Un-augmented patches of `num_grids` random grids of one image, for evaluation and rescaling, which need real
  patches with the training geometry but not the training augmentation: cut_grids with `seed` split in two."""
  resize_seed, grid_seed = tf.unstack(split_seed(seed, 2))
  return cut_grids(image, resize_seed, grid_seed, num_grids)


def revisiting_corners(seed):
  """Upper-left corners (ys, xs), int32 [9] each, of the 9 patches of one image in the revisiting geometry, in the
  292x292 resized image (method.md §8.2): a random 255x255 crop, cut into 3x3 cells of 85 px in row-major order,
  in each cell a 64-px patch at a uniform random offset in [0, 21] per axis, drawn independently per cell."""
  crop_seed, cell_seed = tf.unstack(split_seed(seed, 2))
  crop = tf.random.stateless_uniform([2], crop_seed, minval=0, maxval=REVISITING_RESIZE - REVISITING_CROP + 1,
                                     dtype=tf.int32)
  offsets = tf.random.stateless_uniform([REVISITING_PATCHES, 2], cell_seed, minval=0, maxval=REVISITING_JITTER + 1,
                                        dtype=tf.int32)
  cells = tf.range(REVISITING_PATCHES)
  ys = crop[0] + (cells // REVISITING_SIDE) * REVISITING_CELL + offsets[:, 0]
  xs = crop[1] + (cells % REVISITING_SIDE) * REVISITING_CELL + offsets[:, 1]
  return ys, xs


def revisiting_pairs():
  """(first, second, label), int32 [8] each, of one image's 9 patches (row-major): the 8 (neighbour, centre) pairs of
  Kolesnikov et al., neighbours in row-major order. The label follows our convention (NEIGHBOUR_OFFSETS: where the
  second patch lies relative to the first), here where the centre lies seen from the neighbour; so it is 7 minus
  their label, which names the neighbour's position seen from the centre (method.md §8.2)."""
  first, label = [], []
  for cell in range(REVISITING_PATCHES):
    if cell == REVISITING_CENTRE:
      continue
    row, col = divmod(cell, REVISITING_SIDE)
    centre_row, centre_col = divmod(REVISITING_CENTRE, REVISITING_SIDE)
    first.append(cell)
    label.append(NEIGHBOUR_OFFSETS.index((centre_col - col, centre_row - row)))
  return (tf.constant(first, tf.int32), tf.fill([len(first)], tf.constant(REVISITING_CENTRE, tf.int32)),
          tf.constant(label, tf.int32))


def revisiting_resize(image):
  """Bilinear resize of a uint8 HxWx3 image to 292x292, the aspect not kept (method.md §8.2), as uint8
  (resize_uint8)."""
  return resize_uint8(image, REVISITING_RESIZE, REVISITING_RESIZE)


def cut_revisiting(image, seed):
  """One image's patches in the revisiting geometry (method.md §8.2): bilinear resize to 292x292, then the 9 patches
  of revisiting_corners. Returns cut_grids's dict for one 3x3 grid: patches uint8 [9, 64, 64, 3] (un-augmented),
  grid_height and grid_width [1] (both 3), usable (always: the resize ignores the aspect)."""
  resized = revisiting_resize(image)
  ys, xs = revisiting_corners(seed)
  side = tf.constant([REVISITING_SIDE], tf.int32)
  return {"patches": crop_patches(resized, ys, xs, REVISITING_PATCH), "grid_height": side, "grid_width": side,
          "usable": tf.constant(True)}


def pairs_of_grids(grid_height, grid_width):
  """The pairs of every grid of an image (grid_height, grid_width: int32 [g]), concatenated in grid order: (first,
  second, label) int32 [m] each, as grid_pairs gives them for each grid, its cell indices counted from its own first
  cell; and the pairs of each grid, int32 [g]. (The revisiting geometry's are revisiting_pairs.)

  All grids at once, in a few ops: the input pipeline places the pairs of every image it cuts.
  """
  cells = grid_height * grid_width
  grid = tf.repeat(tf.range(tf.size(cells)), cells)  # each cell's grid
  cell = tf.range(tf.reduce_sum(cells)) - tf.gather(tf.cumsum(cells, exclusive=True), grid)  # row-major in its grid
  height = tf.gather(grid_height, grid)[:, tf.newaxis]
  width = tf.gather(grid_width, grid)[:, tf.newaxis]  # > 0: the grid has this cell
  y, x = cell[:, tf.newaxis] // width, cell[:, tf.newaxis] % width
  offsets = tf.constant(NEIGHBOUR_OFFSETS, tf.int32)  # [8, 2] as (dx, dy)
  ny = y + offsets[tf.newaxis, :, 1]
  nx = x + offsets[tf.newaxis, :, 0]
  valid = (ny >= 0) & (ny < height) & (nx >= 0) & (nx < width)  # [cells, 8]
  first = tf.broadcast_to(cell[:, tf.newaxis], tf.shape(valid))
  label = tf.broadcast_to(tf.range(NUM_CLASSES)[tf.newaxis, :], tf.shape(valid))
  per_grid = tf.math.unsorted_segment_sum(tf.reduce_sum(tf.cast(valid, tf.int32), 1), grid, tf.size(cells))
  return (tf.boolean_mask(first, valid), tf.boolean_mask(ny * width + nx, valid), tf.boolean_mask(label, valid),
          per_grid)


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
