"""Image sources: what --data names (a folder, a list file, TFRecord shards, a TFDS split: tfds_source.py), listed
in a deterministic order, and read as datasets of encoded image bytes: endless and seeded for training, finite for
evaluation and rescaling.

The one reader of every form: training (data.py), prepare, export's rescaling and every evaluation read images
through find_source and these datasets, and TFRecord records through parse_record.
"""
import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
import sys
import zlib

from absl import logging
import tensorflow as tf

from context_keras import errors
from context_keras.input import decoding
from context_keras.input import geometry as geometry_lib
from context_keras.input import patches as patches_lib
from context_keras.input import tfds_source
from context_keras.storage import paths as paths_lib

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
TFRECORD_IMAGE_KEY = "image/encoded"
# Labelled shards (prepare --labels): the class index (0-based, into the shards' index.json "classes") and name.
TFRECORD_CLASS_INDEX_KEY = "image/class/index"
TFRECORD_CLASS_NAME_KEY = "image/class/name"
TFRECORD_SUFFIXES = (".tfrecord", ".tfrecords", ".tfrec")
PACKAGE_PREFIX = "package:"


def resolve_path(path):
  """Expands 'package:NAME' (the folder of an installed package, e.g. scikit-image's sample photos), '~' and the
  shipped flags/NAME (paths.resolve)."""
  if path.startswith(PACKAGE_PREFIX):
    name = path[len(PACKAGE_PREFIX):]
    try:
      spec = importlib.util.find_spec(name)
    except ModuleNotFoundError:
      spec = None
    if spec is None or not spec.submodule_search_locations:
      raise errors.DataError(f"{path}: no installed Python package {name!r} (is it installed in this environment?)")
    return list(spec.submodule_search_locations)[0]
  return paths_lib.resolve(path)


def list_folder(folder):
  """Image files under `folder`, recursively, sorted; follows symlinked folders once (no loops)."""
  return paths_lib.files_under(folder, IMAGE_EXTENSIONS)


def read_list_file(list_file, data_root=None):
  """File names of a list in the original's format (method.md §1.1): the first token of each non-empty line. A
  UTF-8 byte-order mark (which some editors write) is not part of the first name."""
  root = resolve_path(data_root) if data_root else paths_lib.parent(list_file)
  names = []
  for line in paths_lib.read_text(list_file, "utf-8-sig").splitlines():
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
  # TFRecord shards only, one per path: (compression "", "GZIP" or "ZLIB", the bytes its records take uncompressed,
  # whether that count is only known modulo 2^32 (GZIP's trailer)).
  shards: tuple = ()

  def fingerprint(self):
    """A number that changes when the listing changes (a file added, removed or renamed, a shard's size): what a
    checkpoint records so that a resume can tell whether its stream positions still mean the same images."""
    names = relative_names(self.paths)
    if self.kind == "tfrecord":
      names = [f"{name} {paths_lib.size(path) if tf.io.gfile.exists(path) else -1}"
               for name, path in zip(names, self.paths)]
    digest = hashlib.sha256("\n".join(names).encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def relative_names(paths):
  """The paths relative to their common folder: what identifies a listing, wherever its folder is."""
  if not paths:
    return []
  root = paths_lib.common_folder(paths)
  return [paths_lib.relative(p, root) for p in paths]


# --------------------------------------------------------------------------------------------------------------
# TFRecord shards: their compression, told from their first bytes, and what a complete read of them gives

_RECORD_OVERHEAD = 16  # a record's length (8 bytes), its checksum (4), then its data and the data's checksum (4)


def _crc32c_table():
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
    table.append(c)
  return table


_CRC32C = _crc32c_table()


def _masked_crc32c(data):
  """TFRecord's checksum: CRC-32C, rotated and offset ("masked")."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  crc ^= 0xFFFFFFFF
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _zlib_payload(path):
  """Bytes a ZLIB-compressed shard decompresses to, or None if it is corrupt or cut short. ZLIB stores no length,
  so this reads the shard once."""
  stream = zlib.decompressobj()
  total = 0
  try:
    with tf.io.gfile.GFile(path, "rb") as f:
      while chunk := f.read(1 << 20):
        total += len(stream.decompress(chunk))
  except zlib.error:
    return None
  return total if stream.eof else None


def shard_format(path):
  """(compression, payload bytes, payload known modulo 2^32) of a TFRecord shard, told from its content: a plain
  shard starts with a record length and its checksum, a GZIP one with 1f 8b, a ZLIB one with a zlib header. Raises
  ValueError saying what is wrong when it is none of them (tf.errors.OpError when it cannot be read)."""
  size = paths_lib.size(path)
  with tf.io.gfile.GFile(path, "rb") as f:
    head = f.read(12)
    if head[:2] == b"\x1f\x8b" and size >= 18:
      f.seek(size - 4)
      return "GZIP", int.from_bytes(f.read(4), "little"), True  # ISIZE: the payload's size modulo 2^32
  if not head:
    return "", 0, False
  if len(head) == 12 and _masked_crc32c(head[:8]) == int.from_bytes(head[8:], "little"):
    return "", size, False
  if len(head) >= 2 and head[0] & 0x0F == 8 and head[0] >> 4 <= 7 and (head[0] << 8 | head[1]) % 31 == 0:
    payload = _zlib_payload(path)
    if payload is None:
      raise ValueError("a ZLIB-compressed file that is corrupt or cut short")
    return "ZLIB", payload, False
  if head[:2] == b"\x1f\x8b":
    raise ValueError("a GZIP file cut short")
  raise ValueError(f"not a TFRecord file, plain or GZIP/ZLIB-compressed (it starts with {head[:8].hex(' ')})")


def _check_shards(paths, data):
  """The usable shards of `paths` with their formats; each unusable one is named once, in a warning."""
  usable, problems = [], []
  for path in paths:
    try:
      usable.append((path, shard_format(path)))
    except (tf.errors.OpError, ValueError) as e:
      problem = f"{path}: {paths_lib.reason(e) if isinstance(e, tf.errors.OpError) else e}"
      problems.append(problem)
      logging.warning("TFRecord shard %s is left out.", problem)
  if not usable:
    raise errors.DataError(f"--data={data}: none of the {len(paths)} TFRecord shards can be read (first problem: "
                           f"{problems[0]})")
  return usable


def find_source(data, data_root=None, tfds_data_dir=None):
  """What --data names, with its files listed; raises DataError naming the path if it holds no image. A TFDS split
  (tfds:NAME[:SPLIT]) is looked up in tfds_data_dir (None: TFDS's default)."""
  if not data:
    raise errors.DataError("--data is required: a folder of images, a list file, a glob of TFRecord shards or "
                           "tfds:NAME[:SPLIT]")
  if tfds_source.is_tfds(data):
    return tfds_source.find(data, tfds_data_dir)
  path = resolve_path(data)
  if tf.io.gfile.isdir(path):
    files = list_folder(path)
    if not files:
      raise errors.DataError(f"--data={data}: folder {path} holds no {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} "
                             "file")
    return Source("files", tuple(files), f"folder {path} ({len(files)} images)")
  if is_tfrecord_pattern(path):
    shards = paths_lib.glob(path)
    if not shards:
      raise errors.DataError(f"--data={data}: no TFRecord shard matches {path}")
    usable = _check_shards(shards, data)
    left_out = f", {len(shards) - len(usable)} left out" if len(usable) < len(shards) else ""
    compressed = "/".join(sorted({fmt[0] for _, fmt in usable} - {""}))
    return Source("tfrecord", tuple(p for p, _ in usable),
                  f"{len(usable)} TFRecord shards {path}{left_out}{f' ({compressed})' if compressed else ''}",
                  tuple(fmt for _, fmt in usable))
  if paths_lib.is_file(path):
    _refuse_non_list(data, path)
    try:
      files = read_list_file(path, data_root)
    except UnicodeDecodeError as e:
      raise errors.DataError(f"--data={data}: {path} is not a list file (byte {e.start} is not UTF-8 text): give a "
                             "folder of images, a list file or a glob of TFRecord shards") from e
    except tf.errors.OpError as e:
      raise errors.DataError(f"--data={data}: cannot read list file {path}: {paths_lib.reason(e)}") from e
    if not files:
      raise errors.DataError(f"--data={data}: list file {path} names no image")
    return Source("files", tuple(files), f"list {path} ({len(files)} images)")
  raise errors.DataError(f"--data={data}: {path} does not exist")


PREPARED_INDEX = "index.json"  # written by context_keras.prepare beside its shards


def count_images(source):
  """The images of a source, for counting epochs: its files, or for TFRecord shards the records that the
  index.json beside them (context_keras.prepare's) gives for each of them; None when that is unknown."""
  if source.kind == "files":
    return len(source.paths)
  if source.kind == tfds_source.KIND:
    return source.size
  folder = os.path.dirname(source.paths[0])
  try:
    index = json.loads(paths_lib.read_text(os.path.join(folder, PREPARED_INDEX)))
    records = {os.path.join(folder, shard["file"]): int(shard["records"]) for shard in index["shards"]}
  except (tf.errors.OpError, ValueError, KeyError, TypeError):
    return None
  if not all(path in records for path in source.paths):
    return None
  return sum(records[path] for path in source.paths)


def _refuse_non_list(data, path):
  """A single image (or a lone shard without a TFRecord suffix) given as --data is not a list file: say so."""
  try:
    with tf.io.gfile.GFile(path, "rb") as f:
      head = f.read(1 << 16)
  except tf.errors.OpError as e:
    raise errors.DataError(f"--data={data}: cannot read {path}: {paths_lib.reason(e)}") from e
  if path.lower().endswith(IMAGE_EXTENSIONS) or (decoding.image_size_from_header(head) and _binary(head)):
    raise errors.DataError(f"--data={data}: {path} is a single image, not a list file; give its folder "
                           f"(--data={paths_lib.parent(path)}) or a list file naming it")


def _binary(head):
  """Whether bytes read from the start of a file are not text (a list file is UTF-8 text without NUL bytes)."""
  if b"\0" in head:
    return True
  try:
    head.decode("utf-8")
  except UnicodeDecodeError as e:
    return e.start < len(head) - 3  # not merely a character cut at the end of what was read
  return False


def epoch_order(num, seed, epoch):
  """A fresh permutation of range(num) per epoch, a pure function of (seed, epoch)."""
  return tf.random.experimental.stateless_shuffle(tf.range(num), seed=tf.stack([seed, epoch]))


def training_images(source, seed, shuffle_buffer, pipeline_id=0, num_pipelines=1, start_image=0):
  """An endless dataset of the images to decode in a seeded order: this pipeline's share, from its image
  `start_image` on. Files come as {"path": path}: the decoding stage reads each (pipeline.grids_of_images), so that a
  file's bytes are in memory only while it is decoded, never in a read-ahead buffer (docs/guarantees.md,
  Memory). Records come as their encoded bytes.

  Files: each epoch visits them in a new permutation (the original cycled one permutation forever, method.md §1.1), and
  this pipeline takes every num_pipelines-th image of that stream. The order is a pure function of the seed, so
  resuming at an image index reproduces the stream exactly. TFRecord shards are read with interleave and a shuffle
  buffer, whose order cannot be resumed: a resumed run reads them in a fresh order. A TFDS split resumes exactly
  (tfds_source.TfdsSource.records: its files' record counts locate every position).
  """
  if source.kind == tfds_source.KIND:
    return source.training_images(seed, shuffle_buffer, pipeline_id, num_pipelines, start_image)
  num_paths = len(source.paths)
  # The functions given to tf.data here are graph code: AutoGraph would only convert their source at every start.
  graph_code = tf.autograph.experimental.do_not_convert

  def order_of(epoch):
    return epoch_order(num_paths, tf.constant(seed, tf.int64), epoch)

  if source.kind == "files":
    paths = tf.constant(source.paths)
    first = start_image * num_pipelines + pipeline_id  # index in the stream shared by all pipelines
    names = (tf.data.Dataset.range(first // num_paths, 2**62)
             .flat_map(graph_code(lambda epoch: tf.data.Dataset.from_tensor_slices(tf.gather(paths, order_of(epoch)))))
             .skip(first % num_paths)
             .shard(num_pipelines, 0))
    return names.map(graph_code(lambda path: {"path": path}))

  order_seed = seed + start_image
  table = shard_table(source)

  @graph_code
  def epoch_shards(epoch):
    order = order_of(epoch + tf.constant(order_seed, tf.int64) * 1_000_003)
    return tf.data.Dataset.from_tensor_slices({k: tf.gather(v, order) for k, v in table.items()}).map(
        graph_code(lambda shard: dict(shard, first_visit=tf.equal(epoch, 0))))

  shards = tf.data.Dataset.range(2**62).flat_map(epoch_shards)
  if num_paths >= num_pipelines:
    shards = shards.shard(num_pipelines, pipeline_id)
  records = shards.interleave(graph_code(lambda shard: shard_records(**shard)), cycle_length=min(8, num_paths),
                              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  if num_paths < num_pipelines:
    records = records.shard(num_pipelines, pipeline_id)
  records = records.shuffle(shuffle_buffer, seed=order_seed * 7919 + pipeline_id, reshuffle_each_iteration=True)
  return records.map(parse_record, num_parallel_calls=tf.data.AUTOTUNE)


def stream_image(source, seed, pipeline_id, num_pipelines, index):
  """What image `index` of the stream of training_images(source, seed, ..., pipeline_id, num_pipelines) is (the index
  the input pipeline counts from its start, as data.grids_of_images): a file's path, found from the seeded order of
  its epoch; for TFRecord shards, whose order a shuffle buffer makes (not kept), only the position. Host-side: for
  naming the few images the pipeline skips."""
  position = index * num_pipelines + pipeline_id  # in the stream shared by all pipelines
  if source.kind != "files":
    return f"image {position} of the TFRecord stream of {source.description}"
  epoch, offset = divmod(position, len(source.paths))
  return source.paths[_epoch_order(len(source.paths), seed, epoch)[offset]]


@functools.lru_cache(maxsize=2)
def _epoch_order(num, seed, epoch):
  """epoch_order as a numpy array, kept for the next image skipped in the same epoch (an epoch's order costs a
  shuffle of the whole listing)."""
  return epoch_order(num, tf.constant(seed, tf.int64), tf.constant(epoch, tf.int64)).numpy()


# The stand-in for the unread rest of a damaged shard: parse_record refuses it, so that it is skipped and counted
# where the damage lies in the stream (once per read of the shard), not raised by the reader ahead of the shuffle
# buffer (where one damaged shard of a small data set made hundreds of errors before the first batch).
DAMAGED_SHARD = b"\0context_keras: damaged TFRecord shard\0"


def shard_table(source):
  """The shards of a TFRecord source (or a labelled set of shards: anything with .paths and .shards) as columns of
  tensors, for shard_records."""
  compression, payload, modulo = zip(*source.shards) if source.shards else ((),) * 3
  return {"path": tf.constant(source.paths, tf.string), "compression": tf.constant(compression, tf.string),
          "payload": tf.constant(payload, tf.int64), "modulo": tf.constant(modulo, tf.bool)}


def shard_records(path, compression, payload, modulo, first_visit=True):
  """The records of one shard; if the read ends before the shard does (a corrupt record, a cut-short file: the
  reader then stops), one DAMAGED_SHARD stand-in after them. A complete read's records take exactly `payload`
  bytes (modulo 2^32 when `modulo`, as GZIP records the size). On a first visit the damage is named on stderr."""
  records = tf.data.TFRecordDataset(path, compression_type=compression).ignore_errors()
  ended = tf.data.Dataset.from_tensors((tf.constant(b""), tf.constant(True)))
  marked = records.map(lambda record: (record, tf.constant(False))).concatenate(ended)

  def tally(read, element):
    record, end = element
    read += tf.where(end, tf.constant(0, tf.int64), _RECORD_OVERHEAD + tf.cast(tf.strings.length(record), tf.int64))
    return read, (record, end, read)

  def complete(read):
    return tf.where(modulo, tf.equal(read % 2**32, payload), tf.equal(read, payload))

  def stand_in(record, end, read):
    def damaged():
      message = tf.strings.join(["W context_keras: TFRecord shard ", path, " is corrupt or cut short after ",
                                 tf.strings.as_string(read), " bytes of records; the rest of it is skipped and "
                                 "counted as unreadable."])

      def say():
        with tf.control_dependencies([tf.print(message, output_stream=sys.stderr)]):
          return tf.constant(True)

      printed = tf.cond(tf.convert_to_tensor(first_visit), say, lambda: tf.constant(False))
      with tf.control_dependencies([printed]):
        return tf.strings.join([DAMAGED_SHARD, path])
    return tf.cond(end, damaged, lambda: record)

  return (marked.scan(tf.constant(0, tf.int64), tally)
          .filter(lambda record, end, read: ~end | ~complete(read))
          .map(stand_in))


def is_damaged(record):
  """Whether a record of shard_records is the DAMAGED_SHARD stand-in (a bool tensor)."""
  return tf.equal(tf.strings.substr(record, 0, len(DAMAGED_SHARD)), DAMAGED_SHARD)


def parse_record(record, labelled=False):
  """The encoded image bytes of one tf.train.Example record of a shard (the TFRECORD_IMAGE_KEY feature); with
  `labelled`, (bytes, class index, class name) of a labelled shard (a record without them gives -1 and ''). An error
  for the DAMAGED_SHARD stand-in, naming its shard."""
  damaged = is_damaged(record)
  check = tf.debugging.Assert(~damaged, [tf.strings.join(["TFRecord shard ", tf.strings.substr(
      record, len(DAMAGED_SHARD), -1), " is corrupt or cut short here"])])
  spec = {TFRECORD_IMAGE_KEY: tf.io.FixedLenFeature([], tf.string)}
  if labelled:
    spec[TFRECORD_CLASS_INDEX_KEY] = tf.io.FixedLenFeature([], tf.int64, default_value=-1)
    spec[TFRECORD_CLASS_NAME_KEY] = tf.io.FixedLenFeature([], tf.string, default_value="")
  with tf.control_dependencies([check]):
    parsed = tf.io.parse_single_example(record, spec)
  if labelled:
    return parsed[TFRECORD_IMAGE_KEY], parsed[TFRECORD_CLASS_INDEX_KEY], parsed[TFRECORD_CLASS_NAME_KEY]
  return parsed[TFRECORD_IMAGE_KEY]


def all_records(source):
  """Every record of a TFRecord source (or labelled set of shards), shard after shard in listing order, each read
  with its compression."""
  return tf.data.Dataset.from_tensor_slices(shard_table(source)).flat_map(lambda shard: shard_records(**shard))


def finite_images(source, limit=None):
  """A finite dataset of (index, encoded bytes) over a source in its listing order (every file once; the records of
  TFRecord shards in order; a TFDS split's examples in order), at most `limit` of them."""
  if source.kind == tfds_source.KIND:
    return source.finite_images(limit)
  if source.kind == "files":
    paths = source.paths[:limit] if limit else source.paths
    contents = tf.data.Dataset.from_tensor_slices(list(paths)).map(tf.io.read_file)
  else:
    contents = all_records(source).map(parse_record)
    if limit:
      contents = contents.take(limit)
  return contents.enumerate()


def _first_records(source):
  """(name, contents) of the records of each shard in listing order; a damaged shard is left at its stand-in."""
  for path, (compression, payload, modulo) in zip(source.paths, source.shards):
    for i, record in enumerate(shard_records(path, compression, payload, modulo, False)):
      if record.numpy().startswith(DAMAGED_SHARD):
        yield f"{path} record {i}", functools.partial(_damaged, path, i)
        break
      yield f"{path} record {i}", lambda r=record: parse_record(r)


def _damaged(path, records):
  raise tf.errors.DataLossError(None, None, f"{path} is corrupt or cut short after {records} readable records")


def check_readable(source, limit=None, geometry=geometry_lib.DOERSCH):
  """Stops at start, naming the path, when no image of `source` can be decoded and used for a grid of `geometry`
  (geometry.Geometry.holds: any decodable image holds the revisiting geometry's, whose resize ignores the aspect).

  Images are tried in listing order until one works (the first, normally), at most `limit` of them.
  """
  tried = 0
  if source.kind == "files":
    candidates = ((p, lambda p=p: tf.io.read_file(p)) for p in source.paths)
  elif source.kind == tfds_source.KIND:
    candidates = source.first_images()
  else:
    candidates = _first_records(source)
  problems = []
  for name, contents in candidates:
    tried += 1
    try:
      # As small as training decodes it (a large JPEG at a fraction of its size): the aspect is what matters here.
      shape = decoding.decode(contents(), target_pixels=patches_lib.MIN_TARGET_PIXELS).shape
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError, tf.errors.PermissionDeniedError,
            tf.errors.UnknownError, tf.errors.DataLossError) as e:
      message = errors.tf_error_message(e)
      problems.append(message if message.startswith(name) else f"{name}: {message}")
    else:
      if geometry.holds(shape[0], shape[1]):
        return
      problems.append(f"{name}: {shape[1]}x{shape[0]} is too elongated for a grid of {geometry.patch_size}-px "
                      "patches")
    if limit and tried >= limit:
      break
  detail = f" (first problem: {problems[0]})" if problems else ""
  raise errors.DataError(f"--data={source.description}: none of the {tried} images tried can be used{detail}")

