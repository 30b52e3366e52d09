"""Test set-up: two logical CPU devices (so MirroredStrategy runs two replicas), quiet TensorFlow, and the fixtures
the test modules share: photos, ONE small trained run and its export (made once per session), an ordinary user.

`python -m pytest -m "not slow"` runs the fast tier (no subprocess, no training run); the whole suite is the CI's.
"""
import json
import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import helpers  # noqa: E402

NUM_CPU_DEVICES = 2

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * NUM_CPU_DEVICES)


def pytest_collection_modifyitems(items):
  """A hung test fails instead of stalling CI (pytest-timeout, from the test extra)."""
  for item in items:
    if not item.get_closest_marker("timeout"):
      item.add_marker(pytest.mark.timeout(900))


@pytest.fixture(scope="session")
def photo_dir():
  return helpers.skimage_photo_dir()


@pytest.fixture(scope="session")
def demo_list():
  return os.path.join(helpers.REPO, "flags", "demo_photos.txt")


@pytest.fixture
def tiny_image_dir(tmp_path):
  """Three random RGB images big enough for a grid, in nested folders with mixed-case extensions."""
  rng = np.random.default_rng(0)
  (tmp_path / "a" / "b").mkdir(parents=True)
  for name in ("one.png", "a/two.PNG", "a/b/three.Png"):
    helpers.write_png(tmp_path / name, rng.integers(0, 255, (300, 400, 3), dtype=np.uint8))
  return tmp_path


@pytest.fixture(scope="session")
def small_run(tmp_path_factory):
  """RUN: 10 steps of the small network on the demo photos, checkpoints at 5 and 10, its export; made once per
  session. Copy it before changing it."""
  path = tmp_path_factory.mktemp("small_run")
  result = helpers.run_module(helpers.demo_args(path / "run", "--train_steps=10", "--checkpoint_every=5"), cwd=path)
  assert result.returncode == 0, helpers.log_of(result)
  return path / "run"


@pytest.fixture(scope="session")
def exported(tmp_path_factory, small_run):
  """OUT: the export command on the small run, with rescaling on 64 patches of the demo photos; (OUT, its printed
  summary)."""
  path = tmp_path_factory.mktemp("exported")
  result = helpers.run_module(["context_keras.export", f"--model_dir={small_run}", f"--output={path / 'out'}",
                               f"--rescale_data={helpers.REPO}/flags/demo_photos.txt",
                               "--data_root=package:skimage.data", "--rescale_patches=64"], cwd=path)
  assert result.returncode == 0, helpers.log_of(result)
  return path / "out", json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def voc_devkit(tmp_path_factory):
  """A small VOCdevkit folder (tests/voc_set.py: sample photos with pasted objects): 16 trainval and 8 test images
  of 4 classes; made once per session. Copy it before changing it."""
  import voc_set  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("voc") / "VOC2007"
  voc_set.write(str(root), train=16, test=8, seed=0)
  return root


@pytest.fixture(scope="session")
def ordinary_user(tmp_path_factory):
  """A preexec_fn (or None) under which a subprocess's file accesses obey permissions; skips if none can be had."""
  if os.geteuid() != 0:
    return None
  probe = tmp_path_factory.mktemp("permission_probe") / "secret"
  probe.write_text("x")
  probe.chmod(0)
  try:
    result = subprocess.run([sys.executable, "-c", f"open({str(probe)!r}).read()"],
                            preexec_fn=helpers.drop_dac_capabilities, capture_output=True, text=True, timeout=60)
  except subprocess.SubprocessError:
    pytest.skip("cannot drop CAP_DAC_OVERRIDE here, so root ignores file permissions")
  if "PermissionError" not in result.stderr:
    pytest.skip("file permissions are not enforced for subprocesses here")
  return helpers.drop_dac_capabilities
