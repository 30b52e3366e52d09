"""Measures the later fixes for the shortcuts one by one (method.md §9.7):
python -m context_keras.ablation --flagfile=flags/ablation_demo.cfg --variants=baseline,rotation,... --output=DIR

Every variant is the training flags (any flag of context_keras.train, from --flagfile or the command line) plus the
variant's own flags; each is trained with context_keras.train for the same --train_steps on the same images, once per
--seeds, in DIR/runs/VARIANT_sSEED (a run that already reached --train_steps is reused, and so is its evaluation
while the evaluation flags stay the same). Each run is then evaluated as context_keras.evaluate does: pretext
accuracy on the held-out --eval_data and, with --probe_data, the per-layer linear probe (with the random-init
baseline). Writes DIR/ablation.json, DIR/ablation.md (one table: the mean over
seeds and the spread between them) and DIR/ablation.png (accuracy per variant and layer, with matplotlib: pip install
context_keras[plot]; without it the table and JSON are written all the same), and prints the JSON path.

Variants:
"""
import dataclasses
import io
import json
import os
import subprocess
import sys
import tempfile

from absl import flags
from absl import logging
import numpy as np
import tensorflow as tf

from context_keras import errors
from context_keras import train
from context_keras.cli import program
from context_keras.evaluation import linear
from context_keras.evaluation import pretext
from context_keras.evaluation import subject as subject_lib
from context_keras.input import geometry as geometry_lib
from context_keras.input import labelled
from context_keras.storage import paths as paths_lib
from context_keras.storage import writes
from context_keras.training import restore

FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class Variant:
  flags: dict
  help: str


# Each fix alone on top of the training flags, and all of them together (flags/mundhenk.cfg's settings).
MUNDHENK = {"color_mode": "chroma_blur", "yoked_jitter": True, "random_aperture": True, "rotation_classes": True,
            "flip_relabel": True}
VARIANTS = {
    "baseline": Variant({}, "the training flags as given"),
    "chroma_blur": Variant({"color_mode": "chroma_blur"}, "--color_mode=chroma_blur (colour kept, a/b blurred)"),
    "yoked_jitter": Variant({"yoked_jitter": True}, "--yoked_jitter"),
    "random_aperture": Variant({"random_aperture": True}, "--random_aperture"),
    "rotation": Variant({"rotation_classes": True}, "--rotation_classes (32 classes)"),
    "flip": Variant({"flip_relabel": True}, "--flip_relabel"),
    "mundhenk": Variant(MUNDHENK, "all five together, as flags/mundhenk.cfg"),
}
__doc__ += "\n".join(f"  {name:<16}{variant.help}" for name, variant in VARIANTS.items())
RUNS_DIR = "runs"
JSON_FILE, TABLE_FILE, PLOT_FILE = "ablation.json", "ablation.md", "ablation.png"
EVAL_FILE = "ablation_eval.json"  # in each run directory
RUN_FILE = "ablation_run.json"    # in each run directory: the flags that shaped it (run_flags), its reuse key
# The flags a variant's run gets from the ablation itself, not from the training flags.
OWN_TRAIN_FLAGS = ("model_dir", "seed")
# Training flags that do not change what a run learns (logs, summaries, checkpoints, control files, the profiler):
# left out of a run's reuse key, so that a run may be continued with other ones.
BOOKKEEPING_FLAGS = ("model_dir", "log_every", "checkpoint_every", "keep_checkpoints", "export_every",
                     "image_summary_every", "histogram_every", "quit_file", "pause_file", "profile_steps",
                     "steps_per_loop")


def define_flags():
  before = set(FLAGS)
  train.define_flags()
  global TRAIN_FLAGS  # pylint: disable=global-statement
  TRAIN_FLAGS = tuple(name for name in FLAGS if name not in before and FLAGS[name].name == name)
  with program.flag_group("ablation"):
    flags.DEFINE_list("variants", list(VARIANTS), f"Variants to train and compare: any of {', '.join(VARIANTS)}.")
    flags.DEFINE_string("output", None, "Folder of the ablation: runs/ (one training run per variant and seed), "
                        f"{JSON_FILE}, {TABLE_FILE}, {PLOT_FILE}.")
    flags.DEFINE_list("seeds", ["0", "1"], "Training seeds; every variant is trained once per seed, and the table "
                      "gives the mean and the spread (largest minus smallest).")
    flags.DEFINE_string("eval_data", None, "Held-out images for the pretext accuracy (any form --data accepts).")
    flags.DEFINE_string("eval_data_root", None, "Folder the names of an --eval_data list are relative to.")
    program.define_integer("eval_images", pretext.Config.images, "Pretext: at most this many --eval_data images.",
                           lower=1)
    program.define_integer("pairs_per_image", pretext.Config.pairs_per_image, "Pretext: pairs per held-out image.",
                           lower=1)
    flags.DEFINE_string("probe_data", None, "Labelled images for the per-layer linear probe (a folder of class "
                        "folders, or images with --probe_labels); none: no probe.")
    flags.DEFINE_string("probe_labels", None, "Labels file of --probe_data (lines NAME LABEL).")
    flags.DEFINE_string("probe_layer", None, "Probe only this layer of the backbone (default: every named layer).")
    program.define_integer("probe_folds", linear.Config.folds, "Probe: stratified cross-validation folds.", lower=2)
    program.define_integer("probe_image_size", linear.Config.image_size, "Probe: side of the centre squares, at "
                           "least one patch of --geometry.", lower=1)
    program.define_integer("probe_epochs", linear.Config.probe_epochs, "Probe: full-batch steps of each logistic "
                           "regression.", lower=1)


TRAIN_FLAGS = ()


def check_flags():
  unknown = [v for v in FLAGS.variants if v not in VARIANTS]
  if unknown or not FLAGS.variants:
    raise errors.UsageError(f"--variants={','.join(FLAGS.variants)}: unknown {', '.join(unknown) or 'none given'}; "
                            f"choose from {', '.join(VARIANTS)}")
  fixes = [v for v in FLAGS.variants if VARIANTS[v].flags]
  geometry = geometry_lib.get(FLAGS.geometry)
  if fixes and not geometry.shortcut_fixes:
    # Checked here, not after the baseline has trained (method.md §9.9).
    raise errors.UsageError(f"--variants={','.join(fixes)} do not work with --geometry={geometry.name} yet (method.md "
                            "§9.9)")
  if FLAGS.probe_data:
    geometry.check_input_side("--probe_image_size", FLAGS.probe_image_size)
  given = [name for name, value in MUNDHENK.items() if FLAGS[name].value == value]
  if given:
    # Every variant gets the training flags: a fix among them would be in the baseline too.
    raise errors.UsageError(f"--{given[0]}{'' if MUNDHENK[given[0]] is True else '=' + MUNDHENK[given[0]]} is one of "
                            "the fixes the variants compare; given to the ablation it would be in every variant, the "
                            "baseline included: remove it (and flags/mundhenk.cfg) and choose --variants")
  if not all(s.isdigit() for s in FLAGS.seeds) or not FLAGS.seeds or len(set(FLAGS.seeds)) != len(FLAGS.seeds):
    raise errors.UsageError(f"--seeds={','.join(FLAGS.seeds)} must be distinct non-negative integers")
  for name in ("output", "data", "eval_data"):
    if not FLAGS[name].value:
      raise errors.UsageError(f"--{name} is required")
  if not FLAGS.train_steps:
    raise errors.UsageError("--train_steps must be > 0: every variant trains for the same number of steps")
  if FLAGS["model_dir"].present:
    raise errors.UsageError("--model_dir is set by the ablation for each run: give --output")
  if FLAGS["seed"].present:  # base flagfiles such as deepcontext.cfg set it
    logging.warning("--seed=%d is not used: every variant is trained with each of --seeds=%s.", FLAGS.seed,
                    ",".join(FLAGS.seeds))


def training_args(variant, seed, model_dir):
  """The flags of one run: every training flag given to the ablation, then the variant's, then its own."""
  args = [FLAGS[name].serialize() for name in TRAIN_FLAGS
          if FLAGS[name].present and name not in OWN_TRAIN_FLAGS and name not in variant.flags]
  for name, value in variant.flags.items():
    args.append(f"--{name}" if value is True else f"--no{name}" if value is False else f"--{name}={value}")
  return args + [f"--model_dir={model_dir}", f"--seed={seed}"]


def run_flags(variant, seed):
  """{flag: value} of every training flag that shapes one run (BOOKKEEPING_FLAGS left out): the training flags given
  to the ablation or their defaults, then the variant's, then the seed. What RUN_FILE records, and the key that a
  run is reused by."""
  values = {name: FLAGS[name].value for name in TRAIN_FLAGS if name not in BOOKKEEPING_FLAGS}
  values.update(variant.flags, seed=seed)
  return json.loads(json.dumps(values))


def check_reusable(runs):
  """Stops before anything trains when a run directory of `runs` ({model_dir: its run_flags}) holds a run trained
  with other flags, or one that has no record of them."""
  problems = []
  for model_dir, wanted in runs.items():
    record = os.path.join(model_dir, RUN_FILE)
    name = paths_lib.relative(model_dir, paths_lib.parent(paths_lib.parent(model_dir)))
    if paths_lib.is_file(record):
      kept = json.loads(paths_lib.read_text(record)).get("flags", {})
      differing = [f"--{flag}: {kept.get(flag)} then, {value} now" for flag, value in wanted.items()
                   if kept.get(flag) != value]
      if differing:
        problems.append(f"{name} ({'; '.join(differing[:3])}{'; ...' if len(differing) > 3 else ''})")
    elif tf.io.gfile.isdir(model_dir) and tf.io.gfile.listdir(model_dir):
      problems.append(f"{name} (no {RUN_FILE}: an earlier version's run, its flags unknown)")
  if problems:
    raise errors.UsageError(f"--output={FLAGS.output} holds runs trained with other flags: {', '.join(problems)}. "
                            "A run is reused only with the flags that trained it: give another --output, or remove "
                            "those runs to train them again")


def train_run(name, seed, model_dir):
  """Trains one variant and seed in a subprocess (a fresh TensorFlow each: precision policy, seeds and strategy are
  per process); its output goes to RUN/ablation_train.log, written when it ends (RUN may be on a store, which cannot
  take a subprocess's output as it comes; the run's own RUN/train.log follows it meanwhile)."""
  tf.io.gfile.makedirs(model_dir)
  record = os.path.join(model_dir, RUN_FILE)
  if not tf.io.gfile.exists(record):  # before training: a killed ablation resumes the run under the same key
    writes.atomic_write_json(record, {"variant": name, "seed": seed, "flags": run_flags(VARIANTS[name], seed)})
  log_path = os.path.join(model_dir, "ablation_train.log")
  logging.info("Training %s, seed %d, in %s.", name, seed, model_dir)
  with tempfile.TemporaryFile() as log:
    code = subprocess.run([sys.executable, "-m", "context_keras.train",
                           *training_args(VARIANTS[name], seed, model_dir)], stdout=log, stderr=subprocess.STDOUT,
                          check=False).returncode
    log.seek(0)
    text = log.read()
  writes.atomic_write(log_path, text)
  if code:
    tail = [line.strip() for line in text.decode("utf-8", "replace").splitlines() if line.strip()][-1:]
    raise errors.UsageError(f"training {name} (seed {seed}) failed with exit code {code}: "
                            f"{tail[0] if tail else ''} (log: {log_path})")


def evaluation_settings(seed):
  """What an evaluation's figures depend on besides the run: kept with them, so that a later call reuses them."""
  names = ("eval_data", "eval_data_root", "eval_images", "pairs_per_image", "probe_data", "probe_labels",
           "probe_layer", "probe_folds", "probe_image_size", "probe_epochs")
  return dict({name: FLAGS[name].value for name in names}, seed=seed)


def pretext_config():
  """The pretext evaluation of every run (seed 0: the same pairs for every run)."""
  return pretext.Config(data=FLAGS.eval_data, data_root=FLAGS.eval_data_root, tfds_data_dir=FLAGS.tfds_data_dir,
                        images=FLAGS.eval_images, pairs_per_image=FLAGS.pairs_per_image, seed=0)


def probe_config(seed):
  """The linear probe of the runs of one training seed."""
  return linear.Config(splits=labelled.Splits(data=FLAGS.probe_data, labels=FLAGS.probe_labels,
                                                       tfds_data_dir=FLAGS.tfds_data_dir),
                       layer=FLAGS.probe_layer, folds=FLAGS.probe_folds, image_size=FLAGS.probe_image_size,
                       probe_epochs=FLAGS.probe_epochs, seed=seed)


def evaluate_run(model_dir, seed):
  """Pretext accuracy (and per-layer probes) of one trained run: {metric: value}. Kept in RUN/ablation_eval.json
  with its settings and step, and reused while they stay the same."""
  cache = os.path.join(model_dir, EVAL_FILE)
  run = restore.load_run(model_dir)
  settings = dict(evaluation_settings(seed), step=run.step, checkpoint=os.path.basename(run.checkpoint))
  if paths_lib.is_file(cache):
    kept = json.loads(paths_lib.read_text(cache))
    if kept.get("settings") == settings:
      logging.info("Reusing the evaluation of %s (%s).", model_dir, cache)
      return kept["scores"]
  subject = subject_lib.from_run(run)
  found = pretext.evaluate(subject, pretext_config()).metrics
  scores = {"step": run.step, "pretext_accuracy": found["accuracy"], "pretext_classes": found["num_classes"],
            # 8-way, whatever the class count: what every variant can be compared on.
            "pretext_direction_accuracy": found.get("direction_accuracy", found["accuracy"])}
  if FLAGS.probe_data:
    probed = linear.evaluate(subject, probe_config(seed)).metrics
    scores["probe"] = {layer: entry["accuracy"] for layer, entry in probed["per_layer"].items()}
    scores["random_init_probe"] = {layer: entry[linear.RANDOM + "accuracy"]
                                   for layer, entry in probed["per_layer"].items()}
  writes.atomic_write_json(cache, {"settings": settings, "scores": scores})
  return scores


def statistics(values):
  """The mean over seeds, the smallest and largest value and the spread between them (largest minus smallest)."""
  return {"mean": float(np.mean(values)), "min": float(np.min(values)), "max": float(np.max(values)),
          "spread": float(np.ptp(values))}


def summarise(results):
  """Per variant, statistics() over seeds of every score."""
  summary = {}
  for name, by_seed in results.items():
    runs = list(by_seed.values())
    entry = {key: statistics([r[key] for r in runs]) for key in ("pretext_direction_accuracy", "pretext_accuracy")}
    if "probe" in runs[0]:
      for who in ("probe", "random_init_probe"):
        entry[who] = {layer: statistics([r[who][layer] for r in runs]) for layer in runs[0][who]}
    summary[name] = entry
  return summary


def _cell(entry, seeds):
  return f"{100 * entry['mean']:.1f} ± {100 * entry['spread']:.1f}" if len(seeds) > 1 else f"{100 * entry['mean']:.1f}"


def _seeds_said(seeds):
  return (f"mean over seeds {', '.join(map(str, seeds))} ± the spread between them (largest minus smallest)"
          if len(seeds) > 1 else f"bars: seed {seeds[0]}, one run per variant")


def markdown(summary, budget, seeds):
  """The table: one row per variant (and random init), pretext accuracy and each layer's probe, in %."""
  first = next(iter(summary.values()))
  layers = list(first.get("probe", {}))
  head = ["variant", "pretext, 8 directions", "pretext, all classes"] + [f"probe {layer}" for layer in layers]
  rows = [head, ["---"] * len(head)]
  for name, entry in summary.items():
    rows.append([name, _cell(entry["pretext_direction_accuracy"], seeds), _cell(entry["pretext_accuracy"], seeds)] +
                [_cell(entry["probe"][layer], seeds) for layer in layers])
  if layers:
    rows.append(["random init", "", ""] + [_cell(first["random_init_probe"][layer], seeds) for layer in layers])
  lines = [f"Accuracy in % ({_seeds_said(seeds)}).",
           "Budget: " + ", ".join(f"{k} {v}" for k, v in budget.items()) + ".", ""]
  return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


PLOT_NEEDS = f"{PLOT_FILE} is not drawn: the plot needs matplotlib (pip install context_keras[plot])"


def has_matplotlib():
  """Whether matplotlib can be imported (it is the optional `plot` extra)."""
  try:
    import matplotlib  # noqa: F401  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return False
  return True


def figure(summary, seeds):
  """The ablation's plot as a matplotlib Figure: for pretext accuracy (8 directions) and each probed layer, one bar
  per variant (and random init, for the probes) at the mean over seeds, its whisker from the smallest to the
  largest seed's value (the table's ± is the length of that whisker). Drawn on a Figure of its own, with no pyplot
  and so no display or global state: matplotlib's way for programs that only write files."""
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel  (the optional `plot` extra)
  names = list(summary)
  first = summary[names[0]]
  layers = list(first.get("probe", {}))
  groups = ["pretext\n(8 directions)"] + [f"probe\n{layer}" for layer in layers]
  series = [(name, [summary[name]["pretext_direction_accuracy"]] + [summary[name]["probe"][la] for la in layers])
            for name in names]
  if layers:
    series.append(("random init", [None] + [first["random_init_probe"][la] for la in layers]))
  width = min(0.8 / len(series), 0.3)  # a lone bar stays a bar
  fig = Figure(figsize=(max(6.0, 1.6 + 0.22 * len(groups) * len(series)), 4.8), dpi=120, layout="constrained")
  ax = fig.add_subplot()
  tallest = 0.0
  for s, (name, entries) in enumerate(series):
    at = [g + (s - (len(series) - 1) / 2) * width for g, entry in enumerate(entries) if entry is not None]
    shown = [entry for entry in entries if entry is not None]
    means = [100 * e["mean"] for e in shown]
    whiskers = [[100 * (e["mean"] - e["min"]) for e in shown], [100 * (e["max"] - e["mean"]) for e in shown]]
    random_init = name == "random init"
    ax.bar(at, means, width, label=name, yerr=whiskers if len(seeds) > 1 else None, capsize=2,
           color="0.75" if random_init else f"C{s % 10}", hatch="//" if random_init else None,
           edgecolor="0.35" if random_init else None, error_kw={"elinewidth": 0.8, "ecolor": "0.15"})
    tallest = max([tallest] + [100 * e["max"] for e in shown])
  ax.set_xticks(range(len(groups)), groups)
  ax.set_ylabel("accuracy (%)")
  ax.set_ylim(0, min(100.0, max(10.0, tallest * 1.15)))
  ax.yaxis.grid(True, color="0.9")
  ax.set_axisbelow(True)
  bars = (f"bars: mean over seeds {', '.join(map(str, seeds))}; whiskers: smallest to largest seed"
          if len(seeds) > 1 else f"bars: seed {seeds[0]}, one run per variant")
  ax.set_title(f"Ablation: accuracy per variant and layer\n({bars})", fontsize=10)
  ax.legend(title="variant", fontsize=8, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  return fig


def plot_png(summary, seeds):
  """PNG bytes of figure()."""
  buffer = io.BytesIO()
  figure(summary, seeds).savefig(buffer, format="png")
  return buffer.getvalue()


def write_results(output, report, seeds):
  """OUT/ablation.json, OUT/ablation.md and, where matplotlib is installed, OUT/ablation.png; without it, one line
  says so and a plot of an earlier call is removed, so that OUT holds no plot that disagrees with the table."""
  summary, budget = report["summary"], report["budget"]
  plot_path = os.path.join(output, PLOT_FILE)
  try:
    writes.atomic_write_json(os.path.join(output, JSON_FILE), report)
    writes.atomic_write(os.path.join(output, TABLE_FILE), markdown(summary, budget, seeds).encode())
    if has_matplotlib():
      writes.atomic_write(plot_path, plot_png(summary, seeds))
    else:
      logging.warning("%s.", PLOT_NEEDS)
      if tf.io.gfile.exists(plot_path):
        tf.io.gfile.remove(plot_path)
  except (OSError, tf.errors.OpError) as e:
    raise writes.failure("the ablation's results", f"--output={output}", e) from e


def main():
  check_flags()
  output = writes.check_folder(FLAGS.output, "output")
  seeds = [int(s) for s in FLAGS.seeds]
  if not has_matplotlib():  # said now, before hours of training, and again at the end
    logging.warning("%s; the table and JSON will be written.", PLOT_NEEDS)
  runs = {(name, seed): os.path.join(output, RUNS_DIR, f"{name}_s{seed}") for name in FLAGS.variants for seed in seeds}
  check_reusable({model_dir: run_flags(VARIANTS[name], seed) for (name, seed), model_dir in runs.items()})
  results = {}
  for (name, seed), model_dir in runs.items():
    train_run(name, seed, model_dir)
    results.setdefault(name, {})[seed] = dict(evaluate_run(model_dir, seed), flags=run_flags(VARIANTS[name], seed))
    logging.info("%s seed %d: %s", name, seed, json.dumps(results[name][seed]))
  budget = {"steps": FLAGS.train_steps, "width": FLAGS.width_multiplier, "training data": FLAGS.data,
            "held-out data": FLAGS.eval_data, "seeds": len(seeds)}
  if FLAGS.probe_data:
    budget["probe data"] = FLAGS.probe_data
  summary = summarise(results)
  report = {"budget": budget, "variants": {name: dict(vars(VARIANTS[name]), runs={str(s): r for s, r in
                                                                                    results[name].items()})
                                           for name in results}, "summary": summary}
  write_results(output, report, seeds)
  print(os.path.join(output, JSON_FILE))
  return 0


if __name__ == "__main__":
  program.run(main, define_flags)
