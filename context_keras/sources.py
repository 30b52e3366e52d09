"""Image sources: what --data names (a folder, a list file, TFRecord shards), listed in a deterministic order, and
read as datasets of encoded image bytes: endless and seeded for training, finite for evaluation and rescaling.

The one reader of every form: training (data.py), prepare, export's rescaling and every evaluation read images
through find_source and these datasets, and TFRecord records through parse_record.
"""
import dataclasses
import glob
import importlib.util
import os

import tensorflow as tf

from context_keras import decoding
from context_keras import errors
from context_keras import patches as patches_lib

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
TFRECORD_IMAGE_KEY = "image/encoded"
# Labelled shards (prepare --labels): the class index (0-based, into the shards' index.json "classes") and name.
TFRECORD_CLASS_INDEX_KEY = "image/class/index"
TFRECORD_CLASS_NAME_KEY = "image/class/name"
TFRECORD_SUFFIXES = (".tfrecord", ".tfrecords", ".tfrec")
PACKAGE_PREFIX = "package:"


def resolve_path(path):
  """Expands '~' and 'package:NAME' (the folder of an installed package, e.g. scikit-image's sample photos)."""
  if path.startswith(PACKAGE_PREFIX):
    name = path[len(PACKAGE_PREFIX):]
    try:
      spec = importlib.util.find_spec(name)
    except ModuleNotFoundError:
      spec = None
    if spec is None or not spec.submodule_search_locations:
      raise errors.DataError(f"{path}: no installed Python package {name!r} (is it installed in this environment?)")
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
  """File names of a list in the original's format (method.md §1.1): the first token of each non-empty line."""
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
    raise errors.DataError("--data is required: a folder of images, a list file or a glob of TFRecord shards")
  path = resolve_path(data)
  if os.path.isdir(path):
    files = list_folder(path)
    if not files:
      raise errors.DataError(f"--data={data}: folder {path} holds no {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} "
                             "file")
    return Source("files", tuple(files), f"folder {path} ({len(files)} images)")
  if is_tfrecord_pattern(path):
    shards = sorted(glob.glob(path))
    if not shards:
      raise errors.DataError(f"--data={data}: no TFRecord shard matches {path}")
    return Source("tfrecord", tuple(shards), f"{len(shards)} TFRecord shards {path}")
  if os.path.isfile(path):
    try:
      files = read_list_file(path, data_root)
    except (UnicodeDecodeError, OSError) as e:
      raise errors.DataError(f"--data={data}: cannot read list file {path}: {e}") from e
    if not files:
      raise errors.DataError(f"--data={data}: list file {path} names no image")
    return Source("files", tuple(files), f"list {path} ({len(files)} images)")
  raise errors.DataError(f"--data={data}: {path} does not exist")


def epoch_order(num, seed, epoch):
  """A fresh permutation of range(num) per epoch, a pure function of (seed, epoch)."""
  return tf.random.experimental.stateless_shuffle(tf.range(num), seed=tf.stack([seed, epoch]))


def training_images(source, seed, shuffle_buffer, pipeline_id=0, num_pipelines=1, start_image=0):
  """An endless dataset of encoded image bytes in a seeded order: this pipeline's share, from its image
  `start_image` on.

  Files: each epoch visits them in a new permutation (the original cycled one permutation forever, method.md §1.1), and
  this pipeline takes every num_pipelines-th image of that stream. The order is a pure function of the seed, so
  resuming at an image index reproduces the stream exactly. TFRecord shards are read with interleave and a shuffle
  buffer, whose order cannot be resumed: a resumed run reads them in a fresh order.
  """
  paths = tf.constant(source.paths)
  num_paths = len(source.paths)

  def epoch_paths(epoch):
    return tf.data.Dataset.from_tensor_slices(tf.gather(paths, epoch_order(num_paths, tf.constant(seed, tf.int64),
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
  return records.map(parse_record, num_parallel_calls=tf.data.AUTOTUNE)


def parse_record(record, labelled=False):
  """The encoded image bytes of one tf.train.Example record of a shard (the TFRECORD_IMAGE_KEY feature); with
  `labelled`, (bytes, class index, class name) of a labelled shard (a record without them gives -1 and '')."""
  spec = {TFRECORD_IMAGE_KEY: tf.io.FixedLenFeature([], tf.string)}
  if labelled:
    spec[TFRECORD_CLASS_INDEX_KEY] = tf.io.FixedLenFeature([], tf.int64, default_value=-1)
    spec[TFRECORD_CLASS_NAME_KEY] = tf.io.FixedLenFeature([], tf.string, default_value="")
  parsed = tf.io.parse_single_example(record, spec)
  if labelled:
    return parsed[TFRECORD_IMAGE_KEY], parsed[TFRECORD_CLASS_INDEX_KEY], parsed[TFRECORD_CLASS_NAME_KEY]
  return parsed[TFRECORD_IMAGE_KEY]


def finite_images(source, limit=None):
  """A finite dataset of (index, encoded bytes) over a source in its listing order (every file once; the records of
  TFRecord shards in order), at most `limit` of them."""
  if source.kind == "files":
    paths = source.paths[:limit] if limit else source.paths
    contents = tf.data.Dataset.from_tensor_slices(list(paths)).map(tf.io.read_file)
  else:
    contents = tf.data.TFRecordDataset(list(source.paths)).map(parse_record)
    if limit:
      contents = contents.take(limit)
  return contents.enumerate()


def check_readable(source, limit=None):
  """Stops at start, naming the path, when no image of `source` can be decoded and used for a grid.

  Images are tried in listing order until one works (the first, normally), at most `limit` of them.
  """
  tried = 0
  if source.kind == "files":
    candidates = ((p, lambda p=p: tf.io.read_file(p)) for p in source.paths)
  else:
    candidates = ((f"record {i}", lambda r=r: parse_record(r))
                  for i, r in enumerate(tf.data.TFRecordDataset(list(source.paths))))
  problems = []
  for name, contents in candidates:
    tried += 1
    try:
      # As small as training decodes it (a large JPEG at a fraction of its size): the aspect is what matters here.
      shape = decoding.decode(contents(), target_pixels=patches_lib.MIN_TARGET_PIXELS).shape
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError, tf.errors.PermissionDeniedError,
            tf.errors.UnknownError) as e:
      message = errors.tf_error_message(e)
      problems.append(message if message.startswith(name) else f"{name}: {message}")
    else:
      if patches_lib.can_hold_grid(shape[0], shape[1]):
        return
      problems.append(f"{name}: {shape[1]}x{shape[0]} is too elongated for a grid of {patches_lib.PATCH_SIZE}-px "
                      "patches")
    if limit and tried >= limit:
      break
  detail = f" (first problem: {problems[0]})" if problems else ""
  raise errors.DataError(f"--data={source.description}: none of the {tried} images tried can be used{detail}")

