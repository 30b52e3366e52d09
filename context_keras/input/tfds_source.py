"""TensorFlow Datasets as a source (docs/data.md): `tfds:NAME[:VERSION][:SPLIT]` names a split of a dataset prepared in
a TFDS data dir. It is read from the split's record files as TFDS lists them (its file instructions: each file with
the run of records the split takes from it), with our own TFRecord reading, so that every example has a position in
a seeded order and training and the linear job resume at their exact position, as they do for files.

TFDS is an optional extra (pip install context_keras[tfds]), imported only when a tfds: source is opened. Nothing
here downloads or prepares a dataset: one that is not prepared stops at start with TFDS's instructions. A dataset
prepared by a builder whose code this process cannot import (a user's own, or one made elsewhere) is read from its
files' metadata (TFDS's read-only builder).
"""
import contextlib
import dataclasses
import hashlib
import logging as std_logging
import os
import re
import sys

from absl import logging
import numpy as np
import tensorflow as tf

from context_keras import errors

PREFIX = "tfds:"
KIND = "tfds"
INSTALL = "pip install context_keras[tfds]"
# The split read when a tfds: source names none: the first of these that the dataset has.
TRAIN_SPLITS = ("train",)
VALIDATION_SPLITS = ("validation", "test")
_VERSION = re.compile(r"(\d+\.\d+\.\d+)(?::(.*))?\Z", re.S)
# The stand-in for a record that a file of the split does not deliver (the file is missing, cut short or corrupt):
# parsing it fails with the file's name, so that it counts as one unreadable image in its place and every later
# position still means the same example.
MISSING = b"\0context_keras: TFDS record missing\0"
_READ_BUFFER = 8 << 20  # bytes read ahead per file (TFRecordDataset's buffer_size)


def is_tfds(data):
  return isinstance(data, str) and data.startswith(PREFIX)


def parse(data, flag="--data"):
  """(TFDS name, with ':VERSION' when given; the split or None) of `tfds:NAME[:VERSION][:SPLIT]`. A split may hold
  colons itself (TFDS's slices: train[:10%])."""
  name, _, tail = data[len(PREFIX):].partition(":")
  if not name.strip():
    raise errors.UsageError(f"{flag}={data}: name a dataset, tfds:NAME[:SPLIT] (e.g. tfds:imagenet2012:train)")
  version = _VERSION.match(tail)
  if version:
    name, tail = f"{name}:{version.group(1)}", version.group(2) or ""
  return name, tail or None


class _DtypeDeprecation(std_logging.Filter):
  """Drops TFDS's warning that FeatureConnector.dtype is deprecated: its own PartialDecoding reads that attribute
  when it extracts the items of a sequence (VOC's objects), so the warning says nothing a user can act on."""

  def filter(self, record):
    return "FeatureConnector.dtype` is deprecated" not in record.getMessage()


@contextlib.contextmanager
def _without_dtype_deprecation():
  logger, quiet = logging.get_absl_logger(), _DtypeDeprecation()
  logger.addFilter(quiet)
  try:
    yield
  finally:
    logger.removeFilter(quiet)


def _one_line(error, limit=400):
  text = " ".join(str(error).split())
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _tfds(where):
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel  # an optional extra
  except ImportError as e:
    raise errors.UsageError(f"{where}: reading a TFDS dataset needs TensorFlow Datasets ({e}): {INSTALL}") from e
  return tfds


# --------------------------------------------------------------------------------------------------------------
# Opening a prepared split


def _builder(tfds, name, data_dir, where):
  """TFDS's builder of `name` over `data_dir`: the registered code's, or, for a dataset whose code is not importable
  here, the read-only builder of its prepared files. Stops in one line when it is unknown or not prepared."""
  from tensorflow_datasets.core import constants  # pylint: disable=import-outside-toplevel
  root = data_dir or constants.DATA_DIR
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    guess = re.search(r"Did you mean: \S+ -> (\S+)", str(e))
    raise errors.DataError(f"{where}: no dataset {name} is registered with TFDS or prepared in {root}"
                           f"{f' (did you mean {guess.group(1)}?)' if guess else ''}") from e
  except (ValueError, TypeError, KeyError, AssertionError, OSError) as e:  # a bad config or version, a bad folder
    raise errors.DataError(f"{where}: {_one_line(e)}") from e
  if not builder.is_prepared():
    raise errors.DataError(_not_prepared(builder, root, where))
  file_format = getattr(builder.info.file_format, "value", builder.info.file_format)
  if file_format != "tfrecord":
    raise errors.DataError(f"{where}: {builder.info.full_name} is stored as {file_format}; this reader reads TFRecord "
                           f"files: prepare it with `tfds build {_base_name(builder)} --data_dir={root} "
                           "--file_format=tfrecord`")
  return builder


def _base_name(builder):
  """The dataset's name without its version (imagenet2012, voc/2007): what `tfds build` takes."""
  return builder.info.full_name.rsplit("/", 1)[0]


def _not_prepared(builder, root, where):
  """The one line for a dataset that is not prepared: where it was looked for, the versions prepared there, how
  TFDS prepares it (with what a manual download needs, in TFDS's own words)."""
  versions_dir = os.path.dirname(builder.data_dir.rstrip("/"))
  try:
    prepared = sorted(v for v in tf.io.gfile.listdir(versions_dir)
                      if tf.io.gfile.exists(os.path.join(versions_dir, v.rstrip("/"), "dataset_info.json")))
  except tf.errors.OpError:
    prepared = []
  prepared = [v.rstrip("/") for v in prepared]
  base = _base_name(builder)
  text = (f"{where}: {builder.info.full_name} is not prepared in {root} (no {builder.data_dir}/dataset_info.json); "
          "this program reads prepared datasets and never downloads")
  if prepared:
    text += f"; prepared there: version {', '.join(prepared)} (name it tfds:{base}:{prepared[-1]}[:SPLIT])"
  text += f". Prepare it with `tfds build {base} --data_dir={root}`"
  manual = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
  if manual:
    text += (f" after putting what TFDS asks for in its manual_dir ({os.path.join(root, 'downloads', 'manual')}, "
             f"or --manual_dir=DIR): {_one_line(manual, 600)}")
  return text


@dataclasses.dataclass(frozen=True)
class ClassFeature:
  """Where a TFDS split keeps an image's classes: a ClassLabel at `path` (one class per image), or, for a multi-label
  set, a sequence of them (VOC's objects/label), with `difficult` the boolean beside them that marks the objects
  to ignore (VOC's objects/is_difficult) and `boxes` the BBoxFeature beside them (VOC's objects/bbox)."""
  path: tuple
  names: tuple
  multi: bool = False
  difficult: tuple | None = None
  boxes: tuple | None = None

  @property
  def name(self):
    return "/".join(self.path)


def _class_feature(tfds, features, dataset, multi_label, where):
  """The ClassFeature of a split: for one class per image, its top-level ClassLabel ('label' if there are several);
  for a multi-label set, a sequence of ClassLabels: objects/label (VOC's, with objects/is_difficult), else labels,
  else the only one."""
  class_label, sequence, features_dict = tfds.features.ClassLabel, tfds.features.Sequence, tfds.features.FeaturesDict
  singles = [key for key, feature in features.items() if isinstance(feature, class_label)]
  multiple = []
  for key, feature in features.items():
    inner = feature.feature if isinstance(feature, sequence) else None
    if isinstance(inner, class_label):
      multiple.append(ClassFeature((key,), tuple(inner.names), True))
    elif isinstance(inner, features_dict):
      difficult = next((d for d in ("is_difficult", "difficult") if d in inner.keys()), None)
      boxes = next((name for name, item in inner.items() if isinstance(item, tfds.features.BBoxFeature)), None)
      for name, item in inner.items():
        if isinstance(item, class_label):
          multiple.append(ClassFeature((key, name), tuple(item.names), True, (key, difficult) if difficult else None,
                                       (key, boxes) if boxes else None))
  if not multi_label:
    if not singles:
      hint = (f"its classes are in sequences ({', '.join(c.name for c in multiple)}): pass --multi_label" if multiple
              else f"its features: {', '.join(features.keys())}")
      raise errors.DataError(f"{where}: {dataset} has no ClassLabel feature giving one class per image ({hint})")
    if len(singles) > 1 and "label" not in singles:
      raise errors.DataError(f"{where}: {dataset} has several ClassLabel features ({', '.join(singles)}) and none "
                             "named 'label'; which one is the class is not known")
    key = "label" if "label" in singles else singles[0]
    return ClassFeature((key,), tuple(features[key].names))
  by_name = {c.name: c for c in multiple}
  for preferred in ("objects/label", "labels"):
    if preferred in by_name:
      return by_name[preferred]
  if len(multiple) == 1:
    return multiple[0]
  raise errors.DataError(f"{where}: {dataset} has {'no' if not multiple else 'several'} sequences of ClassLabels "
                         f"({', '.join(by_name) or ', '.join(features.keys())}) to read as the classes of a "
                         "multi-label set (VOC's objects/label)")


def _image_feature(tfds, features, dataset, where):
  """The key of the split's image (an Image feature of uint8 pixels, kept encoded: 'image' if there are several)."""
  images = [key for key, feature in features.items() if isinstance(feature, tfds.features.Image)]
  if not images:
    raise errors.DataError(f"{where}: {dataset} has no Image feature (its features: {', '.join(features.keys())})")
  if len(images) > 1 and "image" not in images:
    raise errors.DataError(f"{where}: {dataset} has several Image features ({', '.join(images)}) and none named "
                           "'image'; which one to read is not known")
  key = "image" if "image" in images else images[0]
  if np.dtype(features[key].np_dtype) != np.uint8:
    raise errors.DataError(f"{where}: {dataset}'s {key} holds {np.dtype(features[key].np_dtype).name} pixels; the "
                           "pipeline reads encoded 8-bit images")
  return key


def find(data, data_dir=None, flag="--data", default_splits=TRAIN_SPLITS, multi_label=None, aliases=None, where=None):
  """The TfdsSource that `data` (tfds:NAME[:VERSION][:SPLIT]) names in `data_dir` (None: TFDS's default); with
  multi_label True or False, the split's classes too (a labelled set); with None, only its images. `aliases`: split
  names read as another split expression when the dataset has no split of that name (VOC's trainval: TFDS's
  train+validation). Messages start with `where` (default: FLAG=DATA)."""
  where = where or f"{flag}={data}"
  name, split = parse(data, flag)
  tfds = _tfds(where)
  builder = _builder(tfds, name, data_dir, where)
  dataset = builder.info.full_name
  if split is None:
    split = next((s for s in default_splits if s in builder.info.splits), default_splits[0])
  if split in (aliases or {}) and split not in builder.info.splits:
    split = aliases[split]
  try:
    instructions = builder.info.splits[split].file_instructions
  except (KeyError, ValueError, TypeError, AssertionError) as e:
    raise errors.DataError(f"{where}: split {split!r} of {dataset}: {_one_line(e)} (its splits: "
                           f"{', '.join(builder.info.splits)})") from e
  instructions = [i for i in instructions if i.take > 0]
  if not instructions:
    raise errors.DataError(f"{where}: split {split!r} of {dataset} holds no example")
  features = builder.info.features
  image_key = _image_feature(tfds, features, dataset, where)
  classes = None if multi_label is None else _class_feature(tfds, features, dataset, multi_label, where)
  size = sum(i.take for i in instructions)
  from tensorflow_datasets.core import read_only_builder  # pylint: disable=import-outside-toplevel
  metadata = (", its builder's code not importable here: read through its files' metadata"
              if isinstance(builder, read_only_builder.ReadOnlyBuilder) else "")
  return TfdsSource(
      paths=tuple(os.fspath(i.filename) for i in instructions), skips=tuple(int(i.skip) for i in instructions),
      takes=tuple(int(i.take) for i in instructions), dataset=dataset, split=split,
      description=(f"TFDS {dataset} split {split} ({size} images in {len(instructions)} files of "
                   f"{builder.data_dir}{metadata})"),
      features=features, image_key=image_key, classes=classes)


# --------------------------------------------------------------------------------------------------------------
# Reading: the records of the split's files, each file delivering exactly the records the split takes from it


def file_records(path, skip, take):
  """Records skip .. skip + take - 1 of one file, exactly `take` of them: a file that delivers fewer (missing, cut
  short, corrupt: the reader stops there) is filled up with MISSING stand-ins, and says so once on stderr."""
  records = tf.data.TFRecordDataset(path, buffer_size=_READ_BUFFER).ignore_errors().skip(skip)

  def stand_in(i):
    def say():
      message = tf.strings.join(["W context_keras: TFDS file ", path, " delivers fewer than the ",
                                 tf.strings.as_string(skip + take), " records its split takes (missing, cut short or "
                                 "corrupt); each missing record counts as one unreadable image."])
      with tf.control_dependencies([tf.print(message, output_stream=sys.stderr)]):
        return tf.constant(True)
    said = tf.cond(tf.equal(i, 0), say, lambda: tf.constant(False))
    with tf.control_dependencies([said]):
      return tf.strings.join([MISSING, path])
  return records.concatenate(tf.data.Dataset.range(take).map(stand_in)).take(take)


def _intact(record):
  """The record, or an error naming the file if it is a MISSING stand-in."""
  missing = tf.equal(tf.strings.substr(record, 0, len(MISSING)), MISSING)
  check = tf.debugging.Assert(~missing, [tf.strings.join(["TFDS file ", tf.strings.substr(record, len(MISSING), -1),
                                                          " does not deliver this record"])])
  with tf.control_dependencies([check]):
    return tf.identity(record)


@dataclasses.dataclass(frozen=True, eq=False)
class TfdsSource:
  """A split of a prepared TFDS dataset, as sources.Source describes a source (kind, paths, description,
  fingerprint; `shards` is empty): `paths` are its record files, each holding the split's records skips[i] ..
  skips[i] + takes[i] - 1. `classes` (a ClassFeature) where a labelled set keeps its classes."""
  paths: tuple
  skips: tuple
  takes: tuple
  dataset: str          # TFDS's full name, NAME[/CONFIG]/VERSION
  split: str
  description: str
  features: object      # the builder's tfds.features.FeaturesDict
  image_key: str
  classes: ClassFeature | None = None
  kind: str = KIND
  shards: tuple = ()

  @property
  def size(self):
    return sum(self.takes)

  def slice(self, start, stop):
    """The split's examples start .. stop - 1 (in listing order) as a TfdsSource of their own: the files that hold
    them, the first and last cut to the run of records they hold of it."""
    ends = np.cumsum(self.takes)
    paths, skips, takes = [], [], []
    for path, skip, take, end in zip(self.paths, self.skips, self.takes, ends):
      first, last = max(start, end - take), min(stop, end)
      if first < last:
        paths.append(path)
        skips.append(int(skip + first - (end - take)))
        takes.append(int(last - first))
    return dataclasses.replace(self, paths=tuple(paths), skips=tuple(skips), takes=tuple(takes),
                               description=f"examples {start}-{stop - 1} of {self.description}")

  def fingerprint(self):
    """A number that changes when the split's listing changes (another version, split, file or run of records):
    what a checkpoint records so that a resume can tell whether its positions still mean the same examples."""
    names = [self.dataset, self.split] + [f"{os.path.basename(p)} {s} {t}"
                                          for p, s, t in zip(self.paths, self.skips, self.takes)]
    digest = hashlib.sha256("\n".join(names).encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big", signed=True)

  # ------------------------------------------------------------------------------------------------------------
  # Parsing a record (graph code: TFDS's feature parsing, the image kept encoded)

  def _parser(self, paths):
    """record -> TFDS's decoding of the image (its encoded bytes) and of the features at `paths` (tuples of keys),
    all others left unparsed."""
    wanted = {self.image_key: True}
    for path in paths:
      node = wanted
      for key in path[:-1]:
        node = node.setdefault(key, {})
      node[path[-1]] = True
    tfds = _tfds(self.description)
    partial = tfds.decode.PartialDecoding(wanted, decoders={self.image_key: tfds.decode.SkipDecoding()})
    with _without_dtype_deprecation():
      features = partial.extract_features(self.features)
    return lambda record: features.deserialize_example(_intact(record), decoders=partial.decoders)

  def image_parser(self):
    """record -> its encoded image bytes (an error naming the file for a MISSING stand-in)."""
    parse = self._parser(())
    return tf.autograph.experimental.do_not_convert(lambda record: parse(record)[self.image_key])

  def feature_parser(self, paths):
    """record -> (its encoded image bytes, [the value of the feature at each of `paths`, tuples of keys])."""
    parse = self._parser(paths)

    def values(record):
      example = parse(record)
      found = []
      for path in paths:
        value = example
        for key in path:
          value = value[key]
        found.append(value)
      return example[self.image_key], found
    return tf.autograph.experimental.do_not_convert(values)

  def class_parser(self):
    """record -> (encoded image bytes, its class index into classes.names [] or, multi-label, the indices of its
    objects' classes [n], with whether each is difficult [n] bool)."""
    with_difficult = self.classes.multi and self.classes.difficult
    parse = self.feature_parser((self.classes.path,) + ((self.classes.difficult,) if with_difficult else ()))

    def parse_classes(record):
      image, (value, *difficult) = parse(record)
      if not self.classes.multi:
        return image, value
      difficult = tf.cast(difficult[0], tf.bool) if difficult else tf.zeros_like(value, tf.bool)
      return image, value, difficult
    return tf.autograph.experimental.do_not_convert(parse_classes)

  # ------------------------------------------------------------------------------------------------------------
  # Datasets of records

  def _table(self):
    return {"path": tf.constant(self.paths, tf.string), "skip": tf.constant(self.skips, tf.int64),
            "take": tf.constant(self.takes, tf.int64)}

  def ordered_records(self, limit=None):
    """Every record of the split in its listing order (file after file), at most `limit`."""
    records = tf.data.Dataset.from_tensor_slices(self._table()).flat_map(
        lambda f: file_records(f["path"], f["skip"], f["take"]))
    return records.take(limit) if limit else records

  def _runs(self, keep):
    """(the files a stream reads, as numpy columns path, skip, take and first (the listing position of its first
    record); the records each counts in the stream): every file with all its records, or, with `keep` (a boolean per
    listing position), the files holding kept records, each counting those."""
    takes = np.asarray(self.takes, np.int64)
    table = {"path": np.asarray(self.paths, object), "skip": np.asarray(self.skips, np.int64), "take": takes,
             "first": np.cumsum(takes) - takes}
    if keep is None:
      return table, takes
    keep = np.asarray(keep, bool)
    if keep.shape != (self.size,):
      raise ValueError(f"keep has {keep.shape} entries for the {self.size} records of {self.description}")
    counts = np.add.reduceat(keep.astype(np.int64), table["first"])  # takes are positive: no empty segment
    used = counts > 0
    return {k: v[used] for k, v in table.items()}, counts[used]

  def records(self, seed, window, start=0, pipeline_id=0, num_pipelines=1, keep=None, with_positions=False):
    """This pipeline's endless stream of records in a seeded order, from its position `start` on; with `keep` (a
    boolean per listing position) only the records kept, and with_positions each as (its listing position, record).

    The order is a pure function of (seed, pipeline): each epoch visits the files in a new permutation of them
    (sources.epoch_order's, here of files), each file's run of records in order, and this pipeline reads every
    num_pipelines-th file of it (every num_pipelines-th record when there are fewer files than pipelines). The
    records are then shuffled in consecutive windows of `window`, each by a permutation keyed by (seed, pipeline,
    window index). So position k is window k // window, entry k % window: a resumed stream starts reading at that
    window's first record (located from the split's record counts, or the kept ones', skipping at most the records
    of one file before it) and drops the k % window records before k. TFDS shuffled the examples when it wrote the
    files, so a window mixes images from across the data set. Records that `keep` leaves out are read and dropped
    before the windows (a file without a kept record is not read), so positions count kept records only.
    """
    table, counts = self._runs(keep)
    num_files = len(counts)
    by_file = num_files >= num_pipelines
    seed = int(seed)
    first = (start // window) * window  # the first position of start's window
    epoch, index, offset, file = self._locate(first, seed, pipeline_id, num_pipelines, by_file, counts)
    if keep is not None:  # the offset-th kept record of its file, as a record of that file
      run = np.asarray(keep, bool)[table["first"][file]:table["first"][file] + table["take"][file]]
      offset = int(np.flatnonzero(run)[offset])
    columns = {"path": tf.constant(table["path"].tolist(), tf.string),
               **{k: tf.constant(table[k], tf.int64) for k in ("skip", "take", "first")}}
    kept = None if keep is None else tf.constant(np.asarray(keep, bool))
    seed_tensor = tf.constant(seed, tf.int64)

    def epoch_files(e):
      order = tf.random.experimental.stateless_shuffle(tf.range(num_files), seed=tf.stack([seed_tensor, e]))
      if by_file:
        order = order[pipeline_id::num_pipelines]
      return tf.data.Dataset.from_tensor_slices({k: tf.gather(v, order) for k, v in columns.items()})

    def from_offset(n, f):  # the first file is read from `offset` on
      head = tf.where(tf.equal(n, 0), tf.constant(offset, tf.int64), tf.constant(0, tf.int64))
      pairs = tf.data.Dataset.zip((tf.data.Dataset.range(f["first"] + head, f["first"] + f["take"]),
                                   file_records(f["path"], f["skip"] + head, f["take"] - head)))
      return pairs if kept is None else pairs.filter(lambda position, _: tf.gather(kept, position))

    records = (tf.data.Dataset.range(epoch, 2**62).flat_map(epoch_files).skip(index).enumerate()
               .flat_map(from_offset))
    if not by_file:
      records = records.shard(num_pipelines, 0)
    key = tf.constant([seed, pipeline_id], tf.int64)

    def shuffled(w, batch):
      order = tf.random.experimental.stateless_shuffle(tf.range(window), seed=tf.random.experimental.stateless_fold_in(
          key, w))
      return tf.nest.map_structure(lambda column: tf.gather(column, order), batch)
    records = (records.batch(window, drop_remainder=True).enumerate(start=first // window).map(shuffled).unbatch()
               .skip(start - first))
    return records if with_positions else records.map(lambda _, record: record)

  def _locate(self, position, seed, pipeline_id, num_pipelines, by_file, counts):
    """(epoch, index among the epoch's files of this pipeline, records of the stream to skip in that file, the file)
    of `position` of this pipeline's stream before its windows are shuffled, `counts` being each file's records in
    the stream; the same permutations as records() draws, computed here."""
    def files_of(epoch):
      order = tf.random.experimental.stateless_shuffle(tf.range(len(counts)), seed=tf.constant([seed, epoch],
                                                                                                  tf.int64)).numpy()
      return order[pipeline_id::num_pipelines] if by_file else order

    if by_file:
      epoch = 0
      while True:
        order = files_of(epoch)
        length = int(counts[order].sum())
        if position < length:
          break
        position -= length
        epoch += 1
    else:  # every num_pipelines-th record of the stream that all pipelines share
      shared = position * num_pipelines + pipeline_id
      epoch, position = divmod(shared, int(counts.sum()))
      order = files_of(epoch)
    ends = np.cumsum(counts[order])
    index = int(np.searchsorted(ends, position, side="right"))
    return epoch, index, int(position - (ends[index - 1] if index else 0)), int(order[index])

  # ------------------------------------------------------------------------------------------------------------
  # As sources.py reads a source

  def training_images(self, seed, window, pipeline_id=0, num_pipelines=1, start_image=0):
    """sources.training_images of this split: the encoded images of records()."""
    return self.records(seed, window, start_image, pipeline_id, num_pipelines).map(
        self.image_parser(), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  def finite_images(self, limit=None):
    """(index, encoded bytes) of the split's images in listing order, at most `limit`."""
    return self.ordered_records(limit).map(self.image_parser(), num_parallel_calls=tf.data.AUTOTUNE,
                                           deterministic=True).enumerate()

  def first_images(self):
    """(name, a function giving its encoded bytes) of the split's images in listing order, for check_readable."""
    parse = self.image_parser()
    for i, record in enumerate(self.ordered_records()):
      yield f"{self.dataset} {self.split} example {i}", lambda record=record: parse(record)
