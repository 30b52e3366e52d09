"""PASCAL VOC detection data (docs/detection.md §2): the annotations of a split of a VOCdevkit folder or of a TFDS
dataset read into memory, every bad file or object skipped and counted, and the tf.data pipelines of detection: a
seeded, resumable training stream and the test images, each resized to one static size.

A VOCdevkit folder (VOCdevkit/VOC2007) holds Annotations/<id>.xml, JPEGImages/<id>.jpg and ImageSets/Main/<split>.txt
(one image id per line). Annotations are parsed with the standard library's xml.etree, read through tf.io.gfile (so
gs:// and other file systems work). Boxes keep the annotations' own numbers, the devkit's convention: (xmin, ymin,
xmax, ymax), 1-based, inclusive; the pipelines turn them into continuous pixel coordinates, (xmin - 1, ymin - 1,
xmax, ymax), which is what a detector regresses (the box of pixels 1..W spans [0, W]).

A TFDS voc split (`tfds:voc/2007`: features image, image/filename, objects{bbox [ymin, xmin, ymax, xmax] / image size,
label, is_difficult}) carries the same numbers divided by the image size: tfds_boxes gives them back in the devkit's
convention. Its annotations are read once into the same Split (its images by their position in the split's
listing, tfds_source.TfdsSource) and the same rules apply; its images stay encoded in the record files, read by
position through the source's seeded stream.
"""
import collections
import concurrent.futures
import dataclasses
import os
import xml.etree.ElementTree as ET

from absl import logging
import numpy as np
import tensorflow as tf

from context_keras import errors
from context_keras.input import augment
from context_keras.input import decoding
from context_keras.input import sources
from context_keras.input import tfds_source

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
# The devkit's split names that TFDS's voc calls otherwise (it has train, validation and test).
TFDS_SPLITS = {"trainval": "train+validation", "val": "validation"}
TFDS_FILENAME = "image/filename"  # TFDS voc's feature naming an example's JPEG: its id
# Records of a TFDS split shuffled together in the training stream (tfds_source.TfdsSource.records), at most: ~100 MB
# of VOC's encoded images, a fifth of VOC07 trainval; a smaller split is shuffled whole every epoch.
TFDS_WINDOW = 1024
ANNOTATIONS, IMAGES, IMAGE_SETS = "Annotations", "JPEGImages", os.path.join("ImageSets", "Main")
IMAGE_SUFFIX = ".jpg"
# What is left out, and why (the counters of Split.skipped). Images:
NO_ANNOTATION, MALFORMED, NO_IMAGE, NO_OBJECTS = ("no annotation file", "malformed annotation", "no image file",
                                                  "no objects")
UNREADABLE_EXAMPLE = "unreadable example"  # a TFDS record that cannot be parsed, or whose image's size cannot be read
IMAGE_REASONS = (NO_ANNOTATION, MALFORMED, NO_IMAGE, NO_OBJECTS, UNREADABLE_EXAMPLE)
# Objects:
UNKNOWN_CLASS, OUTSIDE, EMPTY_BOX, BAD_OBJECT, DIFFICULT = ("unknown class", "box outside its image",
                                                           "box of zero area", "malformed object",
                                                           "difficult (not trained on)")
# Objects kept, with their box clipped to the image it partly leaves.
CLIPPED = "box clipped to its image"
READ_THREADS = 16


@dataclasses.dataclass(frozen=True)
class Split:
  """One split, in memory: per image its id, where it is, its annotated size and objects, padded to the most objects
  an image has. boxes [N, M, 4] float32 in the devkit's convention; labels [N, M] int32 indices into `classes`, -1
  for padding; difficult [N, M] bool. `skipped`: {reason: count} of the images and objects left out (and of boxes
  clipped). A VOCdevkit folder's images are files (`paths`); a TFDS split's are records of `source` (its
  tfds_source.TfdsSource), `positions` [N] being their places in its listing, and `paths` is empty."""
  description: str
  ids: tuple
  paths: tuple
  sizes: np.ndarray
  boxes: np.ndarray
  labels: np.ndarray
  difficult: np.ndarray
  classes: tuple
  skipped: dict
  source: object = None
  positions: np.ndarray | None = None

  @property
  def size(self):
    return len(self.ids)

  def image_source(self):
    """The split's images as sources.py reads a source (rescaling samples patches of them): its files, or the TFDS
    split (all its records)."""
    return self.source if self.source is not None else sources.Source("files", self.paths, self.description)

  def reader(self):
    """path or record -> the image's encoded bytes, as graph code."""
    return self.source.image_parser() if self.source is not None else tf.io.read_file

  def listing_rows(self):
    """(keep [listing size] bool, row [listing size] int32: the row of each kept position, -1 elsewhere)."""
    keep = np.zeros(self.source.size, bool)
    keep[self.positions] = True
    rows = np.full(self.source.size, -1, np.int32)
    rows[self.positions] = np.arange(self.size, dtype=np.int32)
    return keep, rows

  @property
  def max_objects(self):
    return self.labels.shape[1]

  def counts(self):
    return (self.labels >= 0).sum(axis=1)


# --------------------------------------------------------------------------------------------------------------
# Reading a VOCdevkit folder


@dataclasses.dataclass
class _Annotation:
  height: int
  width: int
  objects: list  # (name, difficult, xmin, ymin, xmax, ymax) or None for a malformed object


def _text(element, tag):
  found = element.find(tag)
  if found is None or found.text is None or not found.text.strip():
    raise ValueError(f"no <{tag}>")
  return found.text.strip()


def parse_annotation(text):
  """An annotation file's image size and objects; ValueError naming what is wrong when it is not a VOC annotation
  (not XML, no <size> with a positive <width> and <height>). An object without a name or a numeric box is None."""
  try:
    root = ET.fromstring(text)
  except ET.ParseError as e:
    raise ValueError(f"not XML ({e})") from e
  size = root.find("size")
  if size is None:
    raise ValueError("no <size>")
  try:
    width, height = int(float(_text(size, "width"))), int(float(_text(size, "height")))
  except ValueError as e:
    raise ValueError(f"<size>: {e}") from e
  if width <= 0 or height <= 0:
    raise ValueError(f"<size> {width}x{height}")
  objects = []
  for element in root.findall("object"):
    try:
      name = _text(element, "name")
      difficult = element.find("difficult")
      hard = difficult is not None and (difficult.text or "0").strip() not in ("0", "")
      box = element.find("bndbox")
      if box is None:
        raise ValueError("no <bndbox>")
      objects.append((name, hard) + tuple(float(_text(box, tag)) for tag in ("xmin", "ymin", "xmax", "ymax")))
    except ValueError:
      objects.append(None)
  return _Annotation(height, width, objects)


def _check_folder(root, flag):
  missing = [part for part in (ANNOTATIONS, IMAGES, IMAGE_SETS) if not tf.io.gfile.isdir(os.path.join(root, part))]
  if missing:
    raise errors.DataError(f"{flag}={root}: not a VOCdevkit folder (no {', '.join(missing)}); give the folder "
                           "that holds Annotations/, JPEGImages/ and ImageSets/Main/, e.g. VOCdevkit/VOC2007")


def _read_ids(root, split, flag):
  path = os.path.join(root, IMAGE_SETS, f"{split}.txt")
  if not tf.io.gfile.exists(path):
    found = sorted(name[:-4] for name in tf.io.gfile.listdir(os.path.join(root, IMAGE_SETS))
                   if name.endswith(".txt") and "_" not in name)
    raise errors.DataError(f"{flag}={split}: no {path}; the splits there: {', '.join(found) or 'none'}")
  with tf.io.gfile.GFile(path, "r") as f:
    ids = [line.split()[0] for line in f.read().splitlines() if line.split()]
  if not ids:
    raise errors.DataError(f"{flag}={split}: {path} lists no image")
  return ids


def _read_annotation(path):
  """(annotation or None, reason when None)."""
  try:
    with tf.io.gfile.GFile(path, "rb") as f:
      text = f.read()
  except tf.errors.NotFoundError:
    return None, NO_ANNOTATION
  except tf.errors.OpError as e:
    return None, f"{MALFORMED} (unreadable: {errors.tf_error_message(e, 80)})"
  try:
    return parse_annotation(text), None
  except ValueError as e:
    return None, f"{MALFORMED} ({e})"


@dataclasses.dataclass
class _Raw:
  """A split's ids with their parsed annotations, before the classes are known."""
  description: str
  ids: list
  annotations: list   # _Annotation, or None for an image that cannot be used
  reasons: list       # why an annotation is None
  locations: list     # each image's file, or its position in a TFDS split's listing
  source: object = None  # the TFDS split


def _read_raw(root, split, flag):
  ids = _read_ids(root, split, flag)
  paths = [os.path.join(root, ANNOTATIONS, f"{image_id}.xml") for image_id in ids]
  with concurrent.futures.ThreadPoolExecutor(READ_THREADS) as pool:
    results = list(pool.map(_read_annotation, paths))
  images = set(tf.io.gfile.listdir(os.path.join(root, IMAGES)))
  annotations = [a if a is None or i + IMAGE_SUFFIX in images else None for i, (a, _) in zip(ids, results)]
  reasons = [r or (NO_IMAGE if a is None else None) for a, (_, r) in zip(annotations, results)]
  return _Raw(f"{root} {split}", ids, annotations, reasons,
              [os.path.join(root, IMAGES, i + IMAGE_SUFFIX) for i in ids])


# --------------------------------------------------------------------------------------------------------------
# Reading a TFDS split (tfds:voc/2007)


def _read_tfds(data, split, flag, data_dir):
  """The _Raw of split `split` of the TFDS dataset `data` (tfds:NAME[:VERSION]): its annotations read from every
  record in one pass (images not decoded: a JPEG's size comes from its header), objects in the devkit's convention."""
  where = f"--data={data} {flag}={split}"
  _, named = tfds_source.parse(data)
  if named is not None:
    raise errors.UsageError(f"--data={data}: name the splits with --train_split and --test_split, not in --data "
                            "(e.g. --data=tfds:voc/2007 --train_split=trainval --test_split=test)")
  source = tfds_source.find(f"{data}:{split}", data_dir, multi_label=True, aliases=TFDS_SPLITS, where=where)
  feature = source.classes
  if feature.boxes is None:
    raise errors.DataError(f"{where}: {source.dataset} has no BBoxFeature beside its classes {feature.name} (VOC's "
                           "objects/bbox); detection needs the objects' boxes")
  if source.split != split:
    logging.info("%s: the devkit's split %s is TFDS's %s.", where, split, source.split)
  logging.info("Reading the annotations of %s.", source.description)
  has_name = TFDS_FILENAME in source.features.keys()
  paths = [feature.path, feature.boxes]
  if feature.difficult:
    paths.append(feature.difficult)
  if has_name:
    paths.append((TFDS_FILENAME,))
  parse = source.feature_parser(paths)

  def annotation(position, record):
    image, (labels, boxes, *rest) = parse(record)
    difficult = tf.cast(rest[0], tf.bool) if feature.difficult else tf.zeros_like(labels, tf.bool)
    name = rest[-1] if has_name else tf.constant("")
    # A JPEG's size comes from its header; another format's bytes come out to be decoded on the host (TFDS's voc
    # is all JPEG: a decoder in this graph would cost more to build than it saves).
    jpeg = tf.io.is_jpeg(image)
    size = tf.cond(jpeg, lambda: tf.image.extract_jpeg_shape(image)[:2], lambda: tf.constant([-1, -1]))
    return {"position": position, "size": size, "other": tf.where(jpeg, tf.constant(b""), image),
            "labels": tf.cast(labels, tf.int64), "boxes": tf.cast(boxes, tf.float32), "difficult": difficult,
            "name": name, "ok": tf.constant(True)}

  def unreadable(position):
    return {"position": position, "size": tf.zeros([2], tf.int32), "other": tf.constant(b""),
            "labels": tf.zeros([0], tf.int64), "boxes": tf.zeros([0, 4]), "difficult": tf.zeros([0], tf.bool),
            "name": tf.constant(""), "ok": tf.constant(False)}

  def stored_size(example):
    if example["size"][0] >= 0:
      return tuple(int(v) for v in example["size"])
    try:
      return tuple(int(v) for v in tf.shape(decoding.decode_stored(example["other"]))[:2])
    except tf.errors.OpError:
      return None

  def one(position, record):  # exactly one element per record, so that positions stay aligned
    parsed = tf.data.Dataset.from_tensors((position, record)).map(annotation).ignore_errors()
    return parsed.concatenate(tf.data.Dataset.from_tensors(unreadable(position))).take(1)

  examples = source.ordered_records().enumerate().interleave(one, cycle_length=16, block_length=1,
                                                              num_parallel_calls=tf.data.AUTOTUNE,
                                                              deterministic=True)
  ids, annotations, reasons, positions = [], [], [], []
  for example in examples.as_numpy_iterator():
    position = int(example["position"])
    name = example["name"].decode("utf-8", "replace")
    ids.append(os.path.splitext(name)[0] if name else f"{position}")
    positions.append(position)
    size = stored_size(example) if example["ok"] else None
    if size is None:
      annotations.append(None)
      reasons.append(UNREADABLE_EXAMPLE)
      continue
    height, width = size
    boxes = tfds_boxes(example["boxes"], height, width)
    annotations.append(_Annotation(height, width, [
        (feature.names[label], bool(hard), *(float(v) for v in box))
        for label, hard, box in zip(example["labels"], example["difficult"], boxes)]))
    reasons.append(None)
  return _Raw(f"TFDS {source.dataset} {source.split}", ids, annotations, reasons, positions, source)


def annotated_classes(raw):
  """The class names the annotations of a split use, sorted."""
  return tuple(sorted({obj[0] for a in raw.annotations if a for obj in a.objects if obj}))


def _build(raw, classes, keep_difficult, keep_empty):
  """The Split of `raw` with `classes`: images and objects that cannot be used left out and counted."""
  index = {name: k for k, name in enumerate(classes)}
  skipped = collections.Counter()
  examples = collections.defaultdict(list)  # reason -> a few image ids, for the log
  kept = []
  for image_id, annotation, reason, location in zip(raw.ids, raw.annotations, raw.reasons, raw.locations):
    if annotation is None:
      key = reason.split(" (")[0]
      skipped[key] += 1
      examples[key].append(f"{image_id} ({reason[len(key) + 2:-1]})" if key != reason else image_id)
      continue
    objects = []
    for obj in annotation.objects:
      if obj is None:
        skipped[BAD_OBJECT] += 1
        examples[BAD_OBJECT].append(image_id)
        continue
      name, hard, x0, y0, x1, y1 = obj
      if name not in index:
        skipped[UNKNOWN_CLASS] += 1
        examples[UNKNOWN_CLASS].append(f"{image_id} ({name})")
        continue
      if x1 < x0 or y1 < y0:
        skipped[EMPTY_BOX] += 1
        examples[EMPTY_BOX].append(image_id)
        continue
      # Pixels 1..width: a box that covers none of them is outside; one that covers some is clipped to them.
      if x1 < 1 or y1 < 1 or x0 > annotation.width or y0 > annotation.height:
        skipped[OUTSIDE] += 1
        examples[OUTSIDE].append(image_id)
        continue
      clipped = (max(x0, 1.0), max(y0, 1.0), min(x1, float(annotation.width)), min(y1, float(annotation.height)))
      if clipped != (x0, y0, x1, y1):
        skipped[CLIPPED] += 1
      if hard and not keep_difficult:
        skipped[DIFFICULT] += 1
        continue
      objects.append((index[name], hard) + clipped)
    if not objects:
      skipped[NO_OBJECTS] += 1
      examples[NO_OBJECTS].append(image_id)
      if not keep_empty:
        continue
    kept.append((image_id, annotation, objects, location))
  description = raw.description
  for reason, count in sorted(skipped.items()):
    if reason in (DIFFICULT, CLIPPED):
      continue
    left = "kept (its detections count as false positives)" if reason == NO_OBJECTS and keep_empty else "skipped"
    what = "image(s)" if reason in IMAGE_REASONS else "object(s)"
    shown = ", ".join(examples[reason][:5]) + (", ..." if count > 5 else "")
    logging.warning("%s: %d %s with %s %s: %s", description, count, what, reason, left, shown)
  if not kept:
    raise errors.DataError(f"{description}: no usable image ({dict(skipped)}); is the split right, and are the "
                           f"class names among {', '.join(classes[:5])}...?")
  most = max(len(objects) for _, _, objects, _ in kept)
  if not most:  # VOC2012's test split is published without annotations
    raise errors.DataError(f"{description}: none of its {len(kept)} images has an object of the classes "
                           f"{', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}: nothing to evaluate")
  n = len(kept)
  boxes = np.zeros((n, most, 4), np.float32)
  labels = np.full((n, most), -1, np.int32)
  difficult = np.zeros((n, most), bool)
  for i, (_, _, objects, _) in enumerate(kept):
    for j, (label, hard, *box) in enumerate(objects):
      boxes[i, j], labels[i, j], difficult[i, j] = box, label, hard
  locations = [location for _, _, _, location in kept]
  return Split(description=description, ids=tuple(i for i, _, _, _ in kept),
               paths=() if raw.source is not None else tuple(locations),
               sizes=np.array([(a.height, a.width) for _, a, _, _ in kept], np.int32).reshape(-1, 2), boxes=boxes,
               labels=labels, difficult=difficult, classes=tuple(classes), skipped=dict(skipped), source=raw.source,
               positions=np.asarray(locations, np.int64) if raw.source is not None else None)


def load(data, train_split, test_split, classes="voc", train_difficult=False, tfds_data_dir=None):
  """(training Split, test Split) of a VOCdevkit folder or of a TFDS dataset (tfds:voc/2007, prepared in
  tfds_data_dir; its splits in TFDS's syntax, trainval and val read as TFDS_SPLITS says).

  classes: "voc" (the 20 classes, in the devkit's order; a TFDS dataset's class names are mapped to them by name),
  "annotations" (the names the training split's annotations use) or a sequence of names. Training leaves out
  images without objects and, unless train_difficult, difficult objects (as Fast R-CNN does); the test split keeps
  both: difficult objects are neither counted nor penalised by the metric, and detections on an image without
  objects are false positives."""
  if tfds_source.is_tfds(data):
    train_raw = _read_tfds(data, train_split, "--train_split", tfds_data_dir)
    test_raw = _read_tfds(data, test_split, "--test_split", tfds_data_dir)
  else:
    root = sources.resolve_path(data)
    _check_folder(root, "--data")
    train_raw = _read_raw(root, train_split, "--train_split")
    test_raw = _read_raw(root, test_split, "--test_split")
  if classes == "voc":
    names = VOC_CLASSES
  elif classes == "annotations":
    names = annotated_classes(train_raw)
    if not names:
      raise errors.DataError(f"--data={data}: the annotations of --train_split={train_split} name no class")
  else:
    names = tuple(classes)
    if len(set(names)) != len(names) or not all(names):
      raise errors.UsageError(f"--classes={','.join(names)}: class names must be distinct and non-empty")
  return (_build(train_raw, names, keep_difficult=train_difficult, keep_empty=False),
          _build(test_raw, names, keep_difficult=True, keep_empty=True))


def tfds_boxes(bbox, height, width):
  """TFDS voc's normalised boxes [n, 4] (ymin, xmin, ymax, xmax, each the annotation's number over the image size)
  in the devkit's convention (xmin, ymin, xmax, ymax), the annotations' integers recovered by rounding."""
  bbox = np.asarray(bbox, np.float64).reshape(-1, 4) * np.array([height, width, height, width], np.float64)
  return np.round(bbox[:, [1, 0, 3, 2]]).astype(np.float32)


# --------------------------------------------------------------------------------------------------------------
# Pipelines


def continuous(boxes):
  """Devkit boxes [..., 4] (xmin, ymin, xmax, ymax) -> continuous (y0, x0, y1, x1), the detector's format."""
  x0, y0, x1, y1 = tf.unstack(tf.convert_to_tensor(boxes, tf.float32), axis=-1)
  return tf.stack([y0 - 1.0, x0 - 1.0, y1, x1], axis=-1)


def to_devkit(boxes):
  """Continuous (y0, x0, y1, x1) -> the devkit's (xmin, ymin, xmax, ymax), as the annotations number pixels."""
  y0, x0, y1, x1 = np.moveaxis(np.asarray(boxes, np.float64), -1, 0)
  return np.stack([x0 + 1.0, y0 + 1.0, x1, y1], axis=-1)


def fit(image, size, preprocessing):
  """An image [H, W, 3] uint8 -> (float32 [size, size, 3], scale [2]): resized so that its longer side is `size`
  (aspect kept), standardised as the backbone expects (augment.standardize, the run's preprocessing), then padded
  with zeros at the bottom and right. Standardising first keeps the padding out of the image's statistics, and
  zeros are the mean the standardisation subtracts. scale = (new height / height, new width / width)."""
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  ratio = size / tf.reduce_max(shape)
  new = tf.clip_by_value(tf.cast(tf.round(shape * ratio), tf.int32), 1, size)
  resized = tf.image.resize(tf.cast(image, tf.float32), new)
  standard = augment.standardize(resized[tf.newaxis], preprocessing)[0]
  padded = tf.pad(standard, [[0, size - new[0]], [0, size - new[1]], [0, 0]])
  return tf.ensure_shape(padded, [size, size, 3]), tf.cast(new, tf.float32) / shape


def _never_failing(transform, blank):
  """Maps one input through `transform`, or, when that raises (an unreadable or undecodable image), to `blank`
  with the input's index: one output per input, so that stream positions stay exact."""
  def one(index, *rest):
    example = tf.data.Dataset.from_tensors((index,) + rest).map(transform).ignore_errors()
    return example.concatenate(tf.data.Dataset.from_tensors(dict(blank, index=index))).take(1)
  return one


def _blank(size, max_objects=None):
  example = {"image": tf.zeros([size, size, 3]), "weight": tf.constant(0.0), "index": tf.constant(-1, tf.int64)}
  if max_objects is None:
    example.update(scale=tf.ones([2]), shape=tf.ones([2]))
  else:
    example.update(boxes=-tf.ones([max_objects, 4]), labels=-tf.ones([max_objects]))
  return example


def training_stream(split, seed, start):
  """The endless stream (position, path or record, devkit boxes [M, 4], labels [M]) from position `start` on, a pure
  function of the seed, so that a resumed job reads on exactly. A folder's: every epoch visits the images in a new
  permutation of (seed, epoch). A TFDS split's: its records in the source's seeded order (files permuted per epoch,
  windows of TFDS_WINDOW shuffled: tfds_source.TfdsSource.records), only the split's images, each carrying its
  listing position, by which its annotations are looked up."""
  boxes, labels = tf.constant(split.boxes), tf.constant(split.labels)
  if split.source is not None:
    keep, rows = split.listing_rows()
    rows = tf.constant(rows)
    records = split.source.records(seed, min(TFDS_WINDOW, split.size), start, keep=keep, with_positions=True)

    def annotated(i, pair):
      row = tf.gather(rows, pair[0])
      return i, pair[1], tf.gather(boxes, row), tf.gather(labels, row)
    return tf.data.Dataset.zip((tf.data.Dataset.range(start, 2**62), records)).map(annotated)
  paths = tf.constant(split.paths)
  n = split.size

  def epoch(e):
    order = sources.epoch_order(n, tf.constant(seed, tf.int64), e)
    return tf.data.Dataset.from_tensor_slices((tf.gather(paths, order), tf.gather(boxes, order),
                                               tf.gather(labels, order)))
  stream = tf.data.Dataset.range(start // n, 2**62).flat_map(epoch).skip(start % n)
  return tf.data.Dataset.zip((tf.data.Dataset.range(start, 2**62), stream)).map(lambda i, x: (i,) + x)


def train_transform(size, preprocessing, seed, flip=True, read=tf.io.read_file):
  """(position, path or record, devkit boxes, labels) -> a training example: the image read (`read`: Split.reader),
  flipped horizontally with probability 1/2 (a stateless draw keyed by (seed, position)), fitted to size x size;
  boxes continuous (y0, x0, y1, x1) in the fitted image, padding boxes and labels -1 (what keras-hub's label encoder
  takes as none)."""
  def transform(index, path, boxes, labels):
    image = decoding.decode_stored(read(path))
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    y0, x0, y1, x1 = tf.unstack(continuous(boxes), axis=-1)
    # The annotated size can disagree with the file's: keep the boxes inside the pixels there are.
    y0, y1 = tf.clip_by_value(y0, 0.0, shape[0]), tf.clip_by_value(y1, 0.0, shape[0])
    x0, x1 = tf.clip_by_value(x0, 0.0, shape[1]), tf.clip_by_value(x1, 0.0, shape[1])
    if flip:
      mirror = tf.random.stateless_uniform([], tf.stack([tf.constant(seed, tf.int64), index])) < 0.5
      image = tf.cond(mirror, lambda: tf.image.flip_left_right(image), lambda: image)
      x0, x1 = tf.where(mirror, shape[1] - x1, x0), tf.where(mirror, shape[1] - x0, x1)
    fitted, scale = fit(image, size, preprocessing)
    real = labels >= 0
    fitted_boxes = tf.stack([y0 * scale[0], x0 * scale[1], y1 * scale[0], x1 * scale[1]], axis=-1)
    return {"image": fitted, "boxes": tf.where(real[:, tf.newaxis], fitted_boxes, -1.0),
            "labels": tf.where(real, tf.cast(labels, tf.float32), -1.0), "weight": tf.constant(1.0), "index": index}
  return transform


def train_dataset(split, size, preprocessing, seed, start, pipeline, flip=True):
  """One input pipeline's batches (of pipeline.replica_batch) of the training stream from position `start`; the
  pipeline takes every pipeline.count-th example (evaluation.linear_job.Pipeline)."""
  stream = training_stream(split, seed, start).shard(pipeline.count, pipeline.id)
  examples = stream.interleave(_never_failing(train_transform(size, preprocessing, seed, flip, split.reader()),
                                              _blank(size, split.max_objects)),
                               cycle_length=8, block_length=1, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return examples.batch(pipeline.replica_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def test_transform(size, preprocessing, read=tf.io.read_file):
  """(index, path or record) -> the fitted image, its scale and its stored size (height, width)."""
  def transform(index, path):
    image = decoding.decode_stored(read(path))
    fitted, scale = fit(image, size, preprocessing)
    return {"image": fitted, "scale": scale, "shape": tf.cast(tf.shape(image)[:2], tf.float32),
            "weight": tf.constant(1.0), "index": index}
  return transform


def test_steps(split, batch_size):
  return max(1, -(-split.size // batch_size))


def _listed(split):
  """(row, path or record) of every image of the split, in its order (a TFDS split's records read in their listing
  order, those it left out dropped)."""
  if split.source is None:
    return tf.data.Dataset.from_tensor_slices(list(split.paths)).enumerate()
  keep, rows = (tf.constant(v) for v in split.listing_rows())
  return split.source.ordered_records().enumerate().filter(lambda p, _: tf.gather(keep, p)).map(
      lambda p, record: (tf.cast(tf.gather(rows, p), tf.int64), record))


def test_dataset(split, size, preprocessing, steps, pipeline):
  """This pipeline's share of the test images for `steps` steps, padded with blank examples (weight 0, index -1);
  an unreadable image becomes a blank of weight 0 that keeps its index."""
  records = _listed(split).shard(pipeline.count, pipeline.id)
  examples = records.interleave(_never_failing(test_transform(size, preprocessing, split.reader()), _blank(size)),
                                cycle_length=8, block_length=1, num_parallel_calls=tf.data.AUTOTUNE,
                                deterministic=True)
  padding = tf.data.Dataset.from_tensors(_blank(size)).repeat()
  return (examples.concatenate(padding).batch(pipeline.replica_batch, drop_remainder=True)
          .take(steps * pipeline.replicas).prefetch(tf.data.AUTOTUNE))


def stored_images(split, count):
  """The encoded bytes of the split's first `count` images (None for one that cannot be read), for drawing them:
  off the training path, one image at a time."""
  read = split.reader()
  found = []
  for _, where in _listed(split).take(count):
    try:
      found.append(read(where).numpy())
    except tf.errors.OpError:
      found.append(None)
  return found
