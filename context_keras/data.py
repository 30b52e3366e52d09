"""The input pipeline: image sources, decoding, patch grids and packed batches of static shape, as one tf.data graph.

A batch is a set of patches plus (first, second, label) index arrays into it, so that the tower runs once per patch
and every ordered pair gathers its two fc6 rows (spec 2.5 and 3.3). Whole grids are packed into a batch until the
next grid would overflow its patch or pair capacity, as the original packed grids into batches of at most 511
patches; the rest of the static shape is padding, marked by `patch_mask` and `pair_mask`.
"""
import dataclasses
import glob
import importlib.util
import os
import re
import sys

from absl import flags
import tensorflow as tf

from context_keras import patches as patches_lib

flags.DEFINE_string(
    "data", None,
    "Training images: a folder (searched recursively for jpg, jpeg, png, bmp, gif and webp files in any letter "
    "case); a list file in the original's format (first token of each line, relative to --data_root or to the "
    "list's folder); or a glob of TFRecord shards of encoded images (feature 'image/encoded'). A path written "
    "'package:NAME' means the folder of the installed Python package NAME.")
flags.DEFINE_string("data_root", None, "Folder that the names in a --data list file are relative to "
                    "(default: the list file's folder). Accepts 'package:NAME' like --data.")
flags.DEFINE_enum("color_mode", "drop", patches_lib.COLOR_MODES,
                  "Chromatic-aberration remedy per patch (spec 2.4): drop = keep one random channel, the other two "
                  "uniform noise (the validated code); drop_gaussian = Gaussian noise at 1/100 of the kept "
                  "channel's std (the paper); project = the paper's green-magenta projection; none.")
flags.DEFINE_bool("pixelation", True, "Randomly pixelate 33% of the patches (spec 2.4 step 1).")
flags.DEFINE_integer("batch_patches", 511,
                     "Patch capacity of one replica's batch. Whole grids are packed until the next one would not "
                     "fit; the original used at most 511 patches (spec 2.5).")
flags.DEFINE_integer("batch_pairs", 2560,
                     "Pair capacity of one replica's batch. Grids give about 4.4-5.3 ordered pairs per patch, so "
                     "about 5x --batch_patches keeps both capacities nearly full.")
flags.DEFINE_integer("shuffle_buffer", 2048, "Records shuffled together when reading TFRecord shards.")
flags.DEFINE_string("data_service", None,
                    "grpc://HOST:PORT of a tf.data service dispatcher: decoding and patch building then run on its "
                    "workers (python -m context_keras.service), so CPU-only hosts can feed the accelerators.")

FLAGS = flags.FLAGS

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
TFRECORD_IMAGE_KEY = "image/encoded"
TFRECORD_SUFFIXES = (".tfrecord", ".tfrecords", ".tfrec")
PACKAGE_PREFIX = "package:"
# Larger than any camera's photo; a header that claims more is taken for a decompression bomb.
MAX_DECODE_PIXELS = 100_000_000


class DataError(ValueError):
  """--data names nothing that training can use; the message names the path."""


@dataclasses.dataclass(frozen=True)
class InputConfig:
  """What the pipeline needs to know, so that tests and tools can build one without flags."""
  data: str
  data_root: str | None = None
  color_mode: str = "drop"
  pixelation: bool = True
  batch_patches: int = 511
  batch_pairs: int = 2560
  shuffle_buffer: int = 2048
  seed: int = 0
  data_service: str | None = None

  def __post_init__(self):
    if self.batch_patches < patches_lib.max_grid_cells():
      raise ValueError(f"--batch_patches={self.batch_patches} cannot hold the largest grid "
                       f"({patches_lib.max_grid_cells()} patches)")
    if self.batch_pairs < patches_lib.max_grid_pairs():
      raise ValueError(f"--batch_pairs={self.batch_pairs} cannot hold the pairs of the largest grid "
                       f"({patches_lib.max_grid_pairs()})")


def parse_flags(argv):
  """Flag parsing for the programs (app.run(main, flags_parser=parse_flags)): absl's, except that an unknown flag
  (a typo in a flagfile, say) or a bad value exits with code 2, as the programs' other bad flags and paths do,
  rather than absl's 1, which they use for failures during the work."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    sys.stderr.write(f"FATAL Flags parsing error: {e}\nPass --helpshort or --helpfull to see help on flags.\n")
    sys.exit(2)


def config_from_flags(seed):
  return InputConfig(data=FLAGS.data, data_root=FLAGS.data_root, color_mode=FLAGS.color_mode,
                     pixelation=FLAGS.pixelation, batch_patches=FLAGS.batch_patches,
                     batch_pairs=FLAGS.batch_pairs, shuffle_buffer=FLAGS.shuffle_buffer, seed=seed,
                     data_service=FLAGS.data_service)


# --------------------------------------------------------------------------------------------------------------
# Sources


def resolve_path(path):
  """Expands '~' and 'package:NAME' (the folder of an installed package, e.g. scikit-image's sample photos)."""
  if path.startswith(PACKAGE_PREFIX):
    name = path[len(PACKAGE_PREFIX):]
    try:
      spec = importlib.util.find_spec(name)
    except ModuleNotFoundError:
      spec = None
    if spec is None or not spec.submodule_search_locations:
      raise DataError(f"{path}: no installed Python package {name!r} (is it installed in this environment?)")
    return list(spec.submodule_search_locations)[0]
  return os.path.expanduser(path)


def list_folder(folder):
  """Image files under `folder`, recursively, sorted; follows symlinked folders once (no loops)."""
  found, seen = [], set()
  for root, dirs, files in os.walk(folder, followlinks=True):
    real = os.path.realpath(root)
    if real in seen:
      dirs[:] = []
      continue
    seen.add(real)
    dirs.sort()
    found.extend(os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS))
  return sorted(found)


def read_list_file(list_file, data_root=None):
  """File names of a list in the original's format (spec 1.1): the first token of each non-empty line."""
  root = resolve_path(data_root) if data_root else os.path.dirname(os.path.abspath(list_file))
  names = []
  with open(list_file, encoding="utf-8") as f:
    for line in f:
      tokens = line.split()
      if tokens and not tokens[0].startswith("#"):
        names.append(os.path.join(root, tokens[0]))
  return names


def is_tfrecord_pattern(path):
  return any(c in path for c in "*?[") or path.endswith(TFRECORD_SUFFIXES)


@dataclasses.dataclass(frozen=True)
class Source:
  kind: str    # "files" or "tfrecord"
  paths: tuple  # image files, or TFRecord shards, in a deterministic order
  description: str


def find_source(data, data_root=None):
  """What --data names, with its files listed; raises DataError naming the path if it holds no image."""
  if not data:
    raise DataError("--data is required: a folder of images, a list file or a glob of TFRecord shards")
  path = resolve_path(data)
  if os.path.isdir(path):
    files = list_folder(path)
    if not files:
      raise DataError(f"--data={data}: folder {path} holds no {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} file")
    return Source("files", tuple(files), f"folder {path} ({len(files)} images)")
  if is_tfrecord_pattern(path):
    shards = sorted(glob.glob(path))
    if not shards:
      raise DataError(f"--data={data}: no TFRecord shard matches {path}")
    return Source("tfrecord", tuple(shards), f"{len(shards)} TFRecord shards {path}")
  if os.path.isfile(path):
    try:
      files = read_list_file(path, data_root)
    except (UnicodeDecodeError, OSError) as e:
      raise DataError(f"--data={data}: cannot read list file {path}: {e}") from e
    if not files:
      raise DataError(f"--data={data}: list file {path} names no image")
    return Source("files", tuple(files), f"list {path} ({len(files)} images)")
  raise DataError(f"--data={data}: {path} does not exist")


def _epoch_order(num, seed, epoch):
  """A fresh permutation of range(num) per epoch, a pure function of (seed, epoch)."""
  return tf.random.experimental.stateless_shuffle(tf.range(num), seed=tf.stack([seed, epoch]))


def encoded_images(source, seed, shuffle_buffer, pipeline_id=0, num_pipelines=1, start_image=0):
  """An endless dataset of encoded image bytes in a seeded order: this pipeline's share, from its image
  `start_image` on.

  Files: each epoch visits them in a new permutation (the original cycled one permutation forever, spec 1.1), and
  this pipeline takes every num_pipelines-th image of that stream. The order is a pure function of the seed, so
  resuming at an image index reproduces the stream exactly. TFRecord shards are read with interleave and a shuffle
  buffer, whose order cannot be resumed: a resumed run reads them in a fresh order.
  """
  paths = tf.constant(source.paths)
  num_paths = len(source.paths)

  def epoch_paths(epoch):
    return tf.data.Dataset.from_tensor_slices(tf.gather(paths, _epoch_order(num_paths, tf.constant(seed, tf.int64),
                                                                            epoch)))

  if source.kind == "files":
    first = start_image * num_pipelines + pipeline_id  # index in the stream shared by all pipelines
    names = (tf.data.Dataset.range(first // num_paths, 2**62).flat_map(epoch_paths)
             .skip(first % num_paths)
             .shard(num_pipelines, 0))
    return names.map(tf.io.read_file, num_parallel_calls=tf.data.AUTOTUNE)

  order_seed = seed + start_image
  shards = tf.data.Dataset.range(2**62).flat_map(
      lambda epoch: epoch_paths(epoch + tf.constant(order_seed, tf.int64) * 1_000_003))
  if len(source.paths) >= num_pipelines:
    shards = shards.shard(num_pipelines, pipeline_id)
  records = shards.interleave(tf.data.TFRecordDataset, cycle_length=min(8, len(source.paths)),
                              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  if len(source.paths) < num_pipelines:
    records = records.shard(num_pipelines, pipeline_id)
  records = records.shuffle(shuffle_buffer, seed=order_seed * 7919 + pipeline_id, reshuffle_each_iteration=True)
  feature = {TFRECORD_IMAGE_KEY: tf.io.FixedLenFeature([], tf.string)}
  return records.map(lambda r: tf.io.parse_single_example(r, feature)[TFRECORD_IMAGE_KEY],
                     num_parallel_calls=tf.data.AUTOTUNE)


_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # JPEG frame headers (not DHT, JPG, DAC)


def image_size_from_header(contents):
  """(format, width, height) that an encoded image's header claims, or None.

  Reads only the header bytes (JPEG SOF, PNG IHDR, GIF logical screen, BMP DIB header, WebP VP8/VP8L/VP8X),
  without decoding, so that a small file claiming a huge image (a decompression bomb) can be refused before the
  decoder allocates it. None when `contents` does not start like one of the formats tf.io.decode_image reads, or
  its header is cut short.
  """
  b = contents
  n = len(b)

  def int_at(start, size, order="little"):
    return int.from_bytes(b[start:start + size], order)

  if b.startswith(b"\x89PNG\r\n\x1a\n"):
    return ("PNG", int_at(16, 4, "big"), int_at(20, 4, "big")) if n >= 24 and b[12:16] == b"IHDR" else None
  if b[:6] in (b"GIF87a", b"GIF89a"):
    return ("GIF", int_at(6, 2), int_at(8, 2)) if n >= 10 else None
  if b.startswith(b"BM"):
    if n >= 22 and int_at(14, 4) == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
      return "BMP", int_at(18, 2), int_at(20, 2)
    if n >= 26:  # BITMAPINFOHEADER and later: signed 32-bit sizes, a negative height means top-down rows
      width = int.from_bytes(b[18:22], "little", signed=True)
      height = int.from_bytes(b[22:26], "little", signed=True)
      return ("BMP", width, abs(height)) if width >= 0 else None
    return None
  if b.startswith(b"RIFF") and b[8:12] == b"WEBP":
    chunk = b[12:16]
    if chunk == b"VP8 " and n >= 30 and b[23:26] == b"\x9d\x01\x2a":  # lossy: 14-bit sizes after the start code
      return "WebP", int_at(26, 2) & 0x3FFF, int_at(28, 2) & 0x3FFF
    if chunk == b"VP8L" and n >= 25 and b[20] == 0x2F:  # lossless: 14-bit sizes minus one, packed
      bits = int_at(21, 4)
      return "WebP", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and n >= 30:  # extended: 24-bit canvas sizes minus one
      return "WebP", int_at(24, 3) + 1, int_at(27, 3) + 1
    return None
  if b.startswith(b"\xff\xd8"):
    i = 2
    while i < n:
      while i < n and b[i] != 0xFF:  # stray bytes before a marker, skipped as libjpeg does
        i += 1
      while i < n and b[i] == 0xFF:  # fill bytes
        i += 1
      if i >= n:
        return None
      marker = b[i]
      i += 1
      if marker in (0x00, 0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # no segment follows
        continue
      if marker in (0xD9, 0xDA):  # end of image, or a scan, before any frame header
        return None
      if marker in _SOF_MARKERS:
        return ("JPEG", int_at(i + 5, 2, "big"), int_at(i + 3, 2, "big")) if i + 7 <= n else None
      if i + 2 > n:
        return None
      i += int_at(i, 2, "big")
    return None
  return None


# --------------------------------------------------------------------------------------------------------------
# One image -> augmented grids


def _claimed_pixels(contents):
  """Pixels that a PNG, GIF, BMP, WebP or JPEG header claims, read in graph ops before any decoding; 0 otherwise."""
  padded = tf.strings.join([contents, tf.constant(b"\0" * 32)])  # short files read zeros, not out of range

  def number(start, size, big_endian):
    digits = tf.cast(tf.io.decode_raw(tf.strings.substr(padded, start, size), tf.uint8), tf.int64)
    weights = 256 ** tf.range(size, dtype=tf.int64)
    return tf.reduce_sum(digits * (tf.reverse(weights, [0]) if big_endian else weights))

  head = tf.strings.substr(padded, 0, 4)
  png = number(16, 4, True) * number(20, 4, True)
  gif = number(6, 2, False) * number(8, 2, False)
  bmp_height = number(22, 4, False)
  bmp = number(18, 4, False) * tf.where(bmp_height >= 2**31, 2**32 - bmp_height, bmp_height)  # top-down rows
  # WebP (as image_size_from_header): 14-bit sizes (VP8), 14-bit sizes minus one (VP8L), 24-bit ones minus one (VP8X).
  chunk = tf.strings.substr(padded, 12, 4)
  lossless = number(21, 4, False)
  webp = tf.case([
      (tf.equal(chunk, b"VP8 "), lambda: tf.bitwise.bitwise_and(number(26, 2, False), 0x3FFF) *
       tf.bitwise.bitwise_and(number(28, 2, False), 0x3FFF)),
      (tf.equal(chunk, b"VP8L"), lambda: (tf.bitwise.bitwise_and(lossless, 0x3FFF) + 1) *
       (tf.bitwise.bitwise_and(tf.bitwise.right_shift(lossless, 14), 0x3FFF) + 1)),
      (tf.equal(chunk, b"VP8X"), lambda: (number(24, 3, False) + 1) * (number(27, 3, False) + 1))],
      default=lambda: tf.constant(0, tf.int64))
  is_webp = tf.equal(head, b"RIFF") & tf.equal(tf.strings.substr(padded, 8, 4), b"WEBP")
  is_jpeg = tf.equal(tf.strings.substr(head, 0, 2), b"\xff\xd8")
  jpeg = tf.cond(is_jpeg, lambda: tf.reduce_prod(tf.cast(tf.io.extract_jpeg_shape(contents)[:2], tf.int64)),
                 lambda: tf.constant(0, tf.int64))
  return tf.case([(tf.equal(head, b"\x89PNG"), lambda: png), (tf.equal(head, b"GIF8"), lambda: gif),
                  (tf.equal(tf.strings.substr(head, 0, 2), b"BM"), lambda: bmp), (is_webp, lambda: webp)],
                 default=lambda: jpeg)


def decode(contents):
  """RGB uint8 [H, W, 3] of any supported format; grey becomes 3 channels, alpha is dropped (spec 1.1).

  An image whose header claims more than MAX_DECODE_PIXELS is refused before decoding (an error, so the pipeline
  skips and counts it): a small file can claim a huge image, a decompression bomb.
  """
  check = tf.debugging.assert_less_equal(_claimed_pixels(contents), tf.constant(MAX_DECODE_PIXELS, tf.int64),
                                         message="image header claims more pixels than MAX_DECODE_PIXELS")
  with tf.control_dependencies([check]):
    return tf.io.decode_image(contents, channels=3, expand_animations=False)


def image_grids(image, seed, color_mode="drop", pixelation=True):
  """Resize one decoded image and cut its grids of augmented patches.

  Returns a dict: patches float32 [n, 96, 96, 3], grid_height and grid_width int32 [g], usable bool. An image too
  small for a grid after resizing (spec 1.2) is not usable and gives one empty 0x0 grid, so that the
  packer can count it.
  """
  resize_seed, grid_seed, augment_seed = tf.unstack(patches_lib.split_seed(seed, 3))
  resized = patches_lib.random_resize(tf.cast(image, tf.float32), resize_seed)
  height, width = tf.shape(resized)[0], tf.shape(resized)[1]
  usable = (height > patches_lib.MIN_SIDE) & (width > patches_lib.MIN_SIDE)

  def cut():
    ys, xs, grid_h, grid_w = patches_lib.sample_grids(grid_seed, height, width)
    cut_patches = patches_lib.crop_patches(resized, ys, xs)
    return patches_lib.augment(cut_patches, augment_seed, color_mode, pixelation), grid_h, grid_w

  def nothing():
    size = patches_lib.PATCH_SIZE
    return tf.zeros([0, size, size, 3]), tf.zeros([1], tf.int32), tf.zeros([1], tf.int32)

  grid_patches, grid_h, grid_w = tf.cond(usable, cut, nothing)
  return {"patches": grid_patches, "grid_height": grid_h, "grid_width": grid_w, "usable": usable}


# --------------------------------------------------------------------------------------------------------------
# Grids -> packed batches

_PATCH_SHAPE = [patches_lib.PATCH_SIZE, patches_lib.PATCH_SIZE, 3]


def _empty_patch_list():
  return tf.raw_ops.EmptyTensorList(element_shape=tf.constant([-1] + _PATCH_SHAPE, tf.int64), max_num_elements=-1,
                                    element_dtype=tf.float32)


def _concat_patch_list(handle):
  values, _ = tf.raw_ops.TensorListConcatV2(
      input_handle=handle, element_dtype=tf.float32, element_shape=tf.constant([-1] + _PATCH_SHAPE, tf.int64),
      leading_dims=tf.zeros([0], tf.int64))
  return values


def _grids_of_image(index, image):
  """One element per grid of an image, each with its (image, grid) position in the stream."""
  sizes = image["grid_height"] * image["grid_width"]
  starts = tf.cumsum(sizes, exclusive=True)

  def grid(g):
    return {"patches": image["patches"][starts[g]:starts[g] + sizes[g]],
            "grid_height": image["grid_height"][g], "grid_width": image["grid_width"][g],
            "position": tf.stack([index, g]), "usable": image["usable"]}

  return tf.data.Dataset.range(tf.shape(sizes, out_type=tf.int64)[0]).map(grid)


class _Packer:
  """tf.data scan state machine that packs whole grids into batches of bounded patch and pair counts.

  The patches of pending grids are held in a TensorList (appending does not copy them) and concatenated once per
  batch. Image counters ride along so that each batch reports the images used, too small, and skipped as unreadable
  since the previous batch (unreadable images are dropped before this stage, so they show as gaps in the index).
  Each batch also carries `resume`, the (image, grid) position of the first grid after it: a pipeline started
  there continues with exactly the batches that would have followed.
  """

  def __init__(self, max_patches, max_pairs, start_image=0):
    self.max_patches = max_patches
    self.max_pairs = max_pairs
    self.start_image = start_image

  def initial_state(self):
    zero = tf.constant(0, tf.int64)
    return {"patches": _empty_patch_list(), "num_patches": tf.constant(0), "first": tf.zeros([0], tf.int32),
            "second": tf.zeros([0], tf.int32), "label": tf.zeros([0], tf.int32), "last_image": tf.constant(self.start_image - 1, tf.int64),
            "images": zero, "too_small": zero, "unreadable": zero}

  def __call__(self, state, grid):
    h, w = grid["grid_height"], grid["grid_width"]
    n = h * w
    image_index = grid["position"][0]
    new_image = image_index > state["last_image"]
    counters = {
        "last_image": tf.maximum(state["last_image"], image_index),
        "images": state["images"] + tf.cast(new_image & grid["usable"], tf.int64),
        "too_small": state["too_small"] + tf.cast(new_image & ~grid["usable"], tf.int64),
        "unreadable": state["unreadable"] + tf.where(new_image, image_index - state["last_image"] - 1, 0),
    }
    # A single cell has no neighbour, so it would only cost a tower pass.
    has_pairs = n > 1
    first, second, label = patches_lib.grid_pairs(h, w)
    fits = ((state["num_patches"] + n <= self.max_patches) &
            (tf.shape(state["first"])[0] + tf.shape(first)[0] <= self.max_pairs))

    def append(s):
      offset = s["num_patches"]
      return dict(s, patches=tf.raw_ops.TensorListPushBack(input_handle=s["patches"], tensor=grid["patches"]),
                  num_patches=offset + n, first=tf.concat([s["first"], first + offset], 0),
                  second=tf.concat([s["second"], second + offset], 0), label=tf.concat([s["label"], label], 0))

    def keep():
      return dict(state, **counters), self._nothing()

    def add():
      return append(dict(state, **counters)), self._nothing()

    def flush():
      batch = {"ready": tf.constant(True), "patches": _concat_patch_list(state["patches"]),
               "first": state["first"], "second": state["second"], "label": state["label"],
               "images": state["images"], "too_small": state["too_small"], "unreadable": state["unreadable"],
               "resume": grid["position"]}
      fresh = dict(self.initial_state(), last_image=counters["last_image"])
      fresh.update({k: counters[k] - state[k] for k in ("images", "too_small", "unreadable")})
      return append(fresh), batch

    return tf.cond(~has_pairs, keep, lambda: tf.cond(fits, add, flush))

  def _nothing(self):
    zero = tf.constant(0, tf.int64)
    return {"ready": tf.constant(False), "patches": tf.zeros([0] + _PATCH_SHAPE), "first": tf.zeros([0], tf.int32),
            "second": tf.zeros([0], tf.int32), "label": tf.zeros([0], tf.int32), "images": zero, "too_small": zero,
            "unreadable": zero, "resume": tf.zeros([2], tf.int64)}


def pad_batch(batch, max_patches, max_pairs):
  """Static shapes for XLA and tf.distribute: padding patches are zero and padding pairs point at patch 0."""
  num_patches = tf.shape(batch["patches"])[0]
  num_pairs = tf.shape(batch["first"])[0]
  pad_pairs = [[0, max_pairs - num_pairs]]
  out = {
      "patches": tf.pad(batch["patches"], [[0, max_patches - num_patches], [0, 0], [0, 0], [0, 0]]),
      "patch_mask": tf.range(max_patches) < num_patches,
      "first": tf.pad(batch["first"], pad_pairs),
      "second": tf.pad(batch["second"], pad_pairs),
      "label": tf.pad(batch["label"], pad_pairs),
      "pair_mask": tf.range(max_pairs) < num_pairs,
      "images": batch["images"],
      "too_small": batch["too_small"],
      "unreadable": batch["unreadable"],
      "resume": batch["resume"],
  }
  size = patches_lib.PATCH_SIZE
  out["patches"] = tf.ensure_shape(out["patches"], [max_patches, size, size, 3])
  for key in ("first", "second", "label", "pair_mask"):
    out[key] = tf.ensure_shape(out[key], [max_pairs])
  out["patch_mask"] = tf.ensure_shape(out["patch_mask"], [max_patches])
  return out


def batches_from_images(images, config, seed, start=(0, 0)):
  """Packed batches from a dataset of encoded images whose first element is image start[0] of the stream;
  the first start[1] grids of that image are skipped (they went into the batch before a resume)."""
  base_seed = tf.constant([config.seed, seed], tf.int64)
  start_image, start_grid = start

  def process(index, contents):
    image_seed = tf.random.experimental.stateless_fold_in(base_seed, index)
    return index, image_grids(decode(contents), image_seed, config.color_mode, config.pixelation)

  grids = (images.enumerate(start=start_image)
           .map(process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
           .ignore_errors()  # unreadable files; counted by the packer as gaps in the index
           .flat_map(_grids_of_image))
  if start_grid:
    grids = grids.filter(lambda g: (g["position"][0] != start_image) | (g["position"][1] >= start_grid))
  packer = _Packer(config.batch_patches, config.batch_pairs, start_image)
  return (grids.scan(packer.initial_state(), packer)
          .filter(lambda batch: batch["ready"])
          .map(lambda batch: pad_batch(batch, config.batch_patches, config.batch_pairs)))


def make_dataset(config, source=None, pipeline_id=0, num_pipelines=1, start=(0, 0)):
  """The endless dataset of packed batches of one input pipeline, from stream position `start` (image, grid),
  as recorded in a batch's `resume`."""
  source = source or find_source(config.data, config.data_root)
  images = encoded_images(source, config.seed, config.shuffle_buffer, pipeline_id, num_pipelines, start[0])
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


def error_message(error):
  """The first line of a TensorFlow error, without its '{{function_node ...}}' prefix and '[Op:...]' suffix."""
  line = (getattr(error, "message", None) or str(error)).splitlines()[0]
  return re.sub(r"^\{\{function_node [^}]*\}\}\s*|\s*\[Op:\w+\].*$", "", line)[:300]


def check_readable(source, limit=None):
  """Stops at start, naming the path, when no image of `source` can be decoded and used for a grid.

  Images are tried in listing order until one works (the first, normally), at most `limit` of them.
  """
  tried = 0
  if source.kind == "files":
    candidates = ((p, lambda p=p: tf.io.read_file(p)) for p in source.paths)
  else:
    candidates = ((f"record {i}", lambda r=r: tf.io.parse_single_example(
        r, {TFRECORD_IMAGE_KEY: tf.io.FixedLenFeature([], tf.string)})[TFRECORD_IMAGE_KEY])
                  for i, r in enumerate(tf.data.TFRecordDataset(list(source.paths))))
  problems = []
  for name, contents in candidates:
    tried += 1
    try:
      shape = decode(contents()).shape
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError, tf.errors.PermissionDeniedError,
            tf.errors.UnknownError) as e:
      message = error_message(e)
      problems.append(message if message.startswith(name) else f"{name}: {message}")
    else:
      if patches_lib.can_hold_grid(shape[0], shape[1]):
        return
      problems.append(f"{name}: {shape[1]}x{shape[0]} is too elongated for a grid of {patches_lib.PATCH_SIZE}-px "
                      "patches")
    if limit and tried >= limit:
      break
  detail = f" (first problem: {problems[0]})" if problems else ""
  raise DataError(f"--data={source.description}: none of the {tried} images tried can be used{detail}")
