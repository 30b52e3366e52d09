"""Labelled images, as the labelled evaluations read them (method.md §10.1): listed and checked before any work,
then read as datasets of (index, encoded bytes, label).

Three forms, each checked at once with a message naming the flag, the file and the problem:
  a folder of class sub-folders   ImageNet's training layout: the sub-folder's name is the class (train/n01440764/*)
  images + a labels file          lines `NAME LABEL` (or `NAME LABEL1,LABEL2,...` for multi-label sets), NAME relative
                                  to the image folder (or to the labels file's folder), with or without its extension
                                  (ImageNet's validation folder with a file mapping each image to its synset)
  labelled TFRecord shards        written by `prepare --labels`: each record holds its class index and name, and the
                                  shards' index.json the list of classes

A label is a class name, or, when the classes are already known (a validation set read against its training set's
classes), a name or a 0-based index into them. In multi-label files a label written `?NAME` marks an image on which
class NAME is ignored (VOC's "difficult"), so that it counts neither as a positive nor as a negative.
"""
import dataclasses
import json
import os

from absl import logging
import numpy as np
import tensorflow as tf

from context_keras import errors
from context_keras.input import sources

IGNORED_PREFIX = "?"
POSITIVE, NEGATIVE, IGNORED = 1, 0, -1   # the entries of a multi-label matrix
INDEX_FILE = "index.json"                 # beside the shards: prepare's index, with "classes" for labelled shards


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
      return find(self.data, self.labels, multi_label=self.multi_label), None
    if not (self.val_data or self.val_labels):
      raise errors.UsageError("--val_data is required with --train_data: the images the evaluation is scored on")
    train = find(self.train_data, self.train_labels, "--train_data", "--train_labels", multi_label=self.multi_label)
    val = find(self.val_data, self.val_labels, "--val_data", "--val_labels", classes=train.classes,
               multi_label=self.multi_label)
    warn_overlap(train, val)
    return train, val


def find(data, labels_file=None, data_flag="--data", labels_flag="--labels", classes=None, multi_label=False):
  """The labelled set that `data` (and `labels_file`) name; `classes`: those of its training set, which a
  validation set's labels are read against."""
  if labels_file:
    return labelled_files(data, labels_file, data_flag, labels_flag, classes, multi_label)
  if not data:
    raise errors.UsageError(f"{data_flag} is required: a folder of class sub-folders, a folder of images with "
                            f"{labels_flag}, or labelled TFRecord shards")
  if multi_label:
    raise errors.UsageError(f"{data_flag}={data}: a multi-label set needs {labels_flag}=FILE with lines "
                            "'NAME LABEL1,LABEL2,...'")
  path = sources.resolve_path(data)
  if not os.path.isdir(path) and sources.is_tfrecord_pattern(path):
    return labelled_shards(data, data_flag, classes)
  return class_folders(data, data_flag, classes)


def class_folders(data, flag="--data", classes=None):
  """A folder with one sub-folder of images per class (images anywhere below it)."""
  root = sources.resolve_path(data)
  if not os.path.isdir(root):
    raise errors.DataError(f"{flag}={data}: {root} is not a folder (of class sub-folders), nor labelled TFRecord "
                           "shards (give a labels file for a flat folder of images)")
  names = sorted(name for name in os.listdir(root) if os.path.isdir(os.path.join(root, name)))
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
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise errors.DataError(f"{flag}={path}: cannot read it: {getattr(e, 'strerror', None) or e}") from e
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
  root = sources.resolve_path(data) if data else os.path.dirname(os.path.abspath(labels_path))
  if not os.path.isdir(root):
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
    if os.path.isfile(path):
      return path
    if self._stems is None:
      self._stems = {}
      for found in sources.list_folder(self.root):
        self._stems.setdefault(os.path.splitext(os.path.relpath(found, self.root))[0], found)
    return self._stems.get(os.path.splitext(name)[0] if name.lower().endswith(sources.IMAGE_EXTENSIONS) else name)


def labelled_shards(data, flag="--data", classes=None):
  """Labelled TFRecord shards of prepare --labels, with their index.json (the class list) beside them."""
  path = sources.resolve_path(data)
  source = sources.find_source(path)
  index_path = os.path.join(os.path.dirname(source.paths[0]), INDEX_FILE)
  try:
    with open(index_path, encoding="utf-8") as f:
      index = json.load(f)
  except (OSError, ValueError) as e:
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


def _some(classes):
  classes = list(classes or [])
  return ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")


def warn_overlap(train, val):
  """A warning naming the validation images (or shards) that are training ones too: a score on them measures what
  the probe memorised (1.0 for the same set), not what the features carry."""
  def real(paths):
    return {os.path.realpath(p): p for p in paths}
  ours, theirs = real(train.paths), real(val.paths)
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
  return shard_records(shard_examples(sources.all_records(lset), lset.size), lset.classes).enumerate().map(
      lambda i, pair: (i, pair[0], pair[1]))


def class_table(classes):
  return tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
      tf.constant(list(classes)), tf.range(len(classes), dtype=tf.int64)), default_value=-1)


# The class index of a record that could not be read (sources.DAMAGED_SHARD: the unread rest of a damaged shard), with
# empty bytes: every reader counts it as one unreadable image where it lies, as an unreadable image file (README,
# What we guarantee), rather than stopping.
DAMAGED = -2


def shard_examples(raw, size):
  """The serialised records of one pass over labelled shards (shard_records' stream, `raw`), exactly `size` of them
  (the records of the shards' index.json): a damaged shard gives its records up to the damage, and a stand-in
  (sources.DAMAGED_SHARD) at the end of the pass takes the place of each record lost, so that positions in a stream
  of passes keep their meaning (linear_job's exact resume) and every lost record is counted."""
  records = raw.filter(lambda record: ~sources.is_damaged(record))
  if not size:
    return records
  return records.concatenate(tf.data.Dataset.from_tensors(tf.constant(sources.DAMAGED_SHARD)).repeat()).take(size)


def parse_labelled(record, table):
  """(encoded bytes, class index by `table`, -1 for an unknown name) of a serialised labelled record; (b"",
  DAMAGED) for a damaged shard's stand-in."""
  def parsed():
    contents, _, name = sources.parse_record(record, labelled=True)
    return contents, table.lookup(name)
  return tf.cond(sources.is_damaged(record), lambda: (tf.constant(b""), tf.constant(DAMAGED, tf.int64)), parsed)


def shard_records(dataset, classes):
  """(encoded bytes, class index into `classes`) of a dataset of serialised labelled records (DAMAGED for a damaged
  shard's stand-ins)."""
  table = class_table(classes)

  def parse(record):
    contents, label = parse_labelled(record, table)
    check = tf.debugging.Assert(
        (label >= 0) | tf.equal(label, DAMAGED), [f"a record's class name (image/class/name) is not one of the "
                                                 f"{len(classes)} classes (or the record has no label)"])
    with tf.control_dependencies([check]):
      return contents, tf.identity(label)
  return dataset.map(parse, num_parallel_calls=tf.data.AUTOTUNE)
