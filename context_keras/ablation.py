"""Measures the later fixes for the shortcuts one by one (method.md §9.7):
python -m context_keras.ablation --flagfile=flags/ablation_demo.cfg --variants=baseline,rotation,... --output=DIR

Every variant is the training flags (any flag of context_keras.train, from --flagfile or the command line) plus the
variant's own flags; each is trained with context_keras.train for the same --train_steps on the same images, once per
--seeds, in DIR/runs/VARIANT_sSEED (a run that already reached --train_steps is reused, and so is its evaluation
while the evaluation flags stay the same). Each run is then evaluated as context_keras.evaluate does: pretext
accuracy on the held-out --eval_data and, with --probe_data, the per-layer linear probe (with the random-init
baseline). Writes DIR/ablation.json, DIR/ablation.md (one table: the mean over
seeds and the spread between them) and DIR/ablation.png (accuracy per variant and layer), and prints the JSON path.

Variants:
"""
import dataclasses
import json
import os
import subprocess
import sys

from absl import flags
from absl import logging
import numpy as np

from context_keras import errors
from context_keras import train
from context_keras.cli import program
from context_keras.evaluation import chart
from context_keras.evaluation import linear
from context_keras.evaluation import pretext
from context_keras.evaluation import subject as subject_lib
from context_keras.input import labelled
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
    program.define_integer("eval_images", pretext.IMAGES, "Pretext: at most this many --eval_data images.", lower=1)
    program.define_integer("pairs_per_image", pretext.PAIRS_PER_IMAGE, "Pretext: pairs per held-out image.",
                           lower=1)
    flags.DEFINE_string("probe_data", None, "Labelled images for the per-layer linear probe (a folder of class "
                        "folders, or images with --probe_labels); none: no probe.")
    flags.DEFINE_string("probe_labels", None, "Labels file of --probe_data (lines NAME LABEL).")
    flags.DEFINE_string("probe_layer", None, "Probe only this layer of the backbone (default: every named layer).")
    program.define_integer("probe_folds", 5, "Probe: stratified cross-validation folds.", lower=2)
    program.define_integer("probe_image_size", 192, "Probe: side of the centre squares.", lower=96)
    program.define_integer("probe_epochs", linear.PROBE_EPOCHS, "Probe: full-batch steps of each logistic "
                           "regression.", lower=1)


TRAIN_FLAGS = ()


def check_flags():
  unknown = [v for v in FLAGS.variants if v not in VARIANTS]
  if unknown or not FLAGS.variants:
    raise errors.UsageError(f"--variants={','.join(FLAGS.variants)}: unknown {', '.join(unknown) or 'none given'}; "
                            f"choose from {', '.join(VARIANTS)}")
  fixes = [v for v in FLAGS.variants if VARIANTS[v].flags]
  if FLAGS.geometry == "revisiting" and fixes:
    # Checked here, not after the baseline has trained: the fixes work with the doersch geometry only (method.md §9.9).
    raise errors.UsageError(f"--variants={','.join(fixes)} do not work with --geometry=revisiting yet (method.md §9.9)")
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
    name = os.path.relpath(model_dir, os.path.dirname(os.path.dirname(model_dir)))
    if os.path.isfile(record):
      with open(record, encoding="utf-8") as f:
        kept = json.load(f).get("flags", {})
      differing = [f"--{flag}: {kept.get(flag)} then, {value} now" for flag, value in wanted.items()
                   if kept.get(flag) != value]
      if differing:
        problems.append(f"{name} ({'; '.join(differing[:3])}{'; ...' if len(differing) > 3 else ''})")
    elif os.path.isdir(model_dir) and os.listdir(model_dir):
      problems.append(f"{name} (no {RUN_FILE}: an earlier version's run, its flags unknown)")
  if problems:
    raise errors.UsageError(f"--output={FLAGS.output} holds runs trained with other flags: {', '.join(problems)}. "
                            "A run is reused only with the flags that trained it: give another --output, or remove "
                            "those runs to train them again")


def train_run(name, seed, model_dir):
  """Trains one variant and seed in a subprocess (a fresh TensorFlow each: precision policy, seeds and strategy are
  per process); its output goes to RUN/ablation_train.log."""
  os.makedirs(model_dir, exist_ok=True)
  record = os.path.join(model_dir, RUN_FILE)
  if not os.path.isfile(record):  # before training: a killed ablation resumes the run under the same key
    writes.atomic_write_json(record, {"variant": name, "seed": seed, "flags": run_flags(VARIANTS[name], seed)})
  log_path = os.path.join(model_dir, "ablation_train.log")
  logging.info("Training %s, seed %d, in %s.", name, seed, model_dir)
  with open(log_path, "w", encoding="utf-8") as log:
    code = subprocess.run([sys.executable, "-m", "context_keras.train",
                           *training_args(VARIANTS[name], seed, model_dir)], stdout=log, stderr=subprocess.STDOUT,
                          check=False).returncode
  if code:
    with open(log_path, encoding="utf-8") as log:
      tail = [line.strip() for line in log.read().splitlines() if line.strip()][-1:]
    raise errors.UsageError(f"training {name} (seed {seed}) failed with exit code {code}: "
                            f"{tail[0] if tail else ''} (log: {log_path})")


def evaluation_settings(seed):
  """What an evaluation's figures depend on besides the run: kept with them, so that a later call reuses them."""
  names = ("eval_data", "eval_data_root", "eval_images", "pairs_per_image", "probe_data", "probe_labels",
           "probe_layer", "probe_folds", "probe_image_size", "probe_epochs")
  return dict({name: FLAGS[name].value for name in names}, seed=seed)


def evaluate_run(model_dir, seed):
  """Pretext accuracy (and per-layer probes) of one trained run: {metric: value}. Kept in RUN/ablation_eval.json
  with its settings and step, and reused while they stay the same."""
  cache = os.path.join(model_dir, EVAL_FILE)
  run = restore.load_run(model_dir)
  settings = dict(evaluation_settings(seed), step=run.step, checkpoint=os.path.basename(run.checkpoint))
  if os.path.isfile(cache):
    with open(cache, encoding="utf-8") as f:
      kept = json.load(f)
    if kept.get("settings") == settings:
      logging.info("Reusing the evaluation of %s (%s).", model_dir, cache)
      return kept["scores"]
  subject = subject_lib.from_run(run)
  found = pretext.evaluate(subject, pretext.Config(data=FLAGS.eval_data, data_root=FLAGS.eval_data_root,
                                                   images=FLAGS.eval_images, pairs_per_image=FLAGS.pairs_per_image,
                                                   seed=0)).metrics
  scores = {"step": run.step, "pretext_accuracy": found["accuracy"], "pretext_classes": found["num_classes"],
            # 8-way, whatever the class count: what every variant can be compared on.
            "pretext_direction_accuracy": found.get("direction_accuracy", found["accuracy"])}
  if FLAGS.probe_data:
    probed = linear.evaluate(subject, linear.Config(
        splits=labelled.Splits(data=FLAGS.probe_data, labels=FLAGS.probe_labels), layer=FLAGS.probe_layer,
        folds=FLAGS.probe_folds, image_size=FLAGS.probe_image_size, probe_epochs=FLAGS.probe_epochs, seed=seed)).metrics
    scores["probe"] = {layer: entry["accuracy"] for layer, entry in probed["per_layer"].items()}
    scores["random_init_probe"] = {layer: entry[linear.RANDOM + "accuracy"]
                                   for layer, entry in probed["per_layer"].items()}
  writes.atomic_write_json(cache, {"settings": settings, "scores": scores})
  return scores


def summarise(results):
  """Per variant, the mean over seeds of every score and its spread (max - min)."""
  summary = {}
  for name, by_seed in results.items():
    runs = list(by_seed.values())
    entry = {}
    for key in ("pretext_direction_accuracy", "pretext_accuracy"):
      values = [r[key] for r in runs]
      entry[key] = {"mean": float(np.mean(values)), "spread": float(np.ptp(values))}
    if "probe" in runs[0]:
      for who in ("probe", "random_init_probe"):
        entry[who] = {layer: {"mean": float(np.mean([r[who][layer] for r in runs])),
                              "spread": float(np.ptp([r[who][layer] for r in runs]))} for layer in runs[0][who]}
    summary[name] = entry
  return summary


def _cell(entry):
  return f"{100 * entry['mean']:.1f} ± {100 * entry['spread']:.1f}" if len(FLAGS.seeds) > 1 else (
      f"{100 * entry['mean']:.1f}")


def markdown(summary, budget):
  """The table: one row per variant (and random init), pretext accuracy and each layer's probe, in %."""
  first = next(iter(summary.values()))
  layers = list(first.get("probe", {}))
  head = ["variant", "pretext, 8 directions", "pretext, all classes"] + [f"probe {layer}" for layer in layers]
  rows = [head, ["---"] * len(head)]
  for name, entry in summary.items():
    rows.append([name, _cell(entry["pretext_direction_accuracy"]), _cell(entry["pretext_accuracy"])] +
                [_cell(entry["probe"][layer]) for layer in layers])
  if layers:
    rows.append(["random init", "", ""] + [_cell(first["random_init_probe"][layer]) for layer in layers])
  seeds = (f"mean over seeds {', '.join(FLAGS.seeds)} ± the spread between them (largest minus smallest)"
           if len(FLAGS.seeds) > 1 else f"seed {FLAGS.seeds[0]}")
  lines = [f"Accuracy in % ({seeds}).",
           "Budget: " + ", ".join(f"{k} {v}" for k, v in budget.items()) + ".", ""]
  return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def plot(summary):
  """Accuracy per variant: pretext (8 directions) and each probed layer."""
  names = list(summary)
  first = summary[names[0]]
  layers = list(first.get("probe", {}))
  groups = ["pretext"] + layers
  values = [[summary[n]["pretext_direction_accuracy"]["mean"]] + [summary[n]["probe"][la]["mean"] for la in layers]
            for n in names]
  if layers:
    names = names + ["random init"]
    values.append([None] + [first["random_init_probe"][la]["mean"] for la in layers])
  return chart.bar_chart(groups, names, values, title="ablation: accuracy per variant and layer",
                         y_label="accuracy %")


def main():
  check_flags()
  output = os.path.abspath(FLAGS.output)
  writes.check_folder(output, "output")
  seeds = [int(s) for s in FLAGS.seeds]
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
  try:
    writes.atomic_write_json(os.path.join(output, JSON_FILE), report)
    writes.atomic_write(os.path.join(output, TABLE_FILE), markdown(summary, budget).encode())
    image = plot(summary)
    writes.atomic_write(os.path.join(output, PLOT_FILE), chart.encode_png(image))
  except OSError as e:
    raise writes.failure("the ablation's results", f"--output={output}", e) from e
  print(os.path.join(output, JSON_FILE))
  return 0


if __name__ == "__main__":
  program.run(main, define_flags)
