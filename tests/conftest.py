"""Test set-up: two logical CPU devices (so MirroredStrategy runs two replicas), quiet TensorFlow, shared photos."""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CPU_DEVICES = 2

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * NUM_CPU_DEVICES)


def skimage_photo_dir():
  import skimage.data  # test extra
  return os.path.dirname(skimage.data.__file__)


@pytest.fixture(scope="session")
def photo_dir():
  return skimage_photo_dir()


@pytest.fixture(scope="session")
def demo_list():
  return os.path.join(REPO, "flags", "demo_photos.txt")


def write_png(path, array):
  tf.io.write_file(path, tf.io.encode_png(array))


@pytest.fixture
def tiny_image_dir(tmp_path):
  """Three random RGB images big enough for a grid, in nested folders with mixed-case extensions."""
  rng = np.random.default_rng(0)
  (tmp_path / "a" / "b").mkdir(parents=True)
  for name in ("one.png", "a/two.PNG", "a/b/three.Png"):
    write_png(str(tmp_path / name), rng.integers(0, 255, (300, 400, 3), dtype=np.uint8))
  return tmp_path


def run_module(args, cwd, timeout=600, env=None):
  """Runs `python -m ...` in a subprocess with this repository importable; returns the CompletedProcess."""
  import subprocess
  full_env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
                  TF_CPP_MIN_LOG_LEVEL="2", **(env or {}))
  return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                        timeout=timeout)


def pytest_collection_modifyitems(items):
  """A hung test fails instead of stalling CI (pytest-timeout, from the test extra)."""
  for item in items:
    if not item.get_closest_marker("timeout"):
      item.add_marker(pytest.mark.timeout(900))
