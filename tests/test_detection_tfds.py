"""Detection on a TFDS split (docs/detection.md §2), on tfds_voc.py's dataset: voc_devkit's images and annotations as
TFDS's voc stores them (prepared once per session in tfds_voc_data_dir). The split reads as the VOCdevkit folder
does (boxes, labels, difficult flags, skips; classes mapped by name), the devkit's split names and TFDS's syntax, its
training stream resumes at any position with each record's own annotations, its images are the folder's, a damaged
file costs only its records, the one-line refusals, and python -m context_keras.detect on it."""
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from context_keras import errors
from context_keras.evaluation import linear_job
from context_keras.input import voc
from helpers import last_json
from helpers import log_of
from helpers import run_cases
from test_detection import detect_args

tfds_voc = pytest.importorskip("tfds_voc", reason="TensorFlow Datasets (the tfds extra) is not installed")

DATA = f"tfds:{tfds_voc.NAME}/{tfds_voc.CONFIG}"
CLASSES = ("cat", "horse", "motorbike", "person")


def by_id(split):
  """{image id: (its size, its objects (class name, difficult, devkit box), sorted)}."""
  found = {}
  for i, image_id in enumerate(split.ids):
    real = split.labels[i] >= 0
    objects = [(split.classes[label], bool(hard), tuple(float(v) for v in box))
               for label, hard, box in zip(split.labels[i][real], split.difficult[i][real], split.boxes[i][real])]
    found[image_id] = (tuple(int(v) for v in split.sizes[i]), sorted(objects))
  return found


def load(data_dir, train="trainval", test="test", classes="annotations", **kwargs):
  return voc.load(DATA, train, test, classes, tfds_data_dir=str(data_dir), **kwargs)


@pytest.mark.parametrize("classes", ["annotations", "voc", ("person", "cat")])
def test_a_tfds_split_reads_as_its_vocdevkit_folder(voc_devkit, tfds_voc_data_dir, classes):
  """The same images, boxes (back in the devkit's integers), labels, difficult flags and skips as the folder's, in
  TFDS's order; the dataset's class names (in another order) are mapped to --classes by name."""
  folder = voc.load(str(voc_devkit), "trainval", "test", classes)
  tfds = load(tfds_voc_data_dir, classes=classes)
  for ours, theirs in zip(tfds, folder):
    assert ours.classes == theirs.classes and ours.skipped == theirs.skipped
    assert by_id(ours) == by_id(theirs)
    assert ours.paths == () and sorted(ours.positions) == list(ours.positions)
  train, test = tfds
  assert train.description == f"TFDS {tfds_voc.NAME}/{tfds_voc.CONFIG}/1.0.0 train+validation"
  assert train.ids != folder[0].ids  # TFDS shuffled the examples: it is the ids that match
  if classes == "voc":
    assert train.classes == voc.VOC_CLASSES and set(train.labels[train.labels >= 0]) <= {7, 12, 13, 14}
  # The images are the folder's files, byte for byte (what the summaries draw).
  files = dict(zip(folder[1].ids, folder[1].paths))
  assert [tf.io.read_file(files[i]).numpy() for i in test.ids[:3]] == voc.stored_images(test, 3)


def test_tfds_split_names_and_syntax(voc_devkit, tfds_voc_data_dir):
  """trainval and val are the devkit's names of train+validation and validation; any TFDS split expression works,
  for training and for testing."""
  trainval = tfds_voc.split_ids(str(voc_devkit), "trainval")
  whole, validation = load(tfds_voc_data_dir, "train+validation", "val")
  half, few = load(tfds_voc_data_dir, "train[:50%]", "test[:4]")
  assert by_id(whole) == by_id(voc.load(str(voc_devkit), "trainval", "test", "annotations")[0])
  assert whole.description.endswith(" train+validation") and validation.description.endswith(" validation")
  assert set(half.ids) < set(whole.ids) <= set(trainval) and set(validation.ids) == set(trainval[8:])
  assert few.size == 4


def stream(split, start, count, seed=3):
  """[(position, image id of the record, its boxes, labels)] of the training stream."""
  parse = split.source.feature_parser([(voc.TFDS_FILENAME,)])
  return [(int(i), os.path.splitext(parse(record)[1][0].numpy().decode())[0], boxes.numpy().tolist(),
           labels.numpy().tolist())
          for i, record, boxes, labels in voc.training_stream(split, seed, start).take(count)]


@pytest.mark.slow  # in-process, but among the fast tier's slowest (docs/testing.md)
@pytest.mark.parametrize("window", [voc.TFDS_WINDOW, 4])
def test_the_tfds_training_stream_resumes_at_its_position(tfds_voc_data_dir, monkeypatch, window):
  """The stream is a pure function of the seed: started at k it reads on as the stream from 0 does after k records,
  every record with its own image's annotations. Only the split's images come (the one without objects is read
  past); windows as large as the split shuffle each epoch whole, smaller ones (4) shuffle consecutive records."""
  monkeypatch.setattr(voc, "TFDS_WINDOW", window)
  train, _ = load(tfds_voc_data_dir)
  whole = stream(train, 0, 40)
  assert [i for i, *_ in whole] == list(range(40))
  for start in (4, 23, 37):
    assert stream(train, start, 40 - start) == whole[start:]
  rows = {image_id: k for k, image_id in enumerate(train.ids)}
  for _, image_id, boxes, labels in whole:
    assert boxes == train.boxes[rows[image_id]].tolist() and labels == train.labels[rows[image_id]].tolist()
  epochs = [sorted(image_id for _, image_id, *_ in whole[k:k + train.size]) for k in (0, train.size)]
  if window >= train.size:
    assert epochs[0] == epochs[1] == sorted(train.ids)
  assert set(image_id for _, image_id, *_ in whole) == set(train.ids)
  assert stream(train, 0, 10, seed=4) != whole[:10]


@pytest.mark.slow  # in-process, but among the fast tier's slowest (docs/testing.md)
def test_tfds_test_images_are_fitted_as_the_folders(voc_devkit, tfds_voc_data_dir):
  """The test pipeline's images, read from the records in listing order, are the folder's same images fitted."""
  _, folder = voc.load(str(voc_devkit), "trainval", "test", "annotations")
  _, test = load(tfds_voc_data_dir)
  ours = next(iter(voc.test_dataset(test, 128, "none", 1, linear_job.Pipeline(0, 1, 1, 8))))
  assert ours["index"].numpy().tolist() == list(range(8)) and float(tf.reduce_min(ours["weight"])) == 1
  fitted = voc.test_transform(128, "none")
  for row, image_id in enumerate(test.ids):
    theirs = fitted(tf.constant(row, tf.int64), folder.paths[folder.ids.index(image_id)])
    for key in ("image", "shape", "scale"):
      np.testing.assert_array_equal(ours[key][row].numpy(), theirs[key].numpy())


def test_a_tfds_training_example_is_the_folders(voc_devkit, tfds_voc_data_dir):
  """A training example of the TFDS stream, flipped or not, is the folder's same image with its boxes."""
  folder, _ = voc.load(str(voc_devkit), "trainval", "test", "annotations")
  train, _ = load(tfds_voc_data_dir)
  position, record, boxes, labels = next(iter(voc.training_stream(train, 0, 5)))
  image_id = train.source.feature_parser([(voc.TFDS_FILENAME,)])(record)[1][0].numpy().decode()
  row = folder.ids.index(os.path.splitext(image_id)[0])
  flipped = []
  for seed in range(4):
    example = voc.train_transform(128, "none", seed, read=train.reader())(position, record, boxes, labels)
    expected = voc.train_transform(128, "none", seed)(position, folder.paths[row], folder.boxes[row],
                                                     folder.labels[row])
    for key in ("image", "boxes", "labels"):
      np.testing.assert_array_equal(example[key].numpy(), expected[key].numpy())
    flipped.append(not np.array_equal(example["image"].numpy(), voc.train_transform(128, "none", seed, flip=False)(
        position, folder.paths[row], folder.boxes[row], folder.labels[row])["image"].numpy()))
  assert any(flipped) and not all(flipped)


@pytest.mark.slow  # in-process, but among the fast tier's slowest (docs/testing.md)
def test_a_damaged_tfds_file_costs_only_its_records(voc_devkit, tfds_voc_data_dir, tmp_path):
  """A record file cut short: the records it lost are counted as unreadable examples, every other image keeps its
  own annotations and is read in the test pipeline."""
  data_dir = tmp_path / "tfds"
  shutil.copytree(tfds_voc_data_dir, data_dir)
  folder = voc.load(str(voc_devkit), "trainval", "test", "annotations")
  damaged = load(data_dir)[1].source.paths[0]  # the first file of the test split
  with open(damaged, "r+b") as f:
    f.truncate(os.path.getsize(damaged) // 2)
  train, test = load(data_dir)
  lost = test.skipped[voc.UNREADABLE_EXAMPLE]
  assert 1 <= lost <= 4 and test.size == 8 - lost
  truth = by_id(folder[1])
  assert by_id(test) == {i: truth[i] for i in test.ids}
  examples = next(iter(voc.test_dataset(test, 128, "none", 1, linear_job.Pipeline(0, 1, 1, 8))))
  assert examples["weight"].numpy().tolist() == [1.0] * test.size + [0.0] * lost


@pytest.mark.parametrize("case, message", [
    ("unprepared", "{prefix} --train_split=trainval: context_keras_voc/2007/1.0.0 is not prepared in {empty} (no "
                   "{empty}/context_keras_voc/2007/1.0.0/dataset_info.json); this program reads prepared datasets "
                   "and never downloads. Prepare it with `tfds build context_keras_voc/2007 --data_dir={empty}` after "
                   "putting what TFDS asks for in its manual_dir ({empty}/downloads/manual, or --manual_dir=DIR): a "
                   "VOCdevkit folder written by tests/voc_set.py"),
    ("split_in_data", "--data={data}:train: name the splits with --train_split and --test_split, not in --data"),
    ("typo", "{prefix} --test_split=tset: split 'tset' of context_keras_voc/2007/1.0.0: Unknown split 'tset'"),
    ("no_boxes", "has no BBoxFeature beside its classes objects/label"),
])
def test_unusable_tfds_sources_are_refused_in_one_line(tfds_voc_data_dir, tmp_path, request, case, message):
  empty = tmp_path / "empty"
  empty.mkdir()
  data, data_dir, test = DATA, tfds_voc_data_dir, "test"
  if case == "unprepared":
    data_dir = empty
  elif case == "split_in_data":
    data = f"{DATA}:train"
  elif case == "typo":
    test = "tset"
  elif case == "no_boxes":  # the tests' photo dataset has objects/label without boxes
    data_dir, data = request.getfixturevalue("tfds_data_dir"), "tfds:context_keras_photos"
  with pytest.raises(errors.UsageError) as raised:
    voc.load(data, "trainval", test, tfds_data_dir=str(data_dir))
  text = str(raised.value)
  assert message.format(prefix=f"--data={DATA}", data=DATA, empty=empty) in text and "\n" not in text
  assert not any(empty.iterdir())  # nothing was downloaded or prepared


@pytest.mark.slow
def test_detect_on_a_tfds_split(exported, tfds_voc_data_dir, tmp_path):
  """python -m context_keras.detect --data=tfds:... (its builder's code not importable there): a short run gives
  exit 0 with per-class AP in JSON; TFDS's voc/2007, not prepared, stops with exit 2 (one process for both)."""
  out, _ = exported
  subject = [f"--saved_model={out / 'backbone'}"]
  empty = tmp_path / "empty"
  empty.mkdir()
  eval_dir = tmp_path / "eval"
  _, _, (unprepared, run) = run_cases("detect", [args[1:] for args in (  # run_cases names the program itself
      detect_args(subject, "tfds:voc/2007", tmp_path / "unprepared", f"--tfds_data_dir={empty}"),
      detect_args(subject, DATA, eval_dir, f"--tfds_data_dir={tfds_voc_data_dir}", "--train_split=train[:75%]",
                  "--test_split=test", "--train_steps=4"))], cwd=tmp_path)
  # Its one line is test_unusable_tfds_sources_are_refused_in_one_line's: in the batch process the last lines of a
  # case can reach the capture after it was read (program.hold_back_native_lines's filter process).
  assert unprepared.returncode == 2 and "Traceback" not in log_of(unprepared) and not any(empty.iterdir())
  assert run.returncode == 0, log_of(run)[-5000:]
  result = last_json(run)
  train, _ = load(tfds_voc_data_dir, "train[:75%]")
  assert list(result["per_class_AP"]) == list(train.classes) and 0 <= result["mAP"] <= 1 and result["steps"] == 4
  assert result["train_images"] == train.size and result["skipped"]["train"] == train.skipped
  assert result["test_images"] == 8 and result["test_unreadable"] == 0 and result["train_unreadable"] == 0
  assert (eval_dir / "detector").is_dir() and "Traceback" not in log_of(run)
