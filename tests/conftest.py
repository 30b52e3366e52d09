"""Test set-up: two logical CPU devices (so MirroredStrategy runs two replicas), quiet TensorFlow, and the fixtures
the test modules share: photos, ONE small trained run and its export (made once per session, whatever the number of
xdist workers: helpers.made_once), an ordinary user.

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


def pytest_report_header():
  """Which CPU kernels TensorFlow runs here: the `kernels` tests' numbers depend on it (docs/testing.md)."""
  from tensorflow.python.util import _pywrap_util_port  # pylint: disable=import-outside-toplevel
  onednn = _pywrap_util_port.IsMklEnabled()
  return (f"TensorFlow CPU kernels: {'oneDNN' if onednn else 'Eigen'} (TF_ENABLE_ONEDNN_OPTS="
          f"{os.environ.get('TF_ENABLE_ONEDNN_OPTS', 'unset')})")


# The suite's longest tests (30 s or more each in a run of the whole suite: docs/testing.md, Measured), started first.
LONGEST = frozenset("""
test_resnet_revisiting_run_resumes_exactly_exports_and_evaluates
test_the_whole_network_trains_on_the_pretext
test_program_runs_in_other_configurations
test_two_replicas_with_sync_bn_equal_one_device
test_pretext_accuracy_rises_above_chance
test_vgg16_run_resumes_exactly_and_exports_rescaled
test_per_layer_numbers_resume_after_kill_equal_an_uninterrupted_run
test_pretext_writes_json_and_summaries
test_device_augmentation_in_the_step
test_readme_using_the_backbone_runs_verbatim
test_huge_jpegs_train_in_bounded_memory
test_sixteen_parallel_decodes_of_images_that_cannot_be_reduced_stay_bounded
test_a_lost_worker_is_named_with_the_step_and_the_checkpoint_to_resume_from
test_programs_on_the_bad_folder
test_a_run_lives_wholly_on_a_store
test_programs_read_a_tfds_split
test_the_wheel_installs_and_its_programs_run_from_any_folder
test_two_workers_train_in_lockstep_and_the_chief_writes
test_disk_full_stops_with_a_clear_error_and_keeps_the_previous_checkpoint
test_logs_hold_our_own_lines_and_progress_lines_say_when_it_ends
test_ablation_trains_evaluates_and_writes_table_json_and_plot
test_resumed_run_matches_uninterrupted_run
test_kill_9_at_random_moments_never_loses_a_checkpoint
test_training_through_the_data_service
test_unreachable_data_service_times_out_and_signals_stop_at_any_time
test_nan_loss_stops_naming_the_step_and_no_checkpoint_holds_it
test_detect_resumes_after_kill_stops_on_sigterm_and_exports_the_boxes_it_scored
""".split())


def pytest_configure(config):
  """xdist hands out one test at a time (--maxschedchunk=1 unless given): its default gives each worker a quarter of
  its share at the start, so that a worker that drew the quick tests sat idle for ten minutes while the other worked
  through its long ones (docs/testing.md, Measured)."""
  if hasattr(config.option, "maxschedchunk") and config.option.maxschedchunk is None:
    config.option.maxschedchunk = 1


def pytest_collection_modifyitems(items):
  """A hung test fails instead of stalling CI (pytest-timeout, from the test extra). The longest tests run first,
  then the other slow ones, so that the many quick ones fill the xdist workers' last minutes instead of one worker
  finishing a long test alone."""
  for item in items:
    if not item.get_closest_marker("timeout"):
      item.add_marker(pytest.mark.timeout(900))
  items.sort(key=lambda item: (item.get_closest_marker("slow") is None, item.originalname not in LONGEST))


@pytest.fixture(scope="session")
def two_replicas():
  """One MirroredStrategy over the two logical CPUs for the whole process: a second one over the same devices starts
  its collective instance keys afresh, and its steps then meet the first one's in the collectives ("Shape mismatch
  in the collective instance"). A module-scoped one was made again whenever xdist ran another module's test in
  between."""
  return tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")][:NUM_CPU_DEVICES])


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
  """RUN: 10 steps of the small network on the demo photos, checkpoints at 5 and 10, progress lines at 4, 8 and 10,
  its export; made once per session. Copy it before changing it."""
  with helpers.made_once(tmp_path_factory, "small_run") as (path, make):
    if make:
      result = helpers.run_module(helpers.demo_args(path / "run", "--train_steps=10", "--checkpoint_every=5",
                                                    "--log_every=4"), cwd=path)
      assert result.returncode == 0, helpers.log_of(result)
      (path / "log.txt").write_text(helpers.log_of(result))
  return path / "run"


@pytest.fixture(scope="session")
def small_run_log(small_run):
  """What the small run's training process wrote to stdout and stderr."""
  return (small_run.parent / "log.txt").read_text()


@pytest.fixture(scope="session")
def exported(tmp_path_factory, small_run):
  """OUT: the export command on the small run, with rescaling on 64 patches of the demo photos; (OUT, its printed
  summary). Made once per session."""
  with helpers.made_once(tmp_path_factory, "exported") as (path, make):
    if make:
      result = helpers.run_module(["context_keras.export", f"--model_dir={small_run}", f"--output={path / 'out'}",
                                   f"--rescale_data={helpers.REPO}/flags/demo_photos.txt",
                                   "--data_root=package:skimage.data", "--rescale_patches=64"], cwd=path)
      assert result.returncode == 0, helpers.log_of(result)
      (path / "summary.json").write_text(result.stdout.strip().splitlines()[-1])
  return path / "out", json.loads((path / "summary.json").read_text())


@pytest.fixture(scope="session")
def tfds_data_dir(tmp_path_factory):
  """A TFDS data dir holding the tests' photo dataset (tfds_photos.py: 24 + 9 crops, three classes), prepared once
  per session; skips where TensorFlow Datasets (the tfds extra) is not installed."""
  pytest.importorskip("tensorflow_datasets")
  import tfds_photos  # pylint: disable=import-outside-toplevel  # it imports TFDS
  path = tmp_path_factory.mktemp("tfds")
  tfds_photos.build(path)
  return path


@pytest.fixture(scope="session")
def voc_devkit(tmp_path_factory):
  """A small VOCdevkit folder (tests/voc_set.py: sample photos with pasted objects): 16 trainval and 8 test images
  of 4 classes; made once per session. Copy it before changing it."""
  import voc_set  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("voc") / "VOC2007"
  voc_set.write(str(root), train=16, test=8, seed=0)
  return root


@pytest.fixture(scope="session")
def tfds_voc_data_dir(tmp_path_factory, voc_devkit):
  """A TFDS data dir holding voc_devkit's images and annotations as TFDS's voc stores them (tfds_voc.py:
  tfds:context_keras_voc/2007, splits train, validation and test in 2 files each), prepared once per session; skips
  where TensorFlow Datasets is not installed."""
  pytest.importorskip("tensorflow_datasets")
  import tfds_voc  # pylint: disable=import-outside-toplevel  # it imports TFDS
  path = tmp_path_factory.mktemp("tfds_voc")
  tfds_voc.build(path, voc_devkit)
  return path


@pytest.fixture(scope="session")
def deterministic_run(tmp_path_factory):
  """(RUN, its log): helpers.DETERMINISTIC, the run test_pinned pins; made once per session."""
  with helpers.made_once(tmp_path_factory, "deterministic_run") as (path, make):
    if make:
      result = helpers.run_module([*helpers.DETERMINISTIC, f"--model_dir={path / 'run'}"], cwd=helpers.REPO)
      assert result.returncode == 0, helpers.log_of(result)
      (path / "log.txt").write_text(helpers.log_of(result))
  return path / "run", (path / "log.txt").read_text()


@pytest.fixture(scope="session")
def file_permissions(tmp_path_factory):
  """How a subprocess's file accesses can obey permissions: (True, a preexec_fn or None), or (False, why they
  cannot here)."""
  if os.geteuid() != 0:
    return True, None
  probe = tmp_path_factory.mktemp("permission_probe") / "secret"
  probe.write_text("x")
  probe.chmod(0)
  try:
    result = subprocess.run([sys.executable, "-c", f"open({str(probe)!r}).read()"],
                            preexec_fn=helpers.drop_dac_capabilities, capture_output=True, text=True, timeout=60)
  except subprocess.SubprocessError:
    return False, "cannot drop CAP_DAC_OVERRIDE here, so root ignores file permissions"
  if "PermissionError" not in result.stderr:
    return False, "file permissions are not enforced for subprocesses here"
  return True, helpers.drop_dac_capabilities


@pytest.fixture(scope="session")
def ordinary_user(file_permissions):
  """A preexec_fn (or None) under which a subprocess's file accesses obey permissions; skips if none can be had."""
  enforced, preexec = file_permissions
  if not enforced:
    pytest.skip(preexec)
  return preexec
