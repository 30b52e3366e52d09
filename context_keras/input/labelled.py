"""Labelled images, as the labelled evaluations read them (method.md §10.1): listed and checked before any work,
then read as datasets of (index, encoded bytes, label).

Four forms, each checked at once with a message naming the flag, the file and the problem (docs/data.md):
  a folder of class sub-folders   ImageNet's training layout: the sub-folder's name is the class (train/n01440764/*)
  images + a labels file          lines `NAME LABEL` (or `NAME LABEL1,LABEL2,...` for multi-label sets), NAME relative
                                  to the image folder (or to the labels file's folder), with or without its extension
                                  (ImageNet's validation folder with a file mapping each image to its synset)
  labelled TFRecord shards        written by `prepare --labels`: each record holds its class index and name, and the
                                  shards' index.json the list of classes; or, without an index.json, shards in the
                                  common converters' schema (image/class/label, 1-based as TF models' ImageNet
                                  converter writes it, with image/class/synset or /text), their classes found by one
                                  pass over the records' labels
  a TFDS split                    tfds:NAME[:SPLIT] prepared in --tfds_data_dir: the class is the dataset's ClassLabel
                                  feature; multi-label, a sequence of them (VOC's objects/label, difficult ignored)

A label is a class name, or, when the classes are already known (a validation set read against its training set's
classes), a name or a 0-based index into them. In multi-label files a label written `?NAME` marks an image on which
class NAME is ignored (VOC's "difficult"), so that it counts neither as a positive nor as a negative.
"""
import dataclasses
import json
import os
import time

from absl import logging
import numpy as np
import tensorflow as tf

from context_keras import errors
from context_keras.input import sources
from context_keras.input import tfds_source
from context_keras.storage import paths as paths_lib

IGNORED_PREFIX = "?"
POSITIVE, NEGATIVE, IGNORED = 1, 0, -1   # the entries of a multi-label matrix
INDEX_FILE = "index.json"                 # beside the shards: prepare's index, with "classes" for labelled shards
# The common converters' schema (TF models' inception/data/build_imagenet_data.py, and the TPU's imagenet_to_gcs.py
# that follows it): a class number, 1-based for ImageNet's 1000 classes (0 is left to a background class), and
# beside it the class's synset and text.
CONVERTER_LABEL_KEY = "image/class/label"
CONVERTER_SYNSET_KEY = "image/class/synset"
CONVERTER_TEXT_KEY = "image/class/text"
SCAN_BATCH = 4096  # records per step of the scan of shards without an index.json


@dataclasses.dataclass(frozen=True)
class LabelledSet:
  """A listed labelled set. For files, `labels` is [N] class indices, or [N, C] of POSITIVE/NEGATIVE/IGNORED for a
  multi-label set; for shards the labels are in the records, and `labels` is None."""
  kind: str             # "files" or "tfrecord"
  paths: tuple          # image files (one per example) or shards
  labels: object        # np.ndarray or None
  classes: tuple        # class names: label k is classes[k]
  size: int             # examples
  description: str
  multi_label: bool = False
  shards: tuple = ()    # shards: their compression and sizes (sources.Source.shards), for sources.shard_records
  # Shards without an index.json, and TFDS splits: the set's own class numbers (a record's number minus
  # `number_offset`) mapped to indices into `classes`; `label_key`, the feature of shards holding the number.
  class_map: tuple = ()
  label_key: str = ""
  number_offset: int = 0
  source: object = None  # a TFDS split: its tfds_source.TfdsSource

  def images(self):
    """The set's images as a source of sources.py (for what reads images without their labels)."""
    if self.kind == tfds_source.KIND:
      return self.source
    return sources.Source(self.kind, self.paths, self.description, self.shards)

  def subset(self, indices, what):
    """The files at `indices` (a split of a set of files)."""
    indices = np.asarray(indices)
    return dataclasses.replace(self, paths=tuple(self.paths[i] for i in indices), labels=self.labels[indices],
                               size=len(indices), description=f"{what} of {self.description}")

  def counts(self):
    """Examples per class (positives per class for a multi-label set), for sets of files."""
    if self.multi_label:
      return (self.labels == POSITIVE).sum(0)
    return np.bincount(self.labels, minlength=len(self.classes))


@dataclasses.dataclass(frozen=True)
class Splits:
  """Where a labelled evaluation's images are: one set scored by cross-validation (`data`, with `labels` for images
  and a labels file), or a training set and a validation set; `multi_label` reads the labels as sets of classes."""
  data: str | None = None
  labels: str | None = None
  train_data: str | None = None
  train_labels: str | None = None
  val_data: str | None = None
  val_labels: str | None = None
  multi_label: bool = False
  tfds_data_dir: str | None = None

  def named(self):
    """{"data", "train_data", "val_data"}: each set as the user named it (its folder, shards or labels file)."""
    return {"data": self.data or self.labels, "train_data": self.train_data or self.train_labels,
            "val_data": self.val_data or self.val_labels}

  def flag(self, which):
    """`--data=...` (or `--train_data`, `--val_data`): the set `which` as its flag, for messages."""
    return f"--{which}={self.named()[which]}"

  def find(self, multi_label_ok=True):
    """(set, None) for a cross-validated --data [--labels], or (training set, validation set) for --train_data and
    --val_data, each checked (find)."""
    split = any((self.train_data, self.train_labels, self.val_data, self.val_labels))
    if self.multi_label and not multi_label_ok:
      raise errors.UsageError("--multi_label works in --mode=linear and --mode=finetune")
    if split and (self.data or self.labels):
      raise errors.UsageError("give either --data (cross-validated folds) or --train_data and --val_data, not both")
    if not split:
      return find(self.data, self.labels, multi_label=self.multi_label, tfds_data_dir=self.tfds_data_dir), None
    if not (self.val_data or self.val_labels):
      raise errors.UsageError("--val_data is required with --train_data: the images the evaluation is scored on")
    train = find(self.train_data, self.train_labels, "--train_data", "--train_labels", multi_label=self.multi_label,
                 tfds_data_dir=self.tfds_data_dir)
    val = find(self.val_data, self.val_labels, "--val_data", "--val_labels", classes=train.classes,
               multi_label=self.multi_label, tfds_data_dir=self.tfds_data_dir)
    warn_overlap(train, val)
    return train, val


def find(data, labels_file=None, data_flag="--data", labels_flag="--labels", classes=None, multi_label=False,
         tfds_data_dir=None):
  """The labelled set that `data` (and `labels_file`) name; `classes`: those of its training set, which a
  validation set's labels are read against (a TFDS split named without a split is then its validation split)."""
  if tfds_source.is_tfds(data):
    if labels_file:
      raise errors.UsageError(f"{labels_flag}={labels_file}: a TFDS split ({data_flag}={data}) holds its own labels")
    return tfds_set(data, data_flag, classes, multi_label, tfds_data_dir)
  if labels_file:
    return labelled_files(data, labels_file, data_flag, labels_flag, classes, multi_label)
  if not data:
    raise errors.UsageError(f"{data_flag} is required: a folder of class sub-folders, a folder of images with "
                            f"{labels_flag}, labelled TFRecord shards or tfds:NAME[:SPLIT]")
  if multi_label:
    raise errors.UsageError(f"{data_flag}={data}: a multi-label set needs {labels_flag}=FILE with lines "
                            "'NAME LABEL1,LABEL2,...'")
  path = sources.resolve_path(data)
  if not tf.io.gfile.isdir(path) and sources.is_tfrecord_pattern(path):
    return labelled_shards(data, data_flag, classes)
  return class_folders(data, data_flag, classes)


def class_folders(data, flag="--data", classes=None):
  """A folder with one sub-folder of images per class (images anywhere below it)."""
  root = sources.resolve_path(data)
  if not tf.io.gfile.isdir(root):
    raise errors.DataError(f"{flag}={data}: {root} is not a folder (of class sub-folders), nor labelled TFRecord "
                           "shards (give a labels file for a flat folder of images)")
  names = sorted(name for name in paths_lib.listdir(root) if tf.io.gfile.isdir(os.path.join(root, name)))
  if len(names) < 2 and classes is None:
    raise errors.DataError(f"{flag}={data}: needs at least 2 subfolders of images (classes) in {root}; found "
                           f"{len(names)}")
  index = _class_index(classes or names)
  paths, labels = [], []
  for name in names:
    files = sources.list_folder(os.path.join(root, name))
    if not files:
      raise errors.DataError(f"{flag}={data}: class {name} has no image ({os.path.join(root, name)} holds no "
                             f"{'/'.join(e[1:] for e in sources.IMAGE_EXTENSIONS)} file)")
    if name not in index:
      raise errors.DataError(f"{flag}={data}: class folder {name} is not one of the {len(index)} classes of the "
                             f"training set ({_some(classes)})")
    paths.extend(files)
    labels.extend([index[name]] * len(files))
  classes = tuple(classes or names)
  return LabelledSet("files", tuple(paths), np.asarray(labels, np.int64), classes, len(paths),
                     f"folder {root} ({len(paths)} images, {len(names)} classes)")


def read_labels_file(path, flag="--labels"):
  """[(line number, name, [labels])] of a labels file: `NAME LABEL[,LABEL...]` per line; '#' starts a comment."""
  try:
    lines = paths_lib.read_text(path).splitlines()
  except (tf.errors.OpError, UnicodeDecodeError) as e:
    raise errors.DataError(f"{flag}={path}: cannot read it: {paths_lib.reason(e)}") from e
  entries = []
  for number, line in enumerate(lines, 1):
    tokens = line.split(None, 1)
    if not tokens or tokens[0].startswith("#"):
      continue
    labels = [t for t in (tokens[1].replace(",", " ").split() if len(tokens) > 1 else []) if t]
    entries.append((number, tokens[0], labels))
  if not entries:
    raise errors.DataError(f"{flag}={path}: names no image (lines 'NAME LABEL')")
  return entries


# What a program that reads multi-label sets says to a labels file with several labels on a line; prepare, which
# writes one class per record, says MULTI_LABEL_ELSEWHERE.
MULTI_LABEL_HINT = "pass --multi_label for multi-label classification"
MULTI_LABEL_ELSEWHERE = ("labelled shards hold one class per image: give a multi-label set to evaluate or linear_eval "
                         "as its images and this labels file, with --multi_label")


def labelled_files(data, labels_file, data_flag="--data", labels_flag="--labels", classes=None, multi_label=False,
                   multi_label_hint=MULTI_LABEL_HINT):
  """The images a labels file names, under the folder `data` (default: the labels file's folder)."""
  labels_path = sources.resolve_path(labels_file)
  root = sources.resolve_path(data) if data else paths_lib.parent(labels_path)
  if not tf.io.gfile.isdir(root):
    raise errors.DataError(f"{data_flag}={data}: {root} is not a folder (the images that {labels_flag} names)")
  entries = read_labels_file(labels_path, labels_flag)
  where = f"{labels_flag}={labels_file}"
  if not multi_label:
    several = next(((n, labels) for n, _, labels in entries if len(labels) != 1), None)
    if several:
      raise errors.DataError(f"{where}: line {several[0]} gives {len(several[1])} labels, not 1"
                             + (f" ({multi_label_hint})" if several[1] else ""))
  given = classes is not None  # then an integer label may also be an index into them
  if not given:
    names = {label.lstrip(IGNORED_PREFIX) for _, _, labels in entries for label in labels}
    classes = tuple(sorted(names, key=lambda n: (0, int(n), "") if n.isdigit() else (1, 0, n)))
    if len(classes) < 2 and not multi_label:
      raise errors.DataError(f"{where}: names {len(classes)} class; classification needs at least 2")
  index = _class_index(classes)

  def label_index(number, label):
    if label in index:
      return index[label]
    if label.isdigit() and given:
      if int(label) < len(classes):
        return int(label)
      raise errors.DataError(f"{where}: line {number}: label {label} is out of range: there are {len(classes)} "
                             f"classes (0-based indices 0-{len(classes) - 1})")
    raise errors.DataError(f"{where}: line {number}: label {label!r} is not one of the {len(classes)} classes "
                           f"({_some(classes)})")

  files = _Files(root)
  paths, rows, missing, seen = [], [], [], {}
  for number, name, labels in entries:
    path = files.find(name)
    if path is None:
      missing.append(f"{name} (line {number})")
      continue
    if path in seen:
      raise errors.DataError(f"{where}: line {number} names {path} again (first on line {seen[path]})")
    seen[path] = number
    paths.append(path)
    if multi_label:
      row = np.full(len(classes), NEGATIVE, np.int8)
      for label in labels:
        ignored = label.startswith(IGNORED_PREFIX)
        k = label_index(number, label.lstrip(IGNORED_PREFIX))
        row[k] = POSITIVE if not ignored or row[k] == POSITIVE else IGNORED
      rows.append(row)
    else:
      rows.append(label_index(number, labels[0]))
  if missing:
    raise errors.DataError(f"{where}: {len(missing)} of the {len(entries)} images it names are not in {root}: "
                           f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
  labels = np.stack(rows) if multi_label else np.asarray(rows, np.int64)
  return LabelledSet("files", tuple(paths), labels, tuple(classes), len(paths),
                     f"{len(paths)} images of {root} labelled by {labels_path} ({len(classes)} classes)", multi_label)


class _Files:
  """Finds the file a labels file names under `root`: NAME itself, or, when NAME has no image extension, the image
  whose path without its extension is NAME (ImageNet's validation labels often omit '.JPEG')."""

  def __init__(self, root):
    self.root = root
    self._stems = None

  def find(self, name):
    path = name if os.path.isabs(name) else os.path.join(self.root, name)
    if paths_lib.is_file(path):
      return path
    if self._stems is None:
      self._stems = {}
      for found in sources.list_folder(self.root):
        self._stems.setdefault(os.path.splitext(paths_lib.relative(found, self.root))[0], found)
    return self._stems.get(os.path.splitext(name)[0] if name.lower().endswith(sources.IMAGE_EXTENSIONS) else name)


def labelled_shards(data, flag="--data", classes=None):
  """Labelled TFRecord shards of prepare --labels, with their index.json (the class list) beside them; shards
  without one are read in the converters' schema (converter_shards)."""
  path = sources.resolve_path(data)
  source = sources.find_source(path)
  index_path = os.path.join(os.path.dirname(source.paths[0]), INDEX_FILE)
  if not tf.io.gfile.exists(index_path):
    return converter_shards(data, flag, source, classes)
  try:
    index = json.loads(paths_lib.read_text(index_path))
  except (tf.errors.OpError, ValueError) as e:
    raise errors.DataError(f"{flag}={data}: no readable {index_path} beside the shards ({e}); write labelled shards "
                           "with `python -m context_keras.prepare --labels=folders|FILE`") from e
  own = index.get("classes")
  if not own:
    raise errors.DataError(f"{flag}={data}: {index_path} lists no classes: these shards hold no labels (write them "
                           "with prepare --labels=folders|FILE)")
  if classes is not None:
    unknown = [name for name in own if name not in set(classes)]
    if unknown:
      raise errors.DataError(f"{flag}={data}: classes {', '.join(unknown[:3])} of {index_path} are not among the "
                             f"{len(classes)} classes of the training set")
  return LabelledSet("tfrecord", source.paths, None, tuple(classes or own), int(index.get("records", 0)),
                     f"{len(source.paths)} labelled TFRecord shards {path} ({index.get('records', '?')} images, "
                     f"{len(own)} classes)", shards=source.shards)


def _class_index(classes):
  return {name: k for k, name in enumerate(classes)}


def _class_map(own, classes, flag, data, what, present=None):
  """(own class k -> index into the set's classes, the set's classes): its own classes, or those of the training set
  (`classes`) that a validation set is read against, each of its own found among them by name. With `present`
  (the own classes that some image has), the others may be missing there (they map to -1)."""
  if classes is None:
    return tuple(range(len(own))), tuple(own)
  index = _class_index(classes)
  unknown = [name for name in own if name not in index and (present is None or name in present)]
  if unknown:
    raise errors.DataError(f"{flag}={data}: classes {', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''} of "
                           f"{what} are not among the {len(classes)} classes of the training set ({_some(classes)})")
  return tuple(index.get(name, -1) for name in own), tuple(classes)


def tfds_set(data, flag="--data", classes=None, multi_label=False, tfds_data_dir=None):
  """A split of a prepared TFDS dataset (tfds_source.py): its class names are those of its ClassLabel feature.
  Named without a split, it is the 'train' split, or read against a training set's classes, 'validation' (else
  'test')."""
  splits = tfds_source.TRAIN_SPLITS if classes is None else tfds_source.VALIDATION_SPLITS
  source = tfds_source.find(data, tfds_data_dir, flag, splits, multi_label=multi_label)
  class_map, names = _class_map(source.classes.names, classes, flag, data, f"its {source.classes.name}")
  return LabelledSet(tfds_source.KIND, source.paths, None, names, source.size,
                     f"{source.description}, classes from {source.classes.name} ({len(source.classes.names)})",
                     multi_label, class_map=class_map, source=source)


# --------------------------------------------------------------------------------------------------------------
# Shards without an index.json: the converters' schema (or ours), the classes found by a scan of the records


def _scan_spec():
  return {CONVERTER_LABEL_KEY: tf.io.FixedLenFeature([], tf.int64, default_value=-1),
          CONVERTER_SYNSET_KEY: tf.io.FixedLenFeature([], tf.string, default_value=""),
          CONVERTER_TEXT_KEY: tf.io.FixedLenFeature([], tf.string, default_value=""),
          sources.TFRECORD_CLASS_INDEX_KEY: tf.io.FixedLenFeature([], tf.int64, default_value=-1),
          sources.TFRECORD_CLASS_NAME_KEY: tf.io.FixedLenFeature([], tf.string, default_value="")}


@tf.autograph.experimental.do_not_convert
def _scanned(record):
  """The class features of one record (their defaults where it has none; a damaged shard's stand-in: all -2)."""
  damaged = tf.equal(tf.strings.substr(record, 0, len(sources.DAMAGED_SHARD)), sources.DAMAGED_SHARD)
  spec = _scan_spec()

  def stand_in():
    return {k: tf.constant(-2, tf.int64) if v.dtype == tf.int64 else tf.constant("") for k, v in spec.items()}
  return tf.cond(damaged, stand_in, lambda: tf.io.parse_single_example(record, spec))


def scan_classes(source, flag, data):
  """One pass over the records of shards without an index.json, parsing only their class features. Returns a
  ShardClasses. Raises DataError when the records hold no class, some hold none, or one number goes with two names."""
  began = last_report = time.monotonic()
  logging.info("%s=%s: no %s beside the shards; reading the class of every record (one pass over %d shards, images "
               "not decoded).", flag, data, INDEX_FILE, len(source.paths))
  number_keys = (CONVERTER_LABEL_KEY, sources.TFRECORD_CLASS_INDEX_KEY)
  name_keys = {CONVERTER_SYNSET_KEY: CONVERTER_LABEL_KEY, CONVERTER_TEXT_KEY: CONVERTER_LABEL_KEY,
               sources.TFRECORD_CLASS_NAME_KEY: sources.TFRECORD_CLASS_INDEX_KEY}
  labelled = {key: 0 for key in number_keys}
  numbers = {key: set() for key in number_keys}
  names = {key: {} for key in name_keys}
  records = damaged = 0
  batches = sources.all_records(source).map(_scanned, num_parallel_calls=tf.data.AUTOTUNE).batch(SCAN_BATCH)
  for batch in batches.prefetch(2).as_numpy_iterator():
    intact = batch[CONVERTER_LABEL_KEY] != -2
    records += int(intact.sum())
    damaged += int((~intact).sum())
    for key in number_keys:
      values = batch[key][intact]
      labelled[key] += int((values >= 0).sum())
      numbers[key].update(int(v) for v in np.unique(values[values >= 0]))
    for name_key, number_key in name_keys.items():
      has = intact & (batch[number_key] >= 0) & (batch[name_key] != b"")
      for number, name in dict.fromkeys(zip(batch[number_key][has].tolist(), batch[name_key][has].tolist())):
        seen = names[name_key].setdefault(number, name)
        if seen != name:
          raise errors.DataError(f"{flag}={data}: class {number} is {seen.decode(errors='replace')!r} in one record "
                                 f"and {name.decode(errors='replace')!r} in another ({name_key})")
    if time.monotonic() - last_report > 10:
      last_report = time.monotonic()
      done = records + damaged
      logging.info("%s: %d records read (%.0f/s).", flag, done, done / (last_report - began))
  label_key = max(number_keys, key=lambda key: labelled[key])
  if not labelled[label_key]:
    raise errors.DataError(f"{flag}={data}: the records hold no class ({CONVERTER_LABEL_KEY} or "
                           f"{sources.TFRECORD_CLASS_INDEX_KEY}) and there is no {INDEX_FILE} beside the shards: these "
                           "are shards of unlabelled images (write labelled ones with prepare --labels)")
  if labelled[label_key] < records:
    raise errors.DataError(f"{flag}={data}: {records - labelled[label_key]} of the {records} records have no "
                           f"{label_key}")
  name_key = next((k for k, number_key in name_keys.items() if number_key == label_key and names[k]), None)
  logging.info("%s: %d records%s read in %.1f s.", flag, records,
               f" (and {damaged} damaged shards)" if damaged else "", time.monotonic() - began)
  return ShardClasses(records + damaged, label_key, tuple(sorted(numbers[label_key])), name_key,
                      {n: v.decode("utf-8", "surrogateescape") for n, v in names[name_key].items()} if name_key else {})


@dataclasses.dataclass(frozen=True)
class ShardClasses:
  """What a scan of labelled shards found: their elements (records, and a stand-in per damaged shard), the feature
  holding the class number, the numbers seen, and the feature naming them with the names it gives."""
  size: int
  label_key: str
  numbers: tuple
  name_key: str | None
  names: dict

  @property
  def offset(self):
    """What a class number minus gives the 0-based class index: 1 for the converters' 1-based labels (no 0 seen),
    0 for 0-based ones (ours, or a converter's whose labels start at 0)."""
    return 1 if self.label_key == CONVERTER_LABEL_KEY and self.numbers[0] >= 1 else 0

  def classes(self):
    """The set's class names, class k for number k + offset: the names the records give, else the number itself
    (a number that no record names, between the smallest and the largest, is named by itself too)."""
    return tuple(self.names.get(n, str(n)) for n in range(self.offset, self.numbers[-1] + 1))

  def convention(self):
    if self.label_key == sources.TFRECORD_CLASS_INDEX_KEY:
      return f"{self.label_key} (0-based, as prepare --labels writes it, without its {INDEX_FILE})"
    if self.offset:
      return (f"{self.label_key} 1-based ({self.numbers[0]}..{self.numbers[-1]}; 0 is the background class of TF "
              "models' ImageNet converter, build_imagenet_data.py)")
    return f"{self.label_key} 0-based ({self.numbers[0]}..{self.numbers[-1]})"


def converter_shards(data, flag, source, classes=None):
  """Labelled TFRecord shards without an index.json: the common converters' (image/encoded, image/class/label with
  image/class/synset or /text), or ours without their index. Their classes come from one pass over the records;
  the convention found is logged."""
  found = scan_classes(source, flag, data)
  own = found.classes()
  if len(set(own)) < len(own):
    raise errors.DataError(f"{flag}={data}: two class numbers have the same name in {found.name_key}")
  what = f"{found.name_key}" if found.name_key else f"{found.label_key} (numbered, no class names in the records)"
  present = {own[n - found.offset] for n in found.numbers}
  class_map, names = _class_map(own, classes, flag, data, what, present)
  logging.info("%s: classes from %s, names from %s: %d classes.", flag, found.convention(),
               found.name_key or "the numbers themselves", len(own))
  return LabelledSet("tfrecord", source.paths, None, names, found.size,
                     f"{len(source.paths)} TFRecord shards {sources.resolve_path(data)} ({found.size} images, "
                     f"{len(own)} classes from {found.label_key}{' 1-based' if found.offset else ''})",
                     shards=source.shards, class_map=class_map, label_key=found.label_key,
                     number_offset=found.offset)


def _some(classes):
  classes = list(classes or [])
  return ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")


def warn_overlap(train, val):
  """A warning naming the validation images (or shards) that are training ones too: a score on them measures what
  the probe memorised (1.0 for the same set), not what the features carry."""
  def real(lset):
    if lset.kind == tfds_source.KIND:  # its files hold other splits' examples too: the split itself is compared
      return {(lset.source.dataset, lset.source.split): lset.description}
    return {paths_lib.normalise(p): p for p in lset.paths}
  ours, theirs = real(train), real(val)
  shared = [theirs[p] for p in theirs if p in ours]
  if not shared:
    return
  what = "TFRecord shards" if val.kind == "tfrecord" else "images"
  if len(shared) == len(ours) == len(theirs):
    logging.warning("--train_data and --val_data name the same %d %s (%s): the validation score measures "
                    "memorisation (accuracy near 1.0), not what the features carry. Give held-out images as "
                    "--val_data.", len(shared), what, train.description)
  else:
    logging.warning("%d of the %d validation %s are training %s too (%s%s): the validation score counts "
                    "memorisation on them.", len(shared), len(theirs), what, what, ", ".join(shared[:3]),
                    ", ..." if len(shared) > 3 else "")


def check_compatible(train, val, val_flag="--val_data"):
  """A validation set must be read against the training set's classes (find(..., classes=train.classes))."""
  if train.multi_label != val.multi_label:
    raise errors.UsageError(f"{val_flag}: the training and validation sets must both be multi-label or both not")
  if tuple(val.classes) != tuple(train.classes):
    raise errors.DataError(f"{val_flag}: its classes differ from the training set's")


# --------------------------------------------------------------------------------------------------------------
# Reading


def records(lset):
  """A finite dataset of (index, encoded bytes, label) over the set in its listing order. Labels are class indices
  (int64), or for a multi-label set int8 rows. The records of shards are mapped by class name to `lset.classes`;
  a name that is not among them stops the reading with an error that names it. A damaged shard's records are read
  up to the damage; each record the shards' index promised but that could not be read comes as DAMAGED
  (shard_examples)."""
  if lset.kind == "files":
    return tf.data.Dataset.from_tensor_slices((list(lset.paths), lset.labels)).map(
        lambda path, label: (tf.io.read_file(path), label), num_parallel_calls=tf.data.AUTOTUNE).enumerate().map(
            lambda i, pair: (i, pair[0], pair[1]))
  if lset.kind == tfds_source.KIND:
    raw = lset.source.ordered_records()
  else:
    raw = shard_examples(sources.all_records(lset), lset.size)
  return raw.map(parser(lset), num_parallel_calls=tf.data.AUTOTUNE).enumerate().map(
      lambda i, pair: (i, pair[0], pair[1]))


def class_table(classes):
  return tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
      tf.constant(list(classes)), tf.range(len(classes), dtype=tf.int64)), default_value=-1)


# The class index of a record that could not be read (sources.DAMAGED_SHARD: the unread rest of a damaged shard), with
# empty bytes: every reader counts it as one unreadable image where it lies, as an unreadable image file
# (docs/guarantees.md), rather than stopping.
DAMAGED = -2


def shard_examples(raw, size):
  """The serialised records of one pass over labelled shards (sources.all_records' stream, `raw`), exactly `size` of
  them (the records the shards' index promises): a damaged shard gives its records up to the damage, and a stand-in
  (sources.DAMAGED_SHARD) at the end of the pass takes the place of each record lost, so that positions in a stream
  of passes keep their meaning (linear_job's exact resume) and every lost record is counted."""
  records = raw.filter(lambda record: ~sources.is_damaged(record))
  if not size:
    return records
  return records.concatenate(tf.data.Dataset.from_tensors(tf.constant(sources.DAMAGED_SHARD)).repeat()).take(size)


def parser(lset):
  """record -> (encoded bytes, label) of a set of shards or a TFDS split (records' or TfdsSource.ordered_records'
  elements), its label as records() gives it: a damaged shard's stand-in gives (b"", DAMAGED). A record whose class
  is not among lset.classes stops the reading with an error that says so."""
  if lset.kind == tfds_source.KIND:
    return _tfds_parser(lset)
  parse = _numbered_parser(lset) if lset.label_key else _named_parser(lset)

  @tf.autograph.experimental.do_not_convert
  def parse_or_damaged(record):
    return tf.cond(sources.is_damaged(record), lambda: (tf.constant(b""), tf.constant(DAMAGED, tf.int64)),
                   lambda: parse(record))
  return parse_or_damaged


def _named_parser(lset):
  """Our shards (prepare --labels): the class name of each record through the set's classes."""
  table = class_table(lset.classes)

  @tf.autograph.experimental.do_not_convert
  def parse(record):
    contents, _, name = sources.parse_record(record, labelled=True)
    return contents, _known(table.lookup(name), len(lset.classes), "image/class/name")
  return parse


def _known(label, num_classes, feature):
  check = tf.debugging.assert_non_negative(label, message=f"a record's class ({feature}) is not one of the "
                                           f"{num_classes} classes (or the record has no label)")
  with tf.control_dependencies([check]):
    return tf.identity(label)


def _numbered_parser(lset):
  """Shards without an index.json: the class number of lset.label_key, less lset.number_offset, through the class
  map."""
  class_map = tf.constant(lset.class_map, tf.int64)
  spec = {sources.TFRECORD_IMAGE_KEY: tf.io.FixedLenFeature([], tf.string),
          lset.label_key: tf.io.FixedLenFeature([], tf.int64, default_value=-1)}

  @tf.autograph.experimental.do_not_convert
  def parse(record):
    with tf.control_dependencies([sources.parse_record(record)]):  # the image, or the damaged shard's error
      parsed = tf.io.parse_single_example(record, spec)
    own = parsed[lset.label_key] - lset.number_offset
    in_range = (own >= 0) & (own < len(lset.class_map))
    label = tf.where(in_range, tf.gather(class_map, tf.clip_by_value(own, 0, len(lset.class_map) - 1)), -1)
    return parsed[sources.TFRECORD_IMAGE_KEY], _known(label, len(lset.classes), lset.label_key)
  return parse


def _tfds_parser(lset):
  """A TFDS split: its ClassLabel through the class map, or for a multi-label set a row over lset.classes: POSITIVE
  for the classes of objects not marked difficult, IGNORED for those only of difficult ones (VOC's protocol)."""
  class_map = tf.constant(lset.class_map, tf.int64)
  parse = lset.source.class_parser()
  num_classes = len(lset.classes)

  @tf.autograph.experimental.do_not_convert
  def single(record):
    contents, own = parse(record)
    return contents, _known(tf.gather(class_map, own), num_classes, lset.source.classes.name)

  @tf.autograph.experimental.do_not_convert
  def multiple(record):
    contents, own, difficult = parse(record)
    labels = _known(tf.gather(class_map, own), num_classes, lset.source.classes.name)
    easy = tf.math.unsorted_segment_max(tf.cast(~difficult, tf.int32), labels, num_classes) > 0
    present = tf.math.unsorted_segment_max(tf.ones_like(labels, tf.int32), labels, num_classes) > 0
    row = tf.where(easy, POSITIVE, tf.where(present, IGNORED, NEGATIVE))
    return contents, tf.cast(row, tf.int8)
  return multiple if lset.multi_label else single
