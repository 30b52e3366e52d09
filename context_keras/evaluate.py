"""Measures what a run learned: python -m context_keras.evaluate --mode=pretext|linear|neighbors --data=...
(--model_dir=RUN | --saved_model=OUT/backbone) [--watch]

  pretext    the paper's protocol: 8-way accuracy of the pair classifier on pairs cut from held-out images with
             the training geometry and preprocessing (evaluation/pretext.py).
  linear     a linear probe on frozen features of a labelled folder, against a random-init network of the same
             architecture on the same folds (evaluation/linear.py).
  neighbors  the paper's nearest neighbours of random query patches, drawn one row per query
             (evaluation/neighbors.py).
  --watch    polls --model_dir and evaluates every new checkpoint, as an eval job beside training.

Each prints ONE JSON object as its last line (with --watch, one per checkpoint), writes it to EVAL/<mode>.json and
TensorBoard summaries to EVAL/, where EVAL is --eval_dir (default RUN/eval, or the folder holding --saved_model,
plus /eval).
"""
import dataclasses
import os
import time

from absl import flags
from absl import logging
import tensorflow as tf

from context_keras import errors
from context_keras import program
from context_keras import restore
from context_keras import run_dir
from context_keras.evaluation import PROTOCOLS
from context_keras.evaluation import linear
from context_keras.evaluation import neighbors
from context_keras.evaluation import output
from context_keras.evaluation import pretext
from context_keras.evaluation import subject as subject_lib
from context_keras.flagsets import data as data_flags

FLAGS = flags.FLAGS


def define_flags():
  with program.flag_group("evaluation"):
    flags.DEFINE_enum("mode", None, sorted(PROTOCOLS), "What to measure: pretext accuracy, linear probe, or nearest "
                      "neighbours.")
    flags.DEFINE_string("model_dir", None, "Training run to evaluate (its latest checkpoint, or --checkpoint).")
    flags.DEFINE_string("checkpoint", None, "With --model_dir: a checkpoint path (RUN/ckpt-N) or step N.")
    flags.DEFINE_string("saved_model", None, "Instead of --model_dir: an exported backbone (OUT/backbone of "
                        "context_keras.export; pretext mode uses OUT/pair_classifier beside it).")
    flags.DEFINE_string("eval_dir", None, "Where <mode>.json, neighbors.png and the TensorBoard summaries go "
                        "(default RUN/eval, or OUT/eval for --saved_model=OUT/backbone).")
    program.define_integer("seed", 0, "Seed of the image subset, pairs, folds, queries and the random-init "
                           "baseline.", lower=0)
    program.define_integer("images", pretext.IMAGES, "Most images of --data used (a seeded random subset) in "
                           "pretext and neighbors modes; the paper used 500 (method.md §6.3).", lower=1)
    program.define_integer("pairs_per_image", pretext.PAIRS_PER_IMAGE, "Pretext: random pairs per image (the "
                           "paper: 256).", lower=1)
    flags.DEFINE_string("layer", None, "Feature layer: linear default = the best of the backbone's probe layers "
                        "(conv5/pool5/fc6; VGG: conv5_3/pool5/fc6; ResNet: block3/block4/pre_logits) on the training "
                        "folds; neighbors default = the tower's output (fc6; ResNet: pre_logits).")
    program.define_integer("folds", 5, "Linear: stratified cross-validation folds.", lower=2)
    program.define_integer("inner_folds", 3, "Linear: folds of the inner cross-validation that picks the layer.",
                           lower=2)
    program.define_integer("image_size", 192, "Linear: images are resized (shorter side) and centre-cropped to this "
                           "square (at least one patch) before the backbone.", lower=64)
    program.define_integer("probe_epochs", linear.PROBE_EPOCHS, "Linear: full-batch Adam steps of the logistic "
                           "regression.", lower=1)
    program.define_float("probe_learning_rate", linear.PROBE_LEARNING_RATE, "Linear: Adam learning rate of the "
                         "probe.", above=0)
    program.define_float("probe_l2", linear.PROBE_L2, "Linear: L2 penalty on the probe's weights (standardised "
                         "features).", lower=0)
    program.define_integer("queries", 20, "Neighbors: random query patches (the paper drew 1000 and showed a few).",
                           lower=1)
    program.define_integer("top_k", 8, "Neighbors: neighbours shown per query.", lower=1)
    flags.DEFINE_bool("compare_random_init", False, "Neighbors: add each query's row for a random-init network.")
    program.define_integer("batch_size", 64, "Images or patches per forward pass.", lower=1)
    flags.DEFINE_bool("watch", False, "Poll --model_dir for new checkpoints and evaluate each.")
    program.define_integer("watch_interval", 30, "With --watch: least seconds between two polls.", lower=0)
    program.define_integer("watch_timeout", 3600, "With --watch: stop after this many seconds without a new "
                           "checkpoint (it also stops at the run's --train_steps).", lower=1)
  data_flags.define_source()
  data_flags.define_augmentation()


def protocol_config(mode):
  """The chosen protocol's Config from the flags."""
  common = {"data": FLAGS.data, "seed": FLAGS.seed}
  if mode == pretext.NAME:
    return pretext.Config(**common, data_root=FLAGS.data_root, images=FLAGS.images,
                          pairs_per_image=FLAGS.pairs_per_image,
                          # The run's own preprocessing unless given on the command line.
                          color_mode=FLAGS.color_mode if FLAGS["color_mode"].present else None,
                          pixelation=FLAGS.pixelation if FLAGS["pixelation"].present else None)
  if mode == linear.NAME:
    return linear.Config(**common, layer=FLAGS.layer, folds=FLAGS.folds, inner_folds=FLAGS.inner_folds,
                         image_size=FLAGS.image_size, batch_size=FLAGS.batch_size, probe_epochs=FLAGS.probe_epochs,
                         probe_learning_rate=FLAGS.probe_learning_rate, probe_l2=FLAGS.probe_l2)
  return neighbors.Config(**common, data_root=FLAGS.data_root, images=FLAGS.images, layer=FLAGS.layer,
                          queries=FLAGS.queries, top_k=FLAGS.top_k, batch_size=FLAGS.batch_size,
                          compare_random_init=FLAGS.compare_random_init)


def eval_dir_for(model_dir, saved_model, eval_dir):
  if eval_dir:
    return eval_dir
  if model_dir:
    return run_dir.eval_dir(model_dir)
  return os.path.join(os.path.dirname(os.path.normpath(saved_model)), run_dir.EVAL_DIR)


def evaluate_and_emit(mode, subject, config, eval_dir, about=None):
  start = time.time()
  result = PROTOCOLS[mode].evaluate(subject, config)
  metrics = {"mode": mode, **subject.about, **(about or {}), "seed": config.seed,
             "seconds": round(time.time() - start, 1), **result.metrics}
  return output.emit(mode, metrics, result, eval_dir, subject.step)


def watch(mode, config, eval_dir):
  """Evaluates every new checkpoint of --model_dir until the run's --train_steps is reached or no new checkpoint
  comes for --watch_timeout seconds."""
  train_steps = run_dir.read_config(FLAGS.model_dir).train_steps
  run, evaluated = None, 0
  for path in tf.train.checkpoints_iterator(FLAGS.model_dir, min_interval_secs=FLAGS.watch_interval,
                                            timeout=FLAGS.watch_timeout):
    try:
      if run is None:
        run = restore.load_run(FLAGS.model_dir, path)
      else:
        restore.restore(run.networks, path)
        run = dataclasses.replace(run, checkpoint=path, step=run_dir.checkpoint_step(path))
    except (tf.errors.NotFoundError, errors.UsageError) as e:
      logging.warning("Skipping %s: %s", path, errors.tf_error_message(e, 200))  # removed by --keep_checkpoints
      continue
    evaluate_and_emit(mode, subject_lib.from_run(run), config, eval_dir)
    evaluated += 1
    if train_steps and run.step >= train_steps:
      break
  if not evaluated:
    raise errors.UsageError(f"--model_dir={FLAGS.model_dir}: no checkpoint within --watch_timeout="
                            f"{FLAGS.watch_timeout} s")


def main():
  mode = FLAGS.mode
  if not mode:
    raise errors.UsageError(f"--mode is required: one of {', '.join(sorted(PROTOCOLS))}")
  if bool(FLAGS.model_dir) == bool(FLAGS.saved_model):
    raise errors.UsageError("give exactly one of --model_dir (a training run) and --saved_model (OUT/backbone)")
  if FLAGS.watch and not FLAGS.model_dir:
    raise errors.UsageError("--watch evaluates the new checkpoints of a --model_dir")
  if not FLAGS.data:
    raise errors.UsageError(f"--data is required: the images of --mode={mode}")
  config = protocol_config(mode)
  eval_dir = eval_dir_for(FLAGS.model_dir, FLAGS.saved_model, FLAGS.eval_dir)
  if FLAGS.watch:
    return watch(mode, config, eval_dir)
  subject = (subject_lib.from_run(restore.load_run(FLAGS.model_dir, FLAGS.checkpoint)) if FLAGS.model_dir
             else subject_lib.from_saved_model(FLAGS.saved_model))
  evaluate_and_emit(mode, subject, config, eval_dir)
  return 0


if __name__ == "__main__":
  program.run(main, define_flags)
