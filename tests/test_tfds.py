"""TFDS splits as a source (input/tfds_source.py), on the tests' photo dataset (tfds_photos.py, prepared once per
session in tfds_data_dir): the split's listing and sub-splits, its seeded stream resuming at any position for any
pipeline, the image decoded as from a file (EXIF included), labelled sets (one class, multi-label with VOC's
difficult objects, a validation split read against other classes), damaged files keeping positions exact, and the
one-line stops (not prepared, a manual download, a typo, TFDS missing). The programs on it are in
test_tfds_programs.py."""
import os
import shutil
import sys

import numpy as np
import pytest
import tensorflow as tf

from context_keras import errors
from context_keras.evaluation import images as IM
from context_keras.evaluation import linear_job as J
from context_keras.input import decoding
from context_keras.input import labelled as L
from context_keras.input import pipeline
from context_keras.input import sources as S
from context_keras.input import tfds_source as T

tfds_photos = pytest.importorskip("tfds_photos", reason="TensorFlow Datasets (the tfds extra) is not installed")

TRAIN = f"tfds:{tfds_photos.NAME}"  # the default split: train


def records(dataset):
  return [bytes(r) for r in dataset.as_numpy_iterator()]


def test_listing_and_the_split_syntax(tfds_data_dir):
  source = S.find_source(TRAIN, tfds_data_dir=str(tfds_data_dir))
  assert source.kind == T.KIND and source.size == 24 and len(source.paths) == 3
  assert S.count_images(source) == 24 and "TFDS context_keras_photos/1.0.0 split train (24 images" in (
      source.description)
  assert len(set(records(source.ordered_records()))) == 24
  # TFDS's own split syntax (slices, unions) and an explicit version.
  part = T.find(f"{TRAIN}:1.0.0:train[:25%]+validation", str(tfds_data_dir))
  assert part.split == "train[:25%]+validation" and part.size == 6 + 9
  assert records(part.ordered_records())[:6] == records(source.ordered_records())[:6]
  # A slice of the listing (prepare's shards, evaluate's --images) reads the same records as the whole.
  assert records(source.slice(5, 19).ordered_records()) == records(source.ordered_records())[5:19]
  assert IM.select_images(source, 10, 0).size == 10
  # The listing's fingerprint (a resume's check) changes with the split.
  assert source.fingerprint() == S.find_source(TRAIN, tfds_data_dir=str(tfds_data_dir)).fingerprint()
  assert source.fingerprint() != part.fingerprint()


@pytest.mark.parametrize("pipelines", [1, 2, 4])
def test_the_stream_resumes_at_any_position(tfds_data_dir, pipelines):
  """Each pipeline's stream is a pure function of (seed, pipeline): started at position k it continues exactly as
  the stream from 0 does after k records. 2 pipelines share out the 3 files, 4 share out records."""
  source = T.find(TRAIN, str(tfds_data_dir))
  streams = [records(source.records(7, 5, 0, p, pipelines).take(60 // pipelines)) for p in range(pipelines)]
  last = streams[-1]  # the last pipeline's: at a window's start, and within one of a later epoch
  for start in (5, len(last) - 4):
    assert records(source.records(7, 5, start, pipelines - 1, pipelines).take(4)) == last[start:start + 4]
  if pipelines == 1:  # windows of 6 divide the epoch: each 24 records hold every example once
    epochs = records(source.records(7, 6, 0).take(48))
    assert len(set(epochs[:24])) == len(set(epochs[24:])) == 24 and epochs[:24] != epochs[24:]
  else:  # the pipelines read disjoint shares of the first epoch (by file or by record), together all of it
    first = [set(stream[:24 // pipelines - 2]) for stream in streams]
    assert not set.intersection(*first)
  assert records(source.records(8, 5, 0, 0, pipelines).take(10)) != streams[0][:10]


@pytest.mark.slow
def test_training_batches_resume_exactly(tfds_data_dir):
  """The input pipeline on a TFDS split: the batches after a batch's `resume` position are those of a pipeline
  started there."""
  config = pipeline.InputConfig(data=TRAIN, tfds_data_dir=str(tfds_data_dir), batch_patches=64, batch_pairs=320,
                                shuffle_buffer=6, seed=3)
  batches = list(pipeline.make_dataset(config).take(5).as_numpy_iterator())
  start = tuple(int(v) for v in batches[1]["resume"])
  resumed = list(pipeline.make_dataset(config, start=start).take(3).as_numpy_iterator())
  for before, after in zip(batches[2:], resumed):
    np.testing.assert_array_equal(before["patches"], after["patches"])
    np.testing.assert_array_equal(before["label"], after["label"])
  assert sum(int(b["unreadable"]) for b in batches) == 0


def test_images_decode_as_files_do_exif_included(tfds_data_dir, tmp_path):
  """The image is TFDS's stored bytes, decoded by decoding.decode as a file is: the crop stored with EXIF
  orientation 6 comes out turned (EXIF_WIDTH x SIDE), pixel for pixel as its bytes written to a file."""
  source = T.find(TRAIN, str(tfds_data_dir), multi_label=False)
  parse = source.class_parser()
  for record in source.ordered_records():
    name = tf.train.Example.FromString(record.numpy()).features.feature["file_name"].bytes_list.value[0].decode()
    if name == tfds_photos.EXIF_ROTATED:
      contents, label = (v.numpy() for v in parse(record))
      assert label == tfds_photos.CLASSES.index("astronaut")
  (tmp_path / "rotated.jpg").write_bytes(contents)
  from_file = decoding.decode(tf.io.read_file(str(tmp_path / "rotated.jpg"))).numpy()
  from_tfds = decoding.decode(tf.constant(contents)).numpy()
  np.testing.assert_array_equal(from_file, from_tfds)
  assert from_tfds.shape == (tfds_photos.EXIF_WIDTH, tfds_photos.SIDE, 3)
  assert tf.io.decode_jpeg(contents).shape == (tfds_photos.SIDE, tfds_photos.EXIF_WIDTH, 3)  # as stored
  S.check_readable(source)


def test_labelled_splits(tfds_data_dir):
  data_dir = str(tfds_data_dir)
  train = L.find(TRAIN, data_flag="--train_data", tfds_data_dir=data_dir)
  assert train.kind == T.KIND and train.classes == tfds_photos.CLASSES and train.size == 24
  labels = [int(y) for _, _, y in L.records(train).as_numpy_iterator()]
  assert sorted(labels) == [0] * 8 + [1] * 8 + [2] * 8
  # Read against a training set's classes, a TFDS set named without a split is its validation split, mapped by
  # class name (here into another order, with a class it does not have).
  other = ("chelsea", "astronaut", "zebra", "coffee")
  val = L.find(TRAIN, data_flag="--val_data", classes=other, tfds_data_dir=data_dir)
  assert val.size == 9 and val.classes == other and "split validation" in val.description
  val_labels = [int(y) for _, _, y in L.records(val).as_numpy_iterator()]
  assert sorted(val_labels) == [0, 0, 0, 1, 1, 1, 3, 3, 3]
  with pytest.raises(errors.DataError, match="classes coffee of its label are not among the 2 classes"):
    L.find(TRAIN, data_flag="--val_data", classes=("chelsea", "astronaut"), tfds_data_dir=data_dir)
  # Multi-label: the objects' classes, VOC's difficult ones ignored (each crop: its photo, and the next photo's class
  # marked difficult).
  multi = L.find(f"{TRAIN}:validation", multi_label=True, tfds_data_dir=data_dir)
  single = [int(y) for _, _, y in L.records(L.find(f"{TRAIN}:validation", tfds_data_dir=data_dir))
            .as_numpy_iterator()]
  rows = np.stack([y for _, _, y in L.records(multi).as_numpy_iterator()])
  assert rows.dtype == np.int8 and rows.shape == (9, 3)
  for k, row in zip(single, rows):
    assert row[k] == L.POSITIVE and row[(k + 1) % 3] == L.IGNORED and row[(k + 2) % 3] == L.NEGATIVE
  # The linear job's stream: exact positions, labels parsed in the transform.
  read = J.read_example(train)

  def stream(start, count):
    return [(int(i), int(y), bytes(b)) for i, b, y in J.training_records(train, 2, start, 6).take(count).map(
        lambda i, x, y: (i, *read(x, y))).as_numpy_iterator()]
  whole = stream(0, 30)
  assert [i for i, _, _ in whole] == list(range(30)) and stream(13, 17) == whole[13:]
  assert sorted(y for _, y, _ in whole[:24]) == sorted(labels)


def test_damaged_files_keep_every_position(tfds_data_dir, tmp_path, capfd):
  """A file cut short delivers stand-ins for the records it lost: parsing one names the file, every later record
  keeps its position, and an image is still found at start."""
  data_dir = tmp_path / "data"
  shutil.copytree(tfds_data_dir, data_dir)
  source = T.find(TRAIN, str(data_dir))
  with open(source.paths[1], "r+b") as f:  # the second file keeps about half of its records
    f.truncate(os.path.getsize(source.paths[1]) // 2)
  intact = records(T.find(TRAIN, str(tfds_data_dir)).ordered_records())
  damaged = records(source.ordered_records())
  assert len(damaged) == 24 and damaged[:8] == intact[:8] and damaged[16:] == intact[16:]
  lost = [r for r in damaged[8:16] if r.startswith(T.MISSING)]
  assert 1 <= len(lost) < 8 and damaged[8:16][:8 - len(lost)] == intact[8:16][:8 - len(lost)]
  assert "delivers fewer than the 8 records its split takes" in capfd.readouterr().err
  with pytest.raises(tf.errors.InvalidArgumentError, match="does not deliver this record"):
    source.image_parser()(tf.constant(lost[0]))
  S.check_readable(source)
  stream = records(source.records(1, 4, 0).take(30))
  assert records(source.records(1, 4, 11).take(19)) == stream[11:]


@pytest.mark.parametrize("data, message", [
    ("tfds:", "name a dataset, tfds:NAME[:SPLIT]"),
    ("tfds:imagenet2021", "no dataset imagenet2021 is registered with TFDS or prepared in {empty} (did you mean "
                          "imagenet2012?)"),
    (TRAIN, "context_keras_photos/1.0.0 is not prepared in {empty} (no {empty}/context_keras_photos/1.0.0/"
            "dataset_info.json); this program reads prepared datasets and never downloads. Prepare it with `tfds "
            "build context_keras_photos --data_dir={empty}`"),
    ("tfds:imagenet2012:validation", "Prepare it with `tfds build imagenet2012 --data_dir={empty}` after putting "
                                     "what TFDS asks for in its manual_dir ({empty}/downloads/manual, or "
                                     "--manual_dir=DIR): manual_dir should contain two files: "
                                     "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar."),
    (f"{TRAIN}:trian", "split 'trian' of context_keras_photos/1.0.0: Unknown split 'trian'"),
    (f"{TRAIN}:train[:0]", "split 'train[:0]' of context_keras_photos/1.0.0 holds no example"),
    (f"{TRAIN}:9.9.9:train", "tfds:context_keras_photos:9.9.9:train: "),
])
def test_bad_tfds_sources_stop_in_one_line(tfds_data_dir, tmp_path, data, message):
  empty = tmp_path / "empty"
  empty.mkdir()
  data_dir = tfds_data_dir if data.startswith(f"{TRAIN}:") else empty
  with pytest.raises(errors.UsageError) as raised:
    S.find_source(data, tfds_data_dir=str(data_dir))
  text = str(raised.value)
  assert text.startswith(f"--data={data}: ") and message.format(empty=empty) in text and "\n" not in text
  assert not any(empty.iterdir())  # nothing was downloaded or prepared


def test_a_version_prepared_elsewhere_is_named(tfds_data_dir, tmp_path):
  data_dir = tmp_path / "data"
  shutil.copytree(tfds_data_dir, data_dir)
  os.rename(data_dir / tfds_photos.NAME / "1.0.0", data_dir / tfds_photos.NAME / "0.9.0")
  with pytest.raises(errors.DataError, match=r"prepared there: version 0\.9\.0 \(name it tfds:context_keras_photos:"
                                             r"0\.9\.0\[:SPLIT\]\)"):
    S.find_source(TRAIN, tfds_data_dir=str(data_dir))


def test_without_tensorflow_datasets_one_line_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import then raises ImportError
  with pytest.raises(errors.UsageError, match=r"--train_data=tfds:imagenet2012: reading a TFDS dataset needs "
                                              r"TensorFlow Datasets \(.*\): pip install context_keras\[tfds\]$"):
    L.find("tfds:imagenet2012", data_flag="--train_data")
