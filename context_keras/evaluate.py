"""Measures what a run learned: python -m context_keras.evaluate --mode=pretext|linear|knn|finetune|neighbors
(--model_dir=RUN | --saved_model=OUT/backbone) (--data=... | --train_data=... --val_data=...) [--watch]

  pretext    the paper's protocol: accuracy of the pair classifier (8 directions; 32 classes with rotation classes)
             on pairs cut from held-out images with the training geometry and preprocessing (evaluation/pretext.py).
  linear     a linear probe per layer on frozen features pooled to at most --probe_dims values, against a random-init
             network of the same architecture on the same folds; --multi_label for mAP (evaluation/linear.py).
  knn        weighted k-NN on each layer's pooled features (Wu et al. 2018), against random init (evaluation/knn.py).
  finetune   the backbone with a new head trained end to end, against the same from random init
             (evaluation/finetune.py).
  neighbors  the paper's nearest neighbours of random query patches, drawn one row per query
             (evaluation/neighbors.py).
  --watch    polls --model_dir and evaluates every new checkpoint, as an eval job beside training.

Labelled modes read --data (cross-validated over --folds; a folder of class sub-folders, images with --labels,
labelled shards or tfds:NAME[:SPLIT]), or --train_data and --val_data (docs/data.md). For ImageNet-scale sets, use
python -m context_keras.linear_eval.

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
from context_keras.cli import data as data_flags
from context_keras.cli import labelled as labelled_flags
from context_keras.cli import program
from context_keras.evaluation import PROTOCOLS
from context_keras.evaluation import features as features_lib
from context_keras.evaluation import finetune
from context_keras.evaluation import knn
from context_keras.evaluation import linear
from context_keras.evaluation import neighbors
from context_keras.evaluation import output
from context_keras.evaluation import pretext
from context_keras.evaluation import subject as subject_lib
from context_keras.input import labelled
from context_keras.storage import paths as paths_lib
from context_keras.storage import writes
from context_keras.training import restore
from context_keras.training import run_dir

FLAGS = flags.FLAGS


def define_flags():
  with program.flag_group("evaluation"):
    flags.DEFINE_enum("mode", None, sorted(PROTOCOLS), "What to measure: pretext accuracy, per-layer linear probes, "
                      "k-NN, fine-tuning, or nearest neighbours (docs/flags.md#evaluate).")
    flags.DEFINE_string("model_dir", None, "Training run to evaluate (its latest checkpoint, or --checkpoint).")
    flags.DEFINE_string("checkpoint", None, "With --model_dir: a checkpoint path (RUN/ckpt-N) or step N.")
    flags.DEFINE_string("saved_model", None, "Instead of --model_dir: an exported backbone (OUT/backbone of "
                        "context_keras.export; pretext mode uses OUT/pair_classifier beside it).")
    flags.DEFINE_string("eval_dir", None, "Where <mode>.json, neighbors.png and the TensorBoard summaries go "
                        "(default RUN/eval, or OUT/eval for --saved_model=OUT/backbone).")
    program.define_integer("seed", pretext.Config.seed, "Seed of the image subset, pairs, folds, queries and the "
                           "random-init baseline.", lower=0)
    program.define_integer("images", pretext.Config.images, "Pretext and neighbors: most images of --data used (a "
                           "seeded random subset); the paper used 500 (method.md §6.3).", lower=1)
    program.define_integer("pairs_per_image", pretext.Config.pairs_per_image, "Pretext: random pairs per image (the "
                           "paper: 256).", lower=1)
    flags.DEFINE_string("layer", None, "Feature layer; default: every named layer (linear, knn), the last one "
                        "(finetune), the tower's output (neighbors).")
    program.define_integer("folds", linear.Config.folds, "Labelled modes with --data: stratified cross-validation "
                           "folds (finetune holds out fold 0).", lower=2)
    program.define_integer("inner_folds", linear.Config.inner_folds, "Linear with --data: also choose the layer per "
                           "fold by an inner cross-validation of this many folds; 0 = off (docs/flags.md#evaluate).",
                           lower=0)
    program.define_integer("image_size", linear.Config.image_size, "Labelled modes: the side of the centre square "
                           "the backbone sees; at least one patch of the run's geometry (docs/flags.md#evaluate).",
                           lower=1)
    program.define_integer("probe_epochs", linear.Config.probe_epochs, "Linear: full-batch Adam steps of the "
                           "logistic regression.", lower=1)
    program.define_float("probe_learning_rate", linear.Config.probe_learning_rate, "Linear: Adam learning rate of the "
                         "probe.", above=0)
    program.define_float("probe_l2", linear.Config.probe_l2, "Linear: L2 penalty on the probe's weights "
                         "(standardised features).", lower=0)
    program.define_integer("probe_dims", linear.Config.probe_dims, "Linear: each layer's map is pooled to at most "
                           "this many values (about 9,000 in the literature); 1 = global average pooling.", lower=1)
    flags.DEFINE_enum("probe_pool", linear.Config.probe_pool, features_lib.POOL_MODES, "Linear: how a map is pooled "
                      "to --probe_dims: adaptive average, or Kolesnikov et al.'s max (docs/flags.md#evaluate).")
    flags.DEFINE_string("labels", None, "Labelled modes: a labels file for --data, lines 'NAME LABEL' or 'NAME "
                        "LABEL1,LABEL2' with --multi_label (docs/flags.md#labelled-data).")
    flags.DEFINE_bool("multi_label", False, "Linear and finetune: one sigmoid per class, scored by mean average "
                      "precision (VOC 2007's 11-point and the area under the curve).")
    program.define_integer("knn_k", knn.Config.k, "Knn: neighbours that vote (mmselfsup's 20; Wu et al. 2018 used "
                           "200).", lower=1)
    program.define_float("knn_temperature", knn.Config.temperature, "Knn: votes are weighted by exp(cosine "
                         "similarity / this) (Wu et al. 2018).", above=0)
    flags.DEFINE_string("freeze_up_to", finetune.Config.freeze_up_to, "Finetune: layers up to and including this "
                        "one stay frozen (default: none).")
    program.define_integer("finetune_epochs", finetune.Config.epochs, "Finetune: epochs over the training split.",
                           lower=1)
    program.define_float("finetune_learning_rate", finetune.Config.learning_rate, "Finetune: SGD learning rate after a "
                         "one-epoch warm-up, then cosine decay to 0.", above=0)
    program.define_float("finetune_weight_decay", finetune.Config.weight_decay, "Finetune: L2 on the kernels (as in "
                         "the loss: gradient += this * weight).", lower=0)
    flags.DEFINE_bool("finetune_rescale", finetune.Config.rescale, "Finetune: Krähenbühl et al.'s rescaling "
                      "(method.md §5.2) of a backbone not rescaled before (and of the random-init one).")
    program.define_integer("queries", neighbors.Config.queries, "Neighbors: random query patches (the paper drew "
                           "1000 and showed a few).", lower=1)
    program.define_integer("top_k", neighbors.Config.top_k, "Neighbors: neighbours shown per query.", lower=1)
    flags.DEFINE_bool("compare_random_init", neighbors.Config.compare_random_init, "Neighbors: add each query's row "
                      "for a random-init network.")
    program.define_integer("batch_size", linear.Config.batch_size, "Images or patches per forward pass.", lower=1)
    flags.DEFINE_bool("watch", False, "Poll --model_dir for new checkpoints and evaluate each.")
    program.define_integer("watch_interval", 30, "With --watch: least seconds between two polls.", lower=0)
    program.define_integer("watch_timeout", 3600, "With --watch: stop after this many seconds without a new "
                           "checkpoint (it also stops at the run's --train_steps).", lower=1)
  data_flags.define_source()
  data_flags.define_augmentation(where=False)
  labelled_flags.define_splits()


def protocol_config(mode):
  """The chosen protocol's Config from the flags."""
  splits = labelled.Splits(data=FLAGS.data, labels=FLAGS.labels, train_data=FLAGS.train_data,
                           train_labels=FLAGS.train_labels, val_data=FLAGS.val_data, val_labels=FLAGS.val_labels,
                           multi_label=FLAGS.multi_label, tfds_data_dir=FLAGS.tfds_data_dir)
  labelled_data = {"splits": splits, "seed": FLAGS.seed, "folds": FLAGS.folds,
                   "image_size": FLAGS.image_size, "batch_size": FLAGS.batch_size, "layer": FLAGS.layer}
  if mode == pretext.NAME:
    # The run's own augmentation unless given.
    color_mode, pixelation = data_flags.given("color_mode", "pixelation")
    return pretext.Config(data=FLAGS.data, seed=FLAGS.seed, data_root=FLAGS.data_root,
                          tfds_data_dir=FLAGS.tfds_data_dir, images=FLAGS.images,
                          pairs_per_image=FLAGS.pairs_per_image, color_mode=color_mode, pixelation=pixelation)
  if mode == linear.NAME:
    return linear.Config(**labelled_data, inner_folds=FLAGS.inner_folds, probe_epochs=FLAGS.probe_epochs,
                         probe_learning_rate=FLAGS.probe_learning_rate, probe_l2=FLAGS.probe_l2,
                         probe_dims=FLAGS.probe_dims, probe_pool=FLAGS.probe_pool)
  if mode == knn.NAME:
    return knn.Config(**labelled_data, k=FLAGS.knn_k, temperature=FLAGS.knn_temperature)
  if mode == finetune.NAME:
    return finetune.Config(**labelled_data, freeze_up_to=FLAGS.freeze_up_to, epochs=FLAGS.finetune_epochs,
                           learning_rate=FLAGS.finetune_learning_rate, weight_decay=FLAGS.finetune_weight_decay,
                           rescale=FLAGS.finetune_rescale)
  return neighbors.Config(data=FLAGS.data, seed=FLAGS.seed, data_root=FLAGS.data_root,
                          tfds_data_dir=FLAGS.tfds_data_dir, images=FLAGS.images,
                          layer=FLAGS.layer, queries=FLAGS.queries, top_k=FLAGS.top_k, batch_size=FLAGS.batch_size,
                          compare_random_init=FLAGS.compare_random_init)


def eval_dir_for(model_dir, saved_model, eval_dir):
  """--eval_dir, or its default beside the run or the export, checked before the evaluation begins: a read-only
  run directory is refused at once, naming the flag that picks another folder."""
  if eval_dir:
    return writes.check_folder(eval_dir, "eval_dir")
  default = run_dir.eval_dir(paths_lib.normalise(model_dir) if model_dir else paths_lib.parent(saved_model))
  if not tf.io.gfile.isdir(os.path.dirname(default)):
    return default  # no such run or export: loading it says so
  try:
    return writes.check_folder(default, "eval_dir")
  except errors.UsageError as e:
    reason = str(e).rsplit(": ", 1)[-1]
    raise errors.UsageError(f"The results go to {default} unless --eval_dir names another folder, and that one "
                            f"cannot be written ({reason}): give --eval_dir=A_WRITABLE_FOLDER") from e


def evaluate_and_emit(mode, subject, config, eval_dir, about=None):
  start = time.time()
  logging.info("Evaluating --mode=%s of %s (step %d).", mode, subject.about.get("checkpoint") or
               subject.about.get("saved_model") or "the subject", subject.step)
  result = PROTOCOLS[mode].evaluate(subject, config)
  logging.info("--mode=%s done in %.1f s; results in %s.", mode, time.time() - start, eval_dir)
  metrics = {"mode": mode, **subject.about, **(about or {}), "seed": config.seed,
             "seconds": round(time.time() - start, 1), **result.metrics}
  return output.emit(mode, metrics, result, eval_dir, subject.step)


def watch(mode, config, eval_dir, model_dir, interval, timeout):
  """Evaluates every new checkpoint of `model_dir` until the run's --train_steps is reached or no new checkpoint
  comes for `timeout` seconds (--watch_timeout; `interval`: --watch_interval)."""
  train_steps = run_dir.read_config(model_dir).train_steps
  run, evaluated = None, 0
  for path in tf.train.checkpoints_iterator(model_dir, min_interval_secs=interval, timeout=timeout):
    try:
      if run is None:
        run = restore.load_run(model_dir, path)
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
    raise errors.UsageError(f"--model_dir={model_dir}: no checkpoint within --watch_timeout={timeout} s")


def main():
  mode = FLAGS.mode
  if not mode:
    raise errors.UsageError(f"--mode is required: one of {', '.join(sorted(PROTOCOLS))}")
  if bool(FLAGS.model_dir) == bool(FLAGS.saved_model):
    raise errors.UsageError("give exactly one of --model_dir (a training run) and --saved_model (OUT/backbone)")
  if FLAGS.checkpoint and not FLAGS.model_dir:
    raise errors.UsageError("--checkpoint picks a checkpoint of --model_dir; an exported --saved_model has one set of "
                            "weights")
  if FLAGS.watch and not FLAGS.model_dir:
    raise errors.UsageError("--watch evaluates the new checkpoints of a --model_dir")
  if not FLAGS.data and mode in (pretext.NAME, neighbors.NAME):
    raise errors.UsageError(f"--data is required: the images of --mode={mode}")
  given = [f"--{name}" for name in ("color_mode", "pixelation") if FLAGS[name].present]
  if given and mode != pretext.NAME:
    raise errors.UsageError(f"Invalid flags: {', '.join(given)} choose how --mode=pretext augments its pairs; "
                            f"--mode={mode} feeds the backbone with its own preprocessing")
  config = protocol_config(mode)
  eval_dir = eval_dir_for(FLAGS.model_dir, FLAGS.saved_model, FLAGS.eval_dir)
  if FLAGS.watch:
    return watch(mode, config, eval_dir, FLAGS.model_dir, FLAGS.watch_interval, FLAGS.watch_timeout)
  subject = (subject_lib.from_run(restore.load_run(FLAGS.model_dir, FLAGS.checkpoint)) if FLAGS.model_dir
             else subject_lib.from_saved_model(FLAGS.saved_model))
  evaluate_and_emit(mode, subject, config, eval_dir)
  return 0


if __name__ == "__main__":
  program.run(main, define_flags)
