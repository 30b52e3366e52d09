"""Labelled data and the scores of the labelled protocols (fast): labels files and ImageNet's layout, labelled shards of
prepare --labels and of the common ImageNet converters (and a linear evaluation on them), the messages of bad
labelled inputs, per-layer pooling, average precision against a hand-computed
example, k-NN that can fail, and the linear job's input stream and its exact resume."""
import json

from absl import logging as absl_logging
import numpy as np
import pytest
import tensorflow as tf

from context_keras import errors
from context_keras import prepare as PR
from context_keras.evaluation import features as F
from context_keras.evaluation import finetune
from context_keras.evaluation import knn
from context_keras.evaluation import linear
from context_keras.evaluation import linear_job as J
from context_keras.evaluation import metrics as M
from context_keras.evaluation import subject as SJ
from context_keras.input import labelled as L
from context_keras.model import networks as MD
from helpers import random_subject
from helpers import write_png


def image(value, size=100):
  return np.full((size, size, 3), value, np.uint8)


@pytest.fixture
def imagenet(tmp_path):
  """ImageNet's layout in small: train/<synset>/*.JPEG (PNG bytes), val/ flat with a labels file."""
  for synset, count in (("n01440764", 3), ("n01443537", 2), ("n01484850", 2)):
    (tmp_path / "train" / synset).mkdir(parents=True)
    for i in range(count):
      write_png(tmp_path / "train" / synset / f"{synset}_{i}.JPEG", image(40 * i))
  (tmp_path / "val").mkdir()
  for i in range(4):
    write_png(tmp_path / "val" / f"ILSVRC2012_val_{i:08d}.JPEG", image(10 * i))
  (tmp_path / "val.txt").write_text("# name synset\nILSVRC2012_val_00000000 n01443537\n"
                                    "ILSVRC2012_val_00000001.JPEG n01440764\nILSVRC2012_val_00000002 2\n"
                                    "ILSVRC2012_val_00000003 n01443537\n")
  return tmp_path


def test_imagenet_layout_with_a_labels_file(imagenet):
  train = L.find(str(imagenet / "train"), data_flag="--train_data")
  assert train.classes == ("n01440764", "n01443537", "n01484850") and train.size == 7
  assert train.labels.tolist() == [0, 0, 0, 1, 1, 2, 2] and train.counts().tolist() == [3, 2, 2]
  val = L.find(str(imagenet / "val"), str(imagenet / "val.txt"), "--val_data", "--val_labels", classes=train.classes)
  # Names without their extension, and a 0-based index into the training classes, both resolve.
  assert [p.rsplit("/", 1)[1] for p in val.paths] == [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(4)]
  assert val.labels.tolist() == [1, 0, 2, 1] and val.classes == train.classes
  records = list(L.records(val).as_numpy_iterator())
  assert [int(r[0]) for r in records] == [0, 1, 2, 3] and [int(r[2]) for r in records] == [1, 0, 2, 1]


@pytest.mark.parametrize("case, message", [
    ("missing_class_folder", "--train_data={root}/nowhere: {root}/nowhere is not a folder"),
    ("empty_class", "class n01484850 has no image"),
    ("missing_files", "2 of the 3 images it names are not in {root}/val: ILSVRC2012_val_00000008 (line 2), "
                      "ILSVRC2012_val_00000009 (line 3)"),
    ("out_of_range", "line 1: label 3 is out of range: there are 3 classes (0-based indices 0-2)"),
    ("unknown_class", "line 1: label 'n99999999' is not one of the 3 classes"),
    ("two_labels", "line 1 gives 2 labels, not 1 (pass --multi_label"),
    ("one_class", "needs at least 2 subfolders of images (classes)"),
])
def test_bad_labelled_inputs_name_the_problem(imagenet, case, message):
  root = imagenet
  train_dir, val_file = str(root / "train"), root / "bad.txt"
  if case == "missing_class_folder":
    train_dir = str(root / "nowhere")
  elif case == "empty_class":
    for f in (root / "train" / "n01484850").iterdir():
      f.unlink()
  elif case == "one_class":
    (root / "single" / "only").mkdir(parents=True)
    write_png(root / "single" / "only" / "a.png", image(1))
    train_dir = str(root / "single")
  val_file.write_text({"missing_files": "ILSVRC2012_val_00000000 0\nILSVRC2012_val_00000008 0\n"
                                        "ILSVRC2012_val_00000009 1\n",
                       "out_of_range": "ILSVRC2012_val_00000000 3\n",
                       "unknown_class": "ILSVRC2012_val_00000000 n99999999\n",
                       "two_labels": "ILSVRC2012_val_00000000 n01440764,n01443537\n"}.get(case, "x 0\n"))
  with pytest.raises(errors.UsageError) as raised:
    train = L.find(train_dir, data_flag="--train_data")
    L.find(str(root / "val"), str(val_file), "--val_data", "--val_labels", classes=train.classes)
  assert message.format(root=root) in str(raised.value)


def test_multi_label_file_with_ignored_classes(tmp_path):
  for i in range(3):
    write_png(tmp_path / f"{i}.png", image(i))
  (tmp_path / "labels.txt").write_text("0.png cat,dog\n1.png ?cat\n2.png dog, ?person\n")
  found = L.find(None, str(tmp_path / "labels.txt"), multi_label=True)
  assert found.classes == ("cat", "dog", "person") and found.multi_label
  assert found.labels.tolist() == [[1, 1, 0], [-1, 0, 0], [0, 1, -1]]
  assert found.counts().tolist() == [1, 2, 0]


def examples(lset, records):
  """[(position, label, encoded bytes)] of the linear job's (position, path or record, label) records, each read as
  its transform reads it."""
  read = J.read_example(lset)
  return [(int(i), int(y), bytes(b)) for i, b, y in records.map(lambda i, x, y: (i, *read(x, y))).as_numpy_iterator()]


@pytest.mark.slow  # in-process, but among the fast tier's slowest (docs/testing.md)
def test_prepare_labels_round_trip(imagenet, tmp_path):
  # Without a training set to index into, prepare reads every label as a class name.
  (imagenet / "val_synsets.txt").write_text((imagenet / "val.txt").read_text().replace(" 2\n", " n01484850\n"))
  for labels, data, shards in (("folders", imagenet / "train", tmp_path / "train"),
                               (str(imagenet / "val_synsets.txt"), imagenet / "val", tmp_path / "val")):
    PR.prepare(PR.PrepareConfig(data=str(data), output=str(shards), num_shards=2, labels=labels))
  train = L.find(str(tmp_path / "train" / "*.tfrecord"))
  assert train.kind == "tfrecord" and train.classes == ("n01440764", "n01443537", "n01484850") and train.size == 7
  index = json.loads((tmp_path / "val" / "index.json").read_text())
  assert index["classes"] == ["n01440764", "n01443537", "n01484850"] and index["records"] == 4
  val = L.find(str(tmp_path / "val" / "*.tfrecord"), classes=train.classes)
  by_name = {}
  for record in tf.data.TFRecordDataset(list(val.paths)):
    example = tf.train.Example.FromString(record.numpy()).features.feature
    name = example["image/filename"].bytes_list.value[0].decode()
    by_name[name] = (example["image/class/index"].int64_list.value[0],
                     example["image/class/name"].bytes_list.value[0].decode())
  assert by_name == {"ILSVRC2012_val_00000000.JPEG": (1, "n01443537"), "ILSVRC2012_val_00000001.JPEG":
                     (0, "n01440764"), "ILSVRC2012_val_00000002.JPEG": (2, "n01484850"),
                     "ILSVRC2012_val_00000003.JPEG": (1, "n01443537")}
  labels = sorted(int(label) for _, _, label in L.records(val).as_numpy_iterator())
  assert labels == [0, 1, 1, 2]
  # The linear job's stream of shards: every record once per epoch, resumable at any position.
  stream = examples(train, J.training_records(train, 1, 0, 3).take(17))
  assert sorted(y for _, y, _ in stream[:7]) == [0, 0, 0, 1, 1, 2, 2] and stream[:7] != stream[7:14]
  assert examples(train, J.training_records(train, 1, 9, 3).take(8)) == stream[9:]
  # The same shards compressed with GZIP (told by their content, as training's) give the same records and streams.
  (tmp_path / "gzip").mkdir()
  for name in ("train", "val"):
    (tmp_path / "gzip" / name).mkdir()
    (tmp_path / "gzip" / name / "index.json").write_text((tmp_path / name / "index.json").read_text())
    for shard in sorted((tmp_path / name).glob("*.tfrecord")):
      with tf.io.TFRecordWriter(str(tmp_path / "gzip" / name / shard.name), "GZIP") as writer:
        for record in tf.data.TFRecordDataset(str(shard)):
          writer.write(record.numpy())
  gzip_train = L.find(str(tmp_path / "gzip" / "train" / "*.tfrecord"))
  gzip_val = L.find(str(tmp_path / "gzip" / "val" / "*.tfrecord"), classes=train.classes)
  assert [c for c, _, _ in gzip_train.shards] == ["GZIP", "GZIP"]
  assert sorted(int(label) for _, _, label in L.records(gzip_val).as_numpy_iterator()) == [0, 1, 1, 2]
  assert examples(gzip_val, J.val_records(gzip_val)) == examples(val, J.val_records(val))
  assert examples(gzip_train, J.training_records(gzip_train, 1, 0, 3).take(17)) == stream
  # Shards of unlabelled images are refused with the way to make labelled ones.
  PR.prepare(PR.PrepareConfig(data=str(imagenet / "val"), output=str(tmp_path / "plain"), num_shards=1))
  with pytest.raises(errors.DataError, match="lists no classes.*prepare --labels"):
    L.find(str(tmp_path / "plain" / "*.tfrecord"))


def converter_example(contents, label, synset=None, text=None, name="x.JPEG"):
  """A record as TF models' inception/data/build_imagenet_data.py writes it (its feature keys, 1-based labels)."""
  def ints(*values):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=list(values)))

  def data(*values):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v.encode() if isinstance(v, str) else v
                                                                  for v in values]))

  def floats(*values):
    return tf.train.Feature(float_list=tf.train.FloatList(value=list(values)))
  feature = {"image/height": ints(100), "image/width": ints(100), "image/colorspace": data("RGB"),
             "image/channels": ints(3), "image/class/label": ints(label), "image/object/bbox/xmin": floats(0.1),
             "image/object/bbox/xmax": floats(0.9), "image/object/bbox/ymin": floats(0.1),
             "image/object/bbox/ymax": floats(0.9), "image/object/bbox/label": ints(label),
             "image/format": data("PNG"), "image/filename": data(name), "image/encoded": data(contents)}
  if synset is not None:
    feature["image/class/synset"] = data(synset)
  if text is not None:
    feature["image/class/text"] = data(text)
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_converter_shards(folder, examples, num_shards=2, prefix="train"):
  """`examples` (serialised records) dealt round-robin into NAME-0000k-of-0000n shards, as the converters name them."""
  folder.mkdir(parents=True)
  for k in range(num_shards):
    with tf.io.TFRecordWriter(str(folder / f"{prefix}-{k:05d}-of-{num_shards:05d}")) as writer:
      for example in examples[k::num_shards]:
        writer.write(example)
  return f"{folder}/{prefix}-*"


SYNSETS = {1: ("n01440764", "tench"), 2: ("n01443537", "goldfish"), 3: ("n01484850", "great white shark")}


def png(value):
  return tf.io.encode_png(image(value)).numpy()


@pytest.mark.slow  # in-process, but among the fast tier's slowest (docs/testing.md)
def test_shards_of_the_imagenet_converters(tmp_path, caplog, monkeypatch):
  """Shards in the converters' schema, without an index.json: the classes come from a scan of their labels, 1-based
  (0 = background), named by their synsets; a validation set lacking a class is read against the training set's."""
  # absl's logger, whatever an earlier test in this process made of it, passes INFO records on to caplog.
  monkeypatch.setattr(absl_logging.get_absl_logger(), "propagate", True)
  monkeypatch.setattr(absl_logging.get_absl_logger(), "filters", [])
  caplog.set_level("INFO")
  caplog.set_level("INFO", logger="absl")
  train_labels = [1, 2, 3, 1, 2, 3, 1]
  train = L.find(write_converter_shards(tmp_path / "train", [
      converter_example(png(10 * i), k, *SYNSETS[k]) for i, k in enumerate(train_labels)]), data_flag="--train_data")
  assert train.kind == "tfrecord" and train.classes == ("n01440764", "n01443537", "n01484850") and train.size == 7
  assert "image/class/label 1-based (1..3; 0 is the background class" in caplog.text
  assert "names from image/class/synset" in caplog.text
  assert sorted(int(y) for _, _, y in L.records(train).as_numpy_iterator()) == sorted(k - 1 for k in train_labels)
  val = L.find(write_converter_shards(tmp_path / "val", [
      converter_example(png(5), 3, *SYNSETS[3]), converter_example(png(6), 2, *SYNSETS[2])], 1, "validation"),
      data_flag="--val_data", classes=train.classes)
  assert val.classes == train.classes and [int(y) for _, _, y in L.records(val).as_numpy_iterator()] == [2, 1]
  # The linear job reads them too, at exact positions.
  stream = examples(train, J.training_records(train, 1, 0, 3).take(10))
  assert sorted(y for _, y, _ in stream[:7]) == sorted(k - 1 for k in train_labels)
  assert examples(train, J.training_records(train, 1, 4, 3).take(6)) == stream[4:]
  # Without names, the class is named by its number; 0-based labels are told by a 0 among them.
  numbered = L.find(write_converter_shards(tmp_path / "numbered", [
      converter_example(png(i), k) for i, k in enumerate([0, 1, 2, 1])]))
  assert numbered.classes == ("0", "1", "2") and "image/class/label 0-based (0..2)" in caplog.text
  assert [int(y) for _, _, y in L.records(numbered).as_numpy_iterator()] == [0, 2, 1, 1]


@pytest.mark.parametrize("examples_of, message", [
    (lambda: [converter_example(png(1), 1, "n1"), converter_example(png(2), 1, "n2")],
     "class 1 is 'n1' in one record and 'n2' in another (image/class/synset)"),
    (lambda: [converter_example(png(1), 1)] + [
        tf.train.Example(features=tf.train.Features(feature={"image/encoded": tf.train.Feature(
            bytes_list=tf.train.BytesList(value=[png(2)]))})).SerializeToString()],
     "1 of the 2 records have no image/class/label"),
    (lambda: [tf.train.Example(features=tf.train.Features(feature={"image/encoded": tf.train.Feature(
        bytes_list=tf.train.BytesList(value=[png(2)]))})).SerializeToString()],
     "the records hold no class (image/class/label or image/class/index) and there is no index.json beside the "
     "shards"),
])
def test_converter_shards_that_cannot_be_read_stop_at_start(tmp_path, examples_of, message):
  pattern = write_converter_shards(tmp_path / "shards", examples_of(), 1)
  with pytest.raises(errors.DataError) as raised:
    L.find(pattern, data_flag="--train_data")
  assert str(raised.value).startswith(f"--train_data={pattern}: ") and message in str(raised.value)


@pytest.mark.slow  # trains probes on the features of two small random networks
def test_linear_evaluation_on_converter_shards(tmp_path):
  """evaluate --mode=linear (in process) on shards in the converters' schema: horizontal and vertical stripes, which
  even a random network's conv1 tells apart, score near 1 with the 1-based labels read right (read off by one, every
  label would be wrong or out of range)."""
  rng = np.random.default_rng(0)

  def stripes(horizontal):
    period, phase = rng.integers(8, 17), rng.uniform(0, 2 * np.pi)
    wave = 127 + 100 * np.sin(2 * np.pi * np.arange(100) / period + phase)
    pixels = np.repeat((wave[:, None] if horizontal else wave[None, :]) * np.ones((100, 100)), 3).reshape(100, 100, 3)
    return np.clip(pixels + rng.normal(0, 20, pixels.shape), 0, 255).astype(np.uint8)

  def shards(folder, count, prefix):
    records = []
    for i in range(count):
      k = 1 + i % 2  # 1 = horizontal stripes, 2 = vertical ones
      records.append(converter_example(tf.io.encode_png(stripes(k == 1)).numpy(), k, *SYNSETS[k]))
    return write_converter_shards(folder, records, 2, prefix)
  tiny = SJ.Subject(about={}, step=0, model_config=MD.ModelConfig(width_multiplier=0.0625), color_mode="drop",
                    pixelation=True, features=None)
  config = linear.Config(splits=L.Splits(train_data=shards(tmp_path / "train", 24, "train"),
                                         val_data=shards(tmp_path / "val", 10, "validation")),
                         image_size=96, layer="conv1", probe_epochs=100)
  result = linear.evaluate(tiny.random_init(1), config).metrics
  assert result["classes"] == ["n01440764", "n01443537"] and result["images_per_class"] == [17, 17]
  assert result["accuracy"] >= 0.9


def test_pooling_plans_stay_within_the_budget():
  assert F.plan_layer(48, 48, 96, 9000) == F.LayerPool("avg", 48, 48, 96, 9, 9)      # 7,776 values
  assert F.plan_layer(6, 6, 384, 9000).dims == 4 * 4 * 384                             # 6,144
  assert F.plan_layer(3, 3, 256, 9000).mode == "flat"                                  # 2,304: kept as is
  assert F.plan_layer(1, 1, 4096, 9000).dims == 4096
  assert F.plan_layer(5, 5, 4096, 9000).dims == 4096                                   # wider than the budget
  # Kolesnikov et al.'s max pooling: ResNet-50 x2 on a 64-px patch (revisiting.md §3).
  assert [F.plan_layer(h, h, c, 9000, "max").dims for h, c in ((32, 128), (32, 512), (16, 1024), (8, 2048),
                                                                 (8, 4096))] == [8192, 8192, 4096, 8192, 4096]
  maps = tf.reshape(tf.range(2 * 5 * 5 * 3, dtype=tf.float32), [2, 5, 5, 3])
  pooled = F.pool(maps, F.LayerPool("avg", 5, 5, 3, 2, 2)).numpy().reshape(2, 2, 2, 3)
  np.testing.assert_allclose(pooled[0, 0, 0], maps[0, :3, :3].numpy().mean((0, 1)))   # bins overlap at odd sizes
  np.testing.assert_allclose(pooled[1, 1, 1], maps[1, 2:, 2:].numpy().mean((0, 1)))


def test_patch_grid_is_row_major():
  images = tf.reshape(tf.range(2 * 6 * 6 * 3), [2, 6, 6, 3])
  patches = F.cut_patch_grid(images, 3).numpy()
  assert patches.shape == (18, 2, 2, 3)
  np.testing.assert_array_equal(patches[5], images[0, 2:4, 4:6])  # row 1, column 2
  np.testing.assert_array_equal(patches[9], images[1, 0:2, 0:2])


def test_average_precision_by_hand():
  # Ranking by score: + - + (ignored) - +; 3 positives.
  scores = np.array([0.9, 0.8, 0.7, 0.65, 0.6, 0.5])
  targets = np.array([1, 0, 1, -1, 0, 1])
  # Precision/recall after each kept image: 1/1 @1/3, 1/2 @1/3, 2/3 @2/3, 2/4 @2/3, 3/5 @1.
  # AUC: interpolated precision 1 on (0, 1/3], 2/3 on (1/3, 2/3], 3/5 on (2/3, 1].
  assert M.average_precision(scores, targets) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
  # 11-point: t = 0..0.3 -> 1 (4 points), 0.4..0.6 -> 2/3 (3), 0.7..1.0 -> 3/5 (4).
  assert M.average_precision(scores, targets, eleven_point=True) == pytest.approx((4 + 3 * 2 / 3 + 4 * 3 / 5) / 11)
  result = M.mean_average_precision(np.stack([scores, -scores], 1), np.stack([targets, targets], 1), ["a", "b"])
  assert result["per_class_ap"]["a"] == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
  assert result["map_auc"] == pytest.approx((result["per_class_ap"]["a"] + result["per_class_ap"]["b"]) / 2)
  assert np.isnan(M.average_precision(scores, np.zeros(6)))


def test_multi_label_probe_ranks_separable_classes():
  rng = np.random.default_rng(0)
  labels = (rng.random((120, 3)) < 0.4).astype(np.int8)
  features = (labels * 4.0 + rng.normal(0, 1, labels.shape)).astype(np.float32)
  labels[0, 0] = -1
  splits = [(np.arange(80), np.arange(80, 120))]
  result = linear.probe_layer(features, labels, splits, ["a", "b", "c"], linear.LinearProbe(epochs=100))
  assert result["map_auc"] > 0.95 and result["map_11point"] > 0.9
  shuffled = linear.probe_layer(features, labels[rng.permutation(120)], splits, ["a", "b", "c"],
                                linear.LinearProbe(epochs=100))
  assert shuffled["map_auc"] < 0.75


def blobs(rng, classes=4, per_class=40, dim=16, separation=6.0):
  centres = rng.normal(0, separation, (classes, dim))
  labels = np.repeat(np.arange(classes), per_class)
  return (centres[labels] + rng.normal(0, 1, (len(labels), dim))).astype(np.float32), labels


def test_knn_separable_near_one_shuffled_near_chance():
  rng = np.random.default_rng(0)
  features, labels = blobs(rng)
  features = knn.normalise(features)
  queries, train = np.arange(0, 160, 4), np.setdiff1d(np.arange(160), np.arange(0, 160, 4))
  # The training split is streamed in chunks of 7: the merged top k equals one pass over everything.
  scores = knn.knn_scores(features[queries], knn.chunked(features[train], labels[train], 7), 20, 0.07, 4)
  assert knn.accuracies(scores, labels[queries])["accuracy"] > 0.95
  whole = knn.knn_scores(features[queries], [(features[train], labels[train])], 20, 0.07, 4)
  np.testing.assert_allclose(scores, whole, rtol=1e-5)
  shuffled = rng.permutation(labels)
  scores = knn.knn_scores(features[queries], knn.chunked(features[train], shuffled[train], 7), 20, 0.07, 4)
  assert abs(knn.accuracies(scores, shuffled[queries])["accuracy"] - 0.25) < 0.2


def test_training_stream_resumes_at_any_position(tmp_path):
  for i in range(5):
    (tmp_path / f"c{i % 2}").mkdir(exist_ok=True)
    write_png(tmp_path / f"c{i % 2}" / f"{i}.png", image(i))
  lset = L.find(str(tmp_path))

  def take(start, count):
    return [(int(i), p.decode(), int(y)) for i, p, y in
            J.training_records(lset, seed=3, start=start, shuffle_buffer=4).take(count).as_numpy_iterator()]
  stream = take(0, 17)
  assert [s[0] for s in stream] == list(range(17))
  assert all(sorted(s[1] for s in stream[e * 5:e * 5 + 5]) == sorted(lset.paths) for e in range(3))  # epochs
  assert stream[:5] != stream[5:10]  # a new permutation every epoch
  assert take(7, 10) == stream[7:]
  assert take(7, 10) != [(i, p, y) for i, p, y in (
      (int(i), p.decode(), int(y)) for i, p, y in
      J.training_records(lset, seed=4, start=7, shuffle_buffer=4).take(10).as_numpy_iterator())]


@pytest.mark.slow  # in-process, but among the fast tier's slowest (docs/testing.md)
def test_unreadable_images_become_blank_examples_in_place(tmp_path):
  for i in range(4):
    (tmp_path / f"c{i % 2}").mkdir(exist_ok=True)
    write_png(tmp_path / f"c{i % 2}" / f"{i}.png", image(60 * i))
  (tmp_path / "c1" / "9.png").write_bytes(b"not an image")
  lset = L.find(str(tmp_path))
  config = J.JobConfig(crop_size=96, resize_size=100, batch_size=5)
  batch = next(iter(J.val_dataset(lset, config, 1, J.Pipeline(0, 1, 1, 5))))
  assert batch["index"].numpy().tolist() == [0, 1, 2, 3, 4]
  assert batch["weight"].numpy().tolist() == [1, 1, 1, 1, 0]  # 9.png, listed last, is blank
  assert batch["image"].shape == (5, 96, 96, 3)


@pytest.fixture(scope="module")
def damaged_shards(tmp_path_factory):
  """Labelled shards of prepare --labels, 2 classes, training 16 images in 2 shards and validation 8 in 2: one
  training shard with a corrupt record in its middle, one validation shard cut short. (train glob, val glob)."""
  root = tmp_path_factory.mktemp("damaged_labelled")
  rng = np.random.default_rng(0)
  globs = []
  for split, per_class in (("train", 8), ("val", 4)):
    for name, low in (("dark", 0), ("bright", 140)):
      (root / split / name).mkdir(parents=True)
      for i in range(per_class):
        write_png(root / split / name / f"{i}.png", rng.integers(low, low + 115, (100, 100, 3), dtype=np.uint8))
    PR.prepare(PR.PrepareConfig(data=str(root / split), output=str(root / f"{split}_shards"), num_shards=2,
                                labels="folders"))
    globs.append(str(root / f"{split}_shards" / "*.tfrecord"))
  shard = sorted((root / "train_shards").glob("*.tfrecord"))[1]
  corrupt = bytearray(shard.read_bytes())
  corrupt[len(corrupt) // 2] ^= 0xFF
  shard.write_bytes(bytes(corrupt))
  shard = sorted((root / "val_shards").glob("*.tfrecord"))[0]
  shard.write_bytes(shard.read_bytes()[:len(shard.read_bytes()) * 2 // 3])
  return tuple(globs)


@pytest.mark.slow
def test_damaged_labelled_shards_give_their_records_then_unreadable_blanks_in_every_reader(damaged_shards):
  """A corrupt record in the middle of a training shard, a validation shard cut short: every reader of labelled
  shards (the linear job's training and validation streams; evaluate's linear, knn and finetune modes) reads the
  records up to the damage and counts each record it could not read as one unreadable image, in place, so that an
  epoch keeps the length the shards' index gives (the job's positions stay exact); nothing raises."""
  train_glob, val_glob = damaged_shards
  train, val = L.Splits(train_data=train_glob, val_data=val_glob).find()
  assert train.size == 16 and val.size == 8
  config = J.JobConfig(crop_size=96, resize_size=100, batch_size=4, shuffle_buffer=4)
  for lset, dataset in ((train, J.train_dataset(train, config, 0, J.Pipeline(0, 1, 1, 4))),
                        (val, J.val_dataset(val, config, 2, J.Pipeline(0, 1, 1, 4)))):
    examples = [b for _, b in zip(range(2 * lset.size // 4 if lset is train else 2), dataset)]
    weights = np.concatenate([b["weight"].numpy() for b in examples])
    indices = np.concatenate([b["index"].numpy() for b in examples])
    assert indices.tolist() == list(range(len(indices)))  # one example per position, in order
    epochs = len(weights) // lset.size
    blanks = [int((weights[e * lset.size:(e + 1) * lset.size] == 0).sum()) for e in range(epochs)]
    assert all(0 < b < lset.size // 2 for b in blanks) and len(set(blanks)) == 1, blanks  # the same every epoch
  subject = random_subject()
  splits = L.Splits(train_data=train_glob, val_data=val_glob)
  for protocol, protocol_config in (
      (linear, linear.Config(splits=splits, image_size=96, probe_epochs=5, layer="conv1")),
      (knn, knn.Config(splits=splits, image_size=96, layer="conv1", k=3)),
      (finetune, finetune.Config(splits=splits, image_size=96, epochs=1, batch_size=8, rescale=False))):
    result = protocol.evaluate(subject, protocol_config).metrics
    assert 0 < result["train_unreadable"] < 8 and 0 < result["val_unreadable"] < 4, (protocol.NAME, result)
    assert result["train_images"] + result["train_unreadable"] == 16, (protocol.NAME, result)
    assert result["val_images"] + result["val_unreadable"] == 8, (protocol.NAME, result)


def _brightness_features(images):
  """A stand-in backbone: the image's brightness on a 4x4 grid (it separates dark from bright images)."""
  return {"conv1": tf.image.resize(tf.cast(images, tf.float32) / 255.0, [4, 4])}


@pytest.mark.slow  # trains the heads
def test_linear_job_is_a_pure_function_of_its_seed_and_resumes_exactly(tmp_path):
  """Two jobs of the same seed give the same losses and heads (their initialisation included: three identical runs
  of linear_eval differed by 11 points of top-1), and a job restored from its checkpoint at step 2 ends where an
  uninterrupted one does."""
  rng = np.random.default_rng(0)
  for name, low in (("dark", 0), ("bright", 140)):
    (tmp_path / name).mkdir()
    for i in range(8):
      write_png(tmp_path / name / f"{i}.png", rng.integers(low, low + 115, (100, 100, 3), dtype=np.uint8))
  lset = L.find(str(tmp_path))
  config = J.JobConfig(crop_size=96, resize_size=100, batch_size=4, epochs=1, learning_rate=1.0)
  strategy = tf.distribute.get_strategy()

  def job(start=0, restore_from=None, steps=4):
    extractor = F.Extractor(_brightness_features, F.plan(_brightness_features, ["conv1"], 96, 64))
    trainer = J.HeadTrainer(strategy, extractor, 2, config, J.steps_per_epoch(lset.size, 4))
    if restore_from:
      tf.train.Checkpoint(**trainer.checkpoint_items()).restore(restore_from).assert_consumed()
    iterator = iter(J.distributed(strategy, 4, lambda pipeline: J.train_dataset(lset, config, start, pipeline)))
    losses = [float(trainer.train_loop(iterator, tf.constant(1))["loss_conv1"]) for _ in range(steps)]
    return trainer, losses

  first, losses = job()
  again, same = job()
  assert same == losses and J.weights_digest(again.heads) == J.weights_digest(first.heads)
  half, _ = job(steps=2)
  saved = tf.train.Checkpoint(**half.checkpoint_items()).save(str(tmp_path / "ckpt"))
  resumed, rest = job(start=2 * 4, restore_from=saved, steps=2)
  assert rest == losses[2:] and J.weights_digest(resumed.heads) == J.weights_digest(first.heads)


def _class_folders(root, classes, per_class, size=100):
  rng = np.random.default_rng(classes * 100 + per_class)
  for c in range(classes):
    (root / f"class{c}").mkdir(parents=True)
    for i in range(per_class):
      write_png(root / f"class{c}" / f"{i}.png", rng.integers(40 * c % 200, 40 * c % 200 + 55, (size, size, 3),
                                                               dtype=np.uint8))
  return root


@pytest.mark.slow  # features of two small networks
def test_knn_refuses_or_says_what_it_used_and_top5_only_where_it_means_something(tmp_path, caplog):
  """k-NN cross-validated on one image per class is refused as the linear probe refuses it (every test image's
  class was absent from its training folds: 0.0); a k above the training images says which k voted; top-5 accuracy is
  left out with five classes or fewer (it is always 1.0 there)."""
  subject = random_subject()
  single = _class_folders(tmp_path / "single", 3, 1)
  for protocol, config in ((knn, knn.Config(splits=L.Splits(data=str(single)), image_size=96, folds=2)),
                           (linear, linear.Config(splits=L.Splits(data=str(single)), image_size=96, folds=2))):
    with pytest.raises(errors.UsageError, match=r"--folds=2 needs at least 2 images in every class of --data="):
      protocol.evaluate(subject, config)
  few = _class_folders(tmp_path / "few", 3, 2)
  result = knn.evaluate(subject, knn.Config(splits=L.Splits(train_data=str(few), val_data=str(few)), image_size=96,
                                            k=20, layer="conv1")).metrics
  assert result["k"] == 6 and result["knn_k"] == 20 and "top5_accuracy" not in result, result
  assert "--knn_k=20 is more than the 6 training images: all 6 vote" in caplog.text
  many = _class_folders(tmp_path / "many", 6, 2)
  result = knn.evaluate(subject, knn.Config(splits=L.Splits(data=str(many)), image_size=96, folds=2, k=3,
                                            layer="conv1")).metrics
  assert result["k"] == 3 and "knn_k" not in result and "top5_accuracy" in result, result


def test_training_images_among_the_validation_images_are_named(imagenet, tmp_path, caplog):
  """--train_data equal to --val_data (a folder, its labels file, shards), or validation images that are training
  images too, give a warning naming them: the validation score would measure memorisation (accuracy 1.0)."""
  train = str(imagenet / "train")
  L.Splits(train_data=train, val_data=train).find()
  assert f"--train_data and --val_data name the same 7 images (folder {train}" in caplog.text
  caplog.clear()
  (imagenet / "mixed.txt").write_text("n01440764/n01440764_0.JPEG n01440764\nn01443537/n01443537_1.JPEG n01443537\n")
  L.Splits(train_data=train, val_data=train, val_labels=str(imagenet / "mixed.txt")).find()
  assert "2 of the 2 validation images are training images too (" in caplog.text
  caplog.clear()
  L.Splits(train_data=train, val_data=str(imagenet / "val"), val_labels=str(imagenet / "val.txt")).find()
  assert "validation images" not in caplog.text and "same" not in caplog.text
  PR.prepare(PR.PrepareConfig(data=train, output=str(tmp_path / "shards"), num_shards=2, labels="folders"))
  shards = str(tmp_path / "shards" / "*.tfrecord")
  L.Splits(train_data=shards, val_data=shards).find()
  assert "--train_data and --val_data name the same 2 TFRecord shards" in caplog.text


@pytest.mark.slow  # trains the heads
def test_linear_job_scores_multi_label_sets_by_average_precision(tmp_path):
  """VOC 2007's classification at scale: one logistic regression per class and layer, IGNORED entries left out of the
  loss and of the ranking, per-class AP and mAP from every validation image's scores; prepare, which writes one
  class per image, says where a multi-label set goes instead of suggesting a flag it does not have."""
  rng = np.random.default_rng(0)
  lines = []
  for i in range(24):
    bright = i % 2 == 0
    write_png(tmp_path / f"{i}.png", rng.integers(140 if bright else 0, 255 if bright else 115, (100, 100, 3),
                                                  dtype=np.uint8))
    lines.append(f"{i}.png {'bright' if bright else 'dark'},{'?' if i % 5 == 0 else ''}any")
  (tmp_path / "labels.txt").write_text("\n".join(lines) + "\n")
  lset = L.find(None, str(tmp_path / "labels.txt"), multi_label=True)
  assert lset.classes == ("any", "bright", "dark")
  config = J.JobConfig(crop_size=96, resize_size=100, batch_size=4, epochs=3, learning_rate=1.0)
  strategy = tf.distribute.get_strategy()
  extractor = F.Extractor(_brightness_features, F.plan(_brightness_features, ["conv1"], 96, 64))
  trainer = J.HeadTrainer(strategy, extractor, 3, config, J.steps_per_epoch(lset.size, 4), multi_label=True)
  iterator = iter(J.distributed(strategy, 4, lambda pipeline: J.train_dataset(lset, config, 0, pipeline)))
  values = trainer.train_loop(iterator, tf.constant(J.total_steps(config, lset.size)))
  assert np.isfinite(float(values["loss_conv1"])) and float(values["examples"]) == 72
  steps = J.val_steps(lset.size, 4)
  dataset = J.distributed(strategy, 4, lambda pipeline: J.val_dataset(lset, config, steps, pipeline))
  per_layer, examples, unreadable = trainer.evaluate_multi_label(dataset, steps, lset.classes)
  assert examples == 24 and unreadable == 0
  assert per_layer["conv1"]["per_class_ap"]["bright"] > 0.95 and per_layer["conv1"]["per_class_ap"]["dark"] > 0.95
  assert 0 < per_layer["conv1"]["map_auc"] <= 1 and per_layer["conv1"]["dims"] == 48
  with pytest.raises(errors.DataError, match="labelled shards hold one class per image: give a multi-label set to "
                                             "evaluate or linear_eval"):
    PR.prepare(PR.PrepareConfig(data=str(tmp_path), output=str(tmp_path / "shards"), num_shards=1,
                                labels=str(tmp_path / "labels.txt")))


@pytest.mark.slow  # evaluates two sets of heads
def test_linear_job_reports_top5_only_with_more_than_five_classes(tmp_path):
  """Top-5 accuracy is always 1.0 with five classes or fewer: the linear job leaves it out there."""
  extractor = F.Extractor(_brightness_features, F.plan(_brightness_features, ["conv1"], 96, 64))
  config = J.JobConfig(crop_size=96, resize_size=100, batch_size=4)
  strategy = tf.distribute.get_strategy()
  for classes in (3, 6):
    lset = L.find(str(_class_folders(tmp_path / str(classes), classes, 2)))
    trainer = J.HeadTrainer(strategy, extractor, classes, config, 1)
    steps = J.val_steps(lset.size, 4)
    dataset = J.distributed(strategy, 4, lambda pipeline, lset=lset: J.val_dataset(lset, config, steps, pipeline))
    per_layer, examples, _ = trainer.evaluate(dataset, steps, lset.classes)
    assert examples == lset.size and ("top5" in per_layer["conv1"]) is (classes > 5), per_layer
