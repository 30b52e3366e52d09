"""Export: BN folding (method.md §5.1), the SavedModels in a clean process, the Keras file, rescaling
(method.md §5.2), errors."""
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from context_keras.deploy import rescale as R
from context_keras.deploy import serving as SV
from context_keras.input import augment as A
from context_keras.input import sources as S
from context_keras.model import caffe_layers as CL
from context_keras.model import fold as FO
from context_keras.model import networks as M
from context_keras.training import restore as RS

FEATURE_LAYERS = M.BACKBONES["alexnet_bn"].features
SMALL_CONFIG = M.ModelConfig(width_multiplier=0.0625)


def real_patches(photo_dir, demo_list, num=24, color_mode="drop"):
  """Patches of the demo photos, preprocessed as in training (colour dropping, RMS 50)."""
  source = S.find_source(demo_list, photo_dir)
  raw = R.sample_patches(source, num, seed=1)
  return A.augment(tf.constant(raw), A.patch_keys(tf.constant([3, 4], tf.int64), len(raw)), color_mode,
                   pixelation=False)


@pytest.mark.slow
def test_export_writes_everything(exported):
  out, summary = exported
  assert summary["written"] == ["backbone", "backbone.keras", "pair_classifier", "context_model.keras",
                                "rescale.json"]
  for name in ("backbone", "pair_classifier"):
    assert (out / name / "saved_model.pb").exists()
    info = json.loads((out / name / SV.METADATA_FILE).read_text())
    assert info["width_multiplier"] == 0.0625 and info["color_mode"] == "drop" and info["step"] == 10
  info = json.loads((out / "backbone" / SV.METADATA_FILE).read_text())
  assert info["rescaled"] and info["serving_default"] == "features" and info["pooling"] == "caffe"
  assert list(info["features"]) == list(FEATURE_LAYERS)


@pytest.mark.slow
def test_folded_tower_and_head_equal_batchnorm_networks(small_run, photo_dir, demo_list):
  """debatchnorm's identity W'x + b' = (Wx + b - mu)/s (method.md §5.1), on real patches, at every named layer."""
  run = RS.load_run(str(small_run))
  tower, head = run.networks.tower, run.networks.head
  assert float(tower.get_layer("bn3").scale_sum) > 5  # real statistics after 10 steps, not the identity
  patches = real_patches(photo_dir, demo_list)
  folded = FO.fold_tower(tower, SMALL_CONFIG)(patches)
  assert not [layer for layer in FO.fold_tower(tower, SMALL_CONFIG).layers if isinstance(layer, CL.CaffeBatchNorm)]
  valid = tf.ones(tf.shape(patches)[:1])
  for name, layer in (("conv1", "conv1"), ("conv2", "conv2"), ("conv3", "relu3"), ("conv4", "relu4"),
                      ("conv5", "relu5"), ("pool5", "pool5"), ("fc6", "relu6")):
    reference = keras.Model(tower.inputs, tower.get_layer(layer).output)([patches, valid]).numpy()
    got = folded[name].numpy().reshape(reference.shape)
    scale = np.abs(reference).max()
    assert scale > 0, name
    np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-5 * scale, err_msg=name)
  fc6 = tower([patches, valid])
  pairs = tf.concat([fc6[:12], fc6[12:]], -1)
  np.testing.assert_allclose(FO.fold_batchnorm(head)(pairs).numpy(), head([pairs, tf.ones([12])]).numpy(),
                             rtol=1e-4, atol=1e-4)


def test_fold_with_arbitrary_statistics():
  """Folding is exact for any moving statistics, not only near-identity ones."""
  tower = M.alexnet_bn_tower(M.ModelConfig(width_multiplier=0.125))
  rng = np.random.default_rng(0)
  for layer in tower.layers:
    if isinstance(layer, CL.CaffeBatchNorm):
      channels = layer.mean_sum.shape[0]
      layer.scale_sum.assign(3.0)
      layer.mean_sum.assign(3.0 * rng.normal(0, 2, channels).astype(np.float32))
      layer.variance_sum.assign(3.0 * rng.uniform(0.05, 20, channels).astype(np.float32))
  patches = tf.constant(rng.normal(0, 50, (4, 96, 96, 3)).astype(np.float32))
  reference = tower([patches, tf.ones([4])]).numpy()
  got = FO.fold_tower(tower, SMALL_CONFIG)(patches)["fc6"].numpy().reshape(reference.shape)
  np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())


CLEAN_PROCESS = r"""
import json, sys
import numpy as np
import tensorflow as tf
out, train_export, arrays = sys.argv[1:4]
data = np.load(arrays)
backbone = tf.saved_model.load(out + "/backbone")
shapes = {}
for key in ("images_96x96", "images_97x131", "images_211x305", "images_131x97"):
  maps = backbone.signatures["serving_default"](images=tf.constant(data[key]))
  shapes[key] = {name: list(value.shape) for name, value in maps.items()}
  assert all(np.all(np.isfinite(v.numpy())) for v in maps.values())
try:
  backbone.features(tf.zeros([1, 95, 200, 3], tf.uint8))
  shapes["too_small"] = "accepted"
except tf.errors.InvalidArgumentError as e:
  shapes["too_small"] = "at least 96x96" in str(e)
classifier = tf.saved_model.load(out + "/pair_classifier")
logits = classifier.signatures["serving_default"](patch_a=tf.constant(data["patch_a"]),
                                                   patch_b=tf.constant(data["patch_b"]))["logits"]
trained = tf.saved_model.load(train_export)
legacy = trained.signatures["serving_default"](patches=tf.constant(data["preprocessed"]))["fc6"]
features = trained.signatures["features"](images=tf.constant(data["images_96x96"]))["fc6"]
np.savez(arrays + ".out.npz", logits=logits.numpy(), legacy=legacy.numpy(), features=features.numpy())
shapes["context_keras_imported"] = any(m.startswith("context_keras") for m in sys.modules)
print(json.dumps(shapes))
"""


@pytest.mark.slow
def test_saved_models_run_in_clean_process_on_odd_sizes(exported, small_run, tmp_path):
  out, _ = exported
  rng = np.random.default_rng(0)
  arrays = {f"images_{h}x{w}": rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
            for h, w in ((96, 96), (97, 131), (211, 305), (131, 97))}
  arrays["patch_a"] = rng.integers(0, 256, (5, 96, 96, 3), dtype=np.uint8)
  arrays["patch_b"] = rng.integers(0, 256, (5, 96, 96, 3), dtype=np.uint8)
  arrays["preprocessed"] = A.standardize(tf.constant(arrays["images_96x96"], tf.float32)).numpy()
  np.savez(tmp_path / "arrays.npz", **arrays)
  script = tmp_path / "clean.py"
  script.write_text(CLEAN_PROCESS)
  train_export = small_run / "export" / "backbone_10"
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH="")
  result = subprocess.run([sys.executable, str(script), str(out), str(train_export), str(tmp_path / "arrays.npz")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  shapes = json.loads(result.stdout.strip().splitlines()[-1])
  assert shapes.pop("context_keras_imported") is False
  assert shapes.pop("too_small") is True
  width = {"conv1": 6, "conv2": 16, "conv3": 24, "conv4": 24, "conv5": 16, "pool5": 16, "fc6": 256}

  def expected(h, w):
    """Spatial sizes: conv1 11/4 after padding 5, then Caffe's 3/2 pools (ceil((s - 3)/2) + 1), fc6 a valid 3x3
    conv."""
    sizes = {}
    c1 = [(s + 10 - 11) // 4 + 1 for s in (h, w)]
    p1 = [-(-(s - 3) // 2) + 1 for s in c1]
    p2 = [-(-(s - 3) // 2) + 1 for s in p1]
    p5 = [-(-(s - 3) // 2) + 1 for s in p2]
    sizes.update(conv1=c1, conv2=p1, conv3=p2, conv4=p2, conv5=p2, pool5=p5, fc6=[s - 2 for s in p5])
    return {name: [2, *sizes[name], width[name]] for name in width}

  for key, got in shapes.items():
    h, w = (int(v) for v in key.split("_")[1].split("x"))
    assert got == expected(h, w), key
  assert shapes["images_96x96"]["fc6"] == [2, 1, 1, 256]

  # The SavedModels compute what the training networks do, preprocessing included.
  outputs = np.load(tmp_path / "arrays.npz.out.npz")
  run = RS.load_run(str(small_run))
  standardized = [A.standardize(tf.constant(arrays[k], tf.float32)) for k in ("patch_a", "patch_b")]
  np.testing.assert_allclose(outputs["logits"], run.networks.context_model(standardized).numpy(), rtol=1e-4,
                             atol=1e-4)
  fc6 = run.networks.tower([arrays["preprocessed"], np.ones(2, np.float32)]).numpy()
  np.testing.assert_allclose(outputs["legacy"], fc6, rtol=1e-4, atol=1e-4 * np.abs(fc6).max())
  np.testing.assert_allclose(outputs["features"].reshape(fc6.shape), fc6, rtol=1e-4, atol=1e-4 * np.abs(fc6).max())


@pytest.mark.slow
def test_context_model_keras_file_loads(exported, small_run):
  out, _ = exported
  loaded = SV.load_context_model(out / "context_model.keras")
  run = RS.load_run(str(small_run))
  rng = np.random.default_rng(1)
  a, b = (rng.normal(0, 50, (3, 96, 96, 3)).astype(np.float32) for _ in range(2))
  np.testing.assert_allclose(loaded([a, b]).numpy(), run.networks.context_model([a, b]).numpy(), rtol=1e-5,
                             atol=1e-5)


@pytest.mark.slow
def test_rescale_moves_ratios_to_target(exported):
  out, summary = exported
  report = json.loads((out / "rescale.json").read_text())
  calibration = report["between_layer"]
  layers = ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6"]
  for state in ("before", "after_within_layer", "after"):
    assert list(calibration[state]["ratios"]) == layers
  tolerance = calibration["tolerance"]
  assert tolerance == R.TOLERANCE
  assert calibration["before"]["max_deviation"] > 5 * tolerance  # the folded network is badly scaled (method.md §7)
  assert calibration["converged"] and calibration["after"]["max_deviation"] < tolerance
  ratios = np.array(list(calibration["after"]["ratios"].values()))
  assert ratios.max() / ratios.min() < 1.2
  assert summary["rescale"]["converged"]
  assert set(report["within_layer"]) == set(layers) and report["patches"] == 64


@pytest.mark.slow
def test_within_layer_normalises_every_unit(small_run, photo_dir, demo_list):
  """Algorithm 1: afterwards every pre-activation has mean beta and standard deviation 1 on the data."""
  run = RS.load_run(str(small_run))
  folded = FO.fold_tower(run.networks.tower, run.model_config)
  patches = SV.preprocess(R.sample_patches(S.find_source(demo_list, photo_dir), 48, seed=2), "drop")
  R.within_layer(folded, patches, bias=0.1)
  for layer in R.parameter_layers(folded):
    values = keras.Model(folded.input, layer.output)(patches).numpy()
    values = values.reshape(-1, values.shape[-1])
    live = values.std(0) > 1e-6
    np.testing.assert_allclose(values.mean(0), 0.1, atol=2e-3, err_msg=layer.name)
    np.testing.assert_allclose(values.std(0)[live], 1.0, rtol=2e-3, err_msg=layer.name)


