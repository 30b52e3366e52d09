"""Export: BN folding (spec 5.1), the SavedModels in a clean process, the Keras file, rescaling (spec 5.2), errors."""
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO, run_module
from context_keras import data as D
from context_keras import export as E
from context_keras import model as M
from context_keras import patches as P
from context_keras import rescale as R

SMALL_RUN = ["--width_multiplier=0.0625", "--batch_patches=64", "--batch_pairs=320", "--train_steps=10",
             "--checkpoint_every=5", "--log_every=5", "--steps_per_loop=5"]


def log_of(result):
  return result.stdout + result.stderr


def last_json(result):
  return json.loads(result.stdout.strip().splitlines()[-1])


def _once(tmp_path_factory, name, make):
  """A folder made once per session, whichever test module asks first (test_evaluate.py imports these fixtures)."""
  path = tmp_path_factory.getbasetemp() / name
  if not (path / "done").exists():
    make(path)
    (path / "done").write_text("")
  return path


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """RUN: 10 steps of a 1/16-width network on the demo photos, checkpoints at 5 and 10."""
  def make(path):
    result = run_module(["context_keras.train", f"--flagfile={REPO}/flags/demo.cfg",
                         f"--data={REPO}/flags/demo_photos.txt", f"--model_dir={path / 'run'}", *SMALL_RUN],
                        cwd=path.parent)
    assert result.returncode == 0, log_of(result)
  return _once(tmp_path_factory, "trained", make) / "run"


@pytest.fixture(scope="module")
def exported(tmp_path_factory, trained_run):
  """OUT: the export command on RUN, with rescaling on 64 patches of the demo photos; (OUT, its printed summary)."""
  def make(path):
    result = run_module(["context_keras.export", f"--model_dir={trained_run}", f"--output={path / 'out'}",
                         f"--rescale_data={REPO}/flags/demo_photos.txt", "--data_root=package:skimage.data",
                         "--rescale_patches=64"], cwd=path.parent)
    assert result.returncode == 0, log_of(result)
    (path / "summary.json").write_text(result.stdout.strip().splitlines()[-1])
  path = _once(tmp_path_factory, "exported", make)
  return path / "out", json.loads((path / "summary.json").read_text())


def real_patches(photo_dir, demo_list, num=24, color_mode="drop"):
  """Patches of the demo photos, preprocessed as in training (colour dropping, RMS 50)."""
  source = D.find_source(demo_list, photo_dir)
  raw = E.sample_patches(source, num, seed=1)
  return P.augment(tf.constant(raw), tf.constant([3, 4], tf.int64), color_mode, pixelation=False)


def test_run_flags_file_is_trains():
  from context_keras import train as T  # pylint: disable=import-outside-toplevel
  assert E.RUN_FLAGS_FILE == T.RUN_FLAGS_FILE


def test_export_writes_everything(exported):
  out, summary = exported
  assert summary["written"] == ["backbone", "pair_classifier", "context_model.keras", "rescale.json"]
  for name in ("backbone", "pair_classifier"):
    assert (out / name / "saved_model.pb").exists()
    info = json.loads((out / name / E.METADATA_FILE).read_text())
    assert info["width_multiplier"] == 0.0625 and info["color_mode"] == "drop" and info["step"] == 10
  info = json.loads((out / "backbone" / E.METADATA_FILE).read_text())
  assert info["rescaled"] and info["serving_default"] == "features"
  assert list(info["features"]) == list(E.FEATURE_LAYERS)


def test_folded_tower_and_head_equal_batchnorm_networks(trained_run, photo_dir, demo_list):
  """debatchnorm's identity W'x + b' = (Wx + b - mu)/s (spec 5.1), on real patches, at every named layer."""
  run = E.load_run(str(trained_run))
  tower, head = run.networks.tower, run.networks.head
  assert float(tower.get_layer("bn3").scale_sum) > 5  # real statistics after 10 steps, not the identity
  patches = real_patches(photo_dir, demo_list)
  folded = E.fold_tower(tower)(patches)
  assert not [layer for layer in E.fold_tower(tower).layers if isinstance(layer, M.CaffeBatchNorm)]
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
  np.testing.assert_allclose(E.fold_batchnorm(head)(pairs).numpy(), head([pairs, tf.ones([12])]).numpy(),
                             rtol=1e-4, atol=1e-4)


def test_fold_with_arbitrary_statistics():
  """Folding is exact for any moving statistics, not only near-identity ones."""
  tower = M.alexnet_bn_tower(M.ModelConfig(width_multiplier=0.125))
  rng = np.random.default_rng(0)
  for layer in tower.layers:
    if isinstance(layer, M.CaffeBatchNorm):
      channels = layer.mean_sum.shape[0]
      layer.scale_sum.assign(3.0)
      layer.mean_sum.assign(3.0 * rng.normal(0, 2, channels).astype(np.float32))
      layer.variance_sum.assign(3.0 * rng.uniform(0.05, 20, channels).astype(np.float32))
  patches = tf.constant(rng.normal(0, 50, (4, 96, 96, 3)).astype(np.float32))
  reference = tower([patches, tf.ones([4])]).numpy()
  got = E.fold_tower(tower)(patches)["fc6"].numpy().reshape(reference.shape)
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


def test_saved_models_run_in_clean_process_on_odd_sizes(exported, trained_run, tmp_path):
  out, _ = exported
  rng = np.random.default_rng(0)
  arrays = {f"images_{h}x{w}": rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
            for h, w in ((96, 96), (97, 131), (211, 305), (131, 97))}
  arrays["patch_a"] = rng.integers(0, 256, (5, 96, 96, 3), dtype=np.uint8)
  arrays["patch_b"] = rng.integers(0, 256, (5, 96, 96, 3), dtype=np.uint8)
  arrays["preprocessed"] = P.standardize(tf.constant(arrays["images_96x96"], tf.float32)).numpy()
  np.savez(tmp_path / "arrays.npz", **arrays)
  script = tmp_path / "clean.py"
  script.write_text(CLEAN_PROCESS)
  train_export = trained_run / "export" / "backbone_10"
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH="")
  result = subprocess.run([sys.executable, str(script), str(out), str(train_export), str(tmp_path / "arrays.npz")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  shapes = json.loads(result.stdout.strip().splitlines()[-1])
  assert shapes.pop("context_keras_imported") is False
  assert shapes.pop("too_small") is True
  width = {"conv1": 6, "conv2": 16, "conv3": 24, "conv4": 24, "conv5": 16, "pool5": 16, "fc6": 256}

  def expected(h, w):
    """Spatial sizes: conv1 11/4 after padding 5, then 'same' 3/2 pools (ceil), fc6 a valid 3x3 conv."""
    sizes = {}
    c1 = [(s + 10 - 11) // 4 + 1 for s in (h, w)]
    p1 = [-(-s // 2) for s in c1]
    p2 = [-(-s // 2) for s in p1]
    p5 = [-(-s // 2) for s in p2]
    sizes.update(conv1=c1, conv2=p1, conv3=p2, conv4=p2, conv5=p2, pool5=p5, fc6=[s - 2 for s in p5])
    return {name: [2, *sizes[name], width[name]] for name in width}

  for key, got in shapes.items():
    h, w = (int(v) for v in key.split("_")[1].split("x"))
    assert got == expected(h, w), key
  assert shapes["images_96x96"]["fc6"] == [2, 1, 1, 256]

  # The SavedModels compute what the training networks do, preprocessing included.
  outputs = np.load(tmp_path / "arrays.npz.out.npz")
  run = E.load_run(str(trained_run))
  standardized = [P.standardize(tf.constant(arrays[k], tf.float32)) for k in ("patch_a", "patch_b")]
  np.testing.assert_allclose(outputs["logits"], run.networks.context_model(standardized).numpy(), rtol=1e-4,
                             atol=1e-4)
  fc6 = run.networks.tower([arrays["preprocessed"], np.ones(2, np.float32)]).numpy()
  np.testing.assert_allclose(outputs["legacy"], fc6, rtol=1e-4, atol=1e-4 * np.abs(fc6).max())
  np.testing.assert_allclose(outputs["features"].reshape(fc6.shape), fc6, rtol=1e-4, atol=1e-4 * np.abs(fc6).max())


def test_context_model_keras_file_loads(exported, trained_run):
  out, _ = exported
  loaded = E.load_context_model(out / "context_model.keras")
  run = E.load_run(str(trained_run))
  rng = np.random.default_rng(1)
  a, b = (rng.normal(0, 50, (3, 96, 96, 3)).astype(np.float32) for _ in range(2))
  np.testing.assert_allclose(loaded([a, b]).numpy(), run.networks.context_model([a, b]).numpy(), rtol=1e-5,
                             atol=1e-5)


def test_rescale_moves_ratios_to_target(exported):
  out, summary = exported
  report = json.loads((out / "rescale.json").read_text())
  calibration = report["between_layer"]
  layers = ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6"]
  for state in ("before", "after_within_layer", "after"):
    assert list(calibration[state]["ratios"]) == layers
  tolerance = calibration["tolerance"]
  assert tolerance == R.TOLERANCE
  assert calibration["before"]["max_deviation"] > 5 * tolerance  # the folded network is badly scaled (spec 7)
  assert calibration["converged"] and calibration["after"]["max_deviation"] < tolerance
  ratios = np.array(list(calibration["after"]["ratios"].values()))
  assert ratios.max() / ratios.min() < 1.2
  assert summary["rescale"]["converged"]
  assert set(report["within_layer"]) == set(layers) and report["patches"] == 64


def test_within_layer_normalises_every_unit(trained_run, photo_dir, demo_list):
  """Algorithm 1: afterwards every pre-activation has mean beta and standard deviation 1 on the data."""
  run = E.load_run(str(trained_run))
  folded = E.fold_tower(run.networks.tower)
  patches = E.preprocess(E.sample_patches(D.find_source(demo_list, photo_dir), 48, seed=2), "drop")
  R.within_layer(folded, patches, bias=0.1)
  for layer in R.parameter_layers(folded):
    values = keras.Model(folded.input, layer.output)(patches).numpy()
    values = values.reshape(-1, values.shape[-1])
    live = values.std(0) > 1e-6
    np.testing.assert_allclose(values.mean(0), 0.1, atol=2e-3, err_msg=layer.name)
    np.testing.assert_allclose(values.std(0)[live], 1.0, rtol=2e-3, err_msg=layer.name)


@pytest.mark.parametrize("make_args, message", [
    (lambda run, tmp: [f"--model_dir={tmp / 'nowhere'}", f"--output={tmp / 'o'}"], "does not exist"),
    (lambda run, tmp: [f"--model_dir={run}", f"--output={tmp / 'o'}", "--checkpoint=7"],
     "--checkpoint=7: no checkpoint"),
    (lambda run, tmp: [f"--model_dir={run}", f"--output={tmp / 'o'}", f"--rescale_data={tmp / 'none'}"],
     "does not exist"),
], ids=["missing_model_dir", "missing_checkpoint", "missing_rescale_data"])
def test_export_errors_name_the_flag(trained_run, tmp_path, make_args, message):
  result = run_module(["context_keras.export", *make_args(trained_run, tmp_path)], cwd=tmp_path, timeout=120)
  assert result.returncode == 2, log_of(result)
  assert message in log_of(result) and "Traceback" not in log_of(result)
