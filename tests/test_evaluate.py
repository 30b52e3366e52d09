"""Evaluation: every mode and --watch on tiny data (well-formed JSON, files, summaries; the program's command lines
all in one process), the pretext protocol's reproducibility, and the linear probe's ability to fail (separable data
-> high accuracy, shuffled labels -> chance)."""
import dataclasses
import glob
import json
import shutil
import subprocess

import keras
import numpy as np
import pytest
import tensorflow as tf

from context_keras import errors
from context_keras.deploy import serving
from context_keras.evaluation import finetune
from context_keras.evaluation import images as IM
from context_keras.evaluation import linear
from context_keras.evaluation import pretext
from context_keras.evaluation import subject as SJ
from context_keras.input import decoding as DEC
from context_keras.input import labelled as labelled_lib
from context_keras.input import sources as S
from context_keras.model import fold as FO
from context_keras.model import networks as MD
from context_keras.training import restore as RS
from context_keras.training import warm_start as WS
from helpers import REPO
from helpers import last_json
from helpers import log_of
from helpers import made_once
from helpers import random_subject
from helpers import run_cases
from helpers import write_png

DEMO = [f"--data={REPO}/flags/demo_photos.txt", "--data_root=package:skimage.data"]


def write_labelled(folder, photo_dir):
  """Three classes (three photos), six 120-px crops each."""
  rng = np.random.default_rng(0)
  for name in ("astronaut.png", "coffee.png", "rocket.jpg"):
    image = DEC.decode(tf.io.read_file(f"{photo_dir}/{name}")).numpy()
    (folder / name.split(".")[0]).mkdir(parents=True)
    for i in range(6):
      y, x = rng.integers(0, image.shape[0] - 120), rng.integers(0, image.shape[1] - 120)
      write_png(str(folder / name.split(".")[0] / f"{i}.png"), image[y:y + 120, x:x + 120])
  return folder


@pytest.fixture(scope="session")
def evaluations(tmp_path_factory, small_run, exported, photo_dir):
  """(FOLDER, {name: CompletedProcess}): the evaluate program in each mode on the small run (its export for one),
  every command line in one process (helpers.run_cases); the results, the labelled folder and the copies they use
  are in FOLDER. Made once per session."""
  out, _ = exported
  with made_once(tmp_path_factory, "evaluations") as (path, make):
    labelled = path / "labelled"
    cases = {
        "pretext": ["--mode=pretext", f"--model_dir={small_run}", f"--eval_dir={path / 'pretext'}", "--images=3",
                    "--pairs_per_image=32", *DEMO],
        "pretext_saved_model": ["--mode=pretext", f"--saved_model={out / 'backbone'}", "--images=2",
                                "--pairs_per_image=16", *DEMO],
        "linear": ["--mode=linear", f"--model_dir={small_run}", f"--eval_dir={path / 'linear'}", f"--data={labelled}",
                   "--folds=3", "--inner_folds=2", "--image_size=96", "--probe_epochs=100", "--probe_dims=500"],
        "knn": ["--mode=knn", f"--model_dir={small_run}", f"--eval_dir={path / 'knn'}", f"--train_data={labelled}",
                f"--val_data={labelled}", "--image_size=96", "--knn_k=1", "--layer=conv3"],
        "multi_label": ["--mode=linear", f"--model_dir={small_run}", f"--eval_dir={path / 'multi_label'}",
                        "--multi_label", f"--train_labels={path}/split/train.txt",
                        f"--val_labels={path}/split/val.txt", "--image_size=96", "--probe_epochs=50",
                        "--layer=conv2"],
        "finetune": ["--mode=finetune", f"--model_dir={small_run}", f"--eval_dir={path / 'finetune'}",
                     f"--data={labelled}", "--folds=3", "--image_size=96", "--finetune_epochs=1",
                     "--freeze_up_to=conv2"],
        "neighbors": ["--mode=neighbors", f"--model_dir={path / 'run'}", "--images=4", "--queries=3", "--top_k=5",
                      "--compare_random_init", *DEMO],
        "watch": ["--mode=pretext", "--watch", f"--model_dir={small_run}", f"--eval_dir={path / 'watch'}",
                  "--images=1", "--pairs_per_image=8", "--watch_timeout=60", "--watch_interval=1", *DEMO],
    }
    if make:
      write_labelled(labelled, photo_dir)
      shutil.copytree(labelled, path / "split")
      lines = [f"{name}/{i}.png {name}{',rocket' if name == 'coffee' else ''}"
               for name in ("astronaut", "coffee", "rocket") for i in range(6)]
      (path / "split" / "train.txt").write_text("\n".join(lines[0::2]) + "\n")
      (path / "split" / "val.txt").write_text("\n".join(lines[1::2]) + "\n")
      shutil.copytree(small_run, path / "run")  # neighbors' results go into RUN/eval
      _, _, results = run_cases("evaluate", list(cases.values()), cwd=path, timeout=900)
      (path / "results.json").write_text(json.dumps([vars(r) for r in results]))
  results = [subprocess.CompletedProcess(**r) for r in json.loads((path / "results.json").read_text())]
  return path, dict(zip(cases, results))


def evaluated(evaluations, name):
  """The JSON result that the evaluate command line `name` printed last."""
  result = evaluations[1][name]
  assert result.returncode == 0, log_of(result)[-5000:]
  return last_json(result)


def events(folder):
  return glob.glob(str(folder / "events.out.tfevents.*"))


@pytest.mark.slow
def test_pretext_writes_json_and_summaries(evaluations):
  eval_dir = evaluations[0] / "pretext"
  result = evaluated(evaluations, "pretext")
  assert result == json.loads((eval_dir / "pretext.json").read_text())
  assert result["mode"] == "pretext" and result["step"] == 10 and result["chance"] == 0.125
  assert 0 <= result["accuracy"] <= 1 and result["images"] == 3 and result["pairs"] == 3 * 32
  confusion = np.array(result["confusion_matrix"])
  assert confusion.shape == (8, 8) and confusion.sum() == result["pairs"]
  assert result["accuracy"] == pytest.approx(confusion.trace() / confusion.sum())
  assert list(result["per_class_accuracy"]) == ["up-left", "up", "up-right", "left", "right", "down-left", "down",
                                                "down-right"]
  assert events(eval_dir)


@pytest.mark.slow
def test_pretext_is_reproducible_and_uses_training_geometry(small_run, photo_dir, demo_list):
  subject = SJ.from_run(RS.load_run(str(small_run)))
  config = pretext.Config(data=demo_list, data_root=photo_dir, images=2, pairs_per_image=40, seed=5,
                          color_mode="drop", pixelation=True)
  first = pretext.evaluate(subject, config).metrics
  again = pretext.evaluate(subject, config).metrics
  other = pretext.evaluate(subject, dataclasses.replace(config, seed=6)).metrics
  assert first["confusion_matrix"] == again["confusion_matrix"]
  assert first["confusion_matrix"] != other["confusion_matrix"]
  assert first["data"] == IM.select_images(S.find_source(demo_list, photo_dir), 2, seed=5).description
  image = DEC.decode(tf.io.read_file(f"{photo_dir}/astronaut.png"))
  pairs = pretext.pretext_pairs(image, tf.constant([1, 2], tf.int64), 256, "drop", True)
  assert pairs["usable"] and pairs["label"].shape == (256,)
  assert len(np.unique(np.stack([pairs["first"], pairs["second"]], 1), axis=0)) == 256  # drawn without replacement


@pytest.mark.slow
def test_pretext_from_saved_model(evaluations, exported):
  out, _ = exported
  result = evaluated(evaluations, "pretext_saved_model")
  assert result["saved_model"].endswith("backbone") and result["pairs"] == 32
  assert (out / "eval" / "pretext.json").exists() and events(out / "eval")


@pytest.mark.slow
def test_saved_model_names_the_backbone_to_give_and_training_exports_keep_their_step(exported, small_run):
  """--saved_model (evaluate's and linear_eval's) and --init_from given an export folder, its pair classifier or a run
  directory say which folder to give; RUN/export/backbone_N, written by training, knows its step and checkpoint."""
  out, _ = exported
  for given in (out, out / "pair_classifier"):
    with pytest.raises(errors.UsageError, match=f"give .*--saved_model={out / 'backbone'}"):
      SJ.from_saved_model(str(given))
    with pytest.raises(errors.UsageError, match=f"--init_from={out / 'backbone'}"):
      WS.find_source(str(given))
  with pytest.raises(errors.UsageError, match=f"--saved_model={small_run} is a training run: give --model_dir="
                                              f"{small_run}"):
    SJ.from_saved_model(str(small_run))
  backbone = small_run / "export" / "backbone_10"
  subject = SJ.from_saved_model(str(backbone))
  assert subject.step == 10 and subject.about["checkpoint"] == str(small_run / "ckpt-10")
  record = WS.initialise(RS.build_networks(subject.model_config), subject.model_config, str(backbone))
  assert record["step"] == 10 and record["checkpoint"] == str(small_run / "ckpt-10")


@pytest.mark.slow
def test_linear_probes_every_layer(evaluations):
  eval_dir = evaluations[0] / "linear"
  result = evaluated(evaluations, "linear")
  assert result == json.loads((eval_dir / "linear.json").read_text())
  for key in ("accuracy", "balanced_accuracy", "random_init_accuracy", "random_init_balanced_accuracy"):
    assert 0 <= result[key] <= 1 and result[key + "_std"] >= 0, key
  assert result["classes"] == ["astronaut", "coffee", "rocket"] and result["images"] == 18
  per_layer = result["per_layer"]
  assert list(per_layer) == ["conv1", "conv2", "conv3", "conv4", "conv5", "pool5", "fc6"]
  for name, entry in per_layer.items():
    assert 0 <= entry["accuracy"] <= 1 and 0 <= entry["random_init_accuracy"] <= 1 and entry["accuracy_std"] >= 0
    # 1/16 width: conv1 24x24x6 -> 9x9x6 = 486, fc6 1x1x256 (wider than 500 / 4: global pooling).
    assert entry["dims"] <= 500 or name == "fc6", (name, entry["dims"])
  assert per_layer["conv1"]["dims"] == 9 * 9 * 6 and per_layer["fc6"]["dims"] == 256
  assert result["accuracy"] == max(e["accuracy"] for e in per_layer.values())
  assert result["accuracy"] == per_layer[result["best_layer"]]["accuracy"]
  assert result["random_init_accuracy"] == per_layer[result["random_init_best_layer"]]["random_init_accuracy"]
  assert len(result["layers"]) == 3 and set(result["layers"]) <= set(per_layer)  # --inner_folds: chosen per fold
  assert events(eval_dir)
  log = log_of(evaluations[1]["linear"])
  assert "features: 18/18 images" in log and "probe conv1 (486 dims)" in log  # progress lines


@pytest.mark.slow
def test_knn_and_multi_label_linear_on_splits(evaluations):
  """k-NN between a training and a validation split; multi-label probes scored by mAP."""
  result = evaluated(evaluations, "knn")
  # Every validation image is also a training image: its nearest neighbour is itself.
  assert result["accuracy"] == 1.0 and result["per_layer"].keys() == {"conv3"} and result["val_images"] == 18
  result = evaluated(evaluations, "multi_label")
  assert result["protocol"] == "split" and result["train_images"] == 9 and result["val_images"] == 9
  for key in ("map_auc", "map_11point", "random_init_map_auc", "random_init_map_11point"):
    assert 0 < result[key] <= 1, key
  assert result["per_class_ap"].keys() == {"astronaut", "coffee", "rocket"}
  assert result["images_per_class"] == [6, 6, 12]  # positives, training and validation


@pytest.mark.slow
def test_finetune_against_random_init(evaluations):
  result = evaluated(evaluations, "finetune")
  assert result["train_images"] == 12 and result["val_images"] == 6 and result["frozen_layers"] == ["conv1", "conv2"]
  for who in ("", "random_init_"):
    assert 0 <= result[who + "accuracy"] <= 1
    assert all(np.isfinite(result[who + "loss_per_epoch"])) and len(result[who + "loss_per_epoch"]) == 1
    assert result[who + "rescale"]["patches"] > 0  # neither backbone was rescaled before: both are, first
  assert result["rescaled_before_training"]


@pytest.mark.slow
def test_neighbors_writes_json_and_image(evaluations):
  result = evaluated(evaluations, "neighbors")
  eval_dir = evaluations[0] / "run" / "eval"
  assert result == json.loads((eval_dir / "neighbors.json").read_text())
  assert result["queries"] == 3 and result["images"] == 4 and result["layer"] == "fc6"
  for key in ("mean_top1_similarity", "random_init_mean_top1_similarity"):
    assert -1 <= result[key] <= 1
  image = tf.io.decode_png(tf.io.read_file(str(eval_dir / "neighbors.png")))
  assert image.shape[0] == 6 * (96 + 4) + 4  # a trained and a random-init row per query
  assert events(eval_dir)


@pytest.mark.slow
def test_watch_evaluates_checkpoints_until_the_end(evaluations):
  result = evaluations[1]["watch"]
  assert result.returncode == 0, log_of(result)
  lines = [json.loads(line) for line in result.stdout.strip().splitlines()]
  assert lines[-1]["step"] == 10 and lines[-1]["checkpoint"].endswith("ckpt-10")


# ------------------------------------------------------------------------------------------------------------
# The probe can fail


def blobs(rng, classes=4, per_class=40, dim=24, separation=6.0):
  centres = rng.normal(0, separation, (classes, dim))
  labels = np.repeat(np.arange(classes), per_class)
  return (centres[labels] + rng.normal(0, 1, (len(labels), dim))).astype(np.float32), labels


def test_linear_probe_separable_high_shuffled_chance():
  rng = np.random.default_rng(0)
  features, labels = blobs(rng)
  probe = linear.LinearProbe(epochs=150)
  separable = linear.cross_validate({"x": features}, labels, folds=5, seed=0, probe=probe)
  assert separable["accuracy"] > 0.95 and separable["balanced_accuracy"] > 0.95
  shuffled = linear.cross_validate({"x": features}, rng.permutation(labels), folds=5, seed=0, probe=probe)
  assert abs(shuffled["accuracy"] - 0.25) < 0.12, shuffled
  assert separable["accuracy"] - shuffled["accuracy"] > 0.6


def test_layer_is_chosen_on_training_folds_only():
  rng = np.random.default_rng(1)
  signal, labels = blobs(rng, classes=3, per_class=20)
  noise = rng.normal(size=signal.shape).astype(np.float32)
  result = linear.cross_validate({"noise": noise, "signal": signal}, labels, folds=3, seed=0, inner_folds=2,
                            probe=linear.LinearProbe(epochs=100))
  assert result["layers"] == ["signal"] * 3 and result["accuracy"] > 0.9


def test_stratified_folds_balance_classes():
  labels = np.array([0] * 10 + [1] * 7 + [2] * 5)
  folds = linear.stratified_folds(labels, 5, seed=3)
  np.testing.assert_array_equal(folds, linear.stratified_folds(labels, 5, seed=3))
  for c, count in ((0, 10), (1, 7), (2, 5)):
    per_fold = np.bincount(folds[labels == c], minlength=5)
    assert per_fold.max() - per_fold.min() <= 1 and per_fold.sum() == count
  sizes = np.bincount(folds)
  assert sizes.max() - sizes.min() <= 1


@pytest.mark.slow
def test_trainable_copy_of_an_export_computes_its_features(exported):
  """Fine-tuning starts from a Keras copy of the SavedModel's weights (matched by name): the same maps."""
  out, _ = exported
  subject = SJ.from_saved_model(str(out / "backbone"))
  images = tf.constant(np.random.default_rng(0).integers(0, 256, (2, 100, 100, 3)), tf.uint8)
  copy = subject.trainable_backbone()(serving.preprocess(images, subject.color_mode))
  expected = subject.features(images)
  for name in subject.feature_layers:
    np.testing.assert_allclose(copy[name], expected[name], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_multi_label_fine_tuning_ignores_difficult_entries():
  """One step of the multi-label fine-tuner on a tiny random network: finite loss, and an IGNORED target is not
  learned from (changing it changes nothing)."""
  model_config = MD.ModelConfig(width_multiplier=0.0625)
  images = tf.constant(np.random.default_rng(0).integers(0, 256, (4, 96, 96, 3)), tf.uint8)
  config = finetune.Config(epochs=1, learning_rate=0.1)
  logits = []
  for ignored in (1, 0):
    keras.utils.set_random_seed(0)
    backbone = FO.fold_tower(RS.build_networks(model_config).tower, model_config)
    tuner = finetune.FineTuner(backbone, "fc6", 3, True, "drop", config, steps=10)
    targets = tf.constant([[1, 0, -1], [0, 1, 0], [1, 1, 0], [0, 0, 1]], tf.int8)
    if not ignored:
      targets = tf.constant([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]], tf.int8)
    loss, _ = tuner.train_step(images, targets)
    assert np.isfinite(loss)
    logits.append(tuner.logits(images).numpy())
  assert not np.allclose(logits[0], logits[1])  # the entry matters when it is a label
  keras.utils.set_random_seed(0)
  backbone = FO.fold_tower(RS.build_networks(model_config).tower, model_config)
  tuner = finetune.FineTuner(backbone, "fc6", 3, True, "drop", config, steps=10)
  tuner.train_step(images, tf.constant([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1]], tf.int8) * 0 - 1)
  np.testing.assert_allclose(tuner.logits(images).numpy(), 0.0, atol=1e-6)  # all ignored: nothing learned


@pytest.mark.slow  # fine-tunes two small networks twice
def test_finetune_says_rescaled_only_when_it_rescaled(tmp_path, photo_dir):
  """A residual tower is not rescaled (the calibration is defined for chains, method.md §5.2): the result says so
  and does not claim it rescaled; a chain tower is, and says so."""
  labelled = tmp_path / "labelled"
  write_labelled(labelled, photo_dir)
  for model, rescaled in (({"backbone": "resnet18"}, False), ({}, True)):
    result = finetune.evaluate(random_subject(**model), finetune.Config(
        splits=labelled_lib.Splits(data=str(labelled)), folds=3, image_size=96, epochs=1, batch_size=8,
        rescale_patches=16)).metrics
    assert result["rescaled_before_training"] is rescaled, (model, result)
    for who in ("", linear.RANDOM):
      assert ("skipped" not in result[who + "rescale"]) is rescaled, (model, result[who + "rescale"])
