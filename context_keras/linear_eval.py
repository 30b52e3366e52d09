"""Linear evaluation at ImageNet scale: python -m context_keras.linear_eval
(--model_dir=RUN | --saved_model=OUT/backbone) --train_data=... --val_data=... [--val_labels=FILE] --eval_dir=EVAL
[--flagfile=flags/linear_imagenet.cfg]

One linear head per named layer of the frozen backbone (each layer's map pooled to at most --probe_dims values),
all trained jointly with SGD on features streamed through tf.data, never stored; then top-1 (and top-5, with more
than five classes) per layer on the validation set and per-class top-1 (method.md §10.3); with --multi_label, one
logistic regression per class and layer, scored by per-class average precision and their mean (method.md §10.6).
The defaults follow Goyal et al. 2019 as VISSL reproduces it; flags/linear_imagenet_100ep.cfg is the 100-epoch
variant, flags/linear_patches.cfg Kolesnikov et al. 2019's patch-averaged protocol.

Runs like training: under the same strategy (--strategy, several GPUs or workers), with checkpoints in EVAL that a
re-run resumes from (at the exact input position), quit and pause files, SIGINT/SIGTERM (checkpoint and exit 0),
TensorBoard logs in EVAL/train, and progress lines with images/s and ETA. The result is printed as one JSON object,
the last line, and written to EVAL/linear_eval.json.
"""
import dataclasses
import time

from absl import flags
from absl import logging
import tensorflow as tf

from context_keras import errors
from context_keras.cli import labelled as labelled_flags
from context_keras.cli import program
from context_keras.cli import run as run_flags
from context_keras.evaluation import features as features_lib
from context_keras.evaluation import linear_job
from context_keras.evaluation import output
from context_keras.evaluation import subject as subject_lib
from context_keras.evaluation.result import Result
from context_keras.input import labelled
from context_keras.storage import writes
from context_keras.training import actions as actions_lib
from context_keras.training import control
from context_keras.training import controller
from context_keras.training import progress as progress_lib
from context_keras.training import resources
from context_keras.training import restore

FLAGS = flags.FLAGS
NAME = "linear_eval"
CONFIG_FILE = "linear_eval_config.json"
KIND = controller.JobKind(holder="linear evaluation", folder_flag="eval_dir", log_file="linear_eval.log",
                          quit_file="linear_eval_quit", pause_file="linear_eval_pause")
DEFAULTS = linear_job.JobConfig()


def define_flags():
  with program.flag_group("subject"):
    flags.DEFINE_string("model_dir", None, "Training run to evaluate (its latest checkpoint, or --checkpoint).")
    flags.DEFINE_string("checkpoint", None, "With --model_dir: a checkpoint path (RUN/ckpt-N) or step N.")
    flags.DEFINE_string("saved_model", None, "Instead of --model_dir: an exported backbone (OUT/backbone).")
  labelled_flags.define_splits()
  with program.flag_group("protocol"):
    flags.DEFINE_enum("protocol", DEFAULTS.protocol, linear_job.PROTOCOLS, "image: the whole crop through the "
                      "backbone (Goyal et al.); patches: features averaged over a 3x3 grid of patches of the crop "
                      "(docs/flags.md#linear_eval).")
    flags.DEFINE_list("layers", [], "Layers to probe (default: every named layer of the backbone).")
    program.define_integer("probe_dims", DEFAULTS.probe_dims, "Each layer's map is pooled to at most this many "
                           "values (about 9,000: Zhang et al. 2017, Goyal et al. 2019; Kolesnikov et al. 2019); 1 "
                           "= global average pooling.", lower=1)
    flags.DEFINE_enum("probe_pool", DEFAULTS.probe_pool, features_lib.POOL_MODES, "avg: adaptive average pooling to "
                      "the largest square grid within --probe_dims; max: Kolesnikov et al.'s max pooling with "
                      "kernel = stride = ceil(sqrt(HWC / probe_dims)).")
    flags.DEFINE_bool("head_batchnorm", DEFAULTS.head_batchnorm, "Batch norm before each linear head (Goyal et al. "
                      "2019 / VISSL); off: the plain linear layer of Kolesnikov et al. and MoCo.")
    program.define_integer("resize_size", DEFAULTS.resize_size, "Validation (and random_crop training) images: "
                           "shorter side resized to this, then the centre (random) --crop_size square.", lower=1)
    program.define_integer("crop_size", DEFAULTS.crop_size, "Side of the square the backbone sees; it (or each third "
                           "of it, with --protocol=patches) must hold one patch of the run's geometry.", lower=1)
    flags.DEFINE_enum("train_augmentation", DEFAULTS.train_augmentation, linear_job.AUGMENTATIONS,
                      "Training crops: random-resized (Goyal et al.), a random --crop_size crop (Kolesnikov et al.), "
                      "or the validation transform (docs/flags.md#linear_eval).")
    flags.DEFINE_bool("flip", DEFAULTS.flip, "Random horizontal flips of training images.")
    flags.DEFINE_bool("multi_label", False, "Multi-label sets ('NAME L1,L2' lines, '?L' ignored): a logistic "
                      "regression per class and layer, scored by mAP (method.md §10.6).")
  with program.flag_group("optimisation"):
    program.define_integer("batch_size", DEFAULTS.batch_size, "Global batch (images per step over all replicas).",
                           lower=1)
    program.define_float("epochs", DEFAULTS.epochs, "Epochs over the training set (Goyal et al. / VISSL: 28).",
                         above=0)
    program.define_float("learning_rate", DEFAULTS.learning_rate, "SGD learning rate per 256 images, scaled "
                         "linearly with --batch_size (VISSL: 0.01; Kolesnikov et al.: 0.1).", above=0)
    program.define_float("momentum", DEFAULTS.momentum, "SGD momentum (Goyal et al. / VISSL: 0.9).", lower=0, below=1)
    flags.DEFINE_bool("nesterov", DEFAULTS.nesterov, "Nesterov momentum (VISSL: yes).")
    program.define_float("weight_decay", DEFAULTS.weight_decay, "L2 on the heads' kernels, as in the loss (gradient "
                         "+= this * weight; VISSL: 5e-4, Kolesnikov et al.: 0).", lower=0)
    flags.DEFINE_list("decay_epochs", [str(e) for e in DEFAULTS.decay_epochs], "Epochs at which the learning rate is "
                      "multiplied by --decay_factor (VISSL: 8,16,24).")
    program.define_float("decay_factor", DEFAULTS.decay_factor, "Learning-rate factor at each --decay_epochs.",
                         above=0, upper=1)
    program.define_float("warmup_epochs", DEFAULTS.warmup_epochs, "Linear learning-rate warm-up.", lower=0)
    program.define_integer("shuffle_buffer", DEFAULTS.shuffle_buffer, "Records shuffled together when reading "
                           "TFRecord shards or a TFDS split (files are permuted exactly every epoch; docs/data.md).",
                           lower=1)
    program.define_integer("seed", DEFAULTS.seed, "Seed of the data order and augmentation.", lower=0)
  run_flags.define(KIND, controller.RunOptions(steps_per_loop=20, log_every=100, checkpoint_every=1000,
                                               keep_checkpoints=3))
  with program.flag_group("run"):
    flags.DEFINE_string("eval_dir", None, "Folder of the job: checkpoints, TensorBoard logs (train/), its log, "
                        "config and linear_eval.json. A job resumes from its latest checkpoint here.")
    program.define_integer("eval_every", 0, "Steps between validation passes during training (0 = only at the end).",
                           lower=0)


def job_config():
  try:
    decay = tuple(float(e) for e in FLAGS.decay_epochs)
  except ValueError as e:
    raise errors.UsageError(f"Invalid flags: --decay_epochs={','.join(FLAGS.decay_epochs)} must be numbers") from e
  config = linear_job.JobConfig(
      protocol=FLAGS.protocol, layers=tuple(FLAGS.layers), probe_dims=FLAGS.probe_dims, probe_pool=FLAGS.probe_pool,
      head_batchnorm=FLAGS.head_batchnorm, resize_size=FLAGS.resize_size, crop_size=FLAGS.crop_size,
      train_augmentation=FLAGS.train_augmentation, flip=FLAGS.flip, batch_size=FLAGS.batch_size, epochs=FLAGS.epochs,
      learning_rate=FLAGS.learning_rate, momentum=FLAGS.momentum, nesterov=FLAGS.nesterov,
      weight_decay=FLAGS.weight_decay, decay_epochs=decay, decay_factor=FLAGS.decay_factor,
      warmup_epochs=FLAGS.warmup_epochs, shuffle_buffer=FLAGS.shuffle_buffer, seed=FLAGS.seed)
  if config.resize_size < config.crop_size:
    # Every augmentation: the validation images are centre-cropped from the resized image.
    raise errors.UsageError(f"Invalid flags: --resize_size={config.resize_size} is smaller than --crop_size="
                            f"{config.crop_size}: the validation crop (and random_crop's) is cut from the image "
                            "resized to --resize_size")
  return config


def check_flags():
  if bool(FLAGS.model_dir) == bool(FLAGS.saved_model):
    raise errors.UsageError("give exactly one of --model_dir (a training run) and --saved_model (OUT/backbone)")
  if not (FLAGS.train_data or FLAGS.train_labels):
    raise errors.UsageError(f"--train_data is required: {labelled_flags.FORMS}")
  if not (FLAGS.val_data or FLAGS.val_labels):
    raise errors.UsageError("--val_data is required: the images the heads are scored on")
  if not FLAGS.eval_dir:
    raise errors.UsageError("--eval_dir is required: the job's folder (checkpoints, logs, results)")




class Progress(actions_lib.Action):
  """Training scalars after every call, and a progress line every `every` steps: loss, the training top-1 of each
  head's batches (multi-label: the share of their classes on the right side), images/s and ETA."""

  def __init__(self, writer, every, trainer, total, per_epoch, layers):
    self.writer, self.every, self.trainer, self.total, self.per_epoch = writer, every, trainer, total, per_epoch
    self.layers = layers
    self.window = None
    self.start = time.monotonic()
    self.first_step = trainer.current_step()
    self.images = 0

  def __call__(self, output):
    if not output.steps:
      return
    values = output.values
    self.images += int(values["examples"] + values["unreadable"])
    self.window = values if self.window is None else {k: self.window[k] + values[k] for k in values}
    seconds = max(output.seconds, 1e-9)
    examples = max(float(values["examples"]), 1.0)
    with self.writer.at(output.step):
      for name in self.layers:
        tf.summary.scalar(f"loss/{name}", float(values["loss_" + name]) / examples)
        tf.summary.scalar(f"train_top1/{name}", float(values["correct_" + name]) / examples)
      tf.summary.scalar("images_per_second", float(values["examples"] + values["unreadable"]) / seconds)
      tf.summary.scalar("learning_rate", self.trainer.learning_rate())
    if self.is_due(output.step) or output.step >= self.total or output.status != control.STATUS_OK:
      window, self.window = self.window, None
      done = max(float(window["examples"]), 1.0)
      loss = sum(float(window["loss_" + n]) for n in self.layers) / done
      best = max(self.layers, key=lambda n: float(window["correct_" + n]))
      rate = self.rate()
      eta = progress_lib.duration((self.total - output.step) * self.trainer.config.batch_size / rate) if rate else "?"
      logging.info("step %d/%d (epoch %.2f/%g)  loss (sum of heads) %.4f  train %s %.3f (%s)  %.1f images/s  "
                   "lr %.3g  unreadable %d  ETA %s", output.step, self.total, output.step / self.per_epoch,
                   self.trainer.config.epochs, loss, "accuracy per class" if self.trainer.multi_label else "top-1",
                   float(window["correct_" + best]) / done, best, rate, self.trainer.learning_rate(),
                   int(window["unreadable"]), eta)

  def rate(self):
    """Images per second of this invocation's training so far."""
    elapsed = time.monotonic() - self.start
    return self.images / elapsed if elapsed > 0 else 0.0


class Validation(actions_lib.Action):
  """A validation pass every `every` steps (0: none during training) and at the end, logged and written to
  TensorBoard; a step is validated once."""

  def __init__(self, every, strategy, trainer, val, config, classes, summaries):
    self.every, self.strategy, self.trainer, self.val, self.config = every, strategy, trainer, val, config
    self.classes, self.summaries = classes, summaries
    self.steps = linear_job.val_steps(val.size, config.batch_size)
    self.validated = {}

  def __call__(self, output):
    if output.steps and self.is_due(output.step):
      self.validate(output.step)

  def validate(self, step):
    """(per-layer results, examples, unreadable) of the validation set at `step`."""
    if step in self.validated:
      return self.validated[step]
    logging.info("Validation pass at step %d: %d images in %d batches.", step, self.val.size, self.steps)
    began = time.monotonic()
    dataset = linear_job.distributed(self.strategy, self.config.batch_size, lambda pipeline: linear_job.val_dataset(
        self.val, self.config, self.steps, pipeline))
    evaluate = self.trainer.evaluate_multi_label if self.trainer.multi_label else self.trainer.evaluate
    per_layer, examples, bad = evaluate(dataset, self.steps, self.classes)
    key = score_key(self.trainer.multi_label)
    logging.info("Validation at step %d (%.0f images/s): %s %s.", step, (examples + bad) / max(
        time.monotonic() - began, 1e-9), "mAP" if self.trainer.multi_label else "top-1",
                 ", ".join(f"{name} {entry[key]:.4f}" for name, entry in per_layer.items()))
    with self.summaries.at(step):
      for name, entry in per_layer.items():
        for metric in ("top1", "top5", "map_auc", "map_11point"):
          if metric in entry:
            tf.summary.scalar(f"val_{metric}/{name}", entry[metric])
    self.validated[step] = per_layer, examples, bad
    return self.validated[step]


def score_key(multi_label):
  """What the layers are ranked by: top-1 accuracy, or for a multi-label set VOC's mAP (area under the curve)."""
  return "map_auc" if multi_label else "top1"


def result_metrics(per_layer, multi_label):
  """The best layer's scores under the result's top-level keys, and every layer's without its per-class lists."""
  key = score_key(multi_label)
  best = max(per_layer, key=lambda name: per_layer[name][key])
  per_class = "per_class_ap" if multi_label else "per_class_top1"
  scores = {k: v for k, v in per_layer[best].items() if k in ("top1", "top5", "map_auc", "map_11point")}
  return {"best_layer": best, **scores,
          "per_layer": {name: {k: v for k, v in entry.items() if k not in (per_class, "classes_without_positives")}
                        for name, entry in per_layer.items()},
          per_class: per_layer[best][per_class]}


def check_side(config, geometry):
  """The crop (or each of its patches) must hold one of the backbone's patches (geometry.Geometry.check_input_side,
  evaluate's rule too)."""
  side = config.crop_size // config.patch_grid if config.patch_grid else config.crop_size
  geometry.check_input_side("--crop_size", config.crop_size, side, "patches" if config.patch_grid else "images")


def run():
  job = controller.Job(KIND, run_flags.options())
  check_flags()
  config = job_config()
  eval_dir = writes.check_folder(FLAGS.eval_dir, "eval_dir")
  with job.running(eval_dir):
    strategy = job.strategy
    if config.batch_size % strategy.num_replicas_in_sync:
      raise errors.UsageError(f"Invalid flags: --batch_size={config.batch_size} must be a multiple of the "
                              f"{strategy.num_replicas_in_sync} replicas")
    train, val = labelled.Splits(train_data=FLAGS.train_data, train_labels=FLAGS.train_labels,
                                 val_data=FLAGS.val_data, val_labels=FLAGS.val_labels, multi_label=FLAGS.multi_label,
                                 tfds_data_dir=FLAGS.tfds_data_dir).find()
    logging.info("Training set: %s. Validation set: %s.", train.description, val.description)
    with strategy.scope():
      subject = (subject_lib.from_run(restore.load_run(FLAGS.model_dir, FLAGS.checkpoint)) if FLAGS.model_dir
                 else subject_lib.from_saved_model(FLAGS.saved_model))
    check_side(config, subject.patch_geometry)
    layers = config.layers or tuple(subject.feature_layers)
    unknown = [name for name in layers if name not in subject.feature_layers]
    if unknown:
      raise errors.UsageError(f"--layers: {', '.join(unknown)} not among {', '.join(subject.feature_layers)}")
    plans = features_lib.plan(subject.features, layers, config.crop_size, config.probe_dims, config.probe_pool,
                              config.patch_grid)
    extractor = features_lib.Extractor(subject.features, plans, config.patch_grid, owner=subject)
    logging.info("Heads on %s.", ", ".join(f"{n} ({p.dims} dims)" for n, p in plans.items()))
    per_epoch = linear_job.steps_per_epoch(train.size, config.batch_size)
    total = linear_job.total_steps(config, train.size)
    controller.keep_settings(KIND, eval_dir, CONFIG_FILE, {
        "subject": {k: v for k, v in subject.about.items() if k != "step"}, "step": subject.step,
        "config": dataclasses.asdict(config), "layers": list(layers), "train": train.description,
        "val": val.description, "classes": len(train.classes), "multi_label": train.multi_label})
    trainer = linear_job.HeadTrainer(strategy, extractor, len(train.classes), config, per_epoch, train.multi_label)
    unreadable = tf.Variable(0, dtype=tf.int64, trainable=False, name="unreadable")
    checkpoint = tf.train.Checkpoint(**trainer.checkpoint_items(), unreadable=unreadable)
    checkpoints = job.checkpoints(checkpoint, trainer)
    latest = job.latest
    if latest:
      checkpoint.restore(latest).assert_existing_objects_matched()
      logging.info("Resumed from %s at step %d of %d.", latest, trainer.current_step(), total)
    else:
      logging.info("Starting a new linear evaluation in %s: %d steps (%g epochs of %d images, batch %d).", eval_dir,
                   total, config.epochs, train.size, config.batch_size)
    start = trainer.current_step() * config.batch_size
    iterator = iter(linear_job.distributed(strategy, config.batch_size,
                                           lambda pipeline: linear_job.train_dataset(train, config, start, pipeline)))
    summaries = job.summary_writer(latest)
    control = job.control(trainer.request)
    validation = Validation(FLAGS.eval_every, strategy, trainer, val, config, train.classes, summaries)
    progress = Progress(summaries, FLAGS.log_every, trainer, total, per_epoch, layers)
    began = time.monotonic()
    outcome = job.loop(trainer, iterator, [actions_lib.Counters({"unreadable": unreadable}), progress, checkpoints,
                                           validation], total, control, checkpoints)
    if not outcome.finished:
      return outcome.exit_code
    train_seconds = time.monotonic() - began
    step = trainer.current_step()
    per_layer, examples, bad = validation.validate(step)
    scores = result_metrics(per_layer, train.multi_label)
    metrics = {"mode": NAME, **subject.about, "protocol": config.protocol, "train_data": train.description,
               "val_data": val.description, "multi_label": train.multi_label, **scores,
               "classes": len(train.classes), "val_images": examples, "val_unreadable": bad,
               "train_images": train.size, "train_unreadable": int(unreadable.numpy()), "steps": step,
               "epochs": config.epochs, "batch_size": config.batch_size,
               # One number that differs when any head's weight does: jobs of one seed agree on it, resumed or not.
               "heads_digest": linear_job.weights_digest(trainer.heads),
               "images_per_second": round(progress.rate(), 1), "train_seconds": round(train_seconds, 1),
               "peak_rss_mb": round(resources.peak_rss_mb(), 1), "eval_dir": eval_dir}
    if not train.multi_label:
      metrics["chance"] = 1.0 / len(train.classes)
    logging.info("Linear evaluation finished at step %d: best layer %s, %s. Peak memory: %.0f MB.", step,
                 scores["best_layer"], ", ".join(f"{k} {scores[k]:.4f}" for k in ("top1", "top5", "map_auc",
                                                                                    "map_11point") if k in scores),
                 metrics["peak_rss_mb"])
    if job.is_chief:
      output.emit(NAME, metrics, Result(metrics), eval_dir, step)
  return 0


if __name__ == "__main__":
  program.run(run, define_flags)
