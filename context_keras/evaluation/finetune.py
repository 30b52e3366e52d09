"""Fine-tuning (method.md §10.5): the backbone with a new head, trained end to end on a labelled training split and
scored on a validation split, against the same fine-tuning from random initialisation.

The head is global average pooling of --layer's map (default the backbone's last named layer, fc6) and a
zero-initialised linear layer. Layers up to --freeze_up_to stay frozen. A backbone that was not rescaled (a training
run, an export without --rescale_data, and the random-init network) first gets Krähenbühl et al.'s data-dependent
rescaling on patches of the training images (method.md §5.2): without it, the folded weights are so badly scaled
that SGD diverges at once. SGD with momentum, a linear warm-up over the first epoch, cosine decay to 0, L2 on the
kernels, gradients clipped to a global norm. Training images: random-resized crops and flips; validation images:
the centre square. With --multi_label, sigmoid outputs and mean average precision. Without --train_data/--val_data,
fold 0 of --folds stratified folds of --data is held out."""
import dataclasses
import math

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from context_keras import errors
from context_keras.deploy import rescale as rescale_lib
from context_keras.deploy import serving
from context_keras.evaluation import images as images_lib
from context_keras.evaluation import linear
from context_keras.evaluation.result import Result
from context_keras.input import decoding
from context_keras.input import labelled
from context_keras.model import fold
from context_keras.training import trainer as trainer_lib

NAME = "finetune"
EPOCHS = 30
LEARNING_RATE = 0.01
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
CLIP_NORM = 10.0
RANDOM = linear.RANDOM


@dataclasses.dataclass(frozen=True)
class Config:
  splits: labelled.Splits = labelled.Splits()
  layer: str | None = None
  freeze_up_to: str | None = None
  folds: int = images_lib.FOLDS
  image_size: int = images_lib.IMAGE_SIZE
  batch_size: int = images_lib.BATCH_SIZE
  seed: int = 0
  epochs: int = EPOCHS
  learning_rate: float = LEARNING_RATE
  momentum: float = MOMENTUM
  weight_decay: float = WEIGHT_DECAY
  rescale: bool = True
  rescale_patches: int = rescale_lib.NUM_PATCHES


class FineTuner:
  """A folded backbone (Keras, preprocessed input -> named maps) and a new linear head on the global average pool
  of one map, trained with a compiled step."""

  def __init__(self, backbone, layer, classes, multi_label, preprocessing, config, steps):
    self.backbone, self.layer, self.multi_label, self.preprocessing = backbone, layer, multi_label, preprocessing
    self.config = config
    width = backbone.output[layer].shape[-1]
    self.head = keras.Sequential([keras.Input((width,)), keras.layers.Dense(classes, kernel_initializer="zeros")])
    frozen = set()
    if config.freeze_up_to:
      for layer_object in backbone.layers:
        frozen.add(layer_object.name)
        if layer_object.name == config.freeze_up_to:
          break
    self.frozen = sorted(frozen & {layer_object.name for layer_object in backbone.layers if layer_object.weights})
    for layer_object in backbone.layers:
      layer_object.trainable = layer_object.name not in frozen
    self.variables = backbone.trainable_variables + self.head.trainable_variables
    self.kernels = [v for v in self.variables if v.path.endswith("kernel")]
    schedule = trainer_lib.LearningRate(config.learning_rate, warmup_steps=max(1, steps // config.epochs),
                                        decay_steps=steps)
    self.optimizer = keras.optimizers.SGD(schedule, momentum=config.momentum)
    self.optimizer.build(self.variables)
    # Graph code (no Python control flow on tensors): AutoGraph would only add tracing time.
    self.train_step = tf.function(self._train_step, autograph=False)
    self.logits = tf.function(self._logits, autograph=False)

  def _logits(self, images):
    maps = self.backbone(serving.preprocess(images, self.preprocessing), training=False)
    return self.head(tf.reduce_mean(maps[self.layer], axis=[1, 2]))

  def _loss(self, labels, logits):
    if self.multi_label:
      return linear._masked_binary_crossentropy(labels, logits)  # pylint: disable=protected-access
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))

  def _train_step(self, images, labels):
    with tf.GradientTape() as tape:
      loss = self._loss(labels, self._logits(images))
      total = loss + 0.5 * self.config.weight_decay * tf.add_n([tf.reduce_sum(tf.square(k)) for k in self.kernels])
    gradients = tape.gradient(total, self.variables)
    gradients, norm = tf.clip_by_global_norm(gradients, CLIP_NORM)
    self.optimizer.apply_gradients(zip(gradients, self.variables))
    return loss, norm


def rescale_backbone(backbone, train, preprocessing, geometry, num_patches, seed):
  """Krähenbühl et al.'s rescaling of `backbone` in place, on patches of the training images (its geometry's).
  Residual towers are left as they are: the calibration is defined for chains only (export.check_rescalable)."""
  if not fold.is_chain(backbone):
    return {"skipped": "a residual tower: rescaling is defined for chain towers only (method.md §5.2)"}
  patches = rescale_lib.sample_patches(train.images(), num_patches, seed, geometry)
  report = rescale_lib.rescale(backbone, serving.preprocess(patches, preprocessing), seed=seed)
  return {"patches": len(patches), "converged": report["between_layer"]["converged"],
          "max_deviation_after": report["between_layer"]["after"]["max_deviation"]}


def training_examples(lset, size, seed, batch_size, epoch):
  """Batches of (random-resized crop + flip, label) of one epoch, seeded by (seed, epoch, image index). A record of
  labelled shards that cannot be read or decoded is left out (images_lib.labelled_squares says why; an image file
  that cannot be used stops the reading, for read_or_explain to name)."""
  def augment(index, contents, label):
    image_seed = tf.random.experimental.stateless_fold_in(tf.constant([seed, epoch], tf.int64), index)
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(image_seed, 2))
    crop = images_lib.random_resized_crop(decoding.decode(contents), size, crop_seed)
    return tf.image.stateless_random_flip_left_right(crop, flip_seed), label
  records = labelled.records(lset).shuffle(max(lset.size, 1), seed=seed * 1000 + epoch)
  if lset.kind == "files":
    return records.map(augment, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size).prefetch(1)

  def usable(index, contents, label):
    check = tf.debugging.assert_non_negative(label, message="a damaged shard's stand-in")
    with tf.control_dependencies([check]):
      return (*augment(index, contents, label), True)
  examples = images_lib.never_failing(records, usable, lambda index, contents, label: (
      tf.zeros([size, size, 3], tf.uint8), label, False))
  return examples.filter(lambda image, label, ok: ok).map(lambda image, label, ok: (image, label)).batch(
      batch_size).prefetch(1)


def fine_tune(backbone, rescale, train, val, config, layer, preprocessing, geometry, who):
  """Trains one FineTuner; returns its validation metrics and the first and last epoch's mean loss."""
  report = (rescale_backbone(backbone, train, preprocessing, geometry, config.rescale_patches, config.seed)
            if rescale else None)
  steps = config.epochs * math.ceil(train.size / config.batch_size)
  tuner = FineTuner(backbone, layer, len(train.classes), train.multi_label, preprocessing, config, steps)
  losses = []
  trained = 0
  for epoch in range(config.epochs):
    epoch_losses, trained = [], 0
    for images, labels in training_examples(train, config.image_size, config.seed, config.batch_size, epoch):
      epoch_losses.append(float(tuner.train_step(images, labels)[0]))
      trained += int(labels.shape[0])
    if not trained:
      raise errors.DataError(f"--train_data={train.description}: no image could be read")
    losses.append(float(np.mean(epoch_losses)))
    if not math.isfinite(losses[-1]):
      raise errors.UsageError(f"fine-tuning{' from random init' if who else ''} diverged in epoch {epoch + 1} (loss "
                              f"{losses[-1]}): lower --finetune_learning_rate (now {config.learning_rate})")
    logging.info("finetune%s epoch %d/%d: loss %.4f", " (random init)" if who else "", epoch + 1, config.epochs,
                 losses[-1])
  scores, labels, unusable = [], [], 0
  for images, batch_labels, usable in images_lib.labelled_squares(val, config.image_size).batch(config.batch_size):
    usable = usable.numpy()
    scores.append(tuner.logits(images).numpy()[usable])
    labels.append(batch_labels.numpy()[usable])
    unusable += int((~usable).sum())
  if not sum(len(batch) for batch in labels):
    raise errors.DataError(f"--val_data={val.description}: no image could be read")
  result = linear.split_metrics(np.concatenate(labels), np.concatenate(scores), list(train.classes))
  result.pop("classes_without_positives", None)
  result.update({"loss_first_epoch": losses[0], "loss_last_epoch": losses[-1], "loss_per_epoch": losses})
  if report:
    result["rescale"] = report
  counts = {"train_images": trained, "train_unreadable": train.size - trained,
            "val_images": int(sum(len(batch) for batch in labels)), "val_unreadable": unusable}
  return result, tuner.frozen, counts


def evaluate(subject, config):
  layer = config.layer or subject.feature_layers[-1]
  for flag, value in (("layer", layer), ("freeze_up_to", config.freeze_up_to)):
    if value and value not in subject.feature_layers:
      raise errors.UsageError(f"--{flag}={value} is not one of {', '.join(subject.feature_layers)}")
  subject.patch_geometry.check_input_side("--image_size", config.image_size)
  train, val = config.splits.find()
  if val is None:
    if train.kind != "files":
      raise errors.UsageError("--mode=finetune on labelled TFRecord shards or a TFDS split needs --train_data and "
                              "--val_data")
    assignment = linear.stratified_folds(train.labels, config.folds, config.seed)
    train, val = (train.subset(np.flatnonzero(assignment != 0), f"folds 1-{config.folds - 1}"),
                  train.subset(np.flatnonzero(assignment == 0), f"fold 0 of {config.folds}"))
  if not train.size or not val.size:
    raise errors.DataError("--mode=finetune: the training or validation split is empty")
  result = config.splits.named()
  result = {k: v for k, v in result.items() if v is not None}
  random_subject = subject.random_init(config.seed)
  for who, one in (("", subject), (RANDOM, random_subject)):
    keras.utils.set_random_seed(config.seed)
    rescale = config.rescale and not one.rescaled
    scored, frozen, counts = images_lib.read_or_explain(
        train, "--train_data", lambda one=one, rescale=rescale: fine_tune(
            one.trainable_backbone(), rescale, train, val, config, layer, subject.preprocessing,
            subject.patch_geometry, who))
    result.update({who + k: v for k, v in scored.items()})
  if counts["train_unreadable"] or counts["val_unreadable"]:
    logging.warning("finetune: %d training and %d validation images (records of damaged TFRecord shards) could not "
                    "be read and were left out.", counts["train_unreadable"], counts["val_unreadable"])
  result.update({"layer": layer, "frozen_layers": frozen, "classes": list(train.classes), **counts,
                 "epochs": config.epochs,
                 "learning_rate": config.learning_rate, "image_size": config.image_size,
                 # Whether the subject's backbone was rescaled here: a residual tower never is (rescale_backbone).
                 "rescaled_before_training": "skipped" not in result.get("rescale", {"skipped": "not asked"})})
  if not train.multi_label:
    result["chance"] = 1.0 / len(train.classes)
  return Result(result)
