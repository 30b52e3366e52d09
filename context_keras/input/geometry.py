"""The patch geometries of context prediction (--geometry): one object per geometry, holding everything that differs
between them, so that the rest of the package asks the geometry and never compares its name.

  doersch     the original's (method.md §2): the image resized at random to 150,000-450,000 pixels, its aspect kept,
              then 4 random grids of 96-px patches with 48-px gaps and +-7 px jitter, every 8-neighbour pair; each
              patch augmented by --color_mode and --pixelation (§2.4) and the shortcut fixes (§9).
  revisiting  Kolesnikov et al.'s (method.md §8.2): the image resized to 292x292, its aspect not kept, one 3x3 grid
              of 64-px patches in a random 255 crop, the 8 (neighbour, centre) pairs; grayscale with probability
              0.66 per image and per-patch standardisation, whatever --color_mode says.

The cutters are patches.py's and the augmentations augment.py's (pure TensorFlow); a Geometry picks among them and
states the facts the pipeline, the model, the evaluations and the programs need: DOERSCH and REVISITING, by name in
GEOMETRIES.
"""
import abc

import tensorflow as tf

from context_keras import errors
from context_keras.input import augment as augment_lib
from context_keras.input import decoding
from context_keras.input import patches as patches_lib


class Geometry(abc.ABC):
  """What a geometry decides (its two instances: DOERSCH, REVISITING). The attributes:

  name             its --geometry value
  patch_size       the side of its patches, and the smallest image side its backbones take
  grids_per_image  grids cut from one image, which the packer takes in order (pipeline._Packer)
  head             the pair head of its recipe (model.networks.HEADS; each recipe's head is named after it)
  benchmark_grids  grids (revisiting: images) in the benchmark's preloaded batch: its PyTorch baseline's default
  color_modes      whether --color_mode and --pixelation choose its augmentation (method.md §2.4); if not,
  own_colour       what it does instead
  shortcut_fixes   whether the fixes of method.md §9 work with it
  original         whether it is the original's, whose loader and flags/deepcontext.cfg the benchmark measures
  """
  name = patch_size = grids_per_image = head = benchmark_grids = own_colour = None
  color_modes = shortcut_fixes = original = False

  def __repr__(self):
    return f"<geometry {self.name}>"

  @property
  @abc.abstractmethod
  def largest_grid(self):
    """(patches, pairs) of the largest grid an image can give: what one batch must hold."""

  @abc.abstractmethod
  def images_per_batch(self, batch_patches, batch_pairs):
    """Images in every batch of these capacities, or None when the count varies."""

  @abc.abstractmethod
  def holds(self, height, width):
    """Whether an image of this size can give a grid, at some resize."""

  @abc.abstractmethod
  def decoded_pixels(self, contents, seed):
    """The pixels cut() decodes of an encoded image, read from its header (decoding.decoded_pixels)."""

  @abc.abstractmethod
  def cut(self, contents, seed, jitter=patches_lib.JITTER):
    """Decode one encoded image as its resize needs, resize it and cut its grids: (patches.cut_grids's dict,
    the seed of its patches' augmentation keys). `jitter`: the per-cell jitter where the geometry has one."""

  @abc.abstractmethod
  def pairs(self, grid_height, grid_width):
    """The pairs of an image's grids (int32 [g] each), as patches.pairs_of_grids gives them: (first, second,
    label) int32 [m], each grid's cells counted from its own first; the pairs of each grid, int32 [g]."""

  @abc.abstractmethod
  def evaluation_patches(self, image, seed):
    """Un-augmented patches of one decoded image cut as training cuts them, for the evaluations and rescaling:
    patches.cut_grids's dict."""

  @abc.abstractmethod
  def augment(self, patches, keys, color_mode, pixelation, ops=None, static_shapes=False, valid=None):
    """uint8 patches [n, P, P, 3] with their keys (augment.patch_keys) as the tower takes them in training."""

  @abc.abstractmethod
  def preprocessing(self, color_mode):
    """The colour handling of a run of this geometry trained with `color_mode`: what its exported models apply to
    their input (augment.standardize's mode), and what reports name as its colour mode."""

  def unused_settings(self, color_mode=None, pixelation=None):
    """'--flag=value does nothing ...' for each setting given (not None) that this geometry does not use."""
    if self.color_modes:
      return []
    given = ([f"--color_mode={color_mode}"] if color_mode is not None else []) + (
        [f"--{'' if pixelation else 'no'}pixelation"] if pixelation is not None else [])
    return [f"{flag} does nothing with --geometry={self.name}, which {self.own_colour}" for flag in given]

  def unsupported_fix(self, given):
    """The problem of the first of `given` (flags of method.md §9's fixes that are set), or None."""
    given = list(given)
    if given and not self.shortcut_fixes:
      return f"{given[0]} does not work with --geometry={self.name} yet (method.md §9.9)"
    return None

  def check_input_side(self, flag, value, side=None, what="images"):
    """The one rule for what reaches a backbone of this geometry: an input side (`side`, which `value` of `flag`
    gives; default `value` itself) must hold one patch. A UsageError naming the flag otherwise."""
    side = value if side is None else side
    if side < self.patch_size:
      raise errors.UsageError(f"Invalid flags: {flag}={value} gives {what} of {side} px; a backbone of "
                              f"--geometry={self.name} needs at least one patch, {self.patch_size} px")


class Doersch(Geometry):
  name = "doersch"
  patch_size = patches_lib.PATCH_SIZE
  grids_per_image = patches_lib.GRIDS_PER_IMAGE
  head = "doersch"
  benchmark_grids = 56
  color_modes = shortcut_fixes = original = True

  @property
  def largest_grid(self):
    return patches_lib.max_grid_cells(), patches_lib.max_grid_pairs()

  def images_per_batch(self, batch_patches, batch_pairs):
    return None  # whole grids of every size are packed

  def holds(self, height, width):
    return patches_lib.can_hold_grid(height, width)

  def decoded_pixels(self, contents, seed):
    return decoding.decoded_pixels(contents, patches_lib.resize_target(patches_lib.split_seed(seed, 3)[0]))

  def cut(self, contents, seed, jitter=patches_lib.JITTER):
    # Decoded at about the size the random resize needs (a JPEG at a fraction of its size, method.md §1.2).
    resize_seed, grid_seed, augment_seed = tf.unstack(patches_lib.split_seed(seed, 3))
    image = decoding.decode(contents, target_pixels=patches_lib.resize_target(resize_seed))
    return patches_lib.cut_grids(image, resize_seed, grid_seed, jitter=jitter), augment_seed

  def pairs(self, grid_height, grid_width):
    return patches_lib.pairs_of_grids(grid_height, grid_width)

  def evaluation_patches(self, image, seed):
    return patches_lib.grid_patches(image, seed)  # one random grid

  def augment(self, patches, keys, color_mode, pixelation, ops=None, static_shapes=False, valid=None):
    return augment_lib.augment(patches, keys, color_mode, pixelation, static_shapes=static_shapes, valid=valid,
                               ops=ops)

  def preprocessing(self, color_mode):
    return color_mode


class Revisiting(Geometry):
  name = "revisiting"
  patch_size = patches_lib.REVISITING_PATCH
  grids_per_image = 1
  head = "revisiting"
  benchmark_grids = 16
  own_colour = "grays and standardises its patches instead (method.md §8.2)"

  @property
  def largest_grid(self):
    return patches_lib.REVISITING_PATCHES, patches_lib.REVISITING_PAIRS

  def images_per_batch(self, batch_patches, batch_pairs):
    return min(batch_patches // patches_lib.REVISITING_PATCHES, batch_pairs // patches_lib.REVISITING_PAIRS)

  def holds(self, height, width):
    return True  # the 292x292 resize ignores the aspect

  def decoded_pixels(self, contents, seed):
    return decoding.decoded_pixels(contents, tf.constant(decoding.MAX_DECODE_PIXELS, tf.int64))

  def cut(self, contents, seed, jitter=patches_lib.JITTER):
    # Decoded at full size: the 292x292 resize ignores the aspect, so a reduced JPEG decode (which keeps the pixel
    # count, not each side) could leave the short side below 292. No jitter but the patch's place in its cell.
    del jitter
    cut_seed, augment_seed = tf.unstack(patches_lib.split_seed(seed, 2))
    return patches_lib.cut_revisiting(decoding.decode(contents), cut_seed), augment_seed

  def pairs(self, grid_height, grid_width):
    del grid_width  # always 3x3
    first, second, label = patches_lib.revisiting_pairs()
    return first, second, label, tf.fill(tf.shape(grid_height), patches_lib.REVISITING_PAIRS)

  def evaluation_patches(self, image, seed):
    return patches_lib.cut_revisiting(image, seed)  # the 9 patches

  def augment(self, patches, keys, color_mode, pixelation, ops=None, static_shapes=False, valid=None):
    del color_mode, pixelation, ops, static_shapes  # none applies (unused_settings, unsupported_fix)
    return augment_lib.revisiting_augment(patches, keys, valid=valid)

  def preprocessing(self, color_mode):
    return augment_lib.STANDARDIZATION


DOERSCH = Doersch()
REVISITING = Revisiting()
GEOMETRIES = {geometry.name: geometry for geometry in (DOERSCH, REVISITING)}


def get(name):
  """The geometry called `name` (a config's or a metadata file's --geometry); a ValueError naming the flag."""
  if name not in GEOMETRIES:
    raise ValueError(f"--geometry={name} is not one of {tuple(GEOMETRIES)}")
  return GEOMETRIES[name]


def with_patch_size(size):
  """The geometry whose patches have this side (a ModelConfig's patch_size), or None."""
  return next((geometry for geometry in GEOMETRIES.values() if geometry.patch_size == size), None)
