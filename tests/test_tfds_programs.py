"""The programs on a TFDS split (the tests' photo dataset, tfds_photos.py), each in a subprocess that does not define
the dataset's builder, so every one of them reads it through TFDS's read-only builder (its files' metadata): train
and its exact resume, prepare (labelled shards from a split), linear_eval on a training and a validation split,
evaluate --mode=linear of the trained run on the prepared shards against a validation split, and the one-line stop of
a dataset that is not prepared (ImageNet, whose archives TFDS asks for in its manual_dir). The training program's
command lines share one process (helpers.run_cases), which runs beside prepare and linear_eval."""
import concurrent.futures
import json

import pytest
import tensorflow as tf

from helpers import REPO
from helpers import SMALL_MODEL
from helpers import log_of
from helpers import run_all
from helpers import run_cases
from helpers import run_module
from helpers import save_informative

tfds_photos = pytest.importorskip("tfds_photos", reason="TensorFlow Datasets (the tfds extra) is not installed")

DATA = f"tfds:{tfds_photos.NAME}"
READ_ONLY = "its builder's code not importable here: read through its files' metadata"


def train_args(model_dir, data_dir, steps):
  return ["context_keras.train", f"--flagfile={REPO}/flags/demo.cfg", f"--data={DATA}", f"--tfds_data_dir={data_dir}",
          f"--model_dir={model_dir}", *SMALL_MODEL, f"--train_steps={steps}", "--checkpoint_every=2",
          "--steps_per_loop=2", "--log_every=2"]


def last_json(output):
  return json.loads([line for line in output.splitlines() if line.startswith("{")][-1])


@pytest.mark.slow
def test_programs_read_a_tfds_split(tfds_data_dir, tmp_path):
  data_dir = f"--tfds_data_dir={tfds_data_dir}"
  backbone = save_informative(tmp_path / "backbone")
  (tmp_path / "empty").mkdir()
  job = ["--crop_size=96", "--resize_size=100", "--batch_size=8", "--epochs=1", "--learning_rate=1.0",
         "--log_every=1", "--steps_per_loop=3"]
  # The training program's three command lines in one process (helpers.run_cases), beside prepare and linear_eval.
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    training = pool.submit(run_cases, "train", [
        train_args(tmp_path / "run", tfds_data_dir, 2)[1:],
        ["--data=tfds:imagenet2012", f"--tfds_data_dir={tmp_path / 'empty'}", f"--model_dir={tmp_path / 'unprepared'}",
         *SMALL_MODEL],
        train_args(tmp_path / "run", tfds_data_dir, 4)[1:]], cwd=tmp_path)
    first = run_all([
        (["context_keras.prepare", f"--data={DATA}:train", data_dir, "--labels=tfds",
          f"--output={tmp_path / 'shards'}", "--num_shards=2"], None),
        (["context_keras.linear_eval", f"--saved_model={backbone}", f"--train_data={DATA}", f"--val_data={DATA}",
          data_dir, f"--eval_dir={tmp_path / 'job'}", *job], None),
    ], tmp_path, timeout=600)
    (trained, train_log), (stopped, stop_log), (resumed, resume_log) = [
        (result.returncode, log_of(result)) for result in training.result()[2]]
  (prepared, prepare_log), (evaluated, job_log) = first

  assert trained == 0, train_log[-3000:]
  assert f"Data: TFDS {tfds_photos.NAME}/1.0.0 split train (24 images in 3 files" in train_log
  assert READ_ONLY in train_log and "unreadable" not in train_log.split("Data:")[1].split("\n")[0]

  assert prepared == 0, prepare_log[-3000:]
  index = json.loads((tmp_path / "shards" / "index.json").read_text())
  assert index["records"] == 24 and index["classes"] == list(tfds_photos.CLASSES) and index["labels"] == "tfds"
  assert [s["records"] for s in index["shards"]] == [12, 12]

  assert evaluated == 0, job_log[-3000:]
  result = last_json(job_log)
  assert result["train_images"] == 24 and result["val_images"] == 9 and result["classes"] == 3
  assert "split validation" in result["val_data"] and READ_ONLY in job_log

  assert stopped == 2 and "Traceback" not in stop_log, stop_log[-3000:]
  error = next(line for line in stop_log.splitlines() if "is not prepared" in line)
  assert "never downloads" in error and f"tfds build imagenet2012 --data_dir={tmp_path / 'empty'}" in error
  assert "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar" in error
  assert not any((tmp_path / "empty").iterdir())

  linear = run_module(["context_keras.evaluate", "--mode=linear", f"--model_dir={tmp_path / 'run'}", "--checkpoint=2",
                       f"--train_data={tmp_path / 'shards'}/*.tfrecord", f"--val_data={DATA}", data_dir,
                       "--image_size=96", f"--eval_dir={tmp_path / 'eval'}", "--probe_epochs=20"], cwd=tmp_path)
  linear, linear_log = linear.returncode, log_of(linear)
  assert resumed == 0, resume_log[-3000:]
  assert "Resumed from" in resume_log and "cannot resume at its exact position" not in resume_log
  assert tf.train.latest_checkpoint(str(tmp_path / "run")).endswith("ckpt-4")
  assert linear == 0, linear_log[-3000:]
  result = last_json(linear_log)
  assert result["classes"] == list(tfds_photos.CLASSES) and result["images_per_class"] == [8 + 3] * 3
