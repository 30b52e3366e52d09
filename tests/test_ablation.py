"""The ablation program (method.md §9.7): variants trained alike, evaluated, one table, JSON and plot (matplotlib's
bars at the mean over seeds, whiskers from the smallest to the largest); without matplotlib the table and JSON and
one line that says why there is no plot; and its usage errors."""
import json
import logging
import sys

from absl import logging as absl_logging
from matplotlib.container import BarContainer
from matplotlib.container import ErrorbarContainer
import numpy as np
import pytest
import tensorflow as tf

from context_keras import ablation as A
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
  assert_real_plot((out / "ablation.png").read_bytes())
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


def results_of(seeds, layers=("conv1", "fc6")):
  """{variant: {seed: scores}} as evaluate_run gives them, with different values per seed."""
  rng = np.random.default_rng(0)
  return {name: {seed: {"step": 4, "pretext_accuracy": rng.uniform(0.1, 0.3), "pretext_classes": 8,
                        "pretext_direction_accuracy": rng.uniform(0.1, 0.3),
                        "probe": {layer: rng.uniform(0.3, 0.7) for layer in layers},
                        "random_init_probe": {layer: rng.uniform(0.2, 0.5) for layer in layers}} for seed in seeds}
          for name in ("baseline", "mundhenk")}


def assert_real_plot(png):
  """A PNG that decodes to a picture of some size, mostly white with a good share of drawn pixels in many colours."""
  image = tf.io.decode_png(png, channels=3).numpy()
  assert image.shape[0] >= 400 and image.shape[1] >= 600, image.shape
  drawn = (image < 250).any(-1).mean()
  assert 0.05 < drawn < 0.7, drawn
  assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50


def test_plot_shows_the_mean_over_seeds_with_whiskers_from_the_smallest_to_the_largest():
  seeds = [0, 1, 2]
  results = results_of(seeds)
  summary = A.summarise(results)
  ax = A.figure(summary, seeds).axes[0]
  bars = [c for c in ax.containers if isinstance(c, BarContainer)]
  whiskers = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
  assert [b.get_label() for b in bars] == ["baseline", "mundhenk", "random init"] and len(whiskers) == 3
  assert [t.get_text() for t in ax.get_xticklabels()] == ["pretext\n(8 directions)", "probe\nconv1", "probe\nfc6"]
  for name, container, errorbar in zip(("baseline", "mundhenk"), bars, whiskers):
    scores = [[r["pretext_direction_accuracy"]] + [r["probe"][la] for la in ("conv1", "fc6")]
              for r in results[name].values()]
    np.testing.assert_allclose([p.get_height() for p in container], 100 * np.mean(scores, 0))
    (segments,) = errorbar.lines[2]  # the vertical lines, one per bar: from the smallest to the largest seed
    ends = np.array([sorted(segment[:, 1]) for segment in segments.get_segments()])
    np.testing.assert_allclose(ends, 100 * np.stack([np.min(scores, 0), np.max(scores, 0)], 1))
  # The random-init bars stand in the probe groups only, and the table's ± is the whiskers' length.
  assert len(bars[2]) == 2
  assert "85.0 ± 10.0" == A._cell({"mean": 0.85, "spread": 0.1}, seeds)
  assert "whiskers: smallest to largest" in ax.get_title() and ax.get_ylabel() == "accuracy (%)"
  assert_real_plot(A.plot_png(summary, seeds))
  one_seed = A.figure(A.summarise(results_of([0], layers=())), [0]).axes[0]  # no probes, one seed: no whiskers
  assert not [c for c in one_seed.containers if isinstance(c, ErrorbarContainer)] and len(one_seed.containers) == 2


def test_without_matplotlib_table_and_json_are_written_and_one_line_says_how_to_get_the_plot(tmp_path, monkeypatch,
                                                                                             caplog):
  summary = A.summarise(results_of([0, 1]))
  report = {"budget": {"steps": 4}, "variants": {}, "summary": summary}
  A.write_results(str(tmp_path), report, [0, 1])
  assert_real_plot((tmp_path / "ablation.png").read_bytes())
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails as if it were not installed
  monkeypatch.setattr(absl_logging.get_absl_logger(), "propagate", True)
  with caplog.at_level(logging.WARNING):
    A.write_results(str(tmp_path), report, [0, 1])
  assert json.loads((tmp_path / "ablation.json").read_text())["summary"] == summary
  assert "| mundhenk |" in (tmp_path / "ablation.md").read_text()
  assert not (tmp_path / "ablation.png").exists()  # the earlier call's plot would disagree with a newer table
  said = [r.getMessage() for r in caplog.records if "matplotlib" in r.getMessage()]
  assert said == ["ablation.png is not drawn: the plot needs matplotlib (pip install context_keras[plot])."], said
