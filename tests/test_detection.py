"""Detection transfer (docs/detection.md): the VOCdevkit reader and its bad inputs, the pipelines (fitting, flips,
exact resume), the backbone as a feature pyramid for each tower, keras-hub's RetinaNet with its fixes (prior bias,
per-class decoding), trained batch norm, and python -m context_keras.detect end to end: killed and resumed, stopped
by SIGTERM, its SavedModel giving the boxes it was scored on."""
import json
import os
import re
import shutil
import signal
import sys

import numpy as np
import pytest
import tensorflow as tf

from context_keras import errors
from context_keras.evaluation import detector as D
from context_keras.evaluation import linear_job
from context_keras.evaluation import subject as subject_lib
from context_keras.evaluation import voc_metric
from context_keras.input import voc
from context_keras.model import networks as M
from helpers import last_json
from helpers import log_of
from helpers import run_module
from helpers import start_module
from helpers import wait_for

CLASSES = ("cat", "horse", "motorbike", "person")


def objects_of(root, image_id):
  return voc.parse_annotation((root / "Annotations" / f"{image_id}.xml").read_text()).objects


def test_reads_a_vocdevkit_split(voc_devkit):
  train, test = voc.load(str(voc_devkit), "trainval", "test", "annotations")
  assert train.classes == test.classes == CLASSES
  assert test.size == 8 and not test.skipped.get(voc.NO_OBJECTS)
  # Training leaves difficult objects (and images left without objects) out; the test split keeps them, flagged.
  assert not train.difficult.any() and test.difficult.any()
  for split in (train, test):
    for i in range(split.size):
      annotated = [(CLASSES.index(name), x0, y0, x1, y1) for name, hard, x0, y0, x1, y1
                   in objects_of(voc_devkit, split.ids[i]) if split is test or not hard]
      real = split.labels[i] >= 0
      assert sorted(annotated) == sorted((int(label),) + tuple(box) for label, box
                                         in zip(split.labels[i][real], split.boxes[i][real]))
  assert train.size + train.skipped.get(voc.NO_OBJECTS, 0) == 16
  assert voc.load(str(voc_devkit), "trainval", "test")[0].classes == voc.VOC_CLASSES


def write_xml(path, body, size="<size><width>200</width><height>100</height></size>"):
  path.write_text(f"<annotation>{size}{body}</annotation>")


def box_xml(name, box, difficult=0):
  x0, y0, x1, y1 = box
  return (f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
          f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>")


def test_bad_annotations_and_images_are_skipped_and_counted(voc_devkit, tmp_path, caplog):
  root = tmp_path / "VOC2007"
  for part in ("Annotations", "JPEGImages", os.path.join("ImageSets", "Main")):
    (root / part).mkdir(parents=True)
  cat = box_xml("cat", (1, 1, 50, 50))
  entries = {  # id: annotation (None: no file), whether its image exists
      "good": (cat, True), "no_xml": (None, True), "not_xml": ("this is not XML", True),
      "no_size": (f"<annotation>{cat}</annotation>", True),
      "unicorn": (box_xml("unicorn", (1, 1, 9, 9)) + cat, True),
      "outside": (box_xml("cat", (300, 1, 350, 50)) + cat, True),
      "empty": (box_xml("cat", (60, 1, 50, 50)) + cat, True), "no_objects": ("", True), "no_jpeg": (cat, False),
      "no_box": ("<object><name>cat</name></object>" + cat, True),
      "clipped": (box_xml("cat", (150, 50, 250, 120)), True)}
  jpeg = sorted((voc_devkit / "JPEGImages").iterdir())[0]
  for image_id, (body, has_image) in entries.items():
    if body is not None:
      text = body if body.startswith(("this", "<annotation>")) else (
          f"<annotation><size><width>200</width><height>100</height></size>{body}</annotation>")
      (root / "Annotations" / f"{image_id}.xml").write_text(text)
    if has_image:
      shutil.copy(jpeg, root / "JPEGImages" / f"{image_id}.jpg")
  (root / "ImageSets" / "Main" / "trainval.txt").write_text("\n".join(entries) + "\n")
  (root / "ImageSets" / "Main" / "test.txt").write_text("good\nno_objects\n")
  train, test = voc.load(str(root), "trainval", "test", CLASSES)
  assert train.skipped == {voc.NO_ANNOTATION: 1, voc.MALFORMED: 2, voc.UNKNOWN_CLASS: 1, voc.OUTSIDE: 1,
                           voc.EMPTY_BOX: 1, voc.NO_OBJECTS: 1, voc.NO_IMAGE: 1, voc.BAD_OBJECT: 1, voc.CLIPPED: 1}
  assert train.ids == ("good", "unicorn", "outside", "empty", "no_box", "clipped")
  assert [int((labels >= 0).sum()) for labels in train.labels] == [1, 1, 1, 1, 1, 1]
  assert tuple(train.boxes[-1][0]) == (150, 50, 200, 100)
  # The test split keeps an image without objects: detections there are false positives.
  assert test.ids == ("good", "no_objects") and test.skipped == {voc.NO_OBJECTS: 1}
  logged = caplog.text
  for text in ("no annotation file", "not XML", "no <size>", "unicorn", "no image file", "kept (its detections"):
    assert text in logged


@pytest.mark.parametrize("case, message", [
    ("folder", "not a VOCdevkit folder"), ("split", "--train_split=missing: no "),
    ("tfds", "--data=tfds:voc/2007 --train_split=trainval: "),  # not prepared in an empty data dir
    ("empty", "no usable image"), ("classes", "--classes")])
def test_unusable_data_is_refused_in_one_line(voc_devkit, tmp_path, case, message):
  data, split, classes = str(voc_devkit), "trainval", "voc"
  if case == "folder":
    data = str(tmp_path)
  elif case == "split":
    split = "missing"
  elif case == "tfds":
    data = "tfds:voc/2007"
  elif case == "empty":
    classes = ("aeroplane",)
  elif case == "classes":
    classes = ("cat", "cat")
  with pytest.raises(errors.UsageError) as raised:
    voc.load(data, split, "test", classes, tfds_data_dir=str(tmp_path))
  assert message in str(raised.value) and "\n" not in str(raised.value)
  if case == "split":
    assert "test, trainval" in str(raised.value)


def test_tfds_boxes_recover_the_annotation_numbers():
  height, width = 375, 500
  annotated = np.array([[48, 240, 195, 371], [8, 12, 352, 498]], np.float32)  # xmin, ymin, xmax, ymax
  # TFDS voc stores (ymin / height, xmin / width, ymax / height, xmax / width) in float32.
  normalised = (annotated[:, [1, 0, 3, 2]] / np.array([height, width, height, width])).astype(np.float32)
  assert np.array_equal(voc.tfds_boxes(normalised, height, width), annotated)


def test_fit_resizes_the_longer_side_and_standardises_before_padding():
  image = tf.constant(np.random.default_rng(0).integers(0, 256, (60, 100, 3)), tf.uint8)
  fitted, scale = voc.fit(image, 128, "drop")
  assert fitted.shape == (128, 128, 3)
  assert np.allclose(scale.numpy(), [77 / 60, 128 / 100])
  assert np.all(fitted[77:].numpy() == 0)
  inside = fitted[:77].numpy()
  assert np.allclose(inside.mean(axis=(0, 1)), 0.0, atol=1e-3)  # the padding did not enter the statistics


def test_a_flipped_example_mirrors_its_pixels_and_boxes(voc_devkit):
  train, _ = voc.load(str(voc_devkit), "trainval", "test", "annotations")
  transform = voc.train_transform(128, "none", seed=0, flip=True)
  plain = voc.train_transform(128, "none", seed=0, flip=False)
  args = (train.paths[0], train.boxes[0], train.labels[0])
  reference = plain(tf.constant(0, tf.int64), *args)
  flipped = next(out for out in (transform(tf.constant(i, tf.int64), *args) for i in range(20))
                 if not np.array_equal(out["image"].numpy(), reference["image"].numpy()))
  width = round(train.sizes[0][1] * 128 / max(train.sizes[0]))
  assert np.allclose(flipped["image"][:, :width].numpy(), reference["image"][:, :width][:, ::-1].numpy(), atol=1e-2)
  real = train.labels[0] >= 0
  a, b = reference["boxes"].numpy()[real], flipped["boxes"].numpy()[real]
  assert np.allclose(b[:, [0, 2]], a[:, [0, 2]]) and np.allclose(b[:, 1], width - a[:, 3], atol=1e-3)
  assert np.all(flipped["boxes"].numpy()[~real] == -1) and np.all(flipped["labels"].numpy()[~real] == -1)


def test_the_training_stream_resumes_at_its_position(voc_devkit):
  train, _ = voc.load(str(voc_devkit), "trainval", "test", "annotations")
  whole = [(int(i), p.numpy()) for i, p, _, _ in voc.training_stream(train, 3, 0).take(40)]
  resumed = [(int(i), p.numpy()) for i, p, _, _ in voc.training_stream(train, 3, 23).take(17)]
  assert resumed == whole[23:]
  assert sorted(p for _, p in whole[:train.size]) == sorted(p.encode() for p in train.paths)  # an epoch each once


def test_without_keras_hub_detection_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "keras_hub", None)
  with pytest.raises(errors.UsageError, match=re.escape("pip install context_keras[detection]")):
    D.keras_hub()


def tiny_subject(backbone):
  config = M.ModelConfig(backbone=backbone, width_multiplier=0.0625)
  return subject_lib.Subject(about={}, step=0, model_config=config, color_mode="drop", pixelation=True,
                             features=None).random_init(0)


@pytest.mark.slow  # builds a detector on each tower and runs it eagerly
@pytest.mark.parametrize("backbone, expected", [
    ("alexnet_bn", {3: "conv2", 4: "conv5", 5: "pool5"}), ("vgg16_bn", {3: "conv4_3", 4: "conv5_3", 5: "pool5"}),
    # Our stem and strides: block3 and block4 are both at stride 8, the deepest (block4) is P3.
    ("resnet50", {3: "block4"})])
def test_each_tower_becomes_a_pyramid_and_trains(voc_devkit, backbone, expected):
  train, test = voc.load(str(voc_devkit), "trainval", "test", "annotations")
  subject = tiny_subject(backbone)
  config = D.DetectorConfig(image_size=128, fpn_filters=8, head_convs=1, batch_size=2, train_steps=2, rescale=False,
                            score_threshold=0.001)  # two steps leave most scores near the prior, 0.01
  folded = subject.trainable_backbone()
  levels = D.pyramid_levels(folded, D.PYRAMID_LAYERS[backbone], config)
  assert levels == expected
  detector = D.build(folded, levels, len(train.classes), config)
  assert sorted(detector.model.backbone.output) == ["P3", "P4", "P5", "P6", "P7"]
  assert not any(v.path.startswith(("fc6", "pre_logits")) for v in detector.model.trainable_variables)
  # One step and one detection batch, eagerly (the compiled loops are the program's test): no tracing.
  trainer = D.DetectionTrainer(tf.distribute.get_strategy(), detector, config)
  before = D.weights_digest(detector.model)
  stats = trainer.replica_step(next(iter(voc.train_dataset(train, 128, "drop", 0, 0, linear_job.Pipeline(0, 1, 1, 2)))))
  assert float(stats["nonfinite"]) == 0 and float(stats["positives"]) > 0 and D.weights_digest(detector.model) != before
  found = trainer.replica_detect(next(iter(voc.test_dataset(test, 128, "drop", 1, linear_job.Pipeline(0, 1, 1, 2)))))
  assert found["boxes"].shape == (2, config.max_detections, 4) and int(found["valid"][0]) > 0
  assert float(tf.reduce_min(found["scores"][0, :int(found["valid"][0])])) >= config.score_threshold
  if backbone == "alexnet_bn":
    with pytest.raises(errors.UsageError, match="--image_size=160 must be a multiple of 2\\^--max_level = 128"):
      D.pyramid_levels(folded, D.PYRAMID_LAYERS[backbone], D.DetectorConfig(image_size=160))
    assert D.pyramid_levels(folded, ("conv5",), config) == {4: "conv5"}


@pytest.mark.slow  # builds a detector: ~10 s
def test_retinanet_has_its_prior_on_the_class_head_and_decodes_per_class():
  subject = tiny_subject("alexnet_bn")
  config = D.DetectorConfig(image_size=128, fpn_filters=8, head_convs=1)
  folded = subject.trainable_backbone()
  detector = D.build(folded, D.pyramid_levels(folded, ("conv2", "conv5", "pool5"), config), 3, config)
  model = detector.model
  assert np.allclose(model.classification_head.prediction_layer.bias.numpy(), -np.log(99.0))
  assert np.all(model.box_head.prediction_layer.bias.numpy() == 0)
  assert np.std(model.box_head.conv_layers[0].kernel.numpy()) == pytest.approx(D.HEAD_INIT_STDDEV, rel=0.05)
  # Zero deltas: every box is its anchor. Anchor 100 scores 0.9 for class 0 and 0.8 for class 1 (one box, two
  # classes: class-agnostic NMS would keep one), anchor 101 0.1 for class 2 (kept at score 0.05, not at 0.5).
  anchors = detector.anchors.shape[0]
  logits = np.full((1, anchors, 3), -10.0, np.float32)
  logits[0, 100, :2] = np.log([9.0, 4.0])
  logits[0, 101, 2] = np.log(1 / 9)
  outputs = {"bbox_regression": tf.zeros([1, anchors, 4]), "cls_logits": tf.constant(logits)}
  boxes, scores, classes, valid = detector.decode(outputs, tf.constant([[0.5, 0.5]]), tf.constant([[256.0, 256.0]]))
  n = int(valid[0])
  assert n == 3 and classes[0, :n].numpy().tolist() == [0, 1, 2]
  assert np.allclose(scores[0, :n].numpy(), [0.9, 0.8, 0.1], atol=1e-5)
  clipped = tf.clip_by_value(detector.anchors[100], 0.0, 128.0).numpy() * 2  # fitted image -> original pixels
  assert np.allclose(boxes[0, 0].numpy(), clipped) and np.allclose(boxes[0, 1].numpy(), clipped)


@pytest.mark.slow  # ~10 s
def test_trained_batchnorm_starts_as_the_identity():
  subject = tiny_subject("vgg16_bn")
  folded = subject.trainable_backbone()
  patches = tf.random.normal([8, 96, 96, 3], stddev=30.0)
  prepared = D.insert_batchnorm(folded, D.normalised_layers(subject.model_config), patches)
  norms = [layer for layer in prepared.layers if layer.name.endswith("_bn")]
  assert len(norms) == 14 and all(layer.synchronized for layer in norms)  # 13 convolutions and fc6
  before, after = folded(patches), prepared(patches, training=False)
  for name in ("conv1_1", "conv4_3", "pool5"):
    assert np.allclose(before[name].numpy(), after[name].numpy(), rtol=1e-3, atol=1e-3 * np.abs(before[name]).max())
  # In training mode on the same patches (their batch statistics are the calibration's): the same maps again.
  trained = prepared(patches, training=True)
  assert np.allclose(before["conv4_3"].numpy(), trained["conv4_3"].numpy(), rtol=1e-2,
                     atol=1e-2 * np.abs(before["conv4_3"]).max())


# --------------------------------------------------------------------------------------------------------------
# The program


def detect_args(subject, data, eval_dir, *extra):
  return ["context_keras.detect", *subject, f"--data={data}", f"--eval_dir={eval_dir}", "--classes=annotations",
          "--image_size=128", "--fpn_filters=8", "--head_convs=1", "--batch_size=4", "--train_steps=16",
          "--steps_per_loop=2", "--log_every=2", "--checkpoint_every=4", "--learning_rate=0.005", *extra]


@pytest.mark.slow
def test_detect_resumes_after_kill_stops_on_sigterm_and_exports_the_boxes_it_scored(exported, voc_devkit, tmp_path):
  """Killed (-9) after its first checkpoint, re-run: resumes there; SIGTERM: checkpoint and exit 0; re-run: finishes,
  with per-class AP and mAP in JSON; EVAL/detector, loaded without context_keras's code, finds the same boxes."""
  out, _ = exported
  eval_dir = tmp_path / "eval"
  args = detect_args([f"--saved_model={out / 'backbone'}"], voc_devkit, eval_dir)
  log = tmp_path / "first.txt"
  process = start_module(args, tmp_path, log)
  try:
    wait_for(log, r"Checkpoint \S+ckpt-4 written", process, timeout=300)
    process.send_signal(signal.SIGKILL)
  finally:
    process.wait()
  log = tmp_path / "second.txt"
  process = start_module(args, tmp_path, log)
  try:
    wait_for(log, r"Resumed from \S+ckpt-\d+ at step (\d+)", process, timeout=300)
    wait_for(log, r"step \d+/16", process, timeout=300)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 0, log.read_text()[-3000:]
  finally:
    if process.poll() is None:
      process.kill()
      process.wait()
  text = log.read_text()
  resumed_at = int(re.search(r"Resumed from \S+ckpt-\d+ at step (\d+)", text).group(1))
  stopped = int(re.search(r"Stopped at step (\d+) \(SIGTERM\)", text).group(1))
  assert resumed_at >= 4 and stopped > resumed_at and "Traceback" not in text
  assert tf.train.latest_checkpoint(str(eval_dir)).endswith(f"ckpt-{stopped}")
  assert not (eval_dir / "detect.json").exists()
  final = run_module(args, cwd=tmp_path)
  assert final.returncode == 0, log_of(final)
  result = last_json(final)
  assert result == json.loads((eval_dir / "detect.json").read_text())
  assert result["steps"] == 16 and f"at step {stopped}" in log_of(final)
  assert set(result["per_class_AP"]) == set(CLASSES) and 0 <= result["mAP"] <= 1
  assert result["preparation"] == {"resumed": "the backbone was prepared when the job started"}
  first, last = result["loss"]["first"], result["loss"]["last"]
  assert np.isfinite(first["loss"]) and last["loss"] < first["loss"]
  assert "--init=trained" in (eval_dir / "detect_flags.txt").read_text()

  # The SavedModel (TensorFlow alone: its weights are constants) finds the boxes the job scored.
  detector = tf.saved_model.load(str(eval_dir / "detector"))
  _, test = voc.load(str(voc_devkit), "trainval", "test", "annotations")
  found = [detector.detect(tf.io.decode_jpeg(tf.io.read_file(path), channels=3)) for path in test.paths]
  assert all(f["class_names"].numpy().tolist() == [CLASSES[c].encode() for c in f["classes"].numpy()] for f in found)
  detections = voc_metric.Boxes.of(
      np.concatenate([np.full(len(f["scores"]), i) for i, f in enumerate(found)]),
      np.concatenate([f["classes"].numpy() for f in found]),
      np.concatenate([voc.to_devkit(f["boxes"].numpy().reshape(-1, 4)) for f in found]),
      score=np.concatenate([f["scores"].numpy() for f in found]))
  scores = voc_metric.evaluate(detections, D.ground_truth(test), test.classes)
  assert scores["mAP"] == pytest.approx(result["mAP"], abs=1e-6)
  assert result["detections"] == len(detections.image)
