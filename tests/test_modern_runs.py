"""The modern towers through the programs (method.md §8): short runs of ResNet-50 in the revisiting geometry and of
VGG-16-BN in the original's, each resumed exactly, exported (folded, uint8 signature, rescaling where it applies)
and evaluated; the epoch schedule; learning above chance; two replicas and bfloat16."""
import json
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from context_keras.deploy import serving as SV
from context_keras.input import pipeline as D
from context_keras.model import caffe_layers as CL
from context_keras.model import networks as M
from context_keras.training import restore as RS
from context_keras.training import trainer as trainer_lib
from context_keras.training import warm_start as WS
from helpers import REPO
from helpers import demo_args
from helpers import last_json
from helpers import log_of
from helpers import run_all
from helpers import run_cases
from helpers import run_module

pytestmark = pytest.mark.slow

DEMO = [f"--data={REPO}/flags/demo_photos.txt", "--data_root=package:skimage.data"]
# 4 images (36 patches, 32 pairs) per step; an epoch of 12 images is 3 steps.
# --train_steps=0: demo.cfg's 1000 steps would contradict --train_epochs. --augment_on=device: the revisiting
# augmentation in the step (the VGG run's is on the host).
RESNET = ["--train_steps=0", "--augment_on=device", "--backbone=resnet50", "--geometry=revisiting", "--head=revisiting",
          "--batch_patches=36", "--batch_pairs=32", "--learning_rate=0.1", "--lr_scale_images=256", "--momentum=0.9",
          "--l2_tower=1e-4", "--l2_head=5e-4", "--loss_reduction=mean", "--bn_momentum=0.9", "--epoch_images=12",
          "--warmup_epochs=1", "--lr_schedule=steps", "--lr_decay_epochs=1", "--checkpoint_every=3", "--deterministic"]
VGG = ["--backbone=vgg16_bn", "--checkpoint_every=2", "--deterministic", "--bn_momentum=0.9"]


def assert_same_checkpoints(a, b):
  """Every weight, statistic and input position of two checkpoints, exactly (op determinism)."""
  first, second = tf.train.load_checkpoint(str(a)), tf.train.load_checkpoint(str(b))
  names = first.get_variable_to_shape_map()
  assert names == second.get_variable_to_shape_map()
  compared = 0
  for name in names:
    if "_trainable_variables" in name or name.startswith(("tower", "head", "input_positions")):
      np.testing.assert_array_equal(first.get_tensor(name), second.get_tensor(name), err_msg=name)
      compared += 1
  assert compared > 80  # VGG-16-BN with the doersch head: 93 entries


def resumed_exactly(tmp_path, common, whole_steps, part_steps):
  """Runs whole_steps in one go and, at the same time, part_steps; then resumes the second to whole_steps."""
  results = run_all([(demo_args(tmp_path / "whole", *common, whole_steps), None),
                     (demo_args(tmp_path / "parts", *common, part_steps), None)], tmp_path, timeout=600)
  for code, text in results:
    assert code == 0, text[-3000:]
  rest = run_module(demo_args(tmp_path / "parts", *common, whole_steps), cwd=tmp_path)
  assert rest.returncode == 0 and "Resumed from" in log_of(rest), log_of(rest)
  return results[0][1], log_of(rest)


def test_resnet_revisiting_run_resumes_exactly_exports_and_evaluates(tmp_path):
  whole, rest = resumed_exactly(tmp_path, RESNET, "--train_epochs=2", "--train_epochs=1")
  # Epochs counted in steps of the global batch: 12 images / 4 per step = 3 steps; the rate 0.1 x 4 / 256.
  assert "An epoch: 12 images, 3 steps of 4 images." in whole and "Training finished at step 6" in whole
  assert ": 0.1 per 256 images, for 4 images per step." in whole
  assert "Resumed from" in rest and "at step 3" in rest
  assert_same_checkpoints(tmp_path / "whole" / "ckpt-6", tmp_path / "parts" / "ckpt-6")
  config = json.loads((tmp_path / "whole" / "config.json").read_text())
  assert config["optimisation"]["warmup_steps"] == 3 and config["optimisation"]["lr_decay_steps"] == [3]
  assert config["optimisation"]["train_steps"] == 6 and config["model"]["patch_size"] == 64
  assert config["optimisation"]["learning_rate"] == pytest.approx(0.1 * 4 / 256)

  out = tmp_path / "out"
  _, _, (refused, exported) = run_cases("export", [  # in one process
      [f"--model_dir={tmp_path / 'whole'}", f"--output={tmp_path / 'r'}", "--rescale_data=" + DEMO[0][len("--data="):],
       DEMO[1]],
      [f"--model_dir={tmp_path / 'whole'}", f"--output={out}"]], cwd=tmp_path)
  assert refused.returncode == 2 and "residual" in log_of(refused) and "Traceback" not in log_of(refused)
  assert exported.returncode == 0, log_of(exported)
  info = json.loads((out / "backbone" / SV.METADATA_FILE).read_text())
  assert info["geometry"] == "revisiting" and info["output"] == "pre_logits" and info["min_size"] == 64
  assert list(info["features"]) == list(M.BACKBONES["resnet50"].features)

  # The SavedModels compute what the training networks compute, with the preprocessing built in.
  run = RS.load_run(str(tmp_path / "whole"))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
  standardized = tf.image.per_image_standardization(tf.cast(images, tf.float32))
  backbone = tf.saved_model.load(str(out / "backbone"))
  features = run.networks.tower([standardized, tf.ones([3])]).numpy()
  got = backbone.signatures["features"](images=tf.constant(images))["pre_logits"].numpy().reshape(features.shape)
  np.testing.assert_allclose(got, features, rtol=1e-4, atol=1e-4 * np.abs(features).max())
  maps = backbone.features(tf.constant(rng.integers(0, 256, (1, 70, 90, 3), dtype=np.uint8)))
  assert tuple(maps["block4"].shape) == (1, 9, 12, int(info["features"]["block4"]))
  classifier = tf.saved_model.load(str(out / "pair_classifier"))
  logits = classifier.signatures["serving_default"](patch_a=tf.constant(images), patch_b=tf.constant(images[::-1]))
  np.testing.assert_allclose(logits["logits"].numpy(), run.networks.context_model(
      [standardized, standardized[::-1]]).numpy(), rtol=1e-4, atol=1e-4)

  # The Keras file of standard layers, per-image standardisation included.
  keras_file = keras.saving.load_model(str(out / SV.BACKBONE_KERAS_FILE))
  got = keras_file(images)["pre_logits"].numpy().reshape(features.shape)
  np.testing.assert_allclose(got, features, rtol=1e-4, atol=1e-4 * np.abs(features).max())

  # Warm starts: from the run (tower and head copied), and from the export (folded weights, scale and shift back
  # into the BN layers, which start with fresh statistics): both compute the run's features.
  for source in (str(tmp_path / "whole"), str(out / "backbone")):
    fresh = RS.build_networks(run.model_config)
    record = WS.initialise(fresh, run.model_config, source)
    assert record["step"] == 6 and record["head"] == (source == str(tmp_path / "whole"))
    if source == str(out / "backbone"):
      for layer in fresh.tower.layers:
        if isinstance(layer, CL.CaffeBatchNorm):
          for weight in (layer.mean_sum, layer.variance_sum, layer.scale_sum):
            weight.assign(tf.zeros_like(weight))
    np.testing.assert_allclose(fresh.tower([standardized, tf.ones([3])]).numpy(), features, rtol=1e-4,
                               atol=1e-4 * np.abs(features).max())

  labelled = make_labelled(tmp_path / "labelled")
  _, _, evaluations = run_cases("evaluate", [  # in one process
      ["--mode=pretext", f"--model_dir={tmp_path / 'whole'}", "--images=2", "--pairs_per_image=12", *DEMO],
      ["--mode=neighbors", f"--saved_model={out / 'backbone'}", "--images=3", "--queries=2", *DEMO],
      # The smallest input is one patch of the geometry: 64 px here (docs/flags.md#geometry).
      ["--mode=linear", f"--saved_model={out / 'backbone'}", f"--data={labelled}", "--folds=2", "--image_size=64",
       "--probe_epochs=20"],
      ["--mode=knn", f"--model_dir={tmp_path / 'whole'}", f"--data={labelled}", "--folds=2", "--image_size=64",
       "--knn_k=1"]], cwd=tmp_path)
  for evaluated in evaluations:
    assert evaluated.returncode == 0, log_of(evaluated)
    result = last_json(evaluated)
    if result["mode"] == "pretext":
      assert result["geometry"] == "revisiting" and result["pairs"] == 24 and result["step"] == 6
      assert result["color_mode"] == "standardization" and "pixelation" not in result  # what the geometry does
    elif result["mode"] == "neighbors":
      assert result["layer"] == "pre_logits" and result["database_patches"] == 27
    else:  # a probe per named output of the ResNet
      assert list(result["per_layer"]) == list(M.BACKBONES["resnet50"].features), result["mode"]


def test_vgg16_run_resumes_exactly_and_exports_rescaled(tmp_path):
  whole, _ = resumed_exactly(tmp_path, VGG, "--train_steps=4", "--train_steps=2")
  assert "Training finished at step 4" in whole
  assert_same_checkpoints(tmp_path / "whole" / "ckpt-4", tmp_path / "parts" / "ckpt-4")
  exported = run_module(["context_keras.export", f"--model_dir={tmp_path / 'whole'}", f"--output={tmp_path / 'out'}",
                         "--rescale_data=" + DEMO[0][len("--data="):], DEMO[1], "--rescale_patches=32"],
                        cwd=tmp_path)
  assert exported.returncode == 0, log_of(exported)
  report = json.loads((tmp_path / "out" / "rescale.json").read_text())
  convs = [name for name in M.BACKBONES["vgg16_bn"].features if name.startswith("conv")]
  assert list(report["between_layer"]["after"]["ratios"]) == convs + ["fc6"] and len(convs) == 13
  labelled = make_labelled(tmp_path / "labelled")
  linear = run_module(["context_keras.evaluate", "--mode=linear", f"--saved_model={tmp_path / 'out' / 'backbone'}",
                       f"--data={labelled}", "--folds=2", "--inner_folds=2", "--image_size=96",
                       "--probe_epochs=20"], cwd=tmp_path)
  assert linear.returncode == 0, log_of(linear)
  per_layer = last_json(linear)["per_layer"]
  assert list(per_layer) == list(M.BACKBONES["vgg16_bn"].features)  # conv1_1 ... conv5_3, pool5, fc6
  assert set(last_json(linear)["layers"]) <= set(per_layer)


def make_labelled(folder):
  """Two classes of four 100-px images: the linear probe only has to run."""
  rng = np.random.default_rng(1)
  for c in ("a", "b"):
    (folder / c).mkdir(parents=True)
    for i in range(4):
      keras.utils.save_img(str(folder / c / f"{i}.png"), rng.integers(0, 256, (100, 100, 3)).astype(np.uint8))
  return folder


@pytest.mark.kernels
@pytest.mark.parametrize("backbone, geometry, steps", [("resnet50", "revisiting", 60), ("vgg16_bn", "doersch", 30)])
def test_the_whole_network_trains_on_the_pretext(backbone, geometry, steps):
  """A narrow tower with its pair head fits one batch of the demo photos' pairs, repeated: training accuracy far above
  chance (12.5 %), and every trainable variable moved, so gradients reach every stage. (A fresh stream needs hundreds
  of steps to leave chance: docs/training.md, Pretext accuracy after equal time.) The accuracy of the last 10 steps,
  measured on this project's AVX2 machine with Eigen's and oneDNN's kernels: ResNet-50 (4 images a step) 0.90 and
  0.87 (after 40 steps it was 0.93 and 0.47: oneDNN's rounding takes it on another, slower path), VGG-16-BN 0.89 and
  0.87."""
  input_config = D.InputConfig(data=f"{REPO}/flags/demo_photos.txt", data_root="package:skimage.data",
                               geometry=geometry, batch_patches=36 if geometry == "revisiting" else 64,
                               batch_pairs=32 if geometry == "revisiting" else 320)
  model_config = M.ModelConfig(backbone=backbone, width_multiplier=0.0625, patch_size=input_config.patch_size,
                               head="revisiting" if geometry == "revisiting" else "doersch", bn_momentum=0.9)
  keras.utils.set_random_seed(0)
  trainer = trainer_lib.Trainer(tf.distribute.get_strategy(), model_config,
                                trainer_lib.OptimConfig(learning_rate=0.1 if geometry == "revisiting" else 0.01,
                                                        momentum=0.9, loss_reduction="mean"))
  initial = [v.numpy() for v in trainer.trainable_variables]
  iterator = iter(D.make_dataset(input_config).take(1).cache().repeat())
  trainer.train_loop(iterator, tf.constant(steps - 10))
  last = trainer.train_loop(iterator, tf.constant(10))
  accuracy = float(last["correct"] / last["pairs"])
  assert accuracy > 0.5, accuracy
  still = [v.path for v, w in zip(trainer.trainable_variables, initial) if np.array_equal(v.numpy(), w)]
  assert not still, still


def test_torch_baseline_runs_both_networks(tmp_path):
  """benchmarks/torch_baseline.py on the benchmark's shapes (skipped where torch is not installed: it is the bench
  extra, not the test one)."""
  pytest.importorskip("torch")
  shapes = {}
  for args in (["--tower", "resnet50_rpl", "--width", "1", "--grids", "2"], ["--tower", "alexnet_bn", "--grids", "1"]):
    result = subprocess.run([sys.executable, f"{REPO}/benchmarks/torch_baseline.py", *args, "--steps", "1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    shapes[out["tower"]] = (out["patches_per_step"], out["pairs_per_step"])
  assert shapes == {"resnet50_rpl": (18, 16), "alexnet_bn": (9, 40)}


def test_benchmark_reports_a_baseline_that_cannot_run_in_one_line(tmp_path):
  """A baseline script that does not exist, and one that fails (here: a Python without PyTorch, or a script that
  exits 1): the benchmark warns in one line, reports an "error" for it and measures the rest (exit 0)."""
  failing = tmp_path / "failing_baseline.py"
  failing.write_text("import sys\nsys.exit('no baseline here')\n")
  result = run_module(["context_keras.benchmark", "--width_multiplier=0.0625", "--parts=step", "--precisions=fp32",
                       "--grids=1", "--timed_steps=1", "--repeats=1",
                       f"--baseline_script=/nonexistent/torch_baseline.py,{failing}"], cwd=REPO)
  assert result.returncode == 0 and "Traceback" not in log_of(result), log_of(result)
  assert "PyTorch baseline skipped: /nonexistent/torch_baseline.py:" in log_of(result)
  assert f"PyTorch baseline skipped: {failing}: no baseline here" in log_of(result)
  for script in ("/nonexistent/torch_baseline.py", str(failing)):
    assert "error" in last_json(result)["torch"][script]["fp32"]
  assert last_json(result)["step"]["fp32"]["pairs_per_step"] == 40  # one 3x3 grid
