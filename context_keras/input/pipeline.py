"""The input pipeline: encoded images to augmented patch grids to packed batches of static shape, as one tf.data graph.

A batch is a set of patches plus (first, second, label) index arrays into it, so that the tower runs once per patch
and every ordered pair gathers its two fc6 rows (method.md §2.5 and 3.3). Whole grids are packed into a batch until the
next grid would overflow its patch or pair capacity, as the original packed grids into batches of at most 511
patches; the rest of the static shape is padding, marked by `patch_mask` and `pair_mask`. Images come from
sources.py, decoded by decoding.py; grids are cut by patches.cut_grids as uint8 patches, each with its augmentation
key (augment.patch_keys). augment_batch turns a batch's uint8 patches into what the tower takes (augment.augment):
in the pipeline with --augment_on=host, in the training step on the replica's device with --augment_on=device.
What differs between the geometries (how an image is decoded, resized and cut, its pairs, its augmentation) is the
config's geometry.Geometry's: the revisiting geometry (method.md §8.2) goes through the same packer and the same two
modes, each image one 3x3 grid of 64-px patches whose pairs are its 8 (neighbour, centre) pairs.
"""
import dataclasses

import tensorflow as tf

from context_keras.input import augment as augment_lib
from context_keras.input import geometry as geometry_lib
from context_keras.input import patches as patches_lib
from context_keras.input import shortcuts
from context_keras.input import sources

AUGMENT_ON = ("host", "device")
# Images the packer skips: their stream positions (grids_of_images's index) and why, by these codes, ride along with
# the batches, up to SKIPPED_PER_BATCH in each (more wait for the next), for the host to name them
# (sources.stream_image): the pipeline stays graph code.
SKIPPED_UNREADABLE, SKIPPED_TOO_SMALL = 0, 1
SKIPPED_REASONS = ("unreadable", "too small for a grid")
SKIPPED_PER_BATCH = 16


def resolve_augment_on(name):
  """--augment_on as used: 'auto' becomes 'device' when a GPU is visible (the host then only cuts patches), else
  'host' (on a CPU both share the same cores, and the pipeline overlaps the step)."""
  if name != "auto":
    return name
  return "device" if tf.config.list_physical_devices("GPU") else "host"


YOKED_INTERPOLATIONS = ("random", *shortcuts.INTERPOLATIONS)


@dataclasses.dataclass(frozen=True)
class InputConfig:
  """What the pipeline needs to know, so that tests and tools can build one without flags."""
  data: str
  data_root: str | None = None
  tfds_data_dir: str | None = None  # where a tfds: --data is prepared (None: TFDS's default)
  color_mode: str = "drop"
  pixelation: bool = True
  batch_patches: int = 511
  batch_pairs: int = 2560
  shuffle_buffer: int = 2048
  seed: int = 0
  data_service: str | None = None
  # method.md §9: the later fixes for the shortcuts, all off by default.
  chroma_blur_size: int = shortcuts.CHROMA_BLUR_SIZE
  yoked_jitter: bool = False
  yoked_interpolation: str = "random"
  random_aperture: bool = False
  rotation_classes: bool = False
  flip_relabel: bool = False

  augment_on: str = "host"
  geometry: str = geometry_lib.DOERSCH.name  # a name, as config.json records it; patch_geometry is the Geometry

  def __post_init__(self):
    if self.augment_on not in AUGMENT_ON:
      raise ValueError(f"--augment_on={self.augment_on} is not one of {AUGMENT_ON}")
    geometry = geometry_lib.get(self.geometry)
    if self.yoked_interpolation not in YOKED_INTERPOLATIONS:
      raise ValueError(f"--yoked_interpolation={self.yoked_interpolation} is not one of {YOKED_INTERPOLATIONS}")
    if self.chroma_blur_size < 1 or self.chroma_blur_size % 2 == 0:
      raise ValueError(f"--chroma_blur_size={self.chroma_blur_size} must be a positive odd number")
    problem = geometry.unsupported_fix(flag for flag, given in (
        ("--color_mode=chroma_blur", self.color_mode == "chroma_blur"), ("--yoked_jitter", self.yoked_jitter),
        ("--random_aperture", self.random_aperture), ("--rotation_classes", self.rotation_classes),
        ("--flip_relabel", self.flip_relabel)) if given)
    if problem:
      raise ValueError(problem)
    if self.batch_patches < self.largest_grid[0]:
      raise ValueError(f"--batch_patches={self.batch_patches} cannot hold the largest grid "
                       f"({self.largest_grid[0]} patches)")
    if self.batch_pairs < self.largest_grid[1]:
      raise ValueError(f"--batch_pairs={self.batch_pairs} cannot hold the pairs of the largest grid "
                       f"({self.largest_grid[1]})")

  @property
  def patch_geometry(self):
    """The geometry.Geometry of --geometry."""
    return geometry_lib.get(self.geometry)

  @property
  def largest_grid(self):
    """(patches, pairs) of the largest grid of the geometry."""
    return self.patch_geometry.largest_grid

  @property
  def patch_size(self):
    return self.patch_geometry.patch_size

  @property
  def images_per_batch(self):
    """Images in every batch of one replica (revisiting: every image is one grid of 9 patches), or None when it
    varies (doersch)."""
    return self.patch_geometry.images_per_batch(self.batch_patches, self.batch_pairs)

  @property
  def num_classes(self):
    return shortcuts.num_classes(self.rotation_classes)

  @property
  def transforms_grids(self):
    return self.rotation_classes or self.flip_relabel

  @property
  def patch_ops(self):
    return shortcuts.PatchOps(yoked_jitter=self.yoked_jitter, yoked_interpolation=self.yoked_interpolation,
                              random_aperture=self.random_aperture, chroma_blur_size=self.chroma_blur_size)

  @property
  def grid_jitter(self):
    """The per-cell jitter of the grid: the original's +-7 px, or none when the yoked jitter replaces it."""
    return 0 if self.yoked_jitter else patches_lib.JITTER


def image_grids(contents, seed, config=None):
  """Decode one encoded image at the size its resize needs, resize it, cut its grids and key their patches, as the
  config's geometry does it (geometry.Geometry.cut; doersch: method.md §1.2, 2.2, 2.4; revisiting: §8.2); with an
  InputConfig whose grids are mirrored or rotated, transform them (method.md §9.6). Without a config: the doersch
  geometry, no transforms.

  Returns patches.cut_grids's dict (patches uint8 [n, P, P, 3], grid_height and grid_width int32 [g], usable
  bool) with patch_keys uint32 [n, 3], the pairs of the geometry (first, second, label int32 [m], each grid's cells
  counted from its own first; grid_pairs int32 [g]), their labels following the grid's transform (and with
  transforms, flip and rotation [g]); an image too small for a grid gives 0x0 grids, so that the packer counts it.
  The pairs are placed here, in the parallel stage, so that the sequential packer only moves them.
  """
  geometry = config.patch_geometry if config is not None else geometry_lib.DOERSCH
  grids, augment_seed = geometry.cut(contents, seed, config.grid_jitter if config is not None else patches_lib.JITTER)
  first, second, label, grid_pairs = geometry.pairs(grids["grid_height"], grids["grid_width"])
  if config is not None and config.transforms_grids:
    grids = shortcuts.transform_grids(grids, seed, config.flip_relabel, config.rotation_classes)
    # method.md §9.6: a transformed grid's labels follow it.
    label = shortcuts.relabel(label, tf.repeat(grids["flip"], grid_pairs), tf.repeat(grids["rotation"], grid_pairs),
                              config.rotation_classes)
  cells = grids["grid_height"] * grids["grid_width"]
  return dict(grids, patch_keys=augment_lib.patch_keys(augment_seed, tf.shape(grids["patches"])[0], cells),
              first=first, second=second, label=label, grid_pairs=grid_pairs)


# Images that decode to more pixels than this are decoded one at a time, after the parallel stage; all others, many
# at once. Every JPEG within the bomb guard falls below it (a reduced decode keeps under 4x the resize target, or at
# most MAX_DECODE_PIXELS / 64 = 1.56 MP), so the parallel decodes each hold a few MB whatever the core count, and
# only a large PNG, WebP, BMP or GIF (no reduced decoding) pays for its size, once (docs/guarantees.md,
# Memory; method.md §1.2).
PARALLEL_DECODE_MAX_PIXELS = 4 * patches_lib.MAX_TARGET_PIXELS


def decoded_pixels(contents, seed, geometry=geometry_lib.DOERSCH):
  """What image_grids decodes of `contents` with `seed` and a config of `geometry`, in pixels, read from the header
  (geometry.Geometry.decoded_pixels)."""
  return geometry.decoded_pixels(contents, seed)


def _no_grids(config=None):
  """image_grids's structure (for the same config) holding nothing: the place of an image left to the one-at-a-time
  stage."""
  geometry = config.patch_geometry if config is not None else geometry_lib.DOERSCH
  side, grids = geometry.patch_size, geometry.grids_per_image
  empty = tf.zeros([grids], tf.int32)
  no_pairs = tf.zeros([0], tf.int32)
  nothing = {"patches": tf.zeros([0, side, side, 3], tf.uint8),
             "grid_height": empty, "grid_width": empty, "usable": tf.constant(False),
             "patch_keys": tf.zeros([0, 3], tf.uint32),
             "first": no_pairs, "second": no_pairs, "label": no_pairs, "grid_pairs": empty}
  if config is not None and config.transforms_grids:
    nothing.update(flip=tf.zeros([grids], tf.bool), rotation=empty)
  return nothing


def grids_of_images(images, base_seed, start_image=0, config=None):
  """(index, image_grids(..., config)) of each image of `images` (encoded bytes, or {"path"} of a file, read in the
  decoding stage: sources.training_images), its stream index counted from start_image; an image that cannot be read
  or decoded gives an error element (the caller skips and counts it).

  Memory is bounded by design, whatever the core count: tf.data's AUTOTUNE runs up to one decode per core, and each
  of those decodes at most PARALLEL_DECODE_MAX_PIXELS; a larger image is passed on encoded, and decoded in a
  sequential stage, so that at most one large decode is in memory at a time (docs/guarantees.md, Memory).
  """
  def seed_of(index):
    return tf.random.experimental.stateless_fold_in(base_seed, index)

  geometry = config.patch_geometry if config is not None else geometry_lib.DOERSCH
  # One function of the graph that both stages call: image_grids is traced once, not once per stage (its trace is
  # seconds at every program's start).
  grids_of = tf.function(lambda contents, seed: image_grids(contents, seed, config), autograph=False)

  # This module's functions are graph code (tf.cond, tf.where, no Python control flow on tensors), so tf.data is told
  # not to run AutoGraph on them: converting their source only cost seconds at every program's start.
  @tf.autograph.experimental.do_not_convert
  def parallel(index, image):
    contents = tf.io.read_file(image["path"]) if isinstance(image, dict) else image
    large = decoded_pixels(contents, seed_of(index), geometry) > PARALLEL_DECODE_MAX_PIXELS
    grids = tf.cond(large, lambda: _no_grids(config), lambda: grids_of(contents, seed_of(index)))
    return index, tf.where(large, contents, ""), large, grids  # only a large image's bytes travel on

  @tf.autograph.experimental.do_not_convert
  def one_at_a_time(index, contents, large, grids):
    return index, tf.cond(large, lambda: grids_of(contents, seed_of(index)), lambda: grids)

  return (images.enumerate(start=start_image)
          .map(parallel, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
          # One call at a time, explicitly: tf.data's map_parallelization would turn a plain map into a parallel one.
          .map(one_at_a_time, num_parallel_calls=1, deterministic=True))


def augment_batch(batch, config, static_shapes=False):
  """A batch as the tower takes it: its uint8 patches augmented by the geometry with each patch's key (padding
  patches zero), everything else unchanged. static_shapes: see augment.random_pixelate."""
  patches = config.patch_geometry.augment(batch["patches"], batch["patch_keys"], config.color_mode, config.pixelation,
                                          ops=config.patch_ops, static_shapes=static_shapes, valid=batch["patch_mask"])
  return dict(batch, patches=patches)


def step_augmentation(config, jit_compile=False):
  """What the training step applies to each batch: augment_batch with --augment_on=device, None with host (the
  pipeline did it). Shapes are kept static on GPUs and under XLA (see augment.random_pixelate); on a CPU only the
  pixelated third of the patches is resampled."""
  if config.augment_on != "device":
    return None
  static_shapes = jit_compile or bool(tf.config.list_physical_devices("GPU"))
  return lambda batch: augment_batch(batch, config, static_shapes)


# --------------------------------------------------------------------------------------------------------------
# Grids -> packed batches

def _per_patch(size):
  """What a batch holds per patch, packed in TensorLists (appending does not copy): name -> (dtype, shape of one
  patch's value), for patches of size x size pixels."""
  return {"patches": (tf.uint8, [size, size, 3]), "patch_keys": (tf.uint32, [3])}


_PER_PATCH = tuple(_per_patch(patches_lib.PATCH_SIZE))  # the names, the same for every size
# What a batch holds per pair, and the skipped images it names: vectors that grow with each grid, also held in
# TensorLists (of vectors). A list's handle is a scalar whatever it holds, so the scan's state keeps its shapes from
# the first step, and tf.data traces the packer once instead of twice (a plain vector's shape goes from [0] to
# [None], which makes Dataset.scan trace again: seconds at every program's start).
_VECTORS = {"first": tf.int32, "second": tf.int32, "label": tf.int32, "skipped": tf.int64, "skipped_reason": tf.int32}


def _empty_list(dtype, shape):
  return tf.raw_ops.EmptyTensorList(element_shape=tf.constant([-1] + shape, tf.int64), max_num_elements=-1,
                                    element_dtype=dtype)


def _push(handle, value):
  return tf.raw_ops.TensorListPushBack(input_handle=handle, tensor=value)


def _concat_list(dtype, shape, handle):
  values, _ = tf.raw_ops.TensorListConcatV2(
      input_handle=handle, element_dtype=dtype, element_shape=tf.constant([-1] + shape, tf.int64),
      leading_dims=tf.zeros([0], tf.int64))
  return values


class _Packer:
  """tf.data scan state machine that packs whole grids into batches of bounded patch and pair counts.

  It takes one image per step (grids_of_images's element) and goes through its grids in order; a grid that does not
  fit completes the pending batch, and starts the next. The batches completed in a step (none at most steps; several
  only when a batch holds fewer grids than an image has) come out stacked, [k, ...], padded to their static shapes,
  and unbatch() makes them elements: one function call per image, not a dataset and a call per grid, as the host's
  sequential stage costs every core's share of its time (docs/speed.md).

  What pending grids hold (patches, pairs, the skipped images' names) is kept in TensorLists (_PER_PATCH, _VECTORS:
  appending does not copy, and the state's shapes stay fixed) and concatenated once per batch.
  Image counters ride along so that each batch reports the images used, too small, and skipped as unreadable
  since the previous batch (unreadable images are dropped before this stage, so they show as gaps in the index);
  `skipped` and `skipped_reason` name the skipped ones by stream index (-1: none), first come first named.
  Each batch also carries `resume`, the (image, grid) position of the first grid after it: a pipeline started
  there continues with exactly the batches that would have followed (its first start[1] grids of image start[0] are
  skipped, as they went into the batch before).
  """

  def __init__(self, max_patches, max_pairs, start=(0, 0), geometry=geometry_lib.DOERSCH):
    self.max_patches = max_patches
    self.max_pairs = max_pairs
    self.start_image, self.start_grid = start
    self.per_patch = _per_patch(geometry.patch_size)
    self.num_grids = geometry.grids_per_image
    # One function of the graph that every grid of a step calls: _add is traced once, not once per grid.
    self._add_grid = tf.function(self._add, autograph=False)

  def initial_state(self):
    zero = tf.constant(0, tf.int64)
    return {**{k: _empty_list(dtype, shape) for k, (dtype, shape) in self.per_patch.items()},
            **{k: _empty_list(dtype, []) for k, dtype in _VECTORS.items()},
            "num_patches": tf.constant(0), "num_pairs": tf.constant(0),
            "last_image": tf.constant(self.start_image - 1, tf.int64),
            "images": zero, "too_small": zero, "unreadable": zero}

  @tf.autograph.experimental.do_not_convert
  def __call__(self, state, element):
    index, image = element
    cells = image["grid_height"] * image["grid_width"]
    cell_starts = tf.cumsum(cells, exclusive=True)
    pair_starts = tf.cumsum(image["grid_pairs"], exclusive=True)
    completed = []
    for g in range(self.num_grids):
      grid = {**{k: image[k][cell_starts[g]:cell_starts[g] + cells[g]] for k in _PER_PATCH},
              **{k: image[k][pair_starts[g]:pair_starts[g] + image["grid_pairs"][g]]
                 for k in ("first", "second", "label")},
              "grid_height": image["grid_height"][g], "grid_width": image["grid_width"][g],
              "position": tf.stack([index, tf.constant(g, tf.int64)]), "usable": image["usable"]}
      if g < self.start_grid:  # skipped in the image a resumed pipeline starts with
        state, batch = tf.cond(index == self.start_image, lambda s=state: (s, self._nothing()),
                               lambda s=state, grid=grid: self._add_grid(s, grid))
      else:
        state, batch = self._add_grid(state, grid)
      completed.append(batch)
    return state, self._rows(completed)

  def _add(self, state, grid):
    """The state after one grid, and the batch it completed (or _nothing)."""
    h, w = grid["grid_height"], grid["grid_width"]
    n = h * w
    image_index = grid["position"][0]
    new_image = image_index > state["last_image"]
    # The images skipped with this grid's image: the gap before it (unreadable), and itself when too small.
    gap = tf.range(tf.where(new_image, state["last_image"] + 1, image_index), image_index)
    too_small = tf.boolean_mask(image_index[None], (new_image & ~grid["usable"])[None])
    skipped = tf.concat([gap, too_small], 0)
    reasons = tf.concat([tf.fill(tf.shape(gap), SKIPPED_UNREADABLE), tf.fill(tf.shape(too_small), SKIPPED_TOO_SMALL)],
                        0)
    counters = {
        "last_image": tf.maximum(state["last_image"], image_index),
        "images": state["images"] + tf.cast(new_image & grid["usable"], tf.int64),
        "too_small": state["too_small"] + tf.cast(new_image & ~grid["usable"], tf.int64),
        "unreadable": state["unreadable"] + tf.where(new_image, image_index - state["last_image"] - 1, 0),
        "skipped": _push(state["skipped"], skipped),
        "skipped_reason": _push(state["skipped_reason"], reasons),
    }
    # A single cell has no neighbour, so it would only cost a tower pass.
    has_pairs = n > 1
    fits = ((state["num_patches"] + n <= self.max_patches) &
            (state["num_pairs"] + tf.shape(grid["first"])[0] <= self.max_pairs))

    def append(s):
      offset = s["num_patches"]
      return dict(s, **{k: _push(s[k], grid[k]) for k in _PER_PATCH},
                  num_patches=offset + n, num_pairs=s["num_pairs"] + tf.shape(grid["first"])[0],
                  first=_push(s["first"], grid["first"] + offset), second=_push(s["second"], grid["second"] + offset),
                  label=_push(s["label"], grid["label"]))

    def keep():
      return dict(state, **counters), self._nothing()

    def add():
      return append(dict(state, **counters)), self._nothing()

    def flush():
      # The batch comes out padded to its static shapes in one copy: the padding is pushed onto the lists before
      # they are concatenated.
      num_pairs = state["num_pairs"]
      named = {k: _concat_list(_VECTORS[k], [], state[k]) for k in ("skipped", "skipped_reason")}
      batch = {**{k: _concat_list(dtype, shape, _push(state[k], tf.zeros([self.max_patches - state["num_patches"]]
                                                                          + shape, dtype)))
                  for k, (dtype, shape) in self.per_patch.items()},
               "patch_mask": tf.range(self.max_patches) < state["num_patches"],
               **{k: _concat_list(_VECTORS[k], [], _push(state[k], tf.zeros([self.max_pairs - num_pairs], tf.int32)))
                  for k in ("first", "second", "label")},
               "pair_mask": tf.range(self.max_pairs) < num_pairs,  # padding pairs point at patch 0
               "images": state["images"], "too_small": state["too_small"], "unreadable": state["unreadable"],
               **{k: _first(named[k], SKIPPED_PER_BATCH) for k in named},
               "resume": grid["position"], "ready": tf.constant(True)}
      fresh = dict(self.initial_state(), last_image=counters["last_image"])
      fresh.update({k: counters[k] - state[k] for k in ("images", "too_small", "unreadable")})
      fresh.update({k: _push(fresh[k], tf.concat([named[k][SKIPPED_PER_BATCH:], new], 0))
                    for k, new in (("skipped", skipped), ("skipped_reason", reasons))})
      return append(fresh), batch

    return tf.cond(~has_pairs, keep, lambda: tf.cond(fits, add, flush))

  def _nothing(self):
    """flush's batch, holding nothing: the place of a batch in a step that completed none."""
    zero = tf.constant(0, tf.int64)
    no_pairs = tf.zeros([0], tf.int32)
    return {**{k: tf.zeros([0] + s, d) for k, (d, s) in self.per_patch.items()}, "patch_mask": tf.zeros([0], tf.bool),
            "first": no_pairs, "second": no_pairs, "label": no_pairs, "pair_mask": tf.zeros([0], tf.bool),
            "images": zero, "too_small": zero, "unreadable": zero, "resume": tf.zeros([2], tf.int64),
            "skipped": tf.zeros([0], tf.int64), "skipped_reason": tf.zeros([0], tf.int32), "ready": tf.constant(False)}

  def _rows(self, batches):
    """The ready ones of `batches` (one per grid of the step; the others are _nothing, holding no patches), stacked:
    [k, ...] with each batch's static shape, k from 0 to the grids of an image."""
    ready = tf.stack([b["ready"] for b in batches])
    shapes = {**{k: [self.max_patches] + s for k, (_, s) in self.per_patch.items()}, "patch_mask": [self.max_patches],
              **{k: [self.max_pairs] for k in ("first", "second", "label", "pair_mask")},
              **{k: [SKIPPED_PER_BATCH] for k in ("skipped", "skipped_reason")}}

    def stacked(chosen):  # a ready batch's value has the full shape; _nothing's has none of it
      return lambda: {k: tf.concat([tf.reshape(b[k], [-1] + shape) for b in chosen], 0) for k, shape in shapes.items()}

    # Most steps complete no batch and a few complete one, which comes out as it is; only a step completing
    # several (batches of few grids) pays for a copy.
    count = tf.reduce_sum(tf.cast(ready, tf.int32))
    which = tf.where(count == 1, 1 + tf.argmax(tf.cast(ready, tf.int32), output_type=tf.int32),
                     tf.where(count == 0, 0, len(batches) + 1))
    out = tf.switch_case(which, [stacked([batches[0]])] + [stacked([b]) for b in batches] + [stacked(batches)])
    for key in batches[0]:
      if key not in shapes and key != "ready":
        out[key] = tf.boolean_mask(tf.stack([b[key] for b in batches]), ready)
    return out


def _first(values, count):
  """The first `count` of a vector, padded with -1 to that length."""
  values = values[:count]
  return tf.pad(values, [[0, count - tf.shape(values)[0]]], constant_values=-1)


def batches_from_images(images, config, seed, start=(0, 0)):
  """Packed batches from a dataset of images (either form of grids_of_images) whose first element is image start[0]
  of the stream; the first start[1] grids of that image are skipped (they went into the batch before a resume)."""
  base_seed = tf.constant([config.seed, seed], tf.int64)
  packer = _Packer(config.batch_patches, config.batch_pairs, start, config.patch_geometry)
  batches = (grids_of_images(images, base_seed, start[0], config)
             .ignore_errors()  # unreadable files; counted by the packer as gaps in the index
             .scan(packer.initial_state(), packer)
             .unbatch())
  if config.augment_on == "host":
    graph_code = tf.autograph.experimental.do_not_convert  # see grids_of_images
    batches = batches.map(graph_code(lambda batch: augment_batch(batch, config)), num_parallel_calls=tf.data.AUTOTUNE,
                          deterministic=True)
  return batches


def make_dataset(config, source=None, pipeline_id=0, num_pipelines=1, start=(0, 0)):
  """The endless dataset of packed batches of one input pipeline, from stream position `start` (image, grid),
  as recorded in a batch's `resume`."""
  source = source or sources.find_source(config.data, config.data_root, config.tfds_data_dir)
  images = sources.training_images(source, config.seed, config.shuffle_buffer, pipeline_id, num_pipelines, start[0])
  dataset = batches_from_images(images, config, seed=pipeline_id, start=start)
  options = tf.data.Options()
  options.deterministic = True
  dataset = dataset.with_options(options)
  if config.data_service:
    # Dynamic sharding hands each service worker whole epochs of the image order (the first splittable source),
    # so no image is read twice; the consumers of one job share the batches.
    dataset = dataset.apply(tf.data.experimental.service.distribute(
        processing_mode=tf.data.experimental.service.ShardingPolicy.DYNAMIC, service=config.data_service,
        job_name=f"context_keras_{config.seed}_{pipeline_id}"))
  return dataset.prefetch(tf.data.AUTOTUNE)
