"""The ablation program (method.md §9.7): variants trained alike, evaluated, one table, JSON and plot; and its
usage errors."""
import json

from helpers import REPO
from helpers import SMALL_MODEL
from helpers import log_of
from helpers import run_module
from helpers import write_png
import numpy as np
import pytest
import tensorflow as tf


def ablation_args(tmp_path, *extra):
  return ["context_keras.ablation", f"--flagfile={REPO}/flags/demo.cfg", f"--data={REPO}/flags/ablation_train.txt",
          "--data_root=package:skimage.data", *SMALL_MODEL, "--train_steps=4", "--steps_per_loop=2",
          "--log_every=2", f"--eval_data={REPO}/flags/ablation_heldout.txt", "--eval_data_root=package:skimage.data",
          "--eval_images=2", "--pairs_per_image=16", f"--output={tmp_path / 'out'}", *extra]


@pytest.mark.slow
def test_ablation_trains_every_variant_alike_and_writes_table_json_and_plot(tmp_path, photo_dir):
  rng = np.random.default_rng(0)
  for name in ("astronaut", "coffee"):
    (tmp_path / "labelled" / name).mkdir(parents=True)
    image = tf.io.decode_png(tf.io.read_file(f"{photo_dir}/{name}.png"), channels=3).numpy()
    for i in range(4):
      y, x = rng.integers(0, image.shape[0] - 100), rng.integers(0, image.shape[1] - 100)
      write_png(tmp_path / "labelled" / name / f"{i}.png", image[y:y + 100, x:x + 100])
  result = run_module(ablation_args(tmp_path, "--variants=baseline,mundhenk", "--seeds=0",
                                    f"--probe_data={tmp_path / 'labelled'}", "--probe_folds=2", "--probe_layer=conv3",
                                    "--probe_image_size=96", "--probe_epochs=5"), cwd=tmp_path, timeout=600)
  assert result.returncode == 0, log_of(result)
  out = tmp_path / "out"
  report = json.loads((out / "ablation.json").read_text())
  assert set(report["summary"]) == {"baseline", "mundhenk"} and report["budget"]["steps"] == 4
  for name, classes in (("baseline", 8), ("mundhenk", 32)):
    run = report["variants"][name]["runs"]["0"]
    assert run["step"] == 4 and run["pretext_classes"] == classes
    assert set(run["probe"]) == {"conv3"} and 0 <= run["probe"]["conv3"] <= 1
    config = json.loads((out / "runs" / f"{name}_s0" / "config.json").read_text())
    assert config["model"]["num_classes"] == classes and config["model"]["width_multiplier"] == 0.0625
  mundhenk = json.loads((out / "runs" / "mundhenk_s0" / "config.json").read_text())["input"]
  assert mundhenk["color_mode"] == "chroma_blur" and mundhenk["yoked_jitter"] and mundhenk["random_aperture"]
  table = (out / "ablation.md").read_text()
  assert "| mundhenk |" in table and "| random init |" in table and "probe conv3" in table
  plot = tf.io.decode_png(tf.io.read_file(str(out / "ablation.png"))).numpy()
  assert plot.shape[0] > 200 and len(np.unique(plot.reshape(-1, plot.shape[-1]), axis=0)) > 4
  # A second call reuses the trained runs and, with the same evaluation flags, their evaluations.
  probe = [f"--probe_data={tmp_path / 'labelled'}", "--probe_folds=2", "--probe_layer=conv3",
           "--probe_image_size=96", "--probe_epochs=5"]
  again = run_module(ablation_args(tmp_path, "--variants=baseline", "--seeds=0", *probe), cwd=tmp_path, timeout=300)
  assert again.returncode == 0 and "Reusing the evaluation" in log_of(again), log_of(again)
  assert "nothing to train" in (out / "runs" / "baseline_s0" / "ablation_train.log").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("extra,message", [
    (["--variants=baseline,nonsense"], "--variants=baseline,nonsense: unknown nonsense"),
    (["--seeds=0,0"], "--seeds=0,0 must be distinct"),
    (["--seed=3"], "--seed is set by the ablation"),
])
def test_ablation_usage_errors(tmp_path, extra, message):
  result = run_module(ablation_args(tmp_path, *extra), cwd=tmp_path, timeout=120)
  assert result.returncode == 2 and message in log_of(result) and "Traceback" not in log_of(result), log_of(result)
