"""A linear probe: --data is a folder with one subfolder of images per class; frozen features of --layer (global
average pooled; default the best of the backbone's probe layers, conv5/pool5/fc6 for alexnet_bn, chosen by an inner
cross-validation on each training part), a
logistic regression trained with Keras, stratified --folds-fold cross-validation; the same probe on the same folds
on a randomly initialised backbone of the same architecture."""
import dataclasses
import os

import keras
from keras import layers
import numpy as np
import tensorflow as tf

from context_keras import decoding
from context_keras import errors
from context_keras import sources
from context_keras.evaluation import images as images_lib
from context_keras.evaluation.result import Result

NAME = "linear"
PROBE_EPOCHS = 300
PROBE_LEARNING_RATE = 0.05
PROBE_L2 = 1e-4


@dataclasses.dataclass(frozen=True)
class Config:
  data: str
  layer: str | None = None
  folds: int = 5
  inner_folds: int = 3
  image_size: int = 192
  batch_size: int = 64
  seed: int = 0
  probe_epochs: int = PROBE_EPOCHS
  probe_learning_rate: float = PROBE_LEARNING_RATE
  probe_l2: float = PROBE_L2


def stratified_folds(labels, folds, seed):
  """Fold index of every sample: each class shuffled (seeded) and dealt round-robin, continuing where the previous
  class stopped, so folds get near-equal sizes and class shares."""
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  assignment = np.empty(len(labels), np.int64)
  start = 0
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    rng.shuffle(members)
    assignment[members] = (start + np.arange(len(members))) % folds
    start += len(members)
  return assignment


def balanced_accuracy(labels, predicted):
  """Mean over the classes present of the share of their samples predicted right."""
  return float(np.mean([np.mean(predicted[labels == c] == c) for c in np.unique(labels)]))


class LinearProbe:
  """Multinomial logistic regression, trained with Keras: features standardised with the training part's
  statistics, a zero-initialised Dense layer with L2, full-batch Adam for `epochs` steps (one compiled call). The
  problem is convex, so the result does not depend on a seed."""

  def __init__(self, epochs=PROBE_EPOCHS, learning_rate=PROBE_LEARNING_RATE, l2=PROBE_L2):
    self.epochs, self.learning_rate, self.l2 = epochs, learning_rate, l2
    self._models = {}

  def _model(self, dim, classes):
    """One compiled model per shape, reset before every fit (a fresh one would be traced again)."""
    model = self._models.get((dim, classes))
    if model is None:
      model = keras.Sequential([keras.Input((dim,)), layers.Dense(classes, kernel_regularizer=keras.regularizers.L2(
          self.l2))])
      model.compile(keras.optimizers.Adam(self.learning_rate),
                    keras.losses.SparseCategoricalCrossentropy(from_logits=True), steps_per_execution=self.epochs)
      self._models[(dim, classes)] = model
    model.set_weights([np.zeros(w.shape, np.float32) for w in model.get_weights()])
    for variable in model.optimizer.variables:
      if variable.name != "learning_rate":  # the step count and the moments start again
        variable.assign(tf.zeros_like(variable))
    return model

  def fit_predict(self, train_x, train_y, test_x, classes):
    mean = train_x.mean(0)
    std = train_x.std(0)
    std[std < 1e-8] = 1.0
    model = self._model(train_x.shape[1], classes)
    train = ((train_x - mean) / std).astype(np.float32)
    data = tf.data.Dataset.from_tensors((train, np.asarray(train_y, np.int32))).repeat(self.epochs)
    model.fit(data, epochs=1, verbose=0, shuffle=False)
    kernel, bias = model.get_weights()
    return np.argmax(((test_x - mean) / std) @ kernel + bias, -1)


def cross_validate(features, labels, folds=5, seed=0, inner_folds=3, probe=None):
  """Stratified k-fold accuracy of the linear probe.

  features: {layer: [N, D]}; with several layers, each outer fold picks the one with the best mean accuracy of an
  inner stratified cross-validation on its training part, so no test sample takes part in the choice.
  Returns accuracy and balanced accuracy (mean and std over the folds) and the layer of every fold.
  """
  probe = probe or LinearProbe()
  labels = np.asarray(labels)
  classes = int(labels.max()) + 1
  assignment = stratified_folds(labels, folds, seed)
  accuracies, balanced, chosen = [], [], []
  for fold in range(folds):
    train, test = assignment != fold, assignment == fold
    layer = next(iter(features))
    if len(features) > 1:
      inner = stratified_folds(labels[train], inner_folds, seed + 1 + fold)
      scores = {}
      for name, values in features.items():
        x, y = values[train], labels[train]
        scores[name] = np.mean([np.mean(probe.fit_predict(x[inner != k], y[inner != k], x[inner == k], classes)
                                        == y[inner == k]) for k in range(inner_folds)])
      layer = max(scores, key=scores.get)
    predicted = probe.fit_predict(features[layer][train], labels[train], features[layer][test], classes)
    accuracies.append(float(np.mean(predicted == labels[test])))
    balanced.append(balanced_accuracy(labels[test], predicted))
    chosen.append(layer)
  return {"accuracy": float(np.mean(accuracies)), "accuracy_std": float(np.std(accuracies)),
          "balanced_accuracy": float(np.mean(balanced)), "balanced_accuracy_std": float(np.std(balanced)),
          "fold_accuracy": accuracies, "layers": chosen}


def labelled_images(folder):
  """(paths, labels, class names) of a folder with one subfolder of images per class."""
  root = sources.resolve_path(folder)
  if not os.path.isdir(root):
    raise errors.UsageError(f"--data={folder}: {root} is not a folder (--mode=linear needs one subfolder per class)")
  paths, labels, names = [], [], []
  for name in sorted(os.listdir(root)):
    files = sources.list_folder(os.path.join(root, name)) if os.path.isdir(os.path.join(root, name)) else []
    if files:
      labels.extend([len(names)] * len(files))
      paths.extend(files)
      names.append(name)
  if len(names) < 2:
    raise errors.UsageError(f"--data={folder}: --mode=linear needs at least 2 subfolders of images (classes) in "
                            f"{root}; found {len(names)}")
  return paths, np.array(labels), names


def first_unusable_image(paths):
  """'PATH cannot be used: reason' for the first of `paths` that cannot be read and decoded, or None."""
  for path in paths:
    try:
      decoding.decode(tf.io.read_file(path))
    except tf.errors.OpError as e:
      return f"{path} cannot be used: {errors.tf_error_message(e)}"
  return None


def evaluate(subject, config):
  """The probe on the subject and on its random-init counterpart, on the same folds."""
  folder, folds, image_size = config.data, config.folds, config.image_size
  layer_names = (config.layer,) if config.layer else subject.probe_layers
  if config.layer and config.layer not in subject.feature_layers:
    raise errors.UsageError(f"--layer={config.layer} is not one of {', '.join(subject.feature_layers)}")
  paths, labels, names = labelled_images(folder)
  counts = np.bincount(labels)
  if counts.min() < folds:
    raise errors.UsageError(f"--folds={folds} needs at least {folds} images in every class of --data={folder}; "
                            f"{names[int(counts.argmin())]} has {counts.min()}")
  if image_size < subject.patch_size:
    raise errors.UsageError(f"--image_size={image_size} must be >= {subject.patch_size}, the patch size")
  images = tf.data.Dataset.from_tensor_slices(paths).map(
      lambda p: images_lib.centre_square(decoding.decode(tf.io.read_file(p)), image_size),
      num_parallel_calls=tf.data.AUTOTUNE)
  try:
    images = images.cache()
    trained = images_lib.batched_features(subject.features, images, layer_names, config.batch_size)
    random_subject = subject.random_init(config.seed)
    random = images_lib.batched_features(random_subject.features, images, layer_names, config.batch_size)
  except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError, tf.errors.PermissionDeniedError) as e:
    raise errors.UsageError(f"--data={folder}: {first_unusable_image(paths) or str(e).splitlines()[0][:200]}") from e
  probe = LinearProbe(config.probe_epochs, config.probe_learning_rate, config.probe_l2)
  ours = cross_validate(trained, labels, folds, config.seed, config.inner_folds, probe)
  baseline = cross_validate(random, labels, folds, config.seed, config.inner_folds, probe)
  result = {"data": folder, "accuracy": ours["accuracy"], "accuracy_std": ours["accuracy_std"],
            "balanced_accuracy": ours["balanced_accuracy"], "balanced_accuracy_std": ours["balanced_accuracy_std"],
            "random_init_accuracy": baseline["accuracy"], "random_init_accuracy_std": baseline["accuracy_std"],
            "random_init_balanced_accuracy": baseline["balanced_accuracy"],
            "random_init_balanced_accuracy_std": baseline["balanced_accuracy_std"],
            "layers": ours["layers"], "random_init_layers": baseline["layers"], "fold_accuracy": ours["fold_accuracy"],
            "random_init_fold_accuracy": baseline["fold_accuracy"], "classes": names,
            "images_per_class": counts.tolist(), "images": len(paths), "folds": folds,
            "chance": 1.0 / len(names), "majority": float(counts.max() / counts.sum()), "image_size": image_size,
            "candidate_layers": list(layer_names)}
  return Result(result)
