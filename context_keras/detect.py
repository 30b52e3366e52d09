"""Detection transfer: python -m context_keras.detect (--model_dir=RUN | --saved_model=OUT/backbone)
--data=VOCdevkit/VOC2007 --train_split=trainval --test_split=test --eval_dir=EVAL [--init=random] [--train_steps=N]
[--flagfile=flags/voc07_detection.cfg]

Fine-tunes a detector whose backbone is the run's (or the export's) on a split of a VOCdevkit folder or of a TFDS
dataset (--data=tfds:voc/2007 [--tfds_data_dir=DIR]) and reports PASCAL VOC's average precision per class and its
mean on another (docs/detection.md). The detector is keras-hub's RetinaNet (pip install context_keras[detection]) on
a feature pyramid of the backbone's maps; the backbone is first rescaled (Krähenbühl et al., as the original advises
for fine-tuning); --init=random runs the same recipe from random initialisation, the baseline a transfer figure
needs.

Runs like training: under the same strategy, with checkpoints in EVAL that a re-run resumes from (at the exact input
position), quit and pause files, SIGINT/SIGTERM (checkpoint and exit 0), TensorBoard logs in EVAL/train (losses, mAP,
test images with true and detected boxes), progress lines with images/s and ETA. The fine-tuned detector is written
to EVAL/detector (a SavedModel), and the result, printed as one JSON object on the last line, to EVAL/detect.json.
"""
import dataclasses
import os
import time

from absl import flags
from absl import logging
import numpy as np
import tensorflow as tf

from context_keras import errors
from context_keras.cli import data as data_flags
from context_keras.cli import program
from context_keras.cli import run as run_flags
from context_keras.evaluation import detector as detector_lib
from context_keras.evaluation import linear_job
from context_keras.evaluation import output
from context_keras.evaluation import subject as subject_lib
from context_keras.evaluation import voc_metric
from context_keras.evaluation.result import Result
from context_keras.input import decoding
from context_keras.input import voc
from context_keras.storage import writes
from context_keras.training import actions as actions_lib
from context_keras.training import control as control_lib
from context_keras.training import controller
from context_keras.training import progress as progress_lib
from context_keras.training import resources
from context_keras.training import restore
from context_keras.training import trainer as trainer_lib

FLAGS = flags.FLAGS
NAME = "detect"
CONFIG_FILE = "detect_config.json"
FLAGS_FILE = "detect_flags.txt"
EXPORT_DIR = "detector"
KIND = controller.JobKind(holder="detection", folder_flag="eval_dir", log_file="detect.log", quit_file="detect_quit",
                          pause_file="detect_pause")
SUMMARY_IMAGES = 4           # test images drawn with their true and detected boxes at every evaluation
DRAW_SCORE = 0.3             # detections drawn: those scoring at least this
DEFAULTS = detector_lib.DetectorConfig()


def define_flags():
  with program.flag_group("subject"):
    flags.DEFINE_string("model_dir", None, "Training run whose backbone is fine-tuned (its latest checkpoint, or "
                        "--checkpoint).")
    flags.DEFINE_string("checkpoint", None, "With --model_dir: a checkpoint path (RUN/ckpt-N) or step N.")
    flags.DEFINE_string("saved_model", None, "Instead of --model_dir: an exported backbone (OUT/backbone).")
    flags.DEFINE_enum("init", "trained", detector_lib.INITS, "trained: the subject's weights; random: the same "
                      "architecture from random initialisation, the baseline (docs/detection.md §1).")
  with program.flag_group("data"):
    flags.DEFINE_string("data", None, "A VOCdevkit folder (VOCdevkit/VOC2007: Annotations/, JPEGImages/, "
                        "ImageSets/Main/) or a prepared TFDS dataset, tfds:voc/2007 (docs/detection.md §2).")
    flags.DEFINE_string("train_split", "trainval", "Split to fine-tune on: ImageSets/Main/<name>.txt, or a TFDS "
                        "split expression (trainval = train+validation).")
    flags.DEFINE_string("test_split", "test", "Split to evaluate on: ImageSets/Main/<name>.txt, or a TFDS split.")
    flags.DEFINE_list("classes", ["voc"], "voc: the 20 VOC classes; annotations: the names the training split's "
                      "annotations use; or a list of names.")
    flags.DEFINE_bool("train_difficult", False, "Train on objects marked difficult too (Fast R-CNN and mmdetection "
                      "leave them out; the metric ignores them either way).")
  data_flags.define_tfds_data_dir()
  with program.flag_group("detector"):
    flags.DEFINE_enum("detector", DEFAULTS.detector, detector_lib.DETECTORS, "retinanet: keras-hub's RetinaNet on a "
                      "feature pyramid of the backbone (docs/detection.md §1).")
    program.define_integer("image_size", DEFAULTS.image_size, "Images are resized to this longer side and padded "
                           "to a square of it; a multiple of 2^--max_level.", lower=32)
    flags.DEFINE_list("pyramid_layers", list(DEFAULTS.pyramid_layers), "Backbone layers feeding the pyramid, the "
                      "deepest at each stride (default per tower: docs/detection.md §1).")
    program.define_integer("min_level", DEFAULTS.min_level, "Finest pyramid level (stride 2^level).", lower=1)
    program.define_integer("max_level", DEFAULTS.max_level, "Coarsest pyramid level; levels past the backbone's "
                           "deepest map come from stride-2 convolutions.", lower=1)
    program.define_integer("fpn_filters", DEFAULTS.fpn_filters, "Channels of the feature pyramid.", lower=1)
    program.define_integer("head_convs", DEFAULTS.head_convs, "3x3 convolutions (256 channels) in each head before "
                           "its output.", lower=0)
    flags.DEFINE_enum("batchnorm", DEFAULTS.batchnorm, detector_lib.BATCHNORM, "frozen: the backbone's batch norm "
                      "folded into its convolutions (the original); trained: synchronised batch norm after them, "
                      "trained (MoCo's protocol).")
    flags.DEFINE_bool("rescale", DEFAULTS.rescale, "Krähenbühl et al.'s rescaling of the backbone first (chain "
                      "towers; skipped for an export already rescaled).")
    program.define_float("score_threshold", DEFAULTS.score_threshold, "Detections kept above this score.", lower=0,
                         below=1)
    program.define_float("nms_iou", DEFAULTS.nms_iou, "Per-class NMS overlap.", above=0, upper=1)
    program.define_integer("max_detections", DEFAULTS.max_detections, "Detections per image.", lower=1)
  with program.flag_group("optimisation"):
    program.define_integer("batch_size", DEFAULTS.batch_size, "Global batch (images per step over all replicas).",
                           lower=1)
    program.define_integer("train_steps", DEFAULTS.train_steps, "Training steps (the schedule's decays and warm-up "
                           "scale with it).", lower=1)
    program.define_float("learning_rate", DEFAULTS.learning_rate, "SGD learning rate per 16 images, scaled linearly "
                         "with --batch_size (RetinaNet: 0.01).", above=0)
    program.define_float("momentum", DEFAULTS.momentum, "SGD momentum (RetinaNet: 0.9).", lower=0, below=1)
    program.define_float("weight_decay", DEFAULTS.weight_decay, "L2 on every kernel, as in the loss.", lower=0)
    program.define_float("warmup", DEFAULTS.warmup, "Linear warm-up, as a fraction of --train_steps.", lower=0,
                         upper=1)
    flags.DEFINE_list("decay_at", [str(f) for f in DEFAULTS.decay_at], "Fractions of --train_steps at which the "
                      "learning rate is multiplied by --decay_factor.")
    program.define_float("decay_factor", DEFAULTS.decay_factor, "Learning-rate factor at each --decay_at.", above=0,
                         upper=1)
    program.define_float("clip_norm", DEFAULTS.clip_norm, "Clip gradients to this global norm (0: no clipping; "
                         "mmdetection's RetinaNet: 35).", lower=0)
    flags.DEFINE_bool("flip", DEFAULTS.flip, "Random horizontal flips of training images.")
    program.define_integer("seed", DEFAULTS.seed, "Seed of the data order, flips and new layers.", lower=0)
  run_flags.define(KIND, controller.RunOptions(steps_per_loop=20, log_every=50, checkpoint_every=500,
                                               keep_checkpoints=3))
  with program.flag_group("run"):
    flags.DEFINE_string("eval_dir", None, "Folder of the job: checkpoints, TensorBoard logs (train/), its log, "
                        "flags, config, detect.json and the detector SavedModel. A job resumes here.")
    program.define_integer("eval_every", 0, "Steps between test-set evaluations during training (0 = only at the "
                           "end).", lower=0)


def detector_config():
  try:
    decay_at = tuple(float(f) for f in FLAGS.decay_at)
  except ValueError as e:
    raise errors.UsageError(f"Invalid flags: --decay_at={','.join(FLAGS.decay_at)} must be numbers") from e
  return detector_lib.DetectorConfig(
      detector=FLAGS.detector, image_size=FLAGS.image_size, pyramid_layers=tuple(FLAGS.pyramid_layers),
      min_level=FLAGS.min_level, max_level=FLAGS.max_level, fpn_filters=FLAGS.fpn_filters,
      head_convs=FLAGS.head_convs, batchnorm=FLAGS.batchnorm, rescale=FLAGS.rescale,
      score_threshold=FLAGS.score_threshold, nms_iou=FLAGS.nms_iou, max_detections=FLAGS.max_detections,
      batch_size=FLAGS.batch_size, train_steps=FLAGS.train_steps, learning_rate=FLAGS.learning_rate,
      momentum=FLAGS.momentum, weight_decay=FLAGS.weight_decay, warmup=FLAGS.warmup, decay_at=decay_at,
      decay_factor=FLAGS.decay_factor, clip_norm=FLAGS.clip_norm, flip=FLAGS.flip, seed=FLAGS.seed).check()


def check_flags():
  if bool(FLAGS.model_dir) == bool(FLAGS.saved_model):
    raise errors.UsageError("give exactly one of --model_dir (a training run) and --saved_model (OUT/backbone)")
  if not FLAGS.data:
    raise errors.UsageError("--data is required: a VOCdevkit folder (VOCdevkit/VOC2007) or tfds:voc/2007")
  if not FLAGS.eval_dir:
    raise errors.UsageError("--eval_dir is required: the job's folder (checkpoints, logs, results)")


def classes_choice():
  values = [name.strip() for name in FLAGS.classes]
  return values[0] if values in (["voc"], ["annotations"]) else tuple(values)




class Progress(actions_lib.Action):
  """Training scalars after every call, and a progress line every `every` steps: the losses, images/s and ETA."""

  def __init__(self, writer, every, trainer, total, losses):
    self.writer, self.every, self.trainer, self.total, self.losses = writer, every, trainer, total, losses
    self.window = None
    self.start = time.monotonic()
    self.images = 0

  def __call__(self, output):
    if not output.steps:
      return
    values = output.values
    self.images += int(values["images"] + values["unreadable"])
    self.window = values if self.window is None else {k: self.window[k] + values[k] for k in values}
    steps = float(values["steps"])
    with self.writer.at(output.step):
      tf.summary.scalar("loss/classification", float(values["loss_classification"]) / steps)
      tf.summary.scalar("loss/box", float(values["loss_box"]) / steps)
      tf.summary.scalar("loss/total", float(values["loss_classification"] + values["loss_box"]) / steps)
      tf.summary.scalar("positive_anchors_per_image", float(values["positives"]) / max(float(values["images"]), 1))
      tf.summary.scalar("images_per_second", float(values["images"] + values["unreadable"]) / output.seconds)
      tf.summary.scalar("learning_rate", self.trainer.learning_rate())
    if self.is_due(output.step) or output.step >= self.total or output.status != control_lib.STATUS_OK:
      window, self.window = self.window, None
      n = max(float(window["steps"]), 1.0)
      classification, box = float(window["loss_classification"]) / n, float(window["loss_box"]) / n
      self.losses.record(output.step, classification + box)
      rate = self.rate()
      eta = progress_lib.duration((self.total - output.step) * self.trainer.config.batch_size / rate) if rate else "?"
      logging.info("step %d/%d  loss %.4f (classification %.4f, box %.4f)  %.1f images/s  lr %.3g  unreadable %d  "
                   "ETA %s", output.step, self.total, classification + box, classification, box, rate,
                   self.trainer.learning_rate(), int(window["unreadable"]), eta)

  def rate(self):
    elapsed = time.monotonic() - self.start
    return self.images / elapsed if elapsed > 0 else 0.0


class Losses:
  """The mean loss of the first and of the latest progress window, kept in the checkpoint so that a resumed job's
  result still says where the loss started."""

  def __init__(self):
    self.first = tf.Variable([-1.0, -1.0], dtype=tf.float64, trainable=False, name="first_loss")
    self.last = tf.Variable([-1.0, -1.0], dtype=tf.float64, trainable=False, name="last_loss")

  def record(self, step, loss):
    if self.first[0] < 0:
      self.first.assign([step, loss])
    self.last.assign([step, loss])

  def describe(self):
    def entry(variable):
      step, loss = variable.numpy()
      return {"step": int(step), "loss": float(loss)} if step >= 0 else None
    return {"first": entry(self.first), "last": entry(self.last)}


class Evaluation(actions_lib.Action):
  """A test-set evaluation every `every` steps (0: none during training) and at the end, logged and written to
  TensorBoard (mAP, per-class AP, test images with their boxes); a step is evaluated once."""

  def __init__(self, every, strategy, trainer, test, classes, preprocessing, summaries):
    self.every, self.strategy, self.trainer, self.test, self.classes = every, strategy, trainer, test, classes
    self.preprocessing, self.summaries = preprocessing, summaries
    self.steps = voc.test_steps(test, trainer.config.batch_size)
    self.truth = detector_lib.ground_truth(test)
    self.evaluated = {}

  def __call__(self, output):
    if output.steps and self.is_due(output.step):
      self.evaluate(output.step)

  def evaluate(self, step):
    """(voc_metric.evaluate's scores, unreadable test images, detections) at `step`."""
    if step in self.evaluated:
      return self.evaluated[step]
    config = self.trainer.config
    logging.info("Evaluating at step %d: %d test images in %d batches.", step, self.test.size, self.steps)
    began = time.monotonic()
    dataset = linear_job.distributed(self.strategy, config.batch_size, lambda pipeline: voc.test_dataset(
        self.test, config.image_size, self.preprocessing, self.steps, pipeline))
    detections, bad = self.trainer.detect(dataset, self.steps)
    scores = voc_metric.evaluate(detections, self.truth, self.classes)
    logging.info("Test mAP at step %d: %.4f (VOC07 11-point), %.4f (area); %d detections, %.1f images/s.", step,
                 scores["mAP"] or 0.0, scores["mAP_area"] or 0.0, len(detections.image),
                 self.test.size / max(time.monotonic() - began, 1e-9))
    with self.summaries.at(step):
      tf.summary.scalar("test/mAP", scores["mAP"] or 0.0)
      tf.summary.scalar("test/mAP_area", scores["mAP_area"] or 0.0)
      for name, entry in scores["per_class"].items():
        if entry["ap"] is not None:
          tf.summary.scalar(f"test_AP/{name}", entry["ap"])
      drawn = draw(self.test, detections, config.image_size, SUMMARY_IMAGES)
      if drawn is not None:
        tf.summary.image("test/boxes", drawn, max_outputs=SUMMARY_IMAGES)
    self.evaluated[step] = scores, bad, len(detections.image)
    return self.evaluated[step]


def draw(test, detections, size, count):
  """uint8 [count, size, size, 3]: the first test images fitted as the detector sees them, true boxes in green
  (difficult ones in yellow) and detections scoring at least DRAW_SCORE in red."""
  images, gt_boxes, det_boxes = [], [], []
  for i, contents in enumerate(voc.stored_images(test, count)):
    if contents is None:  # unreadable: counted as such by the evaluation
      continue
    try:
      image = decoding.decode_stored(contents)
    except tf.errors.OpError:  # undecodable: the same
      continue
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    ratio = float(size / tf.reduce_max(shape))
    new = tf.cast(tf.round(shape * ratio), tf.int32)
    resized = tf.image.resize(tf.cast(image, tf.float32), new) / 255.0
    images.append(tf.image.pad_to_bounding_box(resized, 0, 0, size, size))
    real = test.labels[i] >= 0
    gt_boxes.append((voc.continuous(test.boxes[i][real]).numpy() * ratio / size, test.difficult[i][real]))
    mine = (detections.image == i) & (detections.score >= DRAW_SCORE)
    det_boxes.append(voc.continuous(detections.box[mine]).numpy() * ratio / size)
  drawn = []
  for image, (truth, difficult), found in zip(images, gt_boxes, det_boxes):
    x = image[tf.newaxis]
    for boxes, colour in ((truth[~difficult], [0.0, 1.0, 0.0, 1.0]), (truth[difficult], [1.0, 1.0, 0.0, 1.0]),
                          (found, [1.0, 0.0, 0.0, 1.0])):
      if len(boxes):
        x = tf.image.draw_bounding_boxes(x, tf.constant(boxes[np.newaxis], tf.float32), [colour])
    drawn.append(x[0])
  return tf.cast(tf.round(tf.stack(drawn) * 255.0), tf.uint8).numpy() if drawn else None


def diverged(output, checkpoints, config):
  """Exit code 1 when a call stopped on a loss that is not finite, saying where the job can resume."""
  if output.status != trainer_lib.STATUS_NOT_FINITE:
    return None
  logging.error("Diverged at step %d: the loss is NaN/Inf. Nothing was checkpointed after step %d; lower "
                "--learning_rate (now %g) or --clip_norm (now %g), then re-run to resume from %s.", output.step,
                checkpoints.last_step, config.learning_rate, config.clip_norm, checkpoints.latest or "scratch")
  return 1


def run():
  job = controller.Job(KIND, run_flags.options())
  check_flags()
  config = detector_config()
  detector_lib.keras_hub()  # refused here, in one line, when the extra is not installed
  eval_dir = writes.check_folder(FLAGS.eval_dir, "eval_dir")
  with job.running(eval_dir):
    strategy = job.strategy
    if config.batch_size % strategy.num_replicas_in_sync:
      raise errors.UsageError(f"Invalid flags: --batch_size={config.batch_size} must be a multiple of the "
                              f"{strategy.num_replicas_in_sync} replicas")
    if job.is_chief:
      writes.atomic_write(os.path.join(eval_dir, FLAGS_FILE),
                          "".join(flag.serialize() + "\n" for flag in program.defined_flags().values()))
    train, test = voc.load(FLAGS.data, FLAGS.train_split, FLAGS.test_split, classes_choice(), FLAGS.train_difficult,
                           FLAGS.tfds_data_dir)
    logging.info("Training on %s: %d images, %d classes; testing on %s: %d images.", train.description, train.size,
                 len(train.classes), test.description, test.size)
    subject = (subject_lib.from_run(restore.load_run(FLAGS.model_dir, FLAGS.checkpoint)) if FLAGS.model_dir
               else subject_lib.from_saved_model(FLAGS.saved_model))
    backbone_name, about = subject.model_config.backbone, dict(subject.about)
    if FLAGS.init == "random":
      subject = subject.random_init(config.seed)
    latest = job.latest
    controller.keep_settings(KIND, eval_dir, CONFIG_FILE, {
        "subject": {k: v for k, v in about.items() if k != "step"}, "init": FLAGS.init, "step": subject.step,
        "config": dataclasses.asdict(config), "train": train.description, "test": test.description,
        "classes": list(train.classes)})
    with strategy.scope():
      folded, preparation = detector_lib.prepare_backbone(
          subject.trainable_backbone(), subject.model_config, subject.patch_geometry, subject.preprocessing, train,
          config, subject.rescaled, resuming=bool(latest))
      levels = detector_lib.pyramid_levels(folded, config.pyramid_layers or detector_lib.PYRAMID_LAYERS[backbone_name],
                                           config)
      logging.info("Pyramid: %s; levels P%d-P%d.", ", ".join(f"P{k} = {n}" for k, n in sorted(levels.items())),
                   min(levels), config.max_level)
      detector = detector_lib.build(folded, levels, len(train.classes), config)
      losses = Losses()
      unreadable = tf.Variable(0, dtype=tf.int64, trainable=False, name="unreadable")
    trainer = detector_lib.DetectionTrainer(strategy, detector, config)
    checkpoint = tf.train.Checkpoint(**trainer.checkpoint_items(), unreadable=unreadable, first_loss=losses.first,
                                     last_loss=losses.last)
    checkpoints = job.checkpoints(checkpoint, trainer)
    total = config.train_steps
    if latest:
      checkpoint.restore(latest).assert_existing_objects_matched()
      logging.info("Resumed from %s at step %d of %d.", latest, trainer.current_step(), total)
    else:
      logging.info("Starting detection fine-tuning in %s: %d steps of %d images (%.1f epochs).", eval_dir, total,
                   config.batch_size, total * config.batch_size / train.size)
    start = trainer.current_step() * config.batch_size
    iterator = iter(linear_job.distributed(strategy, config.batch_size, lambda pipeline: voc.train_dataset(
        train, config.image_size, subject.preprocessing, config.seed, start, pipeline, config.flip)))
    summaries = job.summary_writer(latest)
    control = job.control(trainer.request)
    evaluation = Evaluation(FLAGS.eval_every, strategy, trainer, test, train.classes, subject.preprocessing,
                            summaries)
    progress = Progress(summaries, FLAGS.log_every, trainer, total, losses)
    began = time.monotonic()
    outcome = job.loop(trainer, iterator, [actions_lib.Counters({"unreadable": unreadable}), progress, checkpoints,
                                           evaluation], total, control, checkpoints,
                       guard=lambda output: diverged(output, checkpoints, config))
    if not outcome.finished:
      return outcome.exit_code
    train_seconds = time.monotonic() - began
    step = trainer.current_step()
    scores, bad, found = evaluation.evaluate(step)
    export_path = os.path.join(eval_dir, EXPORT_DIR)
    if job.is_chief:
      with writes.atomic_folder(export_path) as staging:
        detector_lib.export(detector, train.classes, subject.preprocessing, staging)
      logging.info("Detector SavedModel written to %s.", export_path)
    metrics = {"mode": NAME, **about, "init": FLAGS.init, "detector": config.detector,
               "mAP": scores["mAP"], "mAP_area": scores["mAP_area"],
               "per_class_AP": {name: entry["ap"] for name, entry in scores["per_class"].items()},
               "per_class_AP_area": {name: entry["ap_area"] for name, entry in scores["per_class"].items()},
               "per_class": scores["per_class"], "classes_with_positives": scores["classes_with_positives"],
               "test_images": test.size, "test_unreadable": bad, "detections": found, "train_images": train.size,
               "train_unreadable": int(unreadable.numpy()), "skipped": {"train": train.skipped, "test": test.skipped},
               "data": FLAGS.data, "train_split": FLAGS.train_split, "test_split": FLAGS.test_split,
               "pyramid": {f"P{k}": n for k, n in sorted(levels.items())}, "preparation": preparation,
               "loss": losses.describe(), "steps": step, "batch_size": config.batch_size,
               "image_size": config.image_size, "batchnorm": config.batchnorm,
               "images_per_second": round(progress.rate(), 1), "train_seconds": round(train_seconds, 1),
               "peak_rss_mb": round(resources.peak_rss_mb(), 1), "eval_dir": eval_dir,
               "detector_saved_model": export_path}
    logging.info("Detection finished at step %d: mAP %.4f (VOC07 11-point), %.4f (area). Peak memory: %.0f MB.",
                 step, scores["mAP"] or 0.0, scores["mAP_area"] or 0.0, metrics["peak_rss_mb"])
    if job.is_chief:
      output.emit(NAME, metrics, Result(metrics), eval_dir, step)
  return 0


if __name__ == "__main__":
  program.run(run, define_flags)
