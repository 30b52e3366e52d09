"""Weighted k-nearest-neighbour classification (method.md §10.4): Wu et al. 2018's protocol as mmselfsup runs it.
Each layer's map globally average pooled and L2-normalised; a validation image's k most cosine-similar training
images vote for their classes with weight exp(similarity / temperature); top-1 (and top-5) accuracy. k = 20
(mmselfsup's setting; Wu et al. used 200), temperature 0.07 (both). Every layer is scored unless --layer names one;
the best is reported, against the same on a random-init network.

The training split is streamed: its features are computed chunk by chunk and merged into each validation image's
running top k, so only the validation features stay in memory. Without --train_data/--val_data, --data is
cross-validated over --folds stratified folds."""
import dataclasses

from absl import logging
import numpy as np
import tensorflow as tf

from context_keras import errors
from context_keras.evaluation import features as features_lib
from context_keras.evaluation import images as images_lib
from context_keras.evaluation import linear
from context_keras.evaluation.result import Result
from context_keras.input import labelled
from context_keras.training import progress as progress_lib

NAME = "knn"
K = 20              # mmselfsup's knn_imagenet setting; Wu et al. 2018 used 200
TEMPERATURE = 0.07  # Wu et al. 2018 (their NCE temperature); mmselfsup's default
RANDOM = linear.RANDOM


@dataclasses.dataclass(frozen=True)
class Config:
  splits: labelled.Splits = labelled.Splits()
  layer: str | None = None
  k: int = K
  temperature: float = TEMPERATURE
  folds: int = images_lib.FOLDS
  image_size: int = images_lib.IMAGE_SIZE
  batch_size: int = images_lib.BATCH_SIZE
  seed: int = 0


def normalise(features):
  return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


class Neighbours:
  """The running top-k training neighbours of fixed (L2-normalised) queries, merged chunk by chunk."""

  def __init__(self, queries, k):
    self.queries = tf.constant(queries, tf.float32)
    self.k = k
    count = len(queries)
    self.similarity = tf.fill([count, 0], -np.inf)
    self.labels = tf.zeros([count, 0], tf.int64)

  def add(self, features, labels, exclude=None):
    """Merges a chunk of training features [B, D] (L2-normalised) with their labels [B]; `exclude`: [Q, B] bool of
    pairs that must not match (a query's own image in cross-validation)."""
    similarity = tf.matmul(self.queries, tf.constant(features, tf.float32), transpose_b=True)
    if exclude is not None:
      similarity = tf.where(exclude, -np.inf, similarity)
    similarity = tf.concat([self.similarity, similarity], 1)
    chunk_labels = tf.broadcast_to(tf.constant(labels, tf.int64)[None, :], [len(self.queries), len(labels)])
    all_labels = tf.concat([self.labels, chunk_labels], 1)
    top = tf.math.top_k(similarity, k=min(self.k, int(similarity.shape[1])))
    self.similarity, self.labels = top.values, tf.gather(all_labels, top.indices, batch_dims=1)

  def class_scores(self, classes, temperature):
    """[Q, classes]: the sum over the neighbours of exp(similarity / temperature) per class."""
    weights = tf.where(tf.math.is_finite(self.similarity), tf.exp(self.similarity / temperature), 0.0)
    return tf.einsum("qk,qkc->qc", weights, tf.one_hot(self.labels, classes)).numpy()


def knn_scores(queries, chunks, k, temperature, classes):
  """Class scores [Q, classes] of L2-normalised queries against the training chunks [(features, labels)]."""
  neighbours = Neighbours(queries, k)
  for features, labels in chunks:
    neighbours.add(features, labels)
  return neighbours.class_scores(classes, temperature)


def accuracies(scores, labels):
  """Top-1 accuracy, and top-5 where it means something: with five classes or fewer it is always 1.0."""
  result = {"accuracy": float(np.mean(np.argmax(scores, 1) == labels))}
  if scores.shape[1] > 5:
    result["top5_accuracy"] = float(np.mean(np.any(np.argsort(-scores, 1, kind="stable")[:, :5] == labels[:, None],
                                                   1)))
  return result


def votes(k, training_images):
  """The k that votes: at most the training images (with fewer, all of them), said in a warning."""
  if k > training_images:
    logging.warning("--knn_k=%d is more than the %d training images: all %d vote (k = %d).", k, training_images,
                    training_images, training_images)
  return min(k, training_images)


def check_folds(lset, labels, folds, flag):
  """Cross-validation needs `folds` images of every class (linear.py's rule): with fewer, a test image's class can be
  absent from its training folds, which no neighbour can then vote for."""
  counts = np.bincount(labels, minlength=len(lset.classes))
  if counts.min() < folds:
    raise errors.UsageError(f"--folds={folds} needs at least {folds} images in every class of {flag}; "
                            f"{lset.classes[int(counts.argmin())]} has {counts.min()}")


def gap_extractors(subject, layer_names, image_size, seed):
  """Extractors of the global average pool of each layer (max_dims of one value per channel: global pooling) for
  the subject and its random init."""
  plans = features_lib.plan(subject.features, layer_names, image_size, max_dims=1, mode="avg")
  random_subject = subject.random_init(seed)
  return {"": features_lib.Extractor(subject.features, plans, owner=subject),
          RANDOM: features_lib.Extractor(random_subject.features, plans, owner=random_subject)}


def evaluate(subject, config):
  layer_names = (config.layer,) if config.layer else tuple(subject.feature_layers)
  if config.layer and config.layer not in subject.feature_layers:
    raise errors.UsageError(f"--layer={config.layer} is not one of {', '.join(subject.feature_layers)}")
  subject.patch_geometry.check_input_side("--image_size", config.image_size)
  lset, val = config.splits.find(multi_label_ok=False)
  extract = gap_extractors(subject, layer_names, config.image_size, config.seed)
  classes = len(lset.classes)
  scored = {"": {}, RANDOM: {}}
  if val is None:
    if lset.kind == "files":
      check_folds(lset, lset.labels, config.folds, config.splits.flag("data"))
    squares = images_lib.labelled_squares(lset, config.image_size)
    values, labels, unreadable = images_lib.read_or_explain(lset, config.splits.flag("data"), lambda: (
        features_lib.extract(extract, squares, lset.size, "features", config.batch_size)))
    check_folds(lset, labels, config.folds, config.splits.flag("data"))
    assignment = linear.stratified_folds(labels, config.folds, config.seed)
    k = votes(config.k, int(min((assignment != fold).sum() for fold in range(config.folds))))
    for who in scored:
      for name in layer_names:
        normalised = normalise(values[who][name])
        fold_scores = []
        for fold in range(config.folds):
          test, train = assignment == fold, assignment != fold
          scores = knn_scores(normalised[test], chunked(normalised[train], labels[train], config.batch_size * 16),
                              k, config.temperature, classes)
          fold_scores.append(accuracies(scores, labels[test]))
        scored[who][name] = {key: float(np.mean([f[key] for f in fold_scores])) for key in fold_scores[0]}
        scored[who][name]["accuracy_std"] = float(np.std([f["accuracy"] for f in fold_scores]))
    counts = {"images": int(len(labels)), "unreadable": unreadable, "folds": config.folds}
  else:
    scored, counts = streamed(extract, lset, val, config, layer_names, classes)
    k = counts.pop("k")
  per_layer = {name: {**scored[""][name], **{RANDOM + k: v for k, v in scored[RANDOM][name].items()}}
               for name in layer_names}
  for name, entry in per_layer.items():
    logging.info("k-NN %s: accuracy %.4f, random init %.4f", name, entry["accuracy"], entry[RANDOM + "accuracy"])
  result = config.splits.named()
  result = {k: v for k, v in result.items() if v is not None}
  for who in scored:
    best = max(layer_names, key=lambda name: scored[who][name]["accuracy"])
    result[who + "best_layer"] = best
    result.update({who + k: v for k, v in scored[who][best].items()})
  if k != config.k:
    result["knn_k"] = config.k
  result.update({"per_layer": per_layer, "k": k, "temperature": config.temperature, "features":
                 "global average pool, L2-normalised", "classes": list(lset.classes), "chance": 1.0 / classes,
                 "image_size": config.image_size, **counts})
  return Result(result)


def chunked(features, labels, size):
  for start in range(0, len(labels), size):
    yield features[start:start + size], labels[start:start + size]


def streamed(extract, train, val, config, layer_names, classes):
  """k-NN of the validation images against the training images, the training features streamed batch by batch."""
  val_squares = images_lib.labelled_squares(val, config.image_size)
  val_values, val_labels, val_unreadable = images_lib.read_or_explain(
      val, config.splits.flag("val_data"),
      lambda: features_lib.extract(extract, val_squares, val.size, "validation features", config.batch_size))
  neighbours = {who: {name: Neighbours(normalise(val_values[who][name]), config.k) for name in layer_names}
                for who in extract}
  calls = {who: tf.function(e, autograph=False) for who, e in extract.items()}  # graph code (features.Extractor)
  progress = progress_lib.Progress("training images against the validation set", train.size)

  def stream():
    seen = unusable = 0
    for images, labels, usable in (images_lib.labelled_squares(train, config.image_size).batch(config.batch_size)
                                   .prefetch(1)):
      usable = usable.numpy()
      for who, call in calls.items():
        for name, value in call(images).items():
          neighbours[who][name].add(normalise(value.numpy()[usable]), labels.numpy()[usable])
      seen += int(usable.sum())
      unusable += int((~usable).sum())
      progress.add(len(usable))
    return seen, unusable

  seen, unusable = images_lib.read_or_explain(train, config.splits.flag("train_data"), stream)
  progress.finish()
  if unusable:
    logging.warning("training images: %d unreadable images (records of damaged TFRecord shards) left out.", unusable)
  if not seen:
    raise errors.DataError(f"{config.splits.flag('train_data')}: no image")
  scored = {who: {name: accuracies(neighbours[who][name].class_scores(classes, config.temperature), val_labels)
                  for name in layer_names} for who in extract}
  return scored, {"train_images": seen, "train_unreadable": unusable, "val_images": int(len(val_labels)),
                  "val_unreadable": val_unreadable, "k": votes(config.k, seen)}
