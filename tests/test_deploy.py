"""Deployment (method.md §11): SavedModels without variables, LiteRT and ONNX against them on real photos, the Keras
file of standard layers, Caffe's pooling, atomic export folders, checkpoints that vanish while read, warm starts.

The fast tests build tiny networks with arbitrary batch-norm statistics in process; the slow ones run the programs.
Tests that need an optional runtime (ai-edge-litert, tf2onnx + onnxruntime: the test extra installs them) skip with
the reason when it is absent."""
import glob
import importlib.util
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from context_keras import errors as E
from context_keras.deploy import convert as CV
from context_keras.deploy import plain_model as PM
from context_keras.deploy import serving as SV
from context_keras.input import augment as A
from context_keras.input import pipeline as D
from context_keras.model import caffe_layers as CL
from context_keras.model import fold as FO
from context_keras.model import networks as M
from context_keras.storage import writes as W
from context_keras.training import restore as RS
from context_keras.training import run_dir as RD
from context_keras.training import trainer as T
from context_keras.training import warm_start as WS
from helpers import CONV1_KERNEL
from helpers import REPO
from helpers import demo_args
from helpers import log_of
from helpers import made_once
from helpers import run_module
from helpers import start_module

TINY = M.ModelConfig(width_multiplier=0.0625)
NAMES = M.BACKBONES["alexnet_bn"].features
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
TOLERANCE = 1e-4  # of each map's largest value (the "1e-4 relative"; float32 runtimes reach ~2e-6)


def has(module):
  return importlib.util.find_spec(module) is not None


needs_litert = pytest.mark.skipif(not has("ai_edge_litert"), reason="ai-edge-litert is not installed "
                                  "(pip install -e '.[litert]')")
needs_onnx = pytest.mark.skipif(not (has("tf2onnx") and has("onnxruntime")), reason="tf2onnx and onnxruntime are not "
                                "installed (pip install -e '.[onnx]')")


def photos(height, width, count=4):
  """uint8 [count, height, width, 3]: scikit-image's sample photos, resized."""
  import skimage.data  # pylint: disable=import-outside-toplevel  (test extra)
  import skimage.transform  # pylint: disable=import-outside-toplevel
  images = [skimage.transform.resize(getattr(skimage.data, name)(), (height, width), anti_aliasing=True,
                                     preserve_range=True) for name in PHOTOS[:count]]
  return np.clip(np.round(np.stack(images)), 0, 255).astype(np.uint8)


def max_rel(got, reference):
  """max |got - reference| / max |reference|: the error against the map's scale."""
  reference = np.asarray(reference, np.float64)
  assert np.shape(got) == reference.shape
  return float(np.max(np.abs(np.asarray(got, np.float64) - reference)) / np.max(np.abs(reference)))


def arbitrary_networks(config=TINY, seed=0):
  """Networks of `config` in float32 with arbitrary (not identity) batch-norm statistics, as after training."""
  keras.utils.set_random_seed(seed)
  networks = RS.build_networks(config)
  rng = np.random.default_rng(seed)
  for layer in networks.tower.layers + networks.head.layers:
    if isinstance(layer, CL.CaffeBatchNorm):
      channels = layer.mean_sum.shape[0]
      layer.scale_sum.assign(2.0)
      layer.mean_sum.assign(2.0 * rng.normal(0, 1, channels).astype(np.float32))
      layer.variance_sum.assign(2.0 * rng.uniform(0.2, 5, channels).astype(np.float32))
  return networks


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
  """(networks, folded backbone, SavedModel path) of a tiny tower exported as export.py does."""
  networks = arbitrary_networks()
  folded = FO.fold_tower(networks.tower, TINY)
  path = str(tmp_path_factory.mktemp("backbone") / "backbone")
  SV.save_backbone(folded, path, "drop", SV.metadata(TINY, "drop", folded, True, checkpoint="RUN/ckpt-7", step=7))
  return networks, folded, path


def reference_features(path, images):
  return {k: v.numpy() for k, v in tf.saved_model.load(path).signatures["features"](images=tf.constant(images)).items()}


# ----------------------------------------------------------------------------------------------------------------
# Caffe's pooling (method.md §11.4)


def caffe_sizes(side):
  """Every map's side in the original network in Caffe: conv floor((H + 2p - k)/s) + 1, pool ceil((H - 3)/2) + 1."""
  conv = lambda h, k, s, p: (h + 2 * p - k) // s + 1  # noqa: E731
  pool = lambda h: math.ceil((h - 3) / 2) + 1  # noqa: E731
  sizes = {"conv1": conv(side, 11, 4, 5)}
  sizes["pool1"] = pool(sizes["conv1"])
  sizes["conv2"] = conv(sizes["pool1"], 5, 1, 2)
  sizes["pool2"] = pool(sizes["conv2"])
  sizes["conv3"] = sizes["conv4"] = sizes["conv5"] = conv(sizes["pool2"], 3, 1, 1)
  sizes["pool5"] = pool(sizes["conv5"])
  sizes["fc6"] = conv(sizes["pool5"], 3, 1, 0)
  return sizes


def test_caffe_pooling_gives_caffes_sizes_at_every_input_size():
  folded = FO.fold_tower(arbitrary_networks().tower, TINY)
  probe = keras.Model(folded.input, {name: folded.get_layer(name).output
                                     for name in ("conv1", "pool1", "conv2", "pool2", "conv3", "conv5", "pool5")})
  for side in (57, 96, 227, 300):
    expected = caffe_sizes(side)
    x = np.zeros((1, side, side, 3), np.float32)
    got = {name: int(value.shape[1]) for name, value in probe(x).items()}
    if expected["fc6"] > 0:
      got["fc6"] = int(folded(x)["fc6"].shape[1])
    assert got == {k: v for k, v in expected.items() if k in got}, side
  assert caffe_sizes(227)["conv5"] == 14 and caffe_sizes(227)["pool5"] == 7 and caffe_sizes(227)["fc6"] == 5


def test_caffe_pooling_is_ceil_mode_max_pooling_of_relu_maps():
  """fold._caffe_pool against a direct ceil-mode pooling (windows clipped at the bottom/right edge)."""
  inputs = keras.Input((None, None, 4))
  pool = keras.Model(inputs, FO._caffe_pool(keras.layers.MaxPool2D(3, 2, padding="same", name="p"), inputs))
  rng = np.random.default_rng(0)
  for height in range(3, 30):
    for width in (3, 4, 17, 24):
      x = np.maximum(rng.normal(size=(2, height, width, 4)), 0).astype(np.float32)  # a ReLU output
      rows, cols = math.ceil((height - 3) / 2) + 1, math.ceil((width - 3) / 2) + 1
      expected = np.stack([np.stack([x[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3].max(axis=(1, 2)) for j in range(cols)], 1)
                           for i in range(rows)], 1)
      np.testing.assert_array_equal(pool(x).numpy(), expected, err_msg=f"{height}x{width}")


def test_caffe_pooling_equals_the_training_towers_at_96_px():
  """At 96 px the exported backbone's Caffe pooling computes exactly what the training tower's pools do, outputs and
  gradients, and the folded backbone equals the training tower's inference output."""
  networks = arbitrary_networks()
  caffe = FO.fold_tower(networks.tower, TINY, pooling="caffe")
  trained = FO.fold_tower(networks.tower, TINY, pooling="trained")
  assert "pool5_pad" in [layer.name for layer in caffe.layers]
  assert "pool5_pad" not in [layer.name for layer in trained.layers]
  patches = tf.constant(A.standardize(tf.constant(photos(96, 96), tf.float32)))

  def gradients(model):
    with tf.GradientTape() as tape:
      outputs = model(patches)
      loss = sum(tf.reduce_sum(tf.square(v)) for v in outputs.values())
    return outputs, tape.gradient(loss, model.trainable_weights)
  (a, grads_a), (b, grads_b) = gradients(caffe), gradients(trained)
  for name in NAMES:
    np.testing.assert_array_equal(a[name].numpy(), b[name].numpy(), err_msg=name)
  for x, y in zip(grads_a, grads_b):
    np.testing.assert_array_equal(x.numpy(), y.numpy())
  tower = networks.tower([patches, tf.ones([4])]).numpy()
  assert max_rel(a["fc6"].numpy().reshape(tower.shape), tower) < 1e-5


def test_pooling_choice_follows_the_backbone():
  assert FO.caffe_pooling(TINY) is True and FO.caffe_pooling(TINY, "trained") is False
  with pytest.raises(ValueError, match="pooling 'ceil'"):
    FO.caffe_pooling(TINY, "ceil")


# ----------------------------------------------------------------------------------------------------------------
# SavedModels without variables, LiteRT, ONNX, freezing (method.md §11.1-11.2)


def test_saved_models_hold_weights_as_constants(backbone, tmp_path):
  networks, folded, path = backbone
  loaded = tf.saved_model.load(path)
  assert not loaded.signatures["features"].variables and not loaded.signatures["patch_features"].variables
  weights = SV.read_weights(path)
  assert sorted(weights) == sorted(v.path for v in folded.weights)
  for variable in folded.weights:
    np.testing.assert_array_equal(weights[variable.path], variable.numpy())
  pair = str(tmp_path / "pair")
  SV.save_pair_classifier(networks, TINY, pair, "drop", SV.metadata(TINY, "drop"))
  assert not tf.saved_model.load(pair).signatures["logits"].variables
  assert "fc7/kernel" in SV.read_weights(pair) and "conv1/kernel" in SV.read_weights(pair)


def litert_interpreters():
  """(name, interpreter class, op resolver enum) of the LiteRT interpreters: ai-edge-litert's, and TensorFlow's
  deprecated tf.lite.Interpreter, which computes the same."""
  found = [("tf.lite", tf.lite.Interpreter, tf.lite.experimental.OpResolverType)]
  if has("ai_edge_litert"):
    from ai_edge_litert import interpreter as litert  # pylint: disable=import-outside-toplevel
    found.append(("ai_edge_litert", litert.Interpreter, litert.OpResolverType))
  return found


def litert_runner(path, interpreter, resolver, delegate):
  options = {} if delegate else {"experimental_op_resolver_type": resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES}
  runner = interpreter(model_path=path, **options)
  return runner, {op["op_name"] for op in runner._get_ops_details()}  # pylint: disable=protected-access


@pytest.mark.parametrize("delegate", [True, pytest.param(False, marks=pytest.mark.slow)],
                         ids=["default_delegate", "no_delegate"])
@pytest.mark.parametrize("interpreter", ["ai_edge_litert", "tf.lite"])
def test_litert_matches_the_saved_model_on_photos(backbone, tmp_path, interpreter, delegate):
  """The LiteRT interpreter (and TensorFlow's deprecated tf.lite one), with XNNPACK (the default delegate) and
  without: both functions, at 96 px and an odd size, in batches of 4 and 1."""
  _, _, path = backbone
  found = dict((name, rest) for name, *rest in litert_interpreters())
  if interpreter not in found:
    pytest.skip("ai-edge-litert is not installed (pip install -e '.[litert]')")
  runner, ops = litert_runner(CV.to_litert(path, str(tmp_path / "backbone.tflite")), *found[interpreter], delegate)
  assert not ops & {"VAR_HANDLE", "READ_VARIABLE", "ASSIGN_VARIABLE"}, ops
  assert runner.get_signature_list() == {"features": {"inputs": ["images"], "outputs": sorted(NAMES)},
                                         "patch_features": {"inputs": ["patches"], "outputs": ["fc6"]}}
  for size, count in (((96, 96), 4), ((131, 157), 4), ((131, 157), 1)):
    images = photos(*size, count)
    reference = reference_features(path, images)
    got = runner.get_signature_runner("features")(images=images)
    for layer in NAMES:
      assert max_rel(got[layer], reference[layer]) < TOLERANCE, (size, count, layer)
  patches = A.standardize(tf.constant(photos(96, 96), tf.float32)).numpy()
  reference = tf.saved_model.load(path).signatures["patch_features"](patches=tf.constant(patches))["fc6"]
  assert max_rel(runner.get_signature_runner("patch_features")(patches=patches)["fc6"], reference) < TOLERANCE


@pytest.mark.slow
@needs_litert
def test_litert_float16_is_about_1e_3(backbone, tmp_path):
  """The float16 variant halves the file; its outputs are ~1e-3 off (reported, not promised to be within 1e-4)."""
  from ai_edge_litert import interpreter as litert  # pylint: disable=import-outside-toplevel
  _, _, path = backbone
  full = CV.to_litert(path, str(tmp_path / "full.tflite"))
  half = CV.to_litert(path, str(tmp_path / "half.tflite"), float16=True)
  assert os.path.getsize(half) < 0.7 * os.path.getsize(full)
  images = photos(131, 157)
  reference = reference_features(path, images)
  got = litert.Interpreter(model_path=half).get_signature_runner("features")(images=images)
  errors = [max_rel(got[layer], reference[layer]) for layer in NAMES]
  assert max(errors) < 1e-2 and max(errors) > 1e-6  # really float16 weights, and still close


@needs_onnx
def test_onnx_matches_the_saved_model_on_photos(backbone, tmp_path):
  import onnxruntime  # pylint: disable=import-outside-toplevel
  _, _, path = backbone
  session = onnxruntime.InferenceSession(CV.to_onnx(path, str(tmp_path / "backbone.onnx")),
                                         providers=["CPUExecutionProvider"])
  assert [i.name for i in session.get_inputs()] == ["images"]
  names = [o.name for o in session.get_outputs()]
  assert sorted(names) == sorted(NAMES)
  for size, count in (((96, 96), 4), ((131, 157), 4), ((227, 227), 1)):
    images = photos(*size, count)
    reference = reference_features(path, images)
    got = dict(zip(names, session.run(None, {"images": images})))
    for layer in NAMES:
      assert max_rel(got[layer], reference[layer]) < TOLERANCE, (size, count, layer)


class EarlierBackbone(tf.Module):
  """How exports were written before this version: the module tracks the Keras model, so its SavedModel holds
  Keras's variable wrappers, which the LiteRT converter leaves as variables."""

  def __init__(self, folded):
    super().__init__()
    self.model = folded

  @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32, name="preprocessed")])
  def features(self, preprocessed):
    return self.model(preprocessed, training=False)


@pytest.mark.slow
def test_freezing_makes_earlier_exports_convertible(backbone, tmp_path):
  _, folded, _ = backbone
  earlier, frozen = str(tmp_path / "earlier"), str(tmp_path / "frozen")
  module = EarlierBackbone(folded)
  tf.saved_model.save(module, earlier, signatures={"features": module.features.get_concrete_function(),
                                                   "serving_default": module.features.get_concrete_function()})
  SV.write_metadata(earlier, {"backbone": "alexnet_bn"})
  _, ops = litert_runner(CV.to_litert(earlier, str(tmp_path / "earlier.tflite")), *litert_interpreters()[0][1:], True)
  assert "READ_VARIABLE" in ops  # the defect this version fixes: weights left as (never assigned) variables

  assert CV.freeze_saved_model(earlier, frozen) == ["features", "serving_default"]
  loaded = tf.saved_model.load(frozen)
  assert not loaded.signatures["features"].variables
  assert SV.read_metadata(frozen) == {"backbone": "alexnet_bn"}
  assert sorted(SV.read_weights(earlier)) == sorted(v.path for v in folded.weights)
  x = A.standardize(tf.constant(photos(131, 157), tf.float32))
  reference = tf.saved_model.load(earlier).signatures["features"](preprocessed=x)
  got = loaded.signatures["serving_default"](preprocessed=x)
  assert sorted(got) == sorted(NAMES)
  for layer in NAMES:
    np.testing.assert_array_equal(got[layer].numpy(), reference[layer].numpy())
  runner, ops = litert_runner(CV.to_litert(frozen, str(tmp_path / "frozen.tflite")), *litert_interpreters()[0][1:],
                              True)
  assert not ops & {"VAR_HANDLE", "READ_VARIABLE"}
  got = runner.get_signature_runner("features")(preprocessed=x.numpy())
  assert all(max_rel(got[layer], reference[layer]) < TOLERANCE for layer in NAMES)


def test_standardize_keeps_float32_precision_on_large_images():
  """The nested mean (augment.image_mean) against float64 on a 480x640 photo."""
  images = photos(480, 640, 2).astype(np.float64)
  centred = images - images.mean(axis=(1, 2), keepdims=True)
  expected = centred / np.sqrt((centred ** 2).mean(axis=(1, 2), keepdims=True)) * (A.RMS_TARGET / 3 ** 0.5)
  got = A.standardize(tf.constant(images, tf.float32)).numpy()
  assert max_rel(got, expected) < 3e-6


# ----------------------------------------------------------------------------------------------------------------
# The Keras file of standard layers (method.md §11.3)


@pytest.mark.parametrize("color_mode", ["project", pytest.param("drop", marks=pytest.mark.slow),
                                        pytest.param("none", marks=pytest.mark.slow)])
def test_keras_file_computes_the_saved_models_features(backbone, tmp_path, color_mode):
  networks, folded, _ = backbone
  path = str(tmp_path / "backbone.keras")
  PM.backbone_model(folded, color_mode).save(path)
  model = keras.saving.load_model(path)  # safe mode, no custom objects
  for layer in [model] + model.get_layer("features").layers:
    assert type(layer).__module__.startswith("keras."), layer.name
  for size in ((96, 96), (131, 157)):
    images = photos(*size)
    preprocessed = A.standardize(tf.constant(images, tf.float32), color_mode)
    reference = folded(preprocessed)
    got = model(images)  # uint8 in, as the SavedModel's features
    inner = model.get_layer("features")(preprocessed)
    for name in NAMES:
      assert max_rel(got[name], reference[name]) < 1e-5, (size, name)
      assert max_rel(inner[name], reference[name]) < 1e-5, (size, name)
  constant = model(np.full((1, 100, 100, 3), 77, np.uint8))
  assert all(np.all(np.isfinite(v)) for v in constant.values())
  np.testing.assert_array_equal(model.get_layer("standardized").output.shape[1:], (None, None, 3))


@pytest.mark.slow
def test_keras_files_lrn_stays_lrn_when_unfrozen_and_trained(backbone, tmp_path):
  """After the usual freeze-then-unfreeze, which makes every weight trainable, the STFT kernels of the file's
  logarithms train along; its LRN still computes TensorFlow's LRN, as its other forms hold no weights."""
  _, folded, _ = backbone
  path = str(tmp_path / "backbone.keras")
  PM.backbone_model(folded, "drop").save(path)
  model = keras.saving.load_model(path)
  weights = sorted(v.path for v in folded.weights)
  assert sorted(w.path for w in model.trainable_weights) == weights
  assert all(w.path.endswith(("_stft/real_kernel", "_stft/imag_kernel")) for w in model.non_trainable_weights)
  model.trainable = False
  model.trainable = True
  stft = [w for w in model.trainable_weights if "_stft/" in w.path]
  assert len(stft) == 6 and len(model.trainable_weights) == len(weights) + 6
  before = [w.numpy().copy() for w in stft]
  inputs = keras.Input((None, None, 3))
  classifier = keras.Model(inputs, keras.layers.Dense(4)(keras.layers.GlobalAveragePooling2D()(model(inputs)["fc6"])))
  classifier.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  images = photos(131, 157)
  classifier.fit(images, np.arange(4), epochs=3, batch_size=4, verbose=0)
  assert any(not np.array_equal(b, w.numpy()) for b, w in zip(before, stft))  # they did train
  features = model.get_layer("features")
  probe = keras.Model(features.input, [features.get_layer(n).output for n in ("pool1", "norm1", "pool2", "norm2")])
  preprocessed = A.standardize(tf.constant(images, tf.float32))
  pool1, norm1, pool2, norm2 = probe(preprocessed)
  for x, y in ((pool1, norm1), (pool2, norm2)):
    reference = tf.nn.local_response_normalization(x, depth_radius=2, bias=1.0, alpha=1e-4 / 5, beta=0.75)
    assert max_rel(y, reference) < 1e-6


class Doubling(keras.layers.Layer):
  def call(self, x):
    return 2 * x


def test_a_layer_without_standard_form_is_named():
  inputs = keras.Input((None, None, 3))
  with pytest.raises(ValueError, match="layer twice .*Doubling.* has no standard Keras form"):
    PM.standard_copy(keras.Model(inputs, Doubling(name="twice")(inputs)))


# ----------------------------------------------------------------------------------------------------------------
# The modern towers (method.md §8) through every format, at 1/16 width


MODERN = {"resnet50_v1": (M.ModelConfig(backbone="resnet50", width_multiplier=0.0625, head="revisiting",
                                        patch_size=64), "revisiting"),
          "resnet18_v2": (M.ModelConfig(backbone="resnet18", width_multiplier=0.0625, head="revisiting",
                                        patch_size=64, resnet_version=2), "revisiting"),
          "vgg16_bn": (M.ModelConfig(backbone="vgg16_bn", width_multiplier=0.0625), "doersch")}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODERN))
def test_modern_towers_in_every_format(tmp_path, name):
  """SavedModel (constants), the Keras file, LiteRT, ONNX where installed, and a warm start from the export: each
  computes the folded tower's maps, learned BN scale and shift and arbitrary statistics included."""
  config, geometry = MODERN[name]
  networks = arbitrary_networks(config)
  rng = np.random.default_rng(5)
  for layer in networks.tower.layers:
    if isinstance(layer, CL.CaffeBatchNorm) and layer.gamma is not None:
      layer.gamma.assign(rng.uniform(0.5, 2, layer.gamma.shape).astype(np.float32))
      layer.beta.assign(rng.normal(0, 1, layer.beta.shape).astype(np.float32))
  folded = FO.fold_tower(networks.tower, config)
  info = SV.metadata(config, "drop", folded, FO.caffe_pooling(config), geometry, step=3)
  mode, names = info["preprocessing_mode"], M.BACKBONES[config.backbone].features
  path = str(tmp_path / "backbone")
  SV.save_backbone(folded, path, mode, info)
  assert not tf.saved_model.load(path).signatures["features"].variables
  images = photos(config.patch_size + 19, config.patch_size + 37, 2)
  reference = {k: v.numpy() for k, v in folded(A.standardize(tf.constant(images, tf.float32), mode)).items()}
  assert sorted(reference) == sorted(names)
  saved = reference_features(path, images)
  keras_path = str(tmp_path / "backbone.keras")
  PM.backbone_model(folded, mode).save(keras_path)
  from_file = keras.saving.load_model(keras_path)(images)
  runner, _ = litert_runner(CV.to_litert(path, str(tmp_path / "backbone.tflite")), tf.lite.Interpreter,
                            tf.lite.experimental.OpResolverType, True)
  litert = runner.get_signature_runner("features")(images=images)
  onnx = None
  if has("tf2onnx") and has("onnxruntime"):
    import onnxruntime  # pylint: disable=import-outside-toplevel
    session = onnxruntime.InferenceSession(CV.to_onnx(path, str(tmp_path / "backbone.onnx")),
                                           providers=["CPUExecutionProvider"])
    onnx = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"images": images})))
  for layer in names:
    assert max_rel(saved[layer], reference[layer]) < 1e-5, layer
    assert max_rel(from_file[layer], reference[layer]) < 1e-5, layer
    assert max_rel(litert[layer], reference[layer]) < TOLERANCE, layer
    if onnx is not None:
      assert max_rel(onnx[layer], reference[layer]) < TOLERANCE, layer
  # A warm start from the export, BN statistics fresh, computes the same output.
  fresh = RS.build_networks(config)
  WS.initialise(fresh, config, path)
  patches = A.standardize(tf.constant(photos(config.patch_size, config.patch_size), tf.float32), mode)
  output = M.output_name(config.backbone)
  expected = folded(patches)[output].numpy()
  assert max_rel(fresh.tower([patches, tf.ones([4])]).numpy().reshape(expected.shape), expected) < 1e-4


# ----------------------------------------------------------------------------------------------------------------
# Atomic folders (writes.atomic_folder)


def make(folder, files):
  for name, text in files.items():
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)


def contents(folder):
  return {os.path.relpath(p, folder): open(p).read() for p in glob.glob(f"{folder}/**/*", recursive=True)
          if os.path.isfile(p)}


def test_atomic_folder_replaces_keeps_foreign_entries_and_drops_stale_ones(tmp_path):
  out = tmp_path / "out"
  make(out, {"backbone/a": "old", "stale.tflite": "old", "eval/pretext.json": "mine"})
  with W.atomic_folder(out, owned=("backbone", "stale.tflite", "new.txt")) as staging:
    assert not os.path.exists(out / "backbone" / "b") and os.path.dirname(staging) == str(tmp_path)
    make(tmp_path / os.path.basename(staging), {"backbone/b": "new", "new.txt": "new"})
  assert contents(out) == {"backbone/b": "new", "new.txt": "new", "eval/pretext.json": "mine"}
  assert sorted(os.listdir(tmp_path)) == ["out"]  # no staging, no lock left


def test_atomic_folder_leaves_the_old_folder_on_error(tmp_path):
  out = tmp_path / "out"
  make(out, {"a": "old"})
  with pytest.raises(RuntimeError):
    with W.atomic_folder(out) as staging:
      make(tmp_path / os.path.basename(staging), {"a": "half"})
      raise RuntimeError("killed midway")
  assert contents(out) == {"a": "old"} and sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.parametrize("state", ["partial", "complete_not_moved", "between_renames", "old_left", "old_alone"])
def test_recovery_after_a_kill_at_each_step(tmp_path, state):
  """Each state a kill can leave beside OUT ends, once recovered (the next writer does it first), as one complete
  folder, old or new, with OUT's foreign entries kept and nothing left beside it."""
  out, new, old = tmp_path / "out", tmp_path / ".out.new-1", tmp_path / ".out.old-1"
  make(out, {"a": "old", "eval/x": "mine"})
  expected = {"a": "new", "eval/x": "mine"}
  if state == "partial":  # killed while writing
    make(tmp_path / ".out.partial-1", {"a": "half"})
    expected = {"a": "old", "eval/x": "mine"}
  elif state == "complete_not_moved":  # killed after the new folder was complete
    make(new, {"a": "new"})
  elif state == "between_renames":  # OUT's foreign entries moved into the new folder, OUT moved aside
    make(new, {"a": "new"})
    os.rename(out / "eval", new / "eval")
    os.rename(out, old)
  elif state == "old_left":  # killed while removing the replaced folder
    make(old, {"a": "older"})
    expected = {"a": "old", "eval/x": "mine"}
  else:  # the replaced folder alone: put back
    os.rename(out, old)
    expected = {"a": "old", "eval/x": "mine"}
  W.recover_folder(out, owned=("a",))
  assert contents(out) == expected
  assert sorted(os.listdir(tmp_path)) == ["out"]


def test_a_second_writer_is_refused(tmp_path):
  with W.atomic_folder(tmp_path / "out"):
    with pytest.raises(E.UsageError, match="is being written by process"):
      with W.atomic_folder(tmp_path / "out"):
        pass


# ----------------------------------------------------------------------------------------------------------------
# Runs in process: vanishing checkpoints, warm starts


def tiny_run(folder, config=TINY, steps=(5, 10), seed=0):
  """A run directory with config.json and checkpoints of arbitrary networks at `steps`, as training writes them."""
  networks = arbitrary_networks(config, seed)
  manager = tf.train.CheckpointManager(tf.train.Checkpoint(tower=networks.tower, head=networks.head), str(folder),
                                       max_to_keep=10, checkpoint_name=RD.CHECKPOINT_PREFIX)
  for step in steps:
    networks.tower.get_layer("conv1").bias.assign_add(tf.fill(networks.tower.get_layer("conv1").bias.shape, 0.5))
    manager.save(checkpoint_number=step)
  RD.write_config(str(folder), RD.RunConfig(model=config, input=D.InputConfig(data="photos"),
                                            optimisation=T.OptimConfig()))
  return networks


def delete_checkpoint(path):
  for name in glob.glob(f"{path}.*"):
    os.remove(name)


def test_load_run_reads_the_next_checkpoint_when_its_own_vanishes(tmp_path, monkeypatch):
  networks = tiny_run(tmp_path)
  real_restore, calls = RS.restore, []

  def trainer_deletes_it_first(target, path):
    # As a trainer with --keep_checkpoints does: a newer checkpoint appears and the one being read is removed.
    calls.append(path)
    if len(calls) == 1:
      tf.train.CheckpointManager(tf.train.Checkpoint(tower=networks.tower, head=networks.head), str(tmp_path),
                                 max_to_keep=10, checkpoint_name="ckpt").save(checkpoint_number=15)
      delete_checkpoint(path)
    return real_restore(target, path)
  monkeypatch.setattr(RS, "restore", trainer_deletes_it_first)
  run = RS.load_run(str(tmp_path))
  assert [os.path.basename(p) for p in calls] == ["ckpt-10", "ckpt-15"] and run.step == 15


def test_a_chosen_checkpoint_that_vanishes_is_named(tmp_path, monkeypatch):
  tiny_run(tmp_path)
  real_restore = RS.restore

  def deleted_midway(target, path):
    delete_checkpoint(path)
    return real_restore(target, path)
  monkeypatch.setattr(RS, "restore", deleted_midway)
  with pytest.raises(E.UsageError, match=r"--checkpoint=5: .*ckpt-5 disappeared while it was being read.*ckpt-10"):
    RS.load_run(str(tmp_path), "5")


def tower_weights(networks):
  return {w.path: w.numpy() for w in networks.tower.weights}


@pytest.mark.parametrize("kind", [WS.RUN, WS.CHECKPOINT])
def test_warm_start_from_a_run_or_checkpoint_copies_tower_and_head(tmp_path, kind):
  source = tiny_run(tmp_path / "source", seed=1)
  path = str(tmp_path / "source") if kind == WS.RUN else str(tmp_path / "source" / "ckpt-10")
  networks = arbitrary_networks(seed=2)
  record = WS.initialise(networks, TINY, path)
  assert record == {"source": path, "kind": kind, "checkpoint": str(tmp_path / "source" / "ckpt-10"), "step": 10,
                    "head": True}
  expected = tower_weights(source)
  for name, value in tower_weights(networks).items():
    np.testing.assert_array_equal(value, expected[name], err_msg=name)
  for mine, theirs in zip(networks.head.weights, source.head.weights):
    np.testing.assert_array_equal(mine.numpy(), theirs.numpy())


def test_warm_start_from_an_exported_backbone_copies_its_folded_weights(backbone):
  _, folded, path = backbone
  networks = arbitrary_networks(seed=3)
  head_before = [w.numpy() for w in networks.head.weights]
  record = WS.initialise(networks, TINY, path)
  assert record == {"source": path, "kind": WS.BACKBONE, "checkpoint": "RUN/ckpt-7", "step": 7, "rescaled": False,
                    "head": False}
  tower = networks.tower
  np.testing.assert_array_equal(tower.get_layer("conv3").kernel.numpy(), folded.get_layer("conv3").kernel.numpy())
  np.testing.assert_array_equal(tower.get_layer("fc6").kernel.numpy(),
                                folded.get_layer("fc6").kernel.numpy().reshape(tower.get_layer("fc6").kernel.shape))
  for before, weight in zip(head_before, networks.head.weights):
    np.testing.assert_array_equal(before, weight.numpy())
  # With fresh batch-norm statistics (mean 0, variance 1) the new tower computes the exported backbone's features.
  for layer in tower.layers:
    if isinstance(layer, CL.CaffeBatchNorm):
      for weight in (layer.mean_sum, layer.variance_sum, layer.scale_sum):
        weight.assign(tf.zeros_like(weight))
  patches = A.standardize(tf.constant(photos(96, 96), tf.float32))
  reference = folded(patches)["fc6"].numpy()
  assert max_rel(tower([patches, tf.ones([4])]).numpy().reshape(reference.shape), reference) < 1e-4


@pytest.mark.parametrize("kind", [WS.RUN, WS.BACKBONE])
def test_warm_start_refuses_other_shapes_naming_the_layer(tmp_path, backbone, kind):
  path = backbone[2] if kind == WS.BACKBONE else str(tmp_path)
  if kind == WS.RUN:
    tiny_run(tmp_path)
  wider = M.ModelConfig(width_multiplier=0.125)
  with pytest.raises(E.UsageError, match=r"layer conv1's kernel has shape \(11, 11, 3, 6\) there but "
                                         r"\(11, 11, 3, 12\) in this run's tower"):
    WS.initialise(RS.build_networks(wider), wider, path)


def test_warm_start_names_a_path_that_is_nothing(tmp_path):
  with pytest.raises(E.UsageError, match="is neither a run directory"):
    WS.find_source(str(tmp_path / "nothing"))


# ----------------------------------------------------------------------------------------------------------------
# The programs


@pytest.fixture(scope="session")
def deployed(tmp_path_factory, small_run):
  """OUT: export --litert --litert_float16 (and --onnx where tf2onnx is installed) of the small run, at ckpt-10; made
  once per session."""
  with made_once(tmp_path_factory, "deployed") as (path, make):
    if make:
      extra = ["--onnx"] if has("tf2onnx") else []
      result = run_module(["context_keras.export", f"--model_dir={small_run}", f"--output={path / 'out'}", "--litert",
                           "--litert_float16", *extra], cwd=path)
      assert result.returncode == 0, log_of(result)
      (path / "summary.json").write_text(result.stdout.strip().splitlines()[-1])
  return path / "out", json.loads((path / "summary.json").read_text())


@pytest.mark.slow
@needs_litert
def test_export_writes_conversions_that_match_the_saved_model(deployed):
  from ai_edge_litert import interpreter as litert  # pylint: disable=import-outside-toplevel
  out, summary = deployed
  assert summary["pooling"] == "caffe"
  assert summary["written"][:4] == ["backbone", "backbone.keras", "pair_classifier", "context_model.keras"]
  assert {"backbone.tflite", "backbone_float16.tflite"} <= set(summary["written"])
  features = litert.Interpreter(model_path=str(out / "backbone.tflite")).get_signature_runner("features")
  half = litert.Interpreter(model_path=str(out / "backbone_float16.tflite")).get_signature_runner("features")
  keras_file = keras.saving.load_model(out / "backbone.keras")
  session = None
  if (out / "backbone.onnx").exists():
    import onnxruntime  # pylint: disable=import-outside-toplevel
    session = onnxruntime.InferenceSession(str(out / "backbone.onnx"), providers=["CPUExecutionProvider"])
  for size in ((96, 96), (131, 157), (227, 227)):
    images = photos(*size)
    reference = reference_features(str(out / "backbone"), images)
    assert reference["fc6"].shape[1:3] == tuple(caffe_sizes(s)["fc6"] for s in size)
    outputs = {"litert": features(images=images), "keras": keras_file(images)}
    if session:
      outputs["onnx"] = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"images": images})))
    for path, got in outputs.items():
      for layer in NAMES:
        assert max_rel(got[layer], reference[layer]) < TOLERANCE, (path, size, layer)
    got = half(images=images)
    assert max(max_rel(got[layer], reference[layer]) for layer in NAMES) < 1e-2


TRAIN_ONE_STEP = r"""
import json, sys
import keras
import numpy as np
model = keras.saving.load_model(sys.argv[1])
images = np.load(sys.argv[2])
inputs = keras.Input((None, None, 3))
logits = keras.layers.Dense(4)(keras.layers.GlobalAveragePooling2D()(model(inputs)["fc6"]))
classifier = keras.Model(inputs, logits)
classifier.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
model.trainable = False
model.trainable = True
before = {w.path: w.numpy().copy() for w in model.weights}
trainable = {w.path for w in model.trainable_weights}
loss = classifier.fit(images, np.arange(len(images)), epochs=1, batch_size=len(images), verbose=0).history["loss"]
changed = {w.path for w in model.weights if not np.array_equal(before[w.path], w.numpy())}
print(json.dumps({"outputs": sorted(model.output), "trainable": sorted(trainable), "changed": sorted(changed),
                  "loss": loss, "context_keras": any(m.startswith("context_keras") for m in sys.modules)}))
"""


@pytest.mark.slow
def test_keras_file_loads_and_trains_without_context_keras(exported, tmp_path):
  """OUT/backbone.keras in a process without context_keras on its path: keras.saving.load_model (safe mode), then
  one Adam step through fit after the usual freeze-unfreeze; every conv/fc weight moves, no fixed kernel does."""
  out, summary = exported
  assert "backbone.keras" in summary["written"]
  np.save(tmp_path / "images.npy", photos(131, 157))
  (tmp_path / "train.py").write_text(TRAIN_ONE_STEP)
  result = subprocess.run([sys.executable, str(tmp_path / "train.py"), str(out / "backbone.keras"),
                           str(tmp_path / "images.npy")], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH="", TF_CPP_MIN_LOG_LEVEL="2"))
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report["context_keras"] is False and report["outputs"] == sorted(NAMES)
  weights = [f"{name}/{kind}" for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6")
             for kind in ("kernel", "bias")]
  stft = [f"{name}_stft/{kind}" for name in ("mean_square_log", "norm1_log", "norm2_log")
          for kind in ("real_kernel", "imag_kernel")]
  assert report["trainable"] == sorted(weights + stft)  # unfrozen: the STFT kernels too (method.md §11.3)
  assert set(report["changed"]) - set(stft) == set(weights)
  assert np.isfinite(report["loss"][0])


def consistent_export(out, steps):
  """The step of the complete export in OUT: every part holds the same checkpoint's conv1 kernel (which folding does
  not change) and names the same checkpoint."""
  kernels = {step: reader.get_tensor(CONV1_KERNEL) for step, reader in steps.items()}
  info = SV.read_metadata(str(out / "backbone"))
  assert SV.read_metadata(str(out / "pair_classifier"))["checkpoint"] == info["checkpoint"]
  step = info["step"]
  parts = {"backbone": SV.read_weights(str(out / "backbone"))["conv1/kernel"],
           "pair_classifier": SV.read_weights(str(out / "pair_classifier"))["conv1/kernel"],
           "backbone.keras": keras.saving.load_model(out / "backbone.keras").get_layer("features")
           .get_layer("conv1").kernel.numpy(),
           "context_model.keras": SV.load_context_model(out / "context_model.keras").get_layer("tower")
           .get_layer("conv1").kernel.numpy()}
  for name, kernel in parts.items():
    np.testing.assert_array_equal(kernel, kernels[step], err_msg=name)
  assert (out / "eval" / "pretext.json").read_text() == "kept"
  return step


@pytest.mark.slow
def test_kill_9_during_reexports_leaves_a_complete_export(small_run, tmp_path):
  """Re-exports of alternating checkpoints into one OUT, each killed with SIGKILL at a seeded moment: at a random
  time, as soon as its temporary folder appears, or as soon as it is complete and being moved into place. After
  each kill OUT is one complete export (all parts of one checkpoint, with OUT's other files kept), or, for the
  instant between the two renames, the next export finds it beside OUT and completes the move."""
  out = tmp_path / "out"
  steps = {step: tf.train.load_checkpoint(str(small_run / f"ckpt-{step}")) for step in (5, 10)}

  def export(step):
    return ["context_keras.export", f"--model_dir={small_run}", f"--output={out}", f"--checkpoint={step}"]
  result = run_module(export(5), cwd=tmp_path)
  assert result.returncode == 0, log_of(result)
  (out / "eval").mkdir()
  (out / "eval" / "pretext.json").write_text("kept")
  start = time.time()
  result = run_module(export(10), cwd=tmp_path)
  duration = time.time() - start
  assert result.returncode == 0 and consistent_export(out, steps) == 10
  rng = random.Random(10)
  seen = []
  for attempt, moment in enumerate(["appears", "complete", "random"]):  # each moment once, the steps alternating
    step = 5 if attempt % 2 == 0 else 10
    process = start_module(export(step), tmp_path, tmp_path / f"export_{attempt}.txt")
    deadline = time.time() + (rng.uniform(0.3, 1.0) * duration if moment == "random" else 300)
    pattern = str(tmp_path / (".out.partial-*" if moment == "appears" else ".out.new-*"))
    while time.time() < deadline and process.poll() is None:
      if moment != "random" and glob.glob(pattern):
        break
      time.sleep(0.005)
    process.kill()
    process.wait()
    if out.exists():
      seen.append(consistent_export(out, steps))
    else:
      assert glob.glob(str(tmp_path / ".out.new-*")), os.listdir(tmp_path)
      seen.append("between renames")
  result = run_module(export(5), cwd=tmp_path)
  assert result.returncode == 0, log_of(result)
  assert consistent_export(out, steps) == 5
  assert not glob.glob(str(tmp_path / ".out*")), os.listdir(tmp_path)  # nothing left beside OUT
  print("states after the kills:", seen)


@pytest.mark.slow
def test_train_init_from_starts_a_new_run_and_records_it(small_run, exported, tmp_path):
  out, _ = exported
  result = run_module(demo_args(tmp_path / "warm", "--train_steps=2", f"--init_from={out / 'backbone'}"),
                      cwd=tmp_path)
  assert result.returncode == 0, log_of(result)
  assert "Starting a new run" in log_of(result) and "Initialised from backbone" in log_of(result)
  record = json.loads((tmp_path / "warm" / "config.json").read_text())["init_from"]
  assert record["kind"] == "backbone" and record["source"] == str(out / "backbone") and record["step"] == 10
  assert RD.checkpoint_step(RD.find_checkpoint(str(tmp_path / "warm"))) == 2  # it counted from 0
  # (A warm start from a run of another width: test_usage.)


# Runs each snippet file named on the command line as a script of its own (a fresh namespace: an import it lacks
# fails), all in one process, which spares an interpreter and a TensorFlow import per snippet.
SNIPPETS = r"""
import json, runpy, sys, traceback
ran, failed = [], {}
for path in sys.argv[1:]:
  try:
    runpy.run_path(path, run_name="__main__")
  except BaseException as e:  # pylint: disable=broad-except
    if not (isinstance(e, SystemExit) and not e.code):
      failed[path] = traceback.format_exc()
  ran.append(path)
print(json.dumps({"ran": ran, "failed": failed,
                  "context_keras": any(m.startswith("context_keras") for m in sys.modules)}))
"""


def doc_section(path, title):
  """The text of the section of a Markdown file (relative to the repository) under the level-2 heading `title`."""
  text = open(os.path.join(REPO, path), encoding="utf-8").read()
  start = text.index(f"\n## {title}\n")
  end = text.find("\n## ", start + 1)
  return text[start:end if end > 0 else None]


def fenced_blocks(section, language):
  blocks = section.split(f"```{language}\n")[1:]
  return [block.split("```")[0] for block in blocks]


def write_labelled_folder(folder, per_class=12, size=128):
  """A labelled set of class sub-folders: which of four sample photos a random crop comes from."""
  import skimage.data  # pylint: disable=import-outside-toplevel
  import skimage.io  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  for name in ("astronaut", "chelsea", "coffee", "rocket"):
    image = getattr(skimage.data, name)()
    (folder / name).mkdir(parents=True)
    for i in range(per_class):
      y, x = rng.integers(0, image.shape[0] - size), rng.integers(0, image.shape[1] - size)
      skimage.io.imsave(folder / name / f"{i}.png", image[y:y + size, x:x + size], check_contrast=False)


def run_snippets(blocks, cwd):
  paths = []
  for index, block in enumerate(blocks):
    (cwd / f"snippet_{index}.py").write_text(block)
    if "onnxruntime" in block and not has("onnxruntime"):
      continue
    if "ai_edge_litert" in block and not has("ai_edge_litert"):
      continue
    paths.append(f"snippet_{index}.py")
  result = subprocess.run([sys.executable, "-c", SNIPPETS, *paths], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, PYTHONPATH="", TF_CPP_MIN_LOG_LEVEL="2"))
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  failures = [f"{path}:\n{(cwd / path).read_text()}\n{error[-3000:]}" for path, error in report["failed"].items()]
  assert not failures, "\n".join(failures)
  assert report["ran"] == paths and not report["context_keras"]


@pytest.mark.slow
def test_readme_using_the_backbone_runs_verbatim(deployed, tmp_path):
  """Every Python snippet of README's 'Using the backbone', as written, in a process without context_keras (each as
  a script of its own, in one interpreter), on an export of the small run placed where the section's prerequisite
  commands put it and a labelled folder of class sub-folders where its classifier reads one; those commands need no
  extra beyond the demo's (no --litert, --onnx). Then every snippet of docs/deployment.md's 'LiteRT and ONNX' on the
  same export, where that page puts it."""
  out, _ = deployed
  section = doc_section("README.md", "Using the backbone")
  commands = "\n".join(fenced_blocks(section, "sh"))
  assert "context_keras.export" in commands and "--litert" not in commands and "--onnx" not in commands, commands
  export_dir = commands.split("context_keras.export", 1)[1].split("--output=", 1)[1].split()[0]
  shutil.copytree(out, tmp_path / export_dir)
  write_labelled_folder(tmp_path / "labelled")
  blocks = fenced_blocks(section, "python")
  assert len(blocks) >= 3 and any("labelled" in block for block in blocks)
  assert all(export_dir in block for block in blocks if "load" in block), blocks
  run_snippets(blocks, tmp_path)

  runtimes = tmp_path / "runtimes"
  shutil.copytree(out, runtimes / "runs" / "demo_export")
  blocks = fenced_blocks(doc_section("docs/deployment.md", "LiteRT and ONNX"), "python")
  assert len(blocks) >= 2
  run_snippets(blocks, runtimes)
