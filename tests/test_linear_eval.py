"""linear_eval, the streaming job: per-layer numbers that can fail (a backbone whose conv1 separates the classes and
whose other layers carry nothing), resume after kill -9 equal to an uninterrupted run, peak memory that does not grow
with the data set, and exit 2 with a message for bad labelled inputs."""
import json
import os
import re
import signal

import numpy as np
import pytest
import tensorflow as tf

from context_keras.input import patches as P
from helpers import INFORMATIVE_LAYERS
from helpers import last_json
from helpers import log_of
from helpers import peak_mb
from helpers import run_all
from helpers import run_module
from helpers import save_informative
from helpers import start_module
from helpers import wait_for
from helpers import write_png

LAYERS = INFORMATIVE_LAYERS


@pytest.fixture(scope="module")
def informative(tmp_path_factory):
  return save_informative(tmp_path_factory.mktemp("informative") / "backbone")


def write_set(folder, per_class, seed):
  """Dark and bright 100-px images with random texture, class sub-folders."""
  rng = np.random.default_rng(seed)
  for name, low in (("dark", 0), ("bright", 140)):
    (folder / name).mkdir(parents=True)
    for i in range(per_class):
      write_png(folder / name / f"{i}.png", rng.integers(low, low + 115, (100, 100, 3), dtype=np.uint8))
  return folder


@pytest.fixture(scope="module")
def brightness(tmp_path_factory):
  root = tmp_path_factory.mktemp("brightness")
  return write_set(root / "train", 24, 0), write_set(root / "val", 10, 1)


def job(backbone, train, val, eval_dir, *extra):
  return ["context_keras.linear_eval", f"--saved_model={backbone}", f"--train_data={train}", f"--val_data={val}",
          f"--eval_dir={eval_dir}", f"--crop_size={P.PATCH_SIZE}", f"--resize_size={P.PATCH_SIZE + 4}",
          "--batch_size=8", "--epochs=2", "--learning_rate=2.0", "--log_every=2", "--steps_per_loop=2", *extra]


def losses(text):
  """{step: the loss of its progress line} of a job's log."""
  return {int(step): loss for step, loss in re.findall(r"step (\d+)/\d+ .*loss \(sum of heads\) (\S+)", text)}


@pytest.mark.slow
def test_per_layer_numbers_resume_after_kill_equal_an_uninterrupted_run(informative, brightness, tmp_path):
  """Two identical jobs, run at the same time, the second killed with kill -9 after its checkpoint at step 4 and
  resumed: the same loss at every logged step (each step logged by the killed job or by its resumption, together
  all six) and the same per-layer numbers: the job is a function of its seed (its heads' initialisation included)."""
  train, val = brightness
  args = ["--deterministic", "--checkpoint_every=2", "--cpu_replicas=2"]
  log, whole_log = tmp_path / "killed.txt", tmp_path / "whole.txt"
  whole = start_module(job(informative, train, val, tmp_path / "whole", *args), tmp_path, whole_log)
  killed = start_module(job(informative, train, val, tmp_path / "killed", *args), tmp_path, log)
  try:
    wait_for(log, r"Checkpoint \S+ckpt-4 written", killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    code = whole.wait(timeout=600)
  finally:
    for process in (whole, killed):
      if process.poll() is None:
        process.kill()
        process.wait()
  text = whole_log.read_text()
  assert code == 0, text[-3000:]
  assert len(losses(text)) == 6, losses(text)
  result = [json.loads(line) for line in text.splitlines() if line.startswith("{")][-1]
  assert "top5" not in result and "top5" not in result["per_layer"]["conv1"]  # always 1.0 with two classes
  assert result == json.loads((tmp_path / "whole" / "linear_eval.json").read_text())
  per_layer = result["per_layer"]
  assert set(per_layer) == set(LAYERS) and result["best_layer"] == "conv1"
  assert per_layer["conv1"]["top1"] >= 0.9 and per_layer["conv1"]["dims"] == 4 * 4 * 3
  assert all(per_layer[name]["top1"] == 0.5 for name in LAYERS if name != "conv1")  # one class for every image
  assert result["val_images"] == 20 and result["steps"] == 12 and result["per_class_top1"].keys() == {"dark",
                                                                                                       "bright"}
  assert "images/s" in text and "ETA" in text

  assert not (tmp_path / "killed" / "linear_eval.json").exists()
  before = losses(log.read_text())
  resumed = run_module(job(informative, train, val, tmp_path / "killed", *args), cwd=tmp_path)
  assert resumed.returncode == 0, log_of(resumed)
  assert "Resumed from" in log_of(resumed)
  after = losses(log_of(resumed))
  assert after and before and set(before) | set(after) == set(losses(text)), (before, after)
  for part in (before, after):
    assert part == {step: loss for step, loss in losses(text).items() if step in part}, part
  again = last_json(resumed)
  assert again["per_layer"] == per_layer and again["per_class_top1"] == result["per_class_top1"]
  assert again["heads_digest"] == result["heads_digest"]


@pytest.mark.slow
def test_quit_file_stops_at_a_checkpoint_and_a_rerun_finishes(informative, brightness, tmp_path):
  """EVAL_DIR/linear_eval_quit, created while the job runs: it stops after the step in flight with a checkpoint there
  and exit 0, and a re-run resumes from it to the end."""
  train, val = brightness
  eval_dir = tmp_path / "job"
  log = tmp_path / "log.txt"
  args = job(informative, train, val, eval_dir, "--epochs=50", "--checkpoint_every=1000")
  process = start_module(args, tmp_path, log)
  try:
    wait_for(log, r"step 4/", process)
    (eval_dir / "linear_eval_quit").write_text("")
    assert process.wait(timeout=120) == 0
  finally:
    if process.poll() is None:
      process.kill()
      process.wait()
  stopped = int(re.search(r"Stopped at step (\d+) \(quit file", log.read_text()).group(1))
  assert 4 <= stopped < 300 and not (eval_dir / "linear_eval.json").exists()
  assert tf.train.latest_checkpoint(str(eval_dir)).endswith(f"ckpt-{stopped}")
  resumed = run_module(args, cwd=tmp_path)
  assert resumed.returncode == 0 and "Resumed from" in log_of(resumed), log_of(resumed)
  assert last_json(resumed)["steps"] == 300


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_data_set(informative, tmp_path):
  peaks = {}
  for count in (8, 64):
    folder = write_set(tmp_path / f"set{count}", count, 2)
    log = tmp_path / f"memory{count}.txt"
    process = start_module(job(informative, folder, folder, tmp_path / f"eval{count}", "--epochs=1"), tmp_path, log,
                           measure=True)
    assert process.wait(timeout=300) == 0, log.read_text()[-3000:]
    peaks[count] = peak_mb(log.read_text())
  # Eight times the images (train and validation): the same memory, within noise.
  assert peaks[64] - peaks[8] < 40, peaks


@pytest.mark.slow
def test_bad_labelled_inputs_exit_2(informative, brightness, tmp_path):
  train, _ = brightness
  (tmp_path / "val").mkdir()
  (tmp_path / "labels.txt").write_text("missing.JPEG dark\n")
  result = run_module(job(informative, train, tmp_path / "val", tmp_path / "eval", f"--val_labels={tmp_path}/"
                          "labels.txt"), cwd=tmp_path)
  assert result.returncode == 2 and "Traceback" not in log_of(result)
  assert f"--val_labels={tmp_path}/labels.txt: 1 of the 1 images it names are not in {tmp_path}/val: missing.JPEG " \
         "(line 1)" in log_of(result)
  assert not os.path.exists(tmp_path / "eval" / "ckpt-1.index")


@pytest.mark.slow
def test_flags_that_cannot_work_stop_at_start(informative, brightness, exported, tmp_path):
  """Exit 2 at start, naming the flag, with no traceback: a --resize_size below --crop_size whatever the training
  augmentation (the validation crop is cut from the resized image: every validation image was unreadable, top-1 0.0),
  and a --saved_model that is an export folder or its pair classifier (the backbone to give is named)."""
  train, val = brightness
  out, _ = exported
  cases = {("--resize_size=90",): "Invalid flags: --resize_size=90 is smaller than --crop_size=96",
           ("--resize_size=90", "--train_augmentation=none"): "Invalid flags: --resize_size=90 is smaller than",
           ("--resize_size=90", "--train_augmentation=random_crop"): "Invalid flags: --resize_size=90 is smaller than",
           (f"--saved_model={out}",): f"--saved_model={out} is an export folder: give its backbone, "
                                      f"--saved_model={out}/backbone",
           (f"--saved_model={out}/pair_classifier",): f"give the backbone beside it, --saved_model={out}/backbone"}
  results = run_all([(job(informative, train, val, tmp_path / f"eval{i}", *extra), None)
                     for i, extra in enumerate(cases)], tmp_path)
  for (extra, message), (code, text) in zip(cases.items(), results):
    assert code == 2 and message in text and "Traceback" not in text, (extra, text[-3000:])


@pytest.mark.slow
def test_multi_label_sets_are_scored_by_average_precision(informative, brightness, tmp_path):
  """--multi_label (which labelled.py's messages suggest) reads a labels file of several labels per image and
  reports per-layer mAP and the best layer's per-class AP; a validation set that is the training set is named in a
  warning (its accuracy would be memorisation)."""
  train, _ = brightness
  lines = [f"{name}/{i}.png {name},{'?' if i % 4 == 0 else ''}any" for name in ("dark", "bright") for i in range(24)]
  (tmp_path / "labels.txt").write_text("\n".join(lines) + "\n")
  labels = [f"--train_labels={tmp_path / 'labels.txt'}", f"--val_labels={tmp_path / 'labels.txt'}"]
  result = run_module(job(informative, train, train, tmp_path / "eval", "--multi_label", *labels), cwd=tmp_path)
  assert result.returncode == 0, log_of(result)
  metrics = last_json(result)
  assert metrics["multi_label"] and metrics["best_layer"] == "conv1" and metrics["val_images"] == 48
  assert metrics["per_class_ap"]["dark"] > 0.9 and metrics["per_class_ap"]["bright"] > 0.9
  assert set(metrics["per_layer"]["conv1"]) == {"map_auc", "map_11point", "dims"}
  assert "top1" not in metrics and "chance" not in metrics
  assert "--train_data and --val_data name the same 48 images" in log_of(result)
