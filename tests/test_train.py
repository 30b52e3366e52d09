"""The training program: distributed step equivalence, resume, the quit file, divergence, learning, other
configurations. (Its usage errors: test_usage; pause, SIGTERM and SIGINT: test_faults.)"""
import glob
import os
import re
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf

from context_keras.input import augment as A
from context_keras.input import pipeline as D
from context_keras.model import networks as M
from context_keras.training import trainer as trainer_lib
from helpers import CONV1_KERNEL
from helpers import DETERMINISTIC
from helpers import REPO
from helpers import checkpoint_steps
from helpers import demo_args
from helpers import log_of
from helpers import run_cases
from helpers import run_module
from helpers import start_module
from helpers import wait_for

# ------------------------------------------------------------------------------------------------------------
# One step on two replicas equals the single-device step


def input_config(photo_dir, demo_list, augment_on="host", geometry="doersch"):
  capacity = dict(batch_patches=27, batch_pairs=24) if geometry == "revisiting" else dict(batch_patches=64,
                                                                                           batch_pairs=320)
  return D.InputConfig(data=demo_list, data_root=photo_dir, augment_on=augment_on, geometry=geometry, **capacity)


def two_batches(photo_dir, demo_list, augment_on="host", geometry="doersch"):
  return list(D.make_dataset(input_config(photo_dir, demo_list, augment_on, geometry)).take(2))


def concat_batches(a, b):
  """One batch holding both, as a single device would see the global batch."""
  n = a["patches"].shape[0]
  per_patch = ("patches", "patch_mask") + (("patch_keys",) if "patch_keys" in a else ())
  out = {k: tf.concat([a[k], b[k]], 0) for k in per_patch + ("label", "pair_mask", "skipped", "skipped_reason")}
  for k in ("first", "second"):
    out[k] = tf.concat([a[k], b[k] + n], 0)
  for k in ("images", "too_small", "unreadable"):
    out[k] = a[k] + b[k]
  out["resume"] = b["resume"]
  return out


# The modern towers' case: ResNet-18 with batch norm's scale and shift, in the revisiting geometry, and the L2 terms
# each replica adds; 1/8 wide, as at 1/16 its 4-channel convolutions abort oneDNN's filter gradient (docs/testing.md,
# Two sets of CPU kernels). The other cases: the small AlexNet-BN.
RESNET = dict(backbone="resnet18", patch_size=64, width_multiplier=0.125)
ALEXNET = dict(width_multiplier=0.0625)


def make_trainer(strategy, sync, reduction, tower=None, augment=None):
  keras.utils.set_random_seed(0)
  l2 = dict(l2_tower=1e-2, l2_head=5e-2) if tower else {}
  return trainer_lib.Trainer(strategy, M.ModelConfig(sync_batchnorm=sync, **(tower or ALEXNET)),
                             trainer_lib.OptimConfig(learning_rate=1e-2 if reduction == "mean" else 1e-4,
                                                     momentum=0.9, loss_reduction=reduction, **l2), augment=augment)


def one_step(trainer, batches):
  """One step of the trainer's compiled loop, as the training program runs it: each replica takes its batch from a
  dataset distributed by the strategy (one pipeline's consecutive elements go to consecutive replicas). Returns the
  loop's outputs."""
  def dataset_fn(context):
    dataset = tf.data.Dataset.from_tensors(batches[0])
    for batch in batches[1:]:
      dataset = dataset.concatenate(tf.data.Dataset.from_tensors(batch))
    return dataset
  return trainer.train_loop(iter(trainer.strategy.distribute_datasets_from_function(dataset_fn)), tf.constant(1))


def reordered(batch, order):
  """The same batch with its patches in another order (its pairs still naming the same patches)."""
  order = tf.constant(order)
  out = dict(batch)
  for k in ("patches", "patch_mask") + (("patch_keys",) if "patch_keys" in batch else ()):
    out[k] = tf.gather(batch[k], order)
  position = tf.cast(tf.math.invert_permutation(order), batch["first"].dtype)
  for k in ("first", "second"):
    out[k] = tf.gather(position, batch[k])
  return out


def weights_of(trainer):
  return [v.numpy() for v in trainer.networks.tower.weights + trainer.networks.head.weights]


@pytest.mark.slow
@pytest.mark.kernels
@pytest.mark.parametrize("reduction, tower, geometry", [("sum", None, "doersch"), ("mean", None, "doersch"),
                                                        ("mean", RESNET, "revisiting")],
                         ids=["sum", "mean", "resnet18_revisiting"])
def test_two_replicas_with_sync_bn_equal_one_device(photo_dir, demo_list, reduction, tower, geometry,
                                                     two_replicas):
  """One step on two replicas with synchronised batch norm updates the weights as one device does on both batches
  together, to within float32's summation-order noise; without the synchronisation it does not.

  That noise is measured, not assumed: the same single-device step on the same batch with its patches in three other
  orders, each variable's largest difference. At random initialisation a deep tower's gradients are small
  differences of large sums (a parameter that a later batch norm makes nearly irrelevant gets a gradient near zero),
  so merely reordering the batch moves a ResNet-18's updates by up to 1.6 % (at 1/8 width, Eigen's kernels;
  AlexNet-BN's by about 1e-4). (Swapping the batch's two halves is no such measure: oneDNN's kernels sum each half in
  a thread of its own and then add the two sums, which the swap leaves bit for bit equal.)"""
  batches = two_batches(photo_dir, demo_list, geometry=geometry)
  mirrored = make_trainer(two_replicas, True, reduction, tower)
  single = make_trainer(tf.distribute.get_strategy(), True, reduction, tower)
  initial = weights_of(single)
  for a, b in zip(weights_of(mirrored), initial):
    np.testing.assert_array_equal(a, b)
  one_step(mirrored, batches)
  state = single.networks.tower.weights + single.networks.head.weights + single.optimizer.variables
  start = [v.numpy() for v in state]
  whole = concat_batches(*batches)
  one_step(single, [whole])
  updated = weights_of(single)
  differences = []
  rng = np.random.default_rng(0)
  for order in [rng.permutation(len(whole["patches"])) for _ in range(3)]:
    for variable, value in zip(state, start):  # the same step again from the same state, the patches reordered
      variable.assign(value)
    one_step(single, [reordered(whole, order)])
    differences.append([a - b for a, b in zip(weights_of(single), updated)])
  noise = [max(each, key=np.linalg.norm) for each in zip(*differences)]
  assert_same_updates(initial, weights_of(mirrored), updated, noise)
  unsynchronised = make_trainer(two_replicas, False, reduction, tower)
  one_step(unsynchronised, batches)
  with pytest.raises(AssertionError):
    assert_same_updates(initial, weights_of(unsynchronised), updated, noise)


def assert_same_updates(initial, got, expected, noise=None):
  """The updates agree to float32 summation-order noise: 1e-4 of each variable's update, or where `noise` (each
  variable's largest difference between orderings of the same computation) is given, 10 times that noise. With
  synchronised batch norm the two replicas' updates differ from one device's by at most 2.4 times it (ResNet-18 at
  1/8 width with Eigen's kernels; 4.6 times with oneDNN's), without it by 116 to 146 times it on the ResNet's first
  variable alone (by 10^5 times on AlexNet-BN's), so the check still fails them. (Biases right before a BN have a
  zero gradient in exact arithmetic, so their updates are pure noise: hence the atol.)"""
  moved = 0
  for name, (w0, a, b) in enumerate(zip(initial, got, expected)):
    update_a, update_b = a - w0, b - w0
    floor = 10 * np.linalg.norm(noise[name]) if noise is not None else 0.0
    assert np.linalg.norm(update_a - update_b) <= floor + 1e-4 * np.linalg.norm(update_b) + 1e-7, name
    moved += np.linalg.norm(update_b) > 1e-6
  assert moved >= len(initial) // 2


@pytest.mark.slow
@pytest.mark.kernels
def test_two_replicas_sum_their_gradients(photo_dir, demo_list, two_replicas):
  """Per-replica BN (the default): the update is the sum of the two replicas' gradients, not their mean."""
  batches = two_batches(photo_dir, demo_list)
  mirrored = make_trainer(two_replicas, False, "sum")
  single = make_trainer(tf.distribute.get_strategy(), False, "sum")
  initial = [v.numpy() for v in single.trainable_variables]
  one_step(mirrored, batches)
  gradients = [single._gradients(b, tf.constant(0.0))[0] for b in batches]
  summed = [ga + gb for ga, gb in zip(*gradients)]
  single.optimizer.apply_gradients(zip(summed, single.trainable_variables))
  assert_same_updates(initial, [v.numpy() for v in mirrored.trainable_variables],
                      [v.numpy() for v in single.trainable_variables])


@pytest.mark.slow
@pytest.mark.kernels
def test_device_augmentation_in_the_step(photo_dir, demo_list, two_replicas):
  """--augment_on=device: the step augments the uint8 batch on each replica's device. One step on one device
  updates the weights as the host-augmented batch does (same pixels), and two replicas as one device on the
  concatenated batch (each patch is augmented from its own key, wherever it is)."""
  config = input_config(photo_dir, demo_list, "device")
  raw = two_batches(photo_dir, demo_list, "device")
  host = two_batches(photo_dir, demo_list, "host")
  augment = D.step_augmentation(config)
  on_device = make_trainer(tf.distribute.get_strategy(), False, "sum", augment=augment)
  on_host = make_trainer(tf.distribute.get_strategy(), False, "sum")
  initial = weights_of(on_host)
  one_step(on_device, raw[:1])
  one_step(on_host, host[:1])
  assert_same_updates(initial, weights_of(on_device), weights_of(on_host))
  # The pairs the TensorBoard preview shows: the pixels the host gave, though augmented after the loop.
  previews = [one_step(t, [b])["preview"] for t, b in ((on_device, raw[1]), (on_host, host[1]))]
  for key in ("first", "second"):
    np.testing.assert_allclose(previews[0][key].numpy(), previews[1][key].numpy(), atol=1e-5 * A.RMS_TARGET)
  # Two replicas, sync BN: the same update as one device on both batches.
  mirrored = make_trainer(two_replicas, True, "sum", augment=augment)
  single = make_trainer(tf.distribute.get_strategy(), True, "sum", augment=augment)
  initial = weights_of(single)
  one_step(mirrored, raw)
  one_step(single, [concat_batches(*raw)])
  assert_same_updates(initial, weights_of(mirrored), weights_of(single))


# ------------------------------------------------------------------------------------------------------------
# The program, in subprocesses


@pytest.mark.slow
def test_train_resume_and_export(small_run, tmp_path):
  # The session's small run (conftest): 10 steps, checkpoints every 5.
  assert sorted(os.path.basename(p) for p in glob.glob(str(small_run / "ckpt-*.index"))) == [
      "ckpt-10.index", "ckpt-5.index"]
  assert (small_run / "flags.txt").read_text().count("--train_steps=10")
  assert glob.glob(str(small_run / "train" / "events.out.tfevents.*"))
  model_dir = tmp_path / "run"
  shutil.copytree(small_run, model_dir)
  reader = tf.train.load_checkpoint(str(model_dir / "ckpt-10"))
  saved_kernel = reader.get_tensor(CONV1_KERNEL)
  second = run_module(demo_args(model_dir, "--train_steps=15", "--checkpoint_every=5"), cwd=tmp_path)
  assert second.returncode == 0, log_of(second)
  assert re.search(r"Resumed from .*ckpt-10 at step 10", log_of(second))
  assert "cannot resume at its exact position" not in log_of(second)  # the same listing of --data: silently
  assert "step 15/15" in log_of(second) and "step 5/" not in log_of(second)
  after = tf.train.load_checkpoint(str(model_dir / "ckpt-15"))
  kernel = after.get_tensor(CONV1_KERNEL)
  assert not np.array_equal(kernel, saved_kernel) and np.abs(kernel - saved_kernel).max() < 0.1
  assert int(after.get_tensor("optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE")) == 15
  # (A finished run does nothing more: test_usage.)
  # The resumed run's exported backbone runs (that a training export loads in a process that never imports
  # context_keras: test_export's clean process).
  loaded = tf.saved_model.load(str(model_dir / "export" / "backbone_15"))
  out = loaded.signatures["serving_default"](patches=tf.constant(np.random.rand(3, 96, 96, 3), tf.float32))
  assert out["fc6"].shape[0] == 3


@pytest.mark.slow
def test_resumed_run_matches_uninterrupted_run(deterministic_run, tmp_path):
  """Same seed: 6 steps, stop, 6 more equals 12 in one go (weights and the data they saw). Op determinism makes
  the comparison exact; without it, multi-threaded float sums drift apart over the steps. The interrupted run
  augments in the step (--augment_on=device), the other (the session's deterministic run) in the pipeline: the same
  pixels either way."""
  whole, _ = deterministic_run  # helpers.DETERMINISTIC, 12 steps
  parts = [*DETERMINISTIC, f"--model_dir={tmp_path / 'parts'}", "--augment_on=device"]
  part = run_module([*parts, "--train_steps=6"], cwd=REPO)
  assert part.returncode == 0, log_of(part)
  rest = run_module(parts, cwd=REPO)
  assert rest.returncode == 0 and "Resumed from" in log_of(rest), log_of(rest)
  a = tf.train.load_checkpoint(str(whole / "ckpt-12"))
  b = tf.train.load_checkpoint(str(tmp_path / "parts" / "ckpt-12"))
  for name in a.get_variable_to_shape_map():
    if "_trainable_variables" in name or "head" in name or "tower" in name:
      np.testing.assert_allclose(a.get_tensor(name), b.get_tensor(name), rtol=1e-6, atol=1e-7, err_msg=name)
  np.testing.assert_array_equal(a.get_tensor("input_positions/.ATTRIBUTES/VARIABLE_VALUE"),
                                b.get_tensor("input_positions/.ATTRIBUTES/VARIABLE_VALUE"))


def start_training(tmp_path, *extra):
  return start_module(demo_args(tmp_path / "run", "--train_steps=0", "--checkpoint_every=100000", *extra), tmp_path,
                      tmp_path / "log.txt")


@pytest.mark.slow
def test_quit_file_stale_file_and_exact_step(tmp_path):
  (tmp_path / "train_quit").write_text("")  # left over from an earlier run (or another run's): reported, not obeyed
  process = start_training(tmp_path)
  wait_for(tmp_path / "log.txt", r"Control file .*train_quit exists already .*: not obeyed unless created again",
           process)
  wait_for(tmp_path / "log.txt", r"step 10 ", process)
  os.remove(tmp_path / "train_quit")
  (tmp_path / "train_quit").write_text("")  # created anew: obeyed
  assert process.wait(timeout=120) == 0
  log = (tmp_path / "log.txt").read_text()
  stopped = int(re.search(r"Stopped at step (\d+) \(quit file", log).group(1))
  assert checkpoint_steps(tmp_path / "run") == [stopped]


@pytest.mark.slow
def test_divergence_stops_without_checkpoint(tmp_path):
  result = run_module(demo_args(tmp_path / "run", "--learning_rate=1e6", "--train_steps=50",
                                "--checkpoint_every=1"), cwd=tmp_path, timeout=300)
  assert result.returncode == 1, log_of(result)
  match = re.search(r"Diverged at step (\d+): loss or gradient is NaN/Inf", log_of(result))
  assert match, log_of(result)
  steps = checkpoint_steps(tmp_path / "run")
  assert all(s < int(match.group(1)) for s in steps)
  for s in steps:
    reader = tf.train.load_checkpoint(str(tmp_path / "run" / f"ckpt-{s}"))
    for name in reader.get_variable_to_shape_map():
      value = reader.get_tensor(name)
      if np.issubdtype(np.asarray(value).dtype, np.floating):
        assert np.all(np.isfinite(value)), name


@pytest.mark.slow
@pytest.mark.kernels
def test_pretext_accuracy_rises_above_chance(tmp_path):
  """The demo's network on the demo photos (flags/demo.cfg, in float32 whatever the CPU): over steps 51-100 its
  pretext accuracy on its own training photos is well above chance (1/8): above 0.145, about 11 standard deviations
  of the accuracy of 32,000 pairs at chance. Measured on this project's AVX2 machine: 0.18 with Eigen's kernels,
  0.16 with oneDNN's, which learn more slowly here (by step 300, 0.23 and 0.20)."""
  result = run_module(["context_keras.train", f"--flagfile={REPO}/flags/demo.cfg",
                       f"--data={REPO}/flags/demo_photos.txt", f"--model_dir={tmp_path / 'run'}",
                       "--train_steps=100", "--log_every=10", "--mixed_precision=none"], cwd=tmp_path, timeout=900)
  assert result.returncode == 0, log_of(result)
  accuracies = [float(a) for a in re.findall(r"accuracy (\d\.\d+)", log_of(result))]
  assert len(accuracies) == 10  # each of the last 10 steps' 6,400 pairs
  assert np.mean(accuracies[5:]) > 0.145, accuracies


# Two replicas first: the process's CPU is split into logical devices before anything else runs on it.
OTHER_CONFIGURATIONS = [
    (["--cpu_replicas=2"], "MirroredStrategy with 2 replica(s)"),
    # The device augmentation: on two replicas in bfloat16, and in XLA with static shapes.
    (["--cpu_replicas=2", "--mixed_precision=bfloat16", "--augment_on=device"], "MirroredStrategy with 2 replica(s)"),
    (["--mixed_precision=float16", "--jit_compile", "--augment_on=device"],
     "_DefaultDistributionStrategy with 1 replica(s)"),
]


@pytest.mark.slow
def test_program_runs_in_other_configurations(tmp_path):
  """Each configuration trains 3 steps and resumes to 4; all in one process (helpers.run_cases), each run after the
  previous one's resume, as a user would run them one after the other."""
  cases = []
  for i, (extra, _) in enumerate(OTHER_CONFIGURATIONS):
    cases += [demo_args(tmp_path / f"run{i}", "--train_steps=3", "--checkpoint_every=3", *extra)[1:],
              demo_args(tmp_path / f"run{i}", "--train_steps=4", *extra)[1:]]
  _, _, results = run_cases("train", cases, cwd=tmp_path)
  for i, (extra, expect) in enumerate(OTHER_CONFIGURATIONS):
    result, resumed = results[2 * i:2 * i + 2]
    assert result.returncode == 0, log_of(result)
    assert expect in log_of(result) and "Training finished at step 3" in log_of(result), log_of(result)
    where = "in the training step" if "--augment_on=device" in extra else "in the input pipeline"
    assert f"Augmentation: {where}" in log_of(result)
    assert resumed.returncode == 0 and "at step 3" in log_of(resumed), log_of(resumed)
