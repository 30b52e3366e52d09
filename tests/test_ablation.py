"""The ablation program (method.md §9.7): variants trained alike, evaluated, one table, JSON and plot; and its
usage errors."""
import json

import numpy as np
import pytest
import tensorflow as tf

from helpers import REPO
from helpers import SMALL_MODEL
from helpers import log_of
from helpers import run_module
from helpers import write_png


def ablation_args(tmp_path, *extra):
  return ["context_keras.ablation", f"--flagfile={REPO}/flags/demo.cfg", f"--data={REPO}/flags/ablation_train.txt",
          "--data_root=package:skimage.data", *SMALL_MODEL, "--train_steps=4", "--steps_per_loop=2",
          "--log_every=2", f"--eval_data={REPO}/flags/ablation_heldout.txt", "--eval_data_root=package:skimage.data",
          "--eval_images=2", "--pairs_per_image=16", f"--output={tmp_path / 'out'}", *extra]


@pytest.mark.slow
def test_ablation_trains_evaluates_and_writes_table_json_and_plot(tmp_path, photo_dir):
  rng = np.random.default_rng(0)
  for name in ("astronaut", "coffee"):
    (tmp_path / "labelled" / name).mkdir(parents=True)
    image = tf.io.decode_png(tf.io.read_file(f"{photo_dir}/{name}.png"), channels=3).numpy()
    for i in range(4):
      y, x = rng.integers(0, image.shape[0] - 100), rng.integers(0, image.shape[1] - 100)
      write_png(tmp_path / "labelled" / name / f"{i}.png", image[y:y + 100, x:x + 100])
  probe = [f"--probe_data={tmp_path / 'labelled'}", "--probe_folds=2", "--probe_layer=conv3",
           "--probe_image_size=96", "--probe_epochs=5"]
  # One variant keeps the test short: all five fixes, 32 classes; the baseline is the same code without flags.
  result = run_module(ablation_args(tmp_path, "--variants=mundhenk", "--seeds=0", *probe), cwd=tmp_path, timeout=600)
  assert result.returncode == 0, log_of(result)
  out = tmp_path / "out"
  report = json.loads((out / "ablation.json").read_text())
  assert set(report["summary"]) == {"mundhenk"} and report["budget"]["steps"] == 4
  run = report["variants"]["mundhenk"]["runs"]["0"]
  assert run["step"] == 4 and run["pretext_classes"] == 32 and 0 <= run["pretext_direction_accuracy"] <= 1
  assert set(run["probe"]) == {"conv3"} and 0 <= run["probe"]["conv3"] <= 1
  config = json.loads((out / "runs" / "mundhenk_s0" / "config.json").read_text())
  assert config["model"]["num_classes"] == 32 and config["model"]["width_multiplier"] == 0.0625
  assert config["input"]["color_mode"] == "chroma_blur" and config["input"]["yoked_jitter"]
  assert config["input"]["random_aperture"] and config["input"]["flip_relabel"]
  table = (out / "ablation.md").read_text()
  assert "| mundhenk |" in table and "| random init |" in table and "probe conv3" in table
  plot = tf.io.decode_png(tf.io.read_file(str(out / "ablation.png"))).numpy()
  assert plot.shape[0] > 200 and len(np.unique(plot.reshape(-1, plot.shape[-1]), axis=0)) > 4
  flags = run.pop("flags")
  assert json.loads((out / "runs" / "mundhenk_s0" / "ablation_eval.json").read_text())["scores"] == run
  # The record holds every flag that shaped the run (the variant's and the seed included); the run is reused only
  # for the same ones: another learning rate is refused before anything trains, naming the run and the flag.
  assert flags["rotation_classes"] is True and flags["seed"] == 0 and flags["train_steps"] == 4
  assert flags["width_multiplier"] == 0.0625 and "log_every" not in flags and "model_dir" not in flags
  again = run_module(ablation_args(tmp_path, "--variants=mundhenk", "--seeds=0", "--learning_rate=0.01", *probe),
                     cwd=tmp_path, timeout=300)
  assert again.returncode == 2 and "Traceback" not in log_of(again), log_of(again)
  assert (f"--output={out} holds runs trained with other flags: runs/mundhenk_s0 (--learning_rate: 0.0001 then, "
          "0.01 now)") in log_of(again)
  assert "Training mundhenk" not in log_of(again)


@pytest.mark.slow
def test_flagfiles_parse_and_usage_errors_are_one_line(tmp_path):
  """flags/ablation_demo.cfg and flags/mundhenk.cfg parse (every flag known, every value valid) before the check of
  --variants stops the program."""
  result = run_module(["context_keras.ablation", "--flagfile=flags/ablation_demo.cfg", "--flagfile=flags/mundhenk.cfg",
                       "--variants=baseline,nonsense"], cwd=REPO, timeout=120)
  assert result.returncode == 2 and "Traceback" not in log_of(result), log_of(result)
  assert "--variants=baseline,nonsense: unknown nonsense" in log_of(result), log_of(result)
  # The fixes with the revisiting geometry are refused before the baseline trains (method.md §9.9).
  result = run_module(["context_keras.ablation", "--flagfile=flags/ablation_demo.cfg", "--geometry=revisiting",
                       "--variants=baseline,flip"], cwd=REPO, timeout=120)
  assert result.returncode == 2 and "Traceback" not in log_of(result), log_of(result)
  assert "--variants=flip do not work with --geometry=revisiting" in log_of(result), log_of(result)
  # A fix given to the ablation itself would be in every variant, the baseline included: refused, named.
  for fix in ("--rotation_classes", "--color_mode=chroma_blur", "--flagfile=flags/mundhenk.cfg"):
    result = run_module(["context_keras.ablation", "--flagfile=flags/ablation_demo.cfg", fix,
                         f"--output={tmp_path / 'out'}"], cwd=REPO, timeout=120)
    assert result.returncode == 2 and "Traceback" not in log_of(result), log_of(result)
    assert "is one of the fixes the variants compare" in log_of(result), log_of(result)
    assert not (tmp_path / "out" / "runs").exists()
