"""Writes TFRecord shards of encoded images for training: python -m context_keras.prepare --data=FOLDER_OR_LIST
--output=DIR --num_shards=N, then train with --data='DIR/*.tfrecord'. --data and --data_root are read as in training
(a folder or a list file, or a split of a prepared TFDS dataset, tfds:NAME[:SPLIT]; see --help and docs/data.md).

Reads top to bottom: the listing, assigned to shards (sorted, seeded shuffle, contiguous chunks) -> the
output folder checked against an earlier run -> one image (read, header guard, decode, optional downscale) -> one
shard (written to a temporary name, renamed when complete) -> the shards in a thread pool with a progress line ->
rejected.txt and index.json -> the program's flags and main.

Each record is a tf.train.Example whose sources.TFRECORD_IMAGE_KEY feature holds the image's original bytes, EXIF
orientation included (training's decoding applies it), or a JPEG re-encoding of a downscaled upright copy when
--max_pixels asks for it; image/height, image/width (the upright size) and image/filename ride along for
inspection. With --labels (folders: the class sub-folder of --data; or a labels file, lines 'NAME CLASS'; or for a
TFDS split, tfds: its ClassLabel) each record also holds its class index and name (sources.TFRECORD_CLASS_INDEX_KEY,
_NAME_KEY) and index.json the list of classes: labelled shards for evaluate and linear_eval. DIR/.prepare/ keeps what
a re-run needs: the manifest of the input and, per complete shard, its counts and rejected files.

A TFDS split's examples are already in a shuffled order (TFDS shuffles them when it prepares a split), so each shard
takes a contiguous run of them, read from the split's files; --seed does not apply.
"""
import concurrent.futures
import dataclasses
import hashlib
import json
import math
import os
import re
import signal
import sys
import threading
import time

from absl import flags
from absl import logging
import numpy as np
import tensorflow as tf

from context_keras import errors
from context_keras.cli import data as data_flags
from context_keras.cli import program
from context_keras.input import decoding
from context_keras.input import labelled
from context_keras.input import patches as patches_lib
from context_keras.input import sources
from context_keras.input import tfds_source
from context_keras.storage import locks
from context_keras.storage import paths as paths_lib
from context_keras.storage import writes

FLAGS = flags.FLAGS


SHARD_PREFIX = "train"
SHARD_PATTERN = re.compile(r"^(.+)-(\d{5,})-of-(\d{5,})\.tfrecords?$")
PARTIAL_SUFFIX = ".partial"
STATE_DIR = ".prepare"
MANIFEST = "manifest.json"
REJECTED_FILE = "rejected.txt"
INDEX_FILE = "index.json"
PROGRESS_SECONDS = 2.0
JPEG_QUALITY = 95
EXIT_INTERRUPTED = 130


class Interrupted(Exception):
  """A stop was requested (Ctrl+C, SIGTERM) while shards were being written."""


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
  data: str
  output: str
  num_shards: int
  data_root: str | None = None
  max_pixels: int = 0
  max_decode_pixels: int = decoding.MAX_DECODE_PIXELS
  workers: int = os.cpu_count() or 1  # shards written at the same time, one thread each
  seed: int = 0
  labels: str | None = None  # "folders", a labels file, or TFDS_LABELS
  tfds_data_dir: str | None = None


TFDS_LABELS = "tfds"  # --labels of a TFDS split: its ClassLabel


def config_from_flags():
  return PrepareConfig(data=FLAGS.data, output=FLAGS.output, num_shards=FLAGS.num_shards, data_root=FLAGS.data_root,
                       max_pixels=FLAGS.max_pixels, max_decode_pixels=FLAGS.max_decode_pixels,
                       workers=FLAGS.workers, seed=FLAGS.seed, labels=FLAGS.labels,
                       tfds_data_dir=FLAGS.tfds_data_dir)


def labels_of(config):
  """(image paths, {path: (class index, class name)}, classes) of --labels, or (None, None, None) without it."""
  if not config.labels:
    return None, None, None
  if config.labels == "folders":
    found = labelled.class_folders(config.data, "--data")
  else:
    found = labelled.labelled_files(config.data, config.labels, multi_label_hint=labelled.MULTI_LABEL_ELSEWHERE)
  return list(found.paths), {p: (int(k), found.classes[k]) for p, k in zip(found.paths, found.labels)}, found.classes


# --------------------------------------------------------------------------------------------------------------
# The listing, assigned to shards


def shard_name(index, num_shards):
  return f"{SHARD_PREFIX}-{index:05d}-of-{num_shards:05d}.tfrecord"


def assign_shards(paths, num_shards, seed):
  """Contiguous chunks of a seeded permutation of `paths` (in listing order): a pure function of its arguments."""
  order = np.random.default_rng(seed).permutation(len(paths))
  bounds = [i * len(paths) // num_shards for i in range(num_shards + 1)]
  return [[paths[j] for j in order[bounds[i]:bounds[i + 1]]] for i in range(num_shards)]


def make_manifest(config, names, images=None):
  """What identifies a run's input: the listing `names` (the images' names, or a TFDS split's files and runs of
  records) and the image count (default: one image per name)."""
  listing = hashlib.sha256("\n".join(names).encode("utf-8", "surrogateescape")).hexdigest()
  return {"data": config.data, "data_root": config.data_root, "num_shards": config.num_shards,
          "seed": config.seed, "max_pixels": config.max_pixels, "max_decode_pixels": config.max_decode_pixels,
          "images": len(names) if images is None else images, "listing_sha256": listing, "labels": config.labels}


# --------------------------------------------------------------------------------------------------------------
# The input: what each shard holds


@dataclasses.dataclass(frozen=True)
class Plan:
  """What the shards are made of: a description, the manifest's listing and image count, the classes of labelled
  shards, and per shard its image count and its items(): (name in rejected.txt, name in the record, a function
  giving the image's Outcome, (class index, class name) or None) for each of its images."""
  description: str
  listing: list
  images: int
  classes: tuple | None
  sizes: list
  items: object  # items(shard index) -> iterable of (rejected name, record name, examine(), label)


def files_plan(config):
  """Image files (a folder or a list file) in contiguous chunks of a seeded permutation."""
  source = sources.find_source(config.data, config.data_root)
  if source.kind != "files":
    raise errors.DataError(f"--data={config.data} names TFRecord shards; prepare reads a folder of images, a list "
                           "file or a TFDS split")
  if config.labels == TFDS_LABELS:
    raise errors.UsageError(f"--labels={TFDS_LABELS} reads the classes of a TFDS split (--data=tfds:NAME[:SPLIT]); "
                            "for files give --labels=folders or a labels file")
  labelled_paths, labels, classes = labels_of(config)
  paths = labelled_paths or list(source.paths)
  names = dict(zip(paths, sources.relative_names(paths)))
  assigned = assign_shards(paths, config.num_shards, config.seed)

  def items(i):
    # examine is looked up when called (a test counts its calls)
    return [(path, names[path], lambda path=path: examine(path, config.max_pixels, config.max_decode_pixels),
             labels[path] if labels else None) for path in assigned[i]]
  return Plan(source.description, [names[p] for p in paths], len(paths), classes, [len(a) for a in assigned], items)


def tfds_plan(config):
  """A TFDS split: shard i holds its examples i * N // num_shards .. (i + 1) * N // num_shards - 1."""
  if config.labels not in (None, TFDS_LABELS):
    raise errors.UsageError(f"--labels={config.labels}: the labels of a TFDS split come from the split itself: give "
                            f"--labels={TFDS_LABELS}")
  labelled = config.labels == TFDS_LABELS
  source = tfds_source.find(config.data, config.tfds_data_dir, multi_label=False if labelled else None)
  size = source.size
  bounds = [i * size // config.num_shards for i in range(config.num_shards + 1)]
  classes = source.classes.names if labelled else None
  listing = [source.dataset, source.split] + [f"{os.path.basename(p)} {k} {n}"
                                              for p, k, n in zip(source.paths, source.skips, source.takes)]

  def items(i):
    part = source.slice(bounds[i], bounds[i + 1])
    parse = part.class_parser() if labelled else part.image_parser()
    for n, record in enumerate(part.ordered_records(), bounds[i]):
      name = f"{source.dataset} {source.split} {n}"
      try:
        parsed = parse(record)
      except tf.errors.OpError as e:  # a record its file does not deliver
        yield name, name, lambda e=e: Outcome(reason=f"unreadable: {errors.tf_error_message(e, 200)}"), None
        continue
      contents, label = parsed if labelled else (parsed, None)
      yield name, name, lambda contents=contents: examine_contents(contents.numpy(), config.max_pixels,
                                                                   config.max_decode_pixels), (
          (int(label), classes[int(label)]) if labelled else None)
  description = (f"{source.description}{f', classes from {source.classes.name}' if labelled else ''}; shards of "
                 "contiguous runs of its examples")
  return Plan(description, listing, size, classes, [bounds[i + 1] - bounds[i] for i in range(config.num_shards)],
              items)


# --------------------------------------------------------------------------------------------------------------
# The output folder


def prepare_output(output):
  """Checks (and makes) --output and its state folder; returns it normalised (paths.normalise)."""
  if not output:
    raise errors.UsageError("--output is required: the folder for the shards")
  output = writes.check_folder(output, "output")
  writes.check_folder(os.path.join(output, STATE_DIR), "output")
  return output


def check_earlier_run(output, manifest):
  """Refuses an --output holding shards of another --num_shards or another input; else records the manifest."""
  num_shards = manifest["num_shards"]
  expected = {shard_name(i, num_shards) for i in range(num_shards)}
  foreign, other_counts = [], set()
  for name in sorted(paths_lib.listdir(output)):
    if not name.endswith(sources.TFRECORD_SUFFIXES) or name in expected:
      continue
    match = SHARD_PATTERN.match(name)
    if match and match.group(1) == SHARD_PREFIX:
      other_counts.add(int(match.group(3)))
    else:
      foreign.append(name)
  if other_counts:
    counts = ", ".join(str(c) for c in sorted(other_counts))
    raise errors.UsageError(f"--output={output} holds shards of --num_shards={counts}, not {num_shards}: use another "
                            "--output, the same --num_shards, or delete the folder to start over")
  if foreign:
    raise errors.UsageError(f"--output={output} holds other TFRecord files ({', '.join(foreign[:3])}) that training's "
                            f"--data='{os.path.join(output, '*.tfrecord')}' would read too: use another --output")
  manifest_path = os.path.join(output, STATE_DIR, MANIFEST)
  has_shards = any(tf.io.gfile.exists(os.path.join(output, name)) for name in expected)
  if has_shards and tf.io.gfile.exists(manifest_path):
    earlier = json.loads(paths_lib.read_text(manifest_path))
    differences = []
    if (earlier.get("images"), earlier.get("listing_sha256")) != (manifest["images"], manifest["listing_sha256"]):
      differences.append(f"images: {earlier.get('images')} listed from --data={earlier.get('data')} then, "
                         f"{manifest['images']} listed from --data={manifest['data']} now, or other file names")
    for key in ("num_shards", "seed", "max_pixels", "max_decode_pixels", "labels"):
      if earlier.get(key) != manifest[key]:
        differences.append(f"--{key}={earlier.get(key)} then, {manifest[key]} now")
    if differences:
      raise errors.UsageError(f"--output={output} holds shards of a different input ({'; '.join(differences)}): use "
                              "another --output, the earlier flags, or delete the folder to start over")
  elif has_shards:
    raise errors.UsageError(f"--output={output} holds shards without {STATE_DIR}/{MANIFEST}, so their input is "
                            "unknown: use another --output, or delete the folder to start over")
  for name in paths_lib.listdir(output):  # left by a run that was killed
    if name.startswith(SHARD_PREFIX + "-") and name.endswith(PARTIAL_SUFFIX):
      tf.io.gfile.remove(os.path.join(output, name))
  writes.atomic_write(manifest_path, json.dumps(manifest, indent=1) + "\n")



def _state_path(output, name):
  return os.path.join(output, STATE_DIR, name + ".json")


def complete_shard_state(output, name):
  """The recorded state of shard `name` if it is complete (renamed into place, recorded, of the recorded size)."""
  path, state_path = os.path.join(output, name), _state_path(output, name)
  if not (paths_lib.is_file(path) and paths_lib.is_file(state_path)):
    return None
  try:
    state = json.loads(paths_lib.read_text(state_path))
  except (tf.errors.OpError, ValueError):
    return None
  return state if state.get("file") == name and state.get("bytes") == paths_lib.size(path) else None


# --------------------------------------------------------------------------------------------------------------
# One image


@dataclasses.dataclass
class Outcome:
  contents: bytes | None = None  # what the record holds; None when rejected
  reason: str | None = None  # why it was rejected
  height: int = 0
  width: int = 0
  reencoded: bool = False


def examine(path, max_pixels=0, max_decode_pixels=decoding.MAX_DECODE_PIXELS):
  """Reads one image file and decides what its record holds, or why it is rejected. Never raises for a bad file."""
  try:
    contents = paths_lib.read_bytes(path)
  except tf.errors.NotFoundError:
    return Outcome(reason="missing: no such file")
  except tf.errors.PermissionDeniedError:
    return Outcome(reason="unreadable: permission denied")
  except tf.errors.OpError as e:
    if tf.io.gfile.isdir(path):
      return Outcome(reason="unreadable: a folder, not a file")
    return Outcome(reason=f"unreadable: {paths_lib.reason(e)}")
  return examine_contents(contents, max_pixels, max_decode_pixels)


def examine_contents(contents, max_pixels=0, max_decode_pixels=decoding.MAX_DECODE_PIXELS):
  """What the record of an image's encoded bytes holds, or why it is rejected. Never raises for bad bytes."""
  if not contents:
    return Outcome(reason="empty file (0 bytes)")
  header = decoding.image_size_from_header(contents)
  if header is None:
    return Outcome(reason="no readable JPEG, PNG, GIF, BMP or WebP header: not an image, or a corrupt header")
  kind, claimed_width, claimed_height = header
  if claimed_width * claimed_height > max_decode_pixels:
    return Outcome(reason=f"{kind} header claims {claimed_width}x{claimed_height} = "
                          f"{claimed_width * claimed_height / 1e6:.1f} megapixels, more than "
                          f"--max_decode_pixels={max_decode_pixels}; not decoded")
  try:
    image = decoding.decode(contents)
  except tf.errors.OpError as e:
    return Outcome(reason=f"cannot decode: {errors.tf_error_message(e, 200)}")
  height, width = int(image.shape[0]), int(image.shape[1])
  reencode = bool(max_pixels) and height * width > max_pixels
  if reencode:
    scale = math.sqrt(max_pixels / (height * width))
    height, width = max(1, int(height * scale)), max(1, int(width * scale))
  if not patches_lib.can_hold_grid(height, width):
    return Outcome(reason=f"{width}x{height} is too elongated for a grid of {patches_lib.PATCH_SIZE}-px patches",
                   height=height, width=width)
  if reencode:
    small = tf.image.resize(image, [height, width], method="area")
    small = tf.cast(tf.round(tf.clip_by_value(small, 0, 255)), tf.uint8)
    contents = tf.io.encode_jpeg(small, quality=JPEG_QUALITY).numpy()
  return Outcome(contents=contents, height=height, width=width, reencoded=reencode)


def _bytes_feature(value):
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int_feature(value):
  return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))


def make_example(outcome, name, label=None):
  feature = {sources.TFRECORD_IMAGE_KEY: _bytes_feature(outcome.contents),
             "image/height": _int_feature(outcome.height), "image/width": _int_feature(outcome.width),
             "image/filename": _bytes_feature(name.encode("utf-8", "surrogateescape"))}
  if label is not None:
    feature[sources.TFRECORD_CLASS_INDEX_KEY] = _int_feature(label[0])
    feature[sources.TFRECORD_CLASS_NAME_KEY] = _bytes_feature(label[1].encode("utf-8", "surrogateescape"))
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(deterministic=True)


# --------------------------------------------------------------------------------------------------------------
# One shard


class Progress:
  """Images done across threads, reported on stderr at most every PROGRESS_SECONDS."""

  def __init__(self, total, shards):
    self.total, self.shards = total, shards
    self.done = self.rejected = self.shards_done = 0
    self.start = self.last_report = time.monotonic()
    self._lock = threading.Lock()

  def add(self, rejected):
    with self._lock:
      self.done += 1
      self.rejected += int(rejected)

  def shard_done(self):
    with self._lock:
      self.shards_done += 1

  def line(self):
    elapsed = time.monotonic() - self.start
    rate = self.done / elapsed if elapsed > 0 else 0.0
    eta = f"{_duration((self.total - self.done) / rate)}" if rate > 0 else "?"
    percent = 100 * self.done / self.total if self.total else 100
    return (f"{self.done}/{self.total} images ({percent:.0f}%), {self.rejected} rejected, {rate:.1f} images/s, "
            f"ETA {eta}; shards {self.shards_done}/{self.shards}")

  def maybe_report(self, force=False):
    now = time.monotonic()
    if force or now - self.last_report >= PROGRESS_SECONDS:
      self.last_report = now
      print(self.line(), file=sys.stderr, flush=True)


def _duration(seconds):
  seconds = int(round(seconds))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def write_shard(config, output, name, items, progress=None, stop=None):
  """Writes one shard of `items` (Plan.items) under a temporary name, records its state, then renames it into place;
  returns the state."""
  path = os.path.join(output, name)
  partial = path + PARTIAL_SUFFIX
  records = reencoded = 0
  rejected = []
  try:
    with tf.io.TFRecordWriter(partial) as writer:
      for rejected_name, record_name, examine_item, label in items:
        if stop is not None and stop.is_set():
          raise Interrupted()
        try:
          outcome = examine_item()
        except Exception as e:  # pylint: disable=broad-except  # one bad file never stops the others
          outcome = Outcome(reason=f"unexpected error: {type(e).__name__}: {e}")
        if outcome.reason:
          rejected.append([rejected_name, outcome.reason])
        else:
          writer.write(make_example(outcome, record_name, label))
          records += 1
          reencoded += int(outcome.reencoded)
        if progress:
          progress.add(rejected=bool(outcome.reason))
    state = {"file": name, "records": records, "rejected": rejected, "reencoded": reencoded,
             "bytes": paths_lib.size(partial)}
    writes.atomic_write(_state_path(output, name), json.dumps(state) + "\n")
    # One rename locally; on an object store a copy, whose object appears only once whole.
    tf.io.gfile.rename(partial, path, overwrite=True)
  except BaseException:
    if tf.io.gfile.exists(partial):
      tf.io.gfile.remove(partial)
    raise
  if progress:
    progress.shard_done()
  return state


# --------------------------------------------------------------------------------------------------------------
# All shards


def prepare(config, stop=None):
  """Writes the missing shards of `config`, then rejected.txt and index.json; returns the index.

  Raises errors.UsageError or errors.DataError (bad input or output folder) before writing any shard, Interrupted
  when `stop` is set meanwhile (complete shards stay), and data.DataError after writing if no image was usable.
  """
  if not config.num_shards or config.num_shards < 1:
    raise errors.UsageError(f"--num_shards={config.num_shards} must be >= 1")
  plan = tfds_plan(config) if tfds_source.is_tfds(config.data) else files_plan(config)
  config = dataclasses.replace(config, output=prepare_output(config.output))
  # Two runs on one --output would remove each other's partial shards.
  with locks.folder_lock(config.output, "output", "prepare", then="wait for it to finish, or choose another"):
    return _prepare_locked(config, plan, stop)


def _prepare_locked(config, plan, stop):
  check_earlier_run(config.output, make_manifest(config, plan.listing, plan.images))
  if config.num_shards > plan.images:
    logging.warning("--num_shards=%d is more than the %d images: some shards will be empty.", config.num_shards,
                    plan.images)

  shard_names = [shard_name(i, config.num_shards) for i in range(config.num_shards)]
  states = {name: complete_shard_state(config.output, name) for name in shard_names}
  pending = [i for i, name in enumerate(shard_names) if states[name] is None]
  for name in (INDEX_FILE, REJECTED_FILE):  # stale until every shard is complete
    if pending and tf.io.gfile.exists(os.path.join(config.output, name)):
      tf.io.gfile.remove(os.path.join(config.output, name))
  total = sum(plan.sizes[i] for i in pending)
  logging.info("Data: %s. Output: %s: %d shard(s) to write (%d images), %d already complete.", plan.description,
               config.output, len(pending), total, config.num_shards - len(pending))

  start = time.monotonic()
  if pending:
    stop = stop or threading.Event()
    progress = Progress(total, len(pending))
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(config.workers, len(pending)),
                                               thread_name_prefix="prepare") as pool:
      futures = {pool.submit(write_shard, config, config.output, shard_names[i], plan.items(i), progress, stop):
                 shard_names[i] for i in pending}
      try:
        remaining = set(futures)
        while remaining:
          finished, remaining = concurrent.futures.wait(remaining, timeout=PROGRESS_SECONDS / 4,
                                                        return_when=concurrent.futures.FIRST_EXCEPTION)
          for future in finished:
            states[futures[future]] = future.result()  # re-raises a shard's error (a full disk, say)
          progress.maybe_report()
      except BaseException:
        stop.set()
        raise
    progress.maybe_report(force=True)
    if stop.is_set():
      raise Interrupted()

  index = write_index(config, shard_names, [states[name] for name in shard_names], plan.images, plan.classes)
  seconds = time.monotonic() - start
  logging.info("Done in %.1f s: %d shards in %s (%d written, %d kept): %d images in them, %d rejected%s, %d "
               "re-encoded, "
               "%.1f MB. Train with --data='%s'.", seconds, config.num_shards, config.output, len(pending),
               config.num_shards - len(pending), index["records"], index["rejected"],
               f" (listed in {os.path.join(config.output, REJECTED_FILE)})" if index["rejected"] else "",
               index["reencoded"], index["bytes"] / 1e6, os.path.join(config.output, "*.tfrecord"))
  if not index["records"]:
    raise errors.DataError(f"--data={config.data}: none of the {plan.images} images is usable (reasons in "
                           f"{os.path.join(config.output, REJECTED_FILE)})")
  return index


def write_index(config, shard_names, states, num_images, classes=None):
  """rejected.txt (path TAB reason, sorted by path), then index.json, the last file written."""
  rejected = sorted(item for state in states for item in state["rejected"])
  writes.atomic_write(os.path.join(config.output, REJECTED_FILE),
                    "".join(f"{path}\t{reason}\n" for path, reason in rejected))
  index = {
      "shards": [{"file": name, "records": state["records"], "rejected": len(state["rejected"]),
                  "reencoded": state["reencoded"], "bytes": state["bytes"]}
                 for name, state in zip(shard_names, states)],
      "num_shards": len(shard_names),
      "images": num_images,
      "records": sum(state["records"] for state in states),
      "rejected": len(rejected),
      "reencoded": sum(state["reencoded"] for state in states),
      "bytes": sum(state["bytes"] for state in states),
      "feature": sources.TFRECORD_IMAGE_KEY,
      "data": config.data,
      "data_root": config.data_root,
      "seed": config.seed,
      "max_pixels": config.max_pixels,
      "max_decode_pixels": config.max_decode_pixels,
  }
  if classes:
    index.update({"labels": config.labels, "classes": list(classes)})
  writes.atomic_write(os.path.join(config.output, INDEX_FILE), json.dumps(index, indent=1) + "\n")
  return index


def define_flags():
  data_flags.define_source()
  with program.flag_group("prepare"):
    flags.DEFINE_string("output", None, "Folder for the shards, rejected.txt and index.json; re-running the same "
                        "command writes only the missing shards.")
    program.define_integer("num_shards", None, "Number of shards; 100-300 MB each read well (docs/flags.md#prepare).",
                           lower=1)
    program.define_integer("max_pixels", PrepareConfig.max_pixels, "Images with more pixels are downscaled and "
                           "re-encoded as JPEG; 0 keeps every image's bytes (docs/flags.md#prepare).", lower=0)
    program.define_integer("max_decode_pixels", PrepareConfig.max_decode_pixels, "Images whose header claims more "
                           "pixels are rejected undecoded (a guard against decompression bombs).", lower=1)
    program.define_integer("workers", PrepareConfig.workers, "Shards written at the same time, one thread each.",
                           lower=1)
    program.define_integer("seed", PrepareConfig.seed, "Seed of the shuffle that assigns images to shards.", lower=0)
    flags.DEFINE_string("labels", PrepareConfig.labels, "Labelled shards: 'folders' (the class is an image's "
                        f"sub-folder), a labels file of 'NAME CLASS' lines, or '{TFDS_LABELS}' for a tfds: split's "
                        "ClassLabel (docs/flags.md#prepare).")


def main():
  if FLAGS.num_shards is None:
    raise errors.UsageError("--num_shards is required")
  stop = threading.Event()
  signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
  try:
    prepare(config_from_flags(), stop)
  except (Interrupted, KeyboardInterrupt):
    logging.error("Interrupted: complete shards are kept; run the same command again to write the others.")
    return EXIT_INTERRUPTED
  except (OSError, tf.errors.OpError) as e:  # writing a shard failed (a full disk, say); complete shards are kept
    raise errors.WriteError(f"Stopped: {errors.tf_error_message(e)}; complete shards are kept, run the same "
                            "command again to write the others") from e
  return 0


if __name__ == "__main__":
  program.run(main, define_flags)
