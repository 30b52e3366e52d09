"""Measures what a run learned: python -m context_keras.evaluate --mode=pretext|linear|neighbors --data=...
(--model_dir=RUN | --saved_model=OUT/backbone) [--watch]

  pretext    the paper's protocol (spec 6.3): for each of up to --images held-out images, --pairs_per_image (256)
             random pairs cut with the training geometry and preprocessing of the run (seeded, so the figure
             is reproducible); 8-way accuracy overall and per class, and the confusion matrix.
  linear     a linear probe: --data is a folder with one subfolder per class; frozen features of --layer (global
             average pooled; default the best of conv5/pool5/fc6, chosen by an inner cross-validation on each
             training part), a logistic regression trained with Keras, stratified --folds-fold cross-validation;
             the same probe on the same folds on a randomly initialised backbone of the same architecture.
  neighbors  the paper's section 4.1 (spec 6.4): fc6 (or --layer) features of --queries random patches, normalised
             correlation against all patches of the set (other images only), the top --top_k, drawn as one row
             per query; --compare_random_init adds the rows of a random-init network.
  --watch    polls --model_dir and evaluates every new checkpoint (pretext), as an eval job beside training.

Each prints ONE JSON object as its last line (with --watch, one per checkpoint), writes it to EVAL/<mode>.json and
TensorBoard summaries to EVAL/, where EVAL is --eval_dir (default RUN/eval, or the folder holding --saved_model,
plus /eval). Images come from data.py's --data and --data_root. The flags are defined only when this module runs
as the program, like export.py's.
"""
import dataclasses
import json
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
import keras
from keras import layers
import numpy as np
import tensorflow as tf

from context_keras import data as data_lib
from context_keras import export as export_lib
from context_keras import patches as patches_lib

FLAGS = flags.FLAGS

MODES = ("pretext", "linear", "neighbors")
PRETEXT_PAIRS_PER_IMAGE = 256   # spec 6.3: 500 images x 256 pairs
PRETEXT_IMAGES = 500
MAX_PRETEXT_GRIDS = 128         # an image resized to >= 150,000 px gives >= 2 pairs per grid (spec 1.2, 2.2)
LINEAR_LAYERS = ("conv5", "pool5", "fc6")
NEIGHBOR_LAYER = "fc6"          # spec 6.4
PROBE_EPOCHS = 300
PROBE_LEARNING_RATE = 0.05
PROBE_L2 = 1e-4


class EvaluationError(export_lib.ExportError):
  """A flag or path evaluation cannot use; the message names it."""


def label_names():
  """'up-left', 'up', ... for the labels 0-7 (patches.NEIGHBOUR_OFFSETS: where the second patch is)."""
  vertical = {-1: "up", 0: "", 1: "down"}
  horizontal = {-1: "left", 0: "", 1: "right"}
  return ["-".join(p for p in (vertical[dy], horizontal[dx]) if p) for dx, dy in patches_lib.NEIGHBOUR_OFFSETS]


# --------------------------------------------------------------------------------------------------------------
# What is evaluated


@dataclasses.dataclass
class Subject:
  """A trained run or an exported backbone, behind the functions the modes need.

  features:    uint8 images [N, H, W, 3] -> {conv1 ... fc6} maps (export.BackboneModule.features)
  pair_logits: (patches preprocessed as in training [N, 96, 96, 3], first [M], second [M]) -> logits [M, 8]
  """
  about: dict
  step: int
  model_config: object
  color_mode: str
  pixelation: bool
  features: object
  pair_logits: object = None
  owners: tuple = ()  # what `features` and `pair_logits` are bound to: tf.function methods hold only weak references


def _patch_spec():
  return tf.TensorSpec([None, patches_lib.PATCH_SIZE, patches_lib.PATCH_SIZE, 3], tf.float32)


def _run_pair_logits(networks):
  """Pair logits of the training networks in inference mode: the tower once per patch (spec 3.3)."""
  @tf.function(input_signature=[_patch_spec(), tf.TensorSpec([None], tf.int32), tf.TensorSpec([None], tf.int32)])
  def pair_logits(patches, first, second):
    fc6 = networks.tower([patches, tf.ones(tf.shape(patches)[:1])], training=False)
    pairs = tf.concat([tf.gather(fc6, first), tf.gather(fc6, second)], -1)
    return networks.head([pairs, tf.ones(tf.shape(first))], training=False)
  return pair_logits


def subject_from_run(run):
  module = export_lib.BackboneModule(export_lib.fold_tower(run.networks.tower), run.color_mode)
  return Subject(about=run.describe(), step=run.step, model_config=run.model_config, color_mode=run.color_mode,
                 pixelation=run.pixelation, features=module.features, pair_logits=_run_pair_logits(run.networks),
                 owners=(module, run.networks))


def subject_from_saved_model(path):
  info = export_lib.read_metadata(path)
  try:
    backbone = tf.saved_model.load(path)
  except (OSError, ValueError) as e:
    raise EvaluationError(f"--saved_model={path}: cannot load it: {str(e)[:200]}") from e
  pair_dir = os.path.join(os.path.dirname(os.path.normpath(path)), export_lib.PAIR_CLASSIFIER_DIR)
  classifier = tf.saved_model.load(pair_dir) if os.path.isdir(pair_dir) else None

  def pair_logits(patches, first, second):
    return classifier.logits_preprocessed(tf.gather(patches, first), tf.gather(patches, second))["logits"]
  model_config = export_lib.model_lib.ModelConfig(backbone=info["backbone"],
                                                  width_multiplier=info["width_multiplier"])
  return Subject(about={"saved_model": path, "checkpoint": info.get("checkpoint"), "step": info.get("step", 0),
                        "backbone": info["backbone"], "width_multiplier": info["width_multiplier"],
                        "color_mode": info["color_mode"], "rescaled": info.get("rescaled", False)},
                 step=int(info.get("step") or 0), model_config=model_config, color_mode=info["color_mode"],
                 pixelation=info.get("pixelation", True), features=backbone.features,
                 pair_logits=pair_logits if classifier else None, owners=(backbone, classifier))


def random_init_subject(subject, seed):
  """The same architecture as it starts training (LeCun-uniform, zero biases, BN statistics mean 0, variance 1)."""
  keras.utils.set_random_seed(seed)
  networks = export_lib.build_networks(subject.model_config)
  module = export_lib.BackboneModule(export_lib.fold_tower(networks.tower), subject.color_mode)
  return Subject(about={"random_init_seed": seed}, step=subject.step, model_config=subject.model_config,
                 color_mode=subject.color_mode, pixelation=subject.pixelation, features=module.features,
                 pair_logits=_run_pair_logits(networks), owners=(module, networks))


# --------------------------------------------------------------------------------------------------------------
# Images


def select_images(source, limit, seed):
  """At most `limit` images of a source: a seeded random subset of the files, kept in listing order."""
  if source.kind != "files" or not limit or len(source.paths) <= limit:
    return source
  chosen = np.sort(np.random.default_rng(seed).choice(len(source.paths), limit, replace=False))
  paths = tuple(source.paths[i] for i in chosen)
  return dataclasses.replace(source, paths=paths, description=f"{limit} of {source.description}")


def _image_seed(seed, index):
  return tf.random.experimental.stateless_fold_in(tf.constant([seed, 0], tf.int64), index)


def centre_square(image, size):
  """Bilinear resize of the shorter side to `size`, then the central size x size crop; uint8."""
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = size / tf.reduce_min(shape)
  new = tf.maximum(tf.cast(tf.math.ceil(shape * scale), tf.int32), size)
  resized = tf.image.resize(tf.cast(image, tf.float32), new, method="bilinear", antialias=True)
  top, left = (new[0] - size) // 2, (new[1] - size) // 2
  square = resized[top:top + size, left:left + size]
  return tf.cast(tf.clip_by_value(tf.round(square), 0, 255), tf.uint8)


def batched_features(features_fn, images, names, batch_size, pool=True):
  """{name: np [N, ...]} of the features of uint8 images (a dataset of single images), globally average pooled
  over the map (or flattened)."""
  out = {name: [] for name in names}
  for batch in images.batch(batch_size):
    maps = features_fn(batch)
    for name in names:
      value = tf.reduce_mean(maps[name], axis=[1, 2]) if pool else tf.reshape(maps[name], [tf.shape(batch)[0], -1])
      out[name].append(value.numpy())
  return {name: np.concatenate(v) for name, v in out.items()}


# --------------------------------------------------------------------------------------------------------------
# Pretext accuracy (spec 6.3)


def pretext_pairs(image, seed, num_pairs, color_mode, pixelation):
  """Up to num_pairs random pairs of one image, cut with the training geometry and preprocessing (spec 1.2, 2.2-2.4):
  one random resize, grids added one at a time until they hold num_pairs pairs, the pairs drawn without
  replacement, every patch augmented as in training.

  Returns {patches [n, 96, 96, 3], first, second, label [m], usable}; an image too small for a grid is not usable.
  """
  resize_seed, grid_seed, pick_seed, augment_seed = tf.unstack(patches_lib.split_seed(seed, 4))
  resized = patches_lib.random_resize(tf.cast(image, tf.float32), resize_seed)
  height, width = tf.shape(resized)[0], tf.shape(resized)[1]
  usable = (height > patches_lib.MIN_SIDE) & (width > patches_lib.MIN_SIDE)

  def cut():
    def more(i, ys, xs, first, second, label):
      del ys, xs, second, label
      return (tf.shape(first)[0] < num_pairs) & (i < MAX_PRETEXT_GRIDS)

    def grid(i, ys, xs, first, second, label):
      grid_ys, grid_xs, grid_h, grid_w = patches_lib.sample_grids(
          tf.random.experimental.stateless_fold_in(grid_seed, tf.cast(i, tf.int64)), height, width, num_grids=1)
      f, s, l = patches_lib.grid_pairs(grid_h[0], grid_w[0])
      offset = tf.shape(ys)[0]
      return (i + 1, tf.concat([ys, grid_ys], 0), tf.concat([xs, grid_xs], 0), tf.concat([first, f + offset], 0),
              tf.concat([second, s + offset], 0), tf.concat([label, l], 0))

    empty = tf.zeros([0], tf.int32)
    _, ys, xs, first, second, label = tf.while_loop(
        more, grid, (tf.constant(0), empty, empty, empty, empty, empty),
        shape_invariants=(tf.TensorShape([]),) + (tf.TensorShape([None]),) * 5)
    pick = tf.random.experimental.stateless_shuffle(tf.range(tf.shape(first)[0]), pick_seed)[:num_pairs]
    cut_patches = patches_lib.crop_patches(resized, ys, xs)
    return (patches_lib.augment(cut_patches, augment_seed, color_mode, pixelation), tf.gather(first, pick),
            tf.gather(second, pick), tf.gather(label, pick))

  def nothing():
    size = patches_lib.PATCH_SIZE
    empty = tf.zeros([0], tf.int32)
    return tf.zeros([0, size, size, 3]), empty, empty, empty

  patches, first, second, label = tf.cond(usable, cut, nothing)
  return {"patches": patches, "first": first, "second": second, "label": label, "usable": usable}


def evaluate_pretext(subject, source, pairs_per_image, seed, color_mode, pixelation):
  """8-way accuracy of the pair classifier on pairs from `source` (all its images); the result dict."""
  if subject.pair_logits is None:
    raise EvaluationError("--mode=pretext needs the pair classifier: give --model_dir, or a --saved_model "
                          f"exported by context_keras.export (with {export_lib.PAIR_CLASSIFIER_DIR}/ beside it)")
  dataset = export_lib.encoded_images(source).map(
      lambda i, contents: pretext_pairs(data_lib.decode(contents), _image_seed(seed, i), pairs_per_image,
                                        color_mode, pixelation),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors().prefetch(2)
  num_classes = patches_lib.NUM_CLASSES
  confusion = np.zeros([num_classes, num_classes], np.int64)
  seen = too_small = 0
  for item in dataset:
    seen += 1
    if not item["usable"]:
      too_small += 1
      continue
    logits = subject.pair_logits(item["patches"], item["first"], item["second"])
    predicted = np.argmax(logits.numpy(), -1)
    np.add.at(confusion, (item["label"].numpy(), predicted), 1)
  pairs = int(confusion.sum())
  if not pairs:
    raise EvaluationError(f"--data={source.description}: no image gave a pair ({seen} decoded, {too_small} too small)")
  per_class = confusion.diagonal() / np.maximum(confusion.sum(1), 1)
  names = label_names()
  return {"accuracy": float(confusion.trace() / pairs), "chance": 1.0 / num_classes,
          "per_class_accuracy": dict(zip(names, per_class.round(4).tolist())),
          "confusion_matrix": confusion.tolist(), "confusion_labels": names, "pairs": pairs,
          "images": seen - too_small, "too_small": too_small,
          "unreadable": (len(source.paths) - seen) if source.kind == "files" else 0,
          "pairs_per_image": pairs_per_image, "color_mode": color_mode, "pixelation": pixelation}


def confusion_image(confusion, cell=24):
  """The row-normalised confusion matrix (rows: true label, columns: predicted, labels in reading order) as an
  image from white (0) to dark blue (1)."""
  confusion = np.asarray(confusion, np.float64)
  share = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
  colour = np.stack([1 - 0.9 * share, 1 - 0.8 * share, 1 - 0.45 * share], -1)
  image = np.kron(colour, np.ones([cell, cell, 1]))
  image[::cell, :] = image[:, ::cell] = 0.6
  return (image * 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------------------
# Linear probe


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
  root = data_lib.resolve_path(folder)
  if not os.path.isdir(root):
    raise EvaluationError(f"--data={folder}: {root} is not a folder (--mode=linear needs one subfolder per class)")
  paths, labels, names = [], [], []
  for name in sorted(os.listdir(root)):
    files = data_lib.list_folder(os.path.join(root, name)) if os.path.isdir(os.path.join(root, name)) else []
    if files:
      labels.extend([len(names)] * len(files))
      paths.extend(files)
      names.append(name)
  if len(names) < 2:
    raise EvaluationError(f"--data={folder}: --mode=linear needs at least 2 subfolders of images (classes) in {root}; "
                          f"found {len(names)}")
  return paths, np.array(labels), names


def first_unusable_image(paths):
  """'PATH cannot be used: reason' for the first of `paths` that cannot be read and decoded, or None."""
  for path in paths:
    try:
      data_lib.decode(tf.io.read_file(path))
    except tf.errors.OpError as e:
      return f"{path} cannot be used: {data_lib.error_message(e)}"
  return None


def evaluate_linear(subject, random_subject, folder, layer_names, folds, inner_folds, image_size, batch_size, seed,
                    probe):
  paths, labels, names = labelled_images(folder)
  counts = np.bincount(labels)
  if counts.min() < folds:
    raise EvaluationError(f"--folds={folds} needs at least {folds} images in every class of --data={folder}; "
                          f"{names[int(counts.argmin())]} has {counts.min()}")
  if image_size < patches_lib.PATCH_SIZE:
    raise EvaluationError(f"--image_size={image_size} must be >= {patches_lib.PATCH_SIZE}")
  images = tf.data.Dataset.from_tensor_slices(paths).map(
      lambda p: centre_square(data_lib.decode(tf.io.read_file(p)), image_size), num_parallel_calls=tf.data.AUTOTUNE)
  try:
    images = images.cache()
    trained = batched_features(subject.features, images, layer_names, batch_size)
    random = batched_features(random_subject.features, images, layer_names, batch_size)
  except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError, tf.errors.PermissionDeniedError) as e:
    raise EvaluationError(f"--data={folder}: {first_unusable_image(paths) or str(e).splitlines()[0][:200]}") from e
  ours = cross_validate(trained, labels, folds, seed, inner_folds, probe)
  baseline = cross_validate(random, labels, folds, seed, inner_folds, probe)
  result = {"accuracy": ours["accuracy"], "accuracy_std": ours["accuracy_std"],
            "balanced_accuracy": ours["balanced_accuracy"], "balanced_accuracy_std": ours["balanced_accuracy_std"],
            "random_init_accuracy": baseline["accuracy"], "random_init_accuracy_std": baseline["accuracy_std"],
            "random_init_balanced_accuracy": baseline["balanced_accuracy"],
            "random_init_balanced_accuracy_std": baseline["balanced_accuracy_std"],
            "layers": ours["layers"], "random_init_layers": baseline["layers"], "fold_accuracy": ours["fold_accuracy"],
            "random_init_fold_accuracy": baseline["fold_accuracy"], "classes": names,
            "images_per_class": counts.tolist(), "images": len(paths), "folds": folds,
            "chance": 1.0 / len(names), "majority": float(counts.max() / counts.sum()), "image_size": image_size,
            "candidate_layers": list(layer_names)}
  return result


# --------------------------------------------------------------------------------------------------------------
# Nearest neighbours (spec 6.4)


def patch_database(source, seed):
  """One random grid of un-augmented patches per image (training geometry): uint8 [N, 96, 96, 3], image ids [N]."""
  def cut(index, contents):
    patches = patches_lib.grid_patches(data_lib.decode(contents), _image_seed(seed, index))[0]
    return tf.cast(tf.clip_by_value(tf.round(patches), 0, 255), tf.uint8), tf.fill(tf.shape(patches)[:1], index)
  chunks = list(export_lib.encoded_images(source).map(cut).ignore_errors())
  if not chunks:
    raise EvaluationError(f"--data={source.description}: no image could be cut into patches")
  return np.concatenate([c[0].numpy() for c in chunks]), np.concatenate([c[1].numpy() for c in chunks])


def normalised(features):
  """Rows centred and scaled to unit norm, so that a dot product is their normalised correlation."""
  centred = features - features.mean(1, keepdims=True)
  return centred / np.maximum(np.linalg.norm(centred, axis=1, keepdims=True), 1e-12)


def nearest_neighbours(features, image_ids, queries, top_k):
  """For each query index, the top_k most correlated patches of other images (a patch of its own image would match
  through shared content, not learned features): (indices [Q, k], similarity [Q, k])."""
  similarity = features[queries] @ features.T
  similarity[image_ids[queries][:, None] == image_ids[None, :]] = -np.inf
  order = np.argsort(-similarity, axis=1, kind="stable")[:, :top_k]
  return order, np.take_along_axis(similarity, order, 1)


def neighbours_image(patches, rows, gap=4):
  """rows: [(query index, neighbour indices, bar colour)]: one row per entry, a colour bar, the query, a gap, the
  neighbours in order of similarity."""
  size = patches_lib.PATCH_SIZE
  top_k = max(len(r[1]) for r in rows)
  width = 8 + size + 3 * gap + top_k * (size + gap)
  image = np.full((len(rows) * (size + gap) + gap, width, 3), 255, np.uint8)
  for r, (query, neighbours, colour) in enumerate(rows):
    y = gap + r * (size + gap)
    image[y:y + size, 0:6] = colour
    image[y:y + size, 8:8 + size] = patches[query]
    for k, index in enumerate(neighbours):
      x = 8 + size + 3 * gap + k * (size + gap)
      image[y:y + size, x:x + size] = patches[index]
  return image


TRAINED_COLOUR = (40, 90, 200)
RANDOM_COLOUR = (170, 170, 170)


def evaluate_neighbors(subject, random_subject, source, layer, queries, top_k, batch_size, seed, image_path):
  patches, image_ids = patch_database(source, seed)
  if len(np.unique(image_ids)) < 2:
    raise EvaluationError(f"--data={source.description}: nearest neighbours need patches of at least 2 images")
  top_k = min(top_k, len(patches) - 1)
  chosen = np.sort(np.random.default_rng(seed).choice(len(patches), min(queries, len(patches)), replace=False))
  dataset = tf.data.Dataset.from_tensor_slices(patches)
  result = {"layer": layer, "queries": len(chosen), "database_patches": len(patches),
            "images": int(len(np.unique(image_ids))), "top_k": top_k, "image": image_path}
  rows = {}
  for name, who in (("", subject), ("random_init_", random_subject)):
    if who is None:
      continue
    features = normalised(batched_features(who.features, dataset, [layer], batch_size, pool=False)[layer])
    neighbours, similarity = nearest_neighbours(features, image_ids, chosen, top_k)
    result[name + "mean_top1_similarity"] = float(similarity[:, 0].mean())
    result[name + "mean_topk_similarity"] = float(similarity.mean())
    rows[name] = neighbours
  drawn = []
  for q, query in enumerate(chosen):
    drawn.append((query, rows[""][q], TRAINED_COLOUR))
    if "random_init_" in rows:
      drawn.append((query, rows["random_init_"][q], RANDOM_COLOUR))
  return result, neighbours_image(patches, drawn)


# --------------------------------------------------------------------------------------------------------------
# Output


def emit(result, eval_dir, mode, step, images=None, write=True):
  """Prints the result as one JSON line, writes EVAL/<mode>.json and the TensorBoard summaries."""
  os.makedirs(eval_dir, exist_ok=True)
  if write:
    with open(os.path.join(eval_dir, f"{mode}.json"), "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
  writer = tf.summary.create_file_writer(eval_dir)
  with writer.as_default(step=step):
    for key, value in result.items():
      if isinstance(value, (int, float)) and not isinstance(value, bool):
        tf.summary.scalar(f"{mode}/{key}", value)
      elif key == "per_class_accuracy":
        for name, accuracy in value.items():
          tf.summary.scalar(f"{mode}/accuracy_{name}", accuracy)
    for name, image in (images or {}).items():
      tf.summary.image(f"{mode}/{name}", image[np.newaxis], max_outputs=1)
  writer.close()
  print(json.dumps(result), flush=True)


def eval_dir_for(model_dir, saved_model, eval_dir):
  if eval_dir:
    return eval_dir
  if model_dir:
    return os.path.join(model_dir, "eval")
  return os.path.join(os.path.dirname(os.path.normpath(saved_model)), "eval")


def pretext_settings(subject):
  """The run's colour handling and pixelation, unless --color_mode/--pixelation are given on the command line."""
  color_mode = FLAGS.color_mode if FLAGS["color_mode"].present else subject.color_mode
  pixelation = FLAGS.pixelation if FLAGS["pixelation"].present else subject.pixelation
  return color_mode, pixelation


def watch(source, eval_dir):
  """Evaluates every new checkpoint of --model_dir (pretext) until the run's --train_steps is reached or no new
  checkpoint comes for --watch_timeout seconds."""
  values = export_lib.read_run_flags(FLAGS.model_dir)
  run = None
  evaluated = 0
  for path in tf.train.checkpoints_iterator(FLAGS.model_dir, min_interval_secs=FLAGS.watch_interval,
                                            timeout=FLAGS.watch_timeout):
    try:
      if run is None:
        run = export_lib.load_run(FLAGS.model_dir, path)
        subject = subject_from_run(run)
      else:
        export_lib.restore(run.networks, path)
      step = export_lib.checkpoint_step(path)
    except (tf.errors.NotFoundError, export_lib.ExportError) as e:
      logging.warning("Skipping %s: %s", path, str(e).splitlines()[0][:200])  # removed by --keep_checkpoints
      continue
    start = time.time()
    color_mode, pixelation = pretext_settings(subject)
    result = evaluate_pretext(subject, source, FLAGS.pairs_per_image, FLAGS.seed, color_mode, pixelation)
    result = {"mode": "pretext", **run.describe(), "checkpoint": path, "step": step, "data": source.description,
              "seed": FLAGS.seed, "seconds": round(time.time() - start, 1), **result}
    emit(result, eval_dir, "pretext", step, {"confusion_true_rows_predicted_columns": confusion_image(
        result["confusion_matrix"])})
    evaluated += 1
    train_steps = int(values.get("train_steps", "0") or 0)
    if train_steps and step >= train_steps:
      break
  if not evaluated:
    raise EvaluationError(f"--model_dir={FLAGS.model_dir}: no checkpoint within --watch_timeout="
                          f"{FLAGS.watch_timeout} s")


def run():
  mode = FLAGS.mode
  if bool(FLAGS.model_dir) == bool(FLAGS.saved_model):
    raise EvaluationError("give exactly one of --model_dir (a training run) and --saved_model (OUT/backbone)")
  if FLAGS.watch and (mode != "pretext" or not FLAGS.model_dir):
    raise EvaluationError("--watch evaluates new checkpoints of --model_dir in --mode=pretext")
  if not FLAGS.data:
    raise EvaluationError(f"--data is required: the images of --mode={mode}")
  for name in ("images", "pairs_per_image", "folds", "queries", "top_k", "batch_size", "probe_epochs"):
    if FLAGS[name].value < 1:
      raise EvaluationError(f"--{name}={FLAGS[name].value} must be >= 1")
  if FLAGS.folds < 2 or FLAGS.inner_folds < 2:
    raise EvaluationError(f"--folds={FLAGS.folds} and --inner_folds={FLAGS.inner_folds} must be >= 2")
  if FLAGS.layer and FLAGS.layer not in export_lib.FEATURE_LAYERS:
    raise EvaluationError(f"--layer={FLAGS.layer} is not one of {', '.join(export_lib.FEATURE_LAYERS)}")
  eval_dir = eval_dir_for(FLAGS.model_dir, FLAGS.saved_model, FLAGS.eval_dir)

  if mode != "linear":
    source = select_images(data_lib.find_source(FLAGS.data, FLAGS.data_root), FLAGS.images, FLAGS.seed)
  if FLAGS.watch:
    return watch(source, eval_dir)
  subject = (subject_from_run(export_lib.load_run(FLAGS.model_dir, FLAGS.checkpoint)) if FLAGS.model_dir
             else subject_from_saved_model(FLAGS.saved_model))
  start = time.time()
  images = {}
  if mode == "pretext":
    color_mode, pixelation = pretext_settings(subject)
    result = evaluate_pretext(subject, source, FLAGS.pairs_per_image, FLAGS.seed, color_mode, pixelation)
    images["confusion_true_rows_predicted_columns"] = confusion_image(result["confusion_matrix"])
  elif mode == "linear":
    random_subject = random_init_subject(subject, FLAGS.seed)
    layer_names = (FLAGS.layer,) if FLAGS.layer else LINEAR_LAYERS
    probe = LinearProbe(FLAGS.probe_epochs, FLAGS.probe_learning_rate, FLAGS.probe_l2)
    result = evaluate_linear(subject, random_subject, FLAGS.data, layer_names, FLAGS.folds, FLAGS.inner_folds,
                             FLAGS.image_size, FLAGS.batch_size, FLAGS.seed, probe)
  else:
    random_subject = random_init_subject(subject, FLAGS.seed) if FLAGS.compare_random_init else None
    image_path = os.path.join(eval_dir, "neighbors.png")
    result, picture = evaluate_neighbors(subject, random_subject, source, FLAGS.layer or NEIGHBOR_LAYER,
                                         FLAGS.queries, FLAGS.top_k, FLAGS.batch_size, FLAGS.seed, image_path)
    os.makedirs(eval_dir, exist_ok=True)
    tf.io.write_file(image_path, tf.io.encode_png(picture))
    images["queries_then_neighbours"] = picture
  data = FLAGS.data if mode == "linear" else source.description
  result = {"mode": mode, **subject.about, "data": data, "seed": FLAGS.seed,
            "seconds": round(time.time() - start, 1), **result}
  emit(result, eval_dir, mode, subject.step, images)
  return result


def define_flags():
  """The command's flags (see the module docstring); --data and --data_root are data.py's."""
  flags.DEFINE_enum("mode", None, MODES, "What to measure: pretext accuracy, linear probe, or nearest neighbours.")
  flags.DEFINE_string("model_dir", None, "Training run to evaluate (its latest checkpoint, or --checkpoint).")
  flags.DEFINE_string("checkpoint", None, "With --model_dir: a checkpoint path (RUN/ckpt-N) or step N.")
  flags.DEFINE_string("saved_model", None, "Instead of --model_dir: an exported backbone (OUT/backbone of "
                      "context_keras.export; pretext mode uses OUT/pair_classifier beside it).")
  flags.DEFINE_string("eval_dir", None, "Where <mode>.json, neighbors.png and the TensorBoard summaries go "
                      "(default RUN/eval, or OUT/eval for --saved_model=OUT/backbone).")
  flags.DEFINE_integer("seed", 0, "Seed of the image subset, pairs, folds, queries and the random-init baseline.")
  flags.DEFINE_integer("images", PRETEXT_IMAGES, "Most images of --data used (a seeded random subset) in pretext "
                       "and neighbors modes; the paper used 500 (spec 6.3).")
  flags.DEFINE_integer("pairs_per_image", PRETEXT_PAIRS_PER_IMAGE, "Pretext: random pairs per image (the paper: 256).")
  flags.DEFINE_string("layer", None, "Feature layer: linear default = the best of conv5/pool5/fc6 on the training "
                      "folds; neighbors default = fc6.")
  flags.DEFINE_integer("folds", 5, "Linear: stratified cross-validation folds.")
  flags.DEFINE_integer("inner_folds", 3, "Linear: folds of the inner cross-validation that picks the layer.")
  flags.DEFINE_integer("image_size", 192, "Linear: images are resized (shorter side) and centre-cropped to this "
                       "square (>= 96) before the backbone.")
  flags.DEFINE_integer("probe_epochs", PROBE_EPOCHS, "Linear: full-batch Adam steps of the logistic regression.")
  flags.DEFINE_float("probe_learning_rate", PROBE_LEARNING_RATE, "Linear: Adam learning rate of the probe.")
  flags.DEFINE_float("probe_l2", PROBE_L2, "Linear: L2 penalty on the probe's weights (standardised features).")
  flags.DEFINE_integer("queries", 20, "Neighbors: random query patches (the paper drew 1000 and showed a few).")
  flags.DEFINE_integer("top_k", 8, "Neighbors: neighbours shown per query.")
  flags.DEFINE_bool("compare_random_init", False, "Neighbors: add each query's row for a random-init network.")
  flags.DEFINE_integer("batch_size", 64, "Images or patches per forward pass.")
  flags.DEFINE_bool("watch", False, "Poll --model_dir for new checkpoints and evaluate each (pretext mode).")
  flags.DEFINE_integer("watch_interval", 30, "With --watch: least seconds between two polls.")
  flags.DEFINE_integer("watch_timeout", 3600, "With --watch: stop after this many seconds without a new checkpoint "
                       "(it also stops at the run's --train_steps).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS.mode:
    logging.error("--mode is required: one of %s", ", ".join(MODES))
    sys.exit(2)
  try:
    run()
  except (export_lib.ExportError, data_lib.DataError) as e:
    logging.error("%s", e)
    sys.exit(2)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=data_lib.parse_flags)
