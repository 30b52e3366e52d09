"""Per-layer linear probes for sets that fit in memory (method.md §10.2): every named layer of the backbone (or
--layer), each layer's map pooled to at most --probe_dims values (features.py), a logistic regression per layer
trained with Keras; scored by stratified --folds-fold cross-validation of one labelled set (--data), or trained on
--train_data and scored on --val_data; the same probes on the same folds on a randomly initialised backbone of the
same architecture. With --multi_label, one-vs-rest logistic regressions scored by mean average precision
(metrics.py). Large sets go to the streaming job, python -m context_keras.linear_eval."""
import dataclasses

from absl import logging
import keras
from keras import layers
import numpy as np
import tensorflow as tf

from context_keras import errors
from context_keras.evaluation import features as features_lib
from context_keras.evaluation import images as images_lib
from context_keras.evaluation import metrics
from context_keras.evaluation.result import Result
from context_keras.input import labelled

NAME = "linear"
PROBE_EPOCHS = 300
PROBE_LEARNING_RATE = 0.05
PROBE_L2 = 1e-4
RANDOM = "random_init_"


@dataclasses.dataclass(frozen=True)
class Config:
  splits: labelled.Splits = labelled.Splits()
  layer: str | None = None
  folds: int = images_lib.FOLDS
  inner_folds: int = 0
  image_size: int = images_lib.IMAGE_SIZE
  batch_size: int = images_lib.BATCH_SIZE
  seed: int = 0
  probe_epochs: int = PROBE_EPOCHS
  probe_learning_rate: float = PROBE_LEARNING_RATE
  probe_l2: float = PROBE_L2
  probe_dims: int = features_lib.PROBE_DIMS
  probe_pool: str = "avg"


def stratified_folds(labels, folds, seed):
  """Fold index of every sample: each class shuffled (seeded) and dealt round-robin, continuing where the previous
  class stopped, so folds get near-equal sizes and class shares. Multi-label rows [N, C] are dealt unstratified."""
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  if labels.ndim == 2:
    return rng.permutation(len(labels)) % folds
  assignment = np.empty(len(labels), np.int64)
  start = 0
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    rng.shuffle(members)
    assignment[members] = (start + np.arange(len(members))) % folds
    start += len(members)
  return assignment


def _masked_binary_crossentropy(targets, logits):
  """Mean binary cross-entropy over the (image, class) entries that are not IGNORED."""
  valid = tf.cast(tf.not_equal(targets, labelled.IGNORED), logits.dtype)
  positive = tf.cast(tf.equal(targets, labelled.POSITIVE), logits.dtype)
  loss = tf.nn.sigmoid_cross_entropy_with_logits(labels=positive, logits=logits)
  return tf.reduce_sum(loss * valid) / tf.maximum(tf.reduce_sum(valid), 1.0)


class LinearProbe:
  """Logistic regression (softmax, or one sigmoid per class for multi-label targets), trained with Keras: features
  standardised with the training part's statistics, a zero-initialised Dense layer with L2, full-batch Adam for
  `epochs` steps (one compiled call). The problem is convex, so the result does not depend on a seed."""

  def __init__(self, epochs=PROBE_EPOCHS, learning_rate=PROBE_LEARNING_RATE, l2=PROBE_L2):
    self.epochs, self.learning_rate, self.l2 = epochs, learning_rate, l2
    self._models = {}

  def _model(self, dim, classes, multi_label):
    """One compiled model per shape, reset before every fit (a fresh one would be traced again)."""
    key = (dim, classes, multi_label)
    model = self._models.get(key)
    if model is None:
      model = keras.Sequential([keras.Input((dim,)), layers.Dense(classes, kernel_regularizer=keras.regularizers.L2(
          self.l2))])
      loss = (_masked_binary_crossentropy if multi_label else
              keras.losses.SparseCategoricalCrossentropy(from_logits=True))
      model.compile(keras.optimizers.Adam(self.learning_rate), loss, steps_per_execution=self.epochs)
      self._models[key] = model
    model.set_weights([np.zeros(w.shape, np.float32) for w in model.get_weights()])
    for variable in model.optimizer.variables:
      if variable.name != "learning_rate":  # the step count and the moments start again
        variable.assign(tf.zeros_like(variable))
    return model

  def fit_scores(self, train_x, train_y, test_x, classes):
    """Scores (logits) [n_test, classes] of the probe trained on (train_x, train_y); train_y [n] class indices, or
    [n, classes] POSITIVE/NEGATIVE/IGNORED targets for a multi-label probe."""
    train_y = np.asarray(train_y)
    multi_label = train_y.ndim == 2
    mean = train_x.mean(0)
    std = train_x.std(0)
    std[std < 1e-8] = 1.0
    model = self._model(train_x.shape[1], classes, multi_label)
    train = ((train_x - mean) / std).astype(np.float32)
    data = tf.data.Dataset.from_tensors((train, train_y.astype(np.float32 if multi_label else np.int32))).repeat(
        self.epochs)
    model.fit(data, epochs=1, verbose=0, shuffle=False)
    kernel, bias = model.get_weights()
    return ((test_x - mean) / std) @ kernel + bias

  def fit_predict(self, train_x, train_y, test_x, classes):
    return np.argmax(self.fit_scores(train_x, train_y, test_x, classes), -1)


def split_metrics(labels, scores, classes):
  """accuracy and balanced_accuracy, or for multi-label targets map_auc, map_11point and per_class_ap."""
  if np.asarray(labels).ndim == 2:
    return metrics.mean_average_precision(scores, labels, classes)
  predicted = np.argmax(scores, -1)
  return {"accuracy": float(np.mean(predicted == labels)), "balanced_accuracy": metrics.balanced_accuracy(labels,
                                                                                                          predicted)}


def primary_metric(labels):
  return "map_auc" if np.asarray(labels).ndim == 2 else "accuracy"


def probe_layer(features, labels, splits, classes, probe):
  """Mean and std over the splits [(train indices, test indices)] of the split metrics of one layer's probe."""
  per_split = [split_metrics(labels[test], probe.fit_scores(features[train], labels[train], features[test],
                                                            len(classes)), classes) for train, test in splits]
  summary = {}
  for key in per_split[0]:
    if key == "per_class_ap":
      summary[key] = {name: float(np.nanmean([s[key].get(name, np.nan) for s in per_split]))
                      for name in per_split[0][key]}
    elif key != "classes_without_positives":
      values = [s[key] for s in per_split]
      summary[key], summary[key + "_std"] = float(np.mean(values)), float(np.std(values))
      summary["split_" + key] = values
  return summary


def cross_validate(features, labels, folds=5, seed=0, inner_folds=3, probe=None, classes=None):
  """Stratified k-fold score of the linear probe with the layer chosen per fold: each outer fold picks the layer
  of `features` ({layer: [N, D]}) with the best mean score of an inner stratified cross-validation on its training
  part, so no test sample takes part in the choice. Returns the score's mean and std and each fold's layer."""
  probe = probe or LinearProbe()
  labels = np.asarray(labels)
  classes = classes or [str(c) for c in range(int(labels.max()) + 1 if labels.ndim == 1 else labels.shape[1])]
  key = primary_metric(labels)
  assignment = stratified_folds(labels, folds, seed)
  scores, balanced, chosen = [], [], []
  for fold in range(folds):
    train, test = np.flatnonzero(assignment != fold), np.flatnonzero(assignment == fold)
    layer = next(iter(features))
    if len(features) > 1:
      inner = stratified_folds(labels[train], inner_folds, seed + 1 + fold)
      splits = [(train[inner != k], train[inner == k]) for k in range(inner_folds)]
      inner_scores = {name: probe_layer(values, labels, splits, classes, probe)[key]
                      for name, values in features.items()}
      layer = max(inner_scores, key=inner_scores.get)
    result = split_metrics(labels[test], probe.fit_scores(features[layer][train], labels[train],
                                                          features[layer][test], len(classes)), classes)
    scores.append(result[key])
    balanced.append(result.get("balanced_accuracy", np.nan))
    chosen.append(layer)
  return {key: float(np.mean(scores)), key + "_std": float(np.std(scores)),
          "balanced_accuracy": float(np.mean(balanced)), "balanced_accuracy_std": float(np.std(balanced)),
          "fold_" + key: scores, "layers": chosen}


def extractors(subject, config, layer_names, image_size):
  """The subject's and its random-init counterpart's Extractors (same pooling plan: same architecture)."""
  plans = features_lib.plan(subject.features, layer_names, image_size, config.probe_dims, config.probe_pool)
  random_subject = subject.random_init(config.seed)
  return {"": features_lib.Extractor(subject.features, plans, owner=subject),
          RANDOM: features_lib.Extractor(random_subject.features, plans, owner=random_subject)}, plans


def evaluate(subject, config):
  """The per-layer probes on the subject and on its random-init counterpart, on the same folds."""
  layer_names = (config.layer,) if config.layer else tuple(subject.feature_layers)
  if config.layer and config.layer not in subject.feature_layers:
    raise errors.UsageError(f"--layer={config.layer} is not one of {', '.join(subject.feature_layers)}")
  subject.patch_geometry.check_input_side("--image_size", config.image_size)
  lset, val = config.splits.find()
  multi_label = lset.multi_label
  if val is None and not multi_label:
    counts = lset.counts() if lset.kind == "files" else None
    if counts is not None and counts.min() < config.folds:
      raise errors.UsageError(f"--folds={config.folds} needs at least {config.folds} images in every class of "
                              f"{config.splits.flag('data')}; {lset.classes[int(counts.argmin())]} has {counts.min()}")
  extract, plans = extractors(subject, config, layer_names, config.image_size)

  def features_of(one, flag, what):
    squares = images_lib.labelled_squares(one, config.image_size)
    return images_lib.read_or_explain(one, flag, lambda: features_lib.extract(
        extract, squares, one.size, what, config.batch_size))

  if val is None:
    values, labels, unreadable = features_of(lset, config.splits.flag("data"), "features")
    splits = [(np.flatnonzero(assignment != k), np.flatnonzero(assignment == k))
              for assignment in [stratified_folds(labels, config.folds, config.seed)] for k in range(config.folds)]
    unreadable = {"unreadable": unreadable}
  else:
    train_values, train_labels, train_unreadable = features_of(lset, config.splits.flag("train_data"),
                                                               "training features")
    val_values, val_labels, val_unreadable = features_of(val, config.splits.flag("val_data"), "validation features")
    unreadable = {"train_unreadable": train_unreadable, "val_unreadable": val_unreadable}
    values = {key: {name: np.concatenate([train_values[key][name], val_values[key][name]]) for name in layer_names}
              for key in train_values}
    labels = np.concatenate([train_labels, val_labels])
    splits = [(np.arange(len(train_labels)), np.arange(len(train_labels), len(labels)))]
  if not multi_label and val is None and lset.kind != "files":
    counts = np.bincount(labels, minlength=len(lset.classes))
    if counts.min() < config.folds:
      raise errors.UsageError(f"--folds={config.folds} needs at least {config.folds} images in every class of "
                              f"{config.splits.flag('data')}; {lset.classes[int(counts.argmin())]} has {counts.min()}")
  probe = LinearProbe(config.probe_epochs, config.probe_learning_rate, config.probe_l2)
  key = primary_metric(labels)
  per_layer, scored = {}, {"": {}, RANDOM: {}}
  for name in layer_names:
    entry = {"dims": plans[name].dims}
    for who in ("", RANDOM):
      scored[who][name] = probe_layer(values[who][name], labels, splits, lset.classes, probe)
      entry.update({who + k: v for k, v in scored[who][name].items() if not k.startswith("split_")
                    and k != "per_class_ap"})
    per_layer[name] = entry
    logging_line(name, entry, key)
  return Result(dict(summary(config, lset, splits, labels, layer_names, per_layer, scored, key, values, probe),
                     **unreadable))


def logging_line(name, entry, key):
  logging.info("probe %s (%d dims): %s %.4f +- %.4f, random init %.4f +- %.4f", name, entry["dims"], key, entry[key],
               entry[key + "_std"], entry[RANDOM + key], entry[RANDOM + key + "_std"])


def summary(config, lset, splits, labels, layer_names, per_layer, scored, key, values, probe):
  """The result JSON: the best layer's figures under the keys of a single probe, and per_layer."""
  val = None if len(splits) > 1 else splits[0][1]
  result = {**config.splits.named(), "protocol": "folds" if val is None else "split"}
  result = {k: v for k, v in result.items() if v is not None}
  for who in ("", RANDOM):
    best = max(layer_names, key=lambda name: scored[who][name][key])
    result[who + "best_layer"] = best
    for k, v in scored[who][best].items():
      if k.startswith("split_"):
        result[who + ("fold_" if val is None else "val_") + k[len("split_"):]] = v
      else:
        result[who + k] = v
  result["per_layer"] = per_layer
  if val is None and config.inner_folds and len(layer_names) > 1:
    for who in ("", RANDOM):
      nested = cross_validate(values[who], labels, config.folds, config.seed, config.inner_folds, probe,
                              list(lset.classes))
      result[who + "selected_" + key] = nested[key]
      result[who + "selected_" + key + "_std"] = nested[key + "_std"]
      result[who + "layers"] = nested["layers"]
  counts = (labels == labelled.POSITIVE).sum(0) if labels.ndim == 2 else np.bincount(labels,
                                                                                      minlength=len(lset.classes))
  result.update({"classes": list(lset.classes), "images_per_class": counts.tolist(), "images": int(len(labels)),
                 "image_size": config.image_size, "candidate_layers": list(layer_names),
                 "probe_dims": config.probe_dims, "probe_pool": config.probe_pool})
  if val is None:
    result["folds"] = config.folds
  else:
    result.update({"train_images": int(len(splits[0][0])), "val_images": int(len(val))})
  if labels.ndim == 1:
    result.update({"chance": 1.0 / len(lset.classes), "majority": float(counts.max() / counts.sum())})
  return result
