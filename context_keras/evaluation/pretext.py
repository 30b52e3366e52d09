"""Pretext accuracy, the paper's protocol (method.md §6.3): for each of up to --images held-out images,
--pairs_per_image (256) random pairs cut with the training geometry and preprocessing of the run, all seeded, so
the figure is reproducible; accuracy over the run's classes (8 directions, 32 with rotation classes) overall and per
class, and the confusion matrix. For the revisiting geometry the pairs come from repeated random cuts of the image
(method.md §8.2)."""
import dataclasses

import numpy as np
import tensorflow as tf

from context_keras import errors
from context_keras.deploy import serving
from context_keras.evaluation import images as images_lib
from context_keras.evaluation.result import Result
from context_keras.input import augment as augment_lib
from context_keras.input import decoding
from context_keras.input import geometry as geometry_lib
from context_keras.input import patches as patches_lib
from context_keras.input import shortcuts
from context_keras.input import sources
from context_keras.training import progress as progress_lib

NAME = "pretext"
PAIRS_PER_IMAGE = 256   # method.md §6.3: 500 images x 256 pairs
MAX_GRIDS = 128         # an image resized to >= 150,000 px gives >= 2 pairs per grid (method.md §1.2, 2.2)


@dataclasses.dataclass(frozen=True)
class Config:
  data: str
  data_root: str | None = None
  tfds_data_dir: str | None = None
  images: int = images_lib.IMAGES
  pairs_per_image: int = PAIRS_PER_IMAGE
  seed: int = 0
  color_mode: str | None = None   # None: the subject's (the run's) colour handling
  pixelation: bool | None = None  # None: the subject's


def label_names(rotation_classes=False):
  """'up-left', 'up', ... for the labels 0-7 (patches.NEIGHBOUR_OFFSETS: where the second patch is), and the
  rotations' names after them with rotation classes (shortcuts.label_names)."""
  return shortcuts.label_names(rotation_classes)


def pretext_pairs(image, seed, num_pairs, color_mode, pixelation, flip_relabel=False, rotation_classes=False):
  """Up to num_pairs random pairs of one image, cut with the training geometry and preprocessing (method.md §1.2,
  2.2-2.4): one random resize, grids added one at a time until they hold num_pairs pairs, the pairs drawn without
  replacement, every patch augmented as in training. Grids are mirrored and rotated, their labels following, as the
  run's training made its labels (method.md §9.6); the yoked jitter and the aperture are not applied, as Mundhenk et
  al. tested without them.

  Returns {patches [n, 96, 96, 3], first, second, label [m], usable}; an image too small for a grid is not usable.
  """
  resize_seed, grid_seed, pick_seed, augment_seed = tf.unstack(patches_lib.split_seed(seed, 4))
  resized, usable = patches_lib.resize_for_grids(image, resize_seed)
  height, width = tf.shape(resized)[0], tf.shape(resized)[1]

  def cut():
    def more(i, ys, xs, first, second, label, patch_grid):
      del ys, xs, second, label, patch_grid
      return (tf.shape(first)[0] < num_pairs) & (i < MAX_GRIDS)

    def grid(i, ys, xs, first, second, label, patch_grid):
      grid_ys, grid_xs, grid_h, grid_w = patches_lib.sample_grids(
          tf.random.experimental.stateless_fold_in(grid_seed, tf.cast(i, tf.int64)), height, width, num_grids=1)
      pair_first, pair_second, pair_label = patches_lib.grid_pairs(grid_h[0], grid_w[0])
      offset = tf.shape(ys)[0]
      return (i + 1, tf.concat([ys, grid_ys], 0), tf.concat([xs, grid_xs], 0),
              tf.concat([first, pair_first + offset], 0), tf.concat([second, pair_second + offset], 0),
              tf.concat([label, pair_label], 0), tf.concat([patch_grid, tf.fill(tf.shape(grid_ys), i)], 0))

    empty = tf.zeros([0], tf.int32)
    _, ys, xs, first, second, label, patch_grid = tf.while_loop(
        more, grid, (tf.constant(0), empty, empty, empty, empty, empty, empty),
        shape_invariants=(tf.TensorShape([]),) + (tf.TensorShape([None]),) * 6)
    pick = tf.random.experimental.stateless_shuffle(tf.range(tf.shape(first)[0]), pick_seed)[:num_pairs]
    cut_patches = patches_lib.crop_patches(resized, ys, xs)
    if flip_relabel or rotation_classes:
      flip, k = shortcuts.grid_transforms(tf.random.experimental.stateless_fold_in(seed, shortcuts.TRANSFORM_STREAM),
                                          MAX_GRIDS, flip_relabel, rotation_classes)
      cut_patches = shortcuts.transform_patches(cut_patches, tf.gather(flip, patch_grid), tf.gather(k, patch_grid))
      pair_grid = tf.gather(patch_grid, first)
      label = shortcuts.relabel(label, tf.gather(flip, pair_grid), tf.gather(k, pair_grid), rotation_classes)
    keys = augment_lib.patch_keys(augment_seed, tf.shape(cut_patches)[0])
    return (augment_lib.augment(cut_patches, keys, color_mode, pixelation), tf.gather(first, pick),
            tf.gather(second, pick), tf.gather(label, pick))

  def nothing():
    size = patches_lib.PATCH_SIZE
    empty = tf.zeros([0], tf.int32)
    return tf.zeros([0, size, size, 3]), empty, empty, empty

  patches, first, second, label = tf.cond(usable, cut, nothing)
  return {"patches": patches, "first": first, "second": second, "label": label, "usable": usable}


def revisiting_pretext_pairs(image, seed, num_pairs, color_mode=None, pixelation=None, flip_relabel=False,
                             rotation_classes=False):
  """num_pairs random pairs of one image in the revisiting geometry (method.md §8.2): ceil(num_pairs / 8) cuts as
  training makes them (a random 255 crop of the 292x292 image, a random 64-px patch per cell), each augmented as
  one image (grayscale with probability 0.66, per-patch standardisation), their (neighbour, centre) pairs pooled and
  num_pairs of them drawn without replacement. Returns pretext_pairs's dict. The colour handling and the fixes of
  method.md §9 do not apply to this geometry (evaluate refuses them)."""
  del color_mode, pixelation, flip_relabel, rotation_classes
  cuts = -(-num_pairs // patches_lib.REVISITING_PAIRS)
  cut_seed, augment_seed, pick_seed = tf.unstack(patches_lib.split_seed(seed, 3))
  resized = patches_lib.revisiting_resize(image)
  corners = [patches_lib.revisiting_corners(s) for s in tf.unstack(patches_lib.split_seed(cut_seed, cuts))]
  ys = tf.concat([c[0] for c in corners], 0)
  xs = tf.concat([c[1] for c in corners], 0)
  # Every cut keyed as one image of training, so that each draws its own grayscale.
  keys = tf.concat([augment_lib.patch_keys(s, patches_lib.REVISITING_PATCHES)
                    for s in tf.unstack(patches_lib.split_seed(augment_seed, cuts))], 0)
  patches = augment_lib.revisiting_augment(patches_lib.crop_patches(resized, ys, xs, patches_lib.REVISITING_PATCH),
                                           keys)
  first, second, label = patches_lib.revisiting_pairs()
  offsets = tf.repeat(tf.range(cuts) * patches_lib.REVISITING_PATCHES, patches_lib.REVISITING_PAIRS)
  first, second, label = tf.tile(first, [cuts]) + offsets, tf.tile(second, [cuts]) + offsets, tf.tile(label, [cuts])
  pick = tf.random.experimental.stateless_shuffle(tf.range(tf.shape(first)[0]), pick_seed)[:num_pairs]
  return {"patches": patches, "first": tf.gather(first, pick), "second": tf.gather(second, pick),
          "label": tf.gather(label, pick), "usable": tf.constant(True)}


# Each geometry's pairs, cut and augmented as its training does it.
PAIRS = {geometry_lib.DOERSCH: pretext_pairs, geometry_lib.REVISITING: revisiting_pretext_pairs}


def evaluate(subject, config):
  """Accuracy of the subject's pair classifier on pairs from config.data, over its classes."""
  if subject.pair_logits is None:
    raise errors.UsageError("--mode=pretext needs the pair classifier: give --model_dir, or a --saved_model "
                            f"exported by context_keras.export (with {serving.PAIR_CLASSIFIER_DIR}/ beside it)")
  geometry = subject.patch_geometry
  unused = geometry.unused_settings(config.color_mode, config.pixelation)
  if unused:
    raise errors.UsageError(f"Invalid flags: {'; '.join(unused)}; that is the evaluated run's geometry")
  color_mode = subject.color_mode if config.color_mode is None else config.color_mode
  pixelation = subject.pixelation if config.pixelation is None else config.pixelation
  source = images_lib.select_images(sources.find_source(config.data, config.data_root, config.tfds_data_dir),
                                    config.images, config.seed)
  if not geometry.shortcut_fixes and (subject.rotation_classes or subject.flip_relabel):
    raise errors.UsageError(f"{subject.about}: rotation classes and flip relabelling do not work with "
                            f"--geometry={geometry.name} yet (method.md §9.9)")

  def pairs(i, contents):
    image, seed = decoding.decode(contents), images_lib.image_seed(config.seed, i)
    return PAIRS[geometry](image, seed, config.pairs_per_image, color_mode, pixelation, subject.flip_relabel,
                           subject.rotation_classes)

  dataset = sources.finite_images(source).map(pairs, num_parallel_calls=tf.data.AUTOTUNE,
                                              deterministic=True).ignore_errors().prefetch(2)
  num_classes = subject.model_config.num_classes
  if num_classes != shortcuts.num_classes(subject.rotation_classes):
    raise errors.UsageError(f"{subject.about}: its pair classifier has {num_classes} classes, which its recorded "
                            "label settings do not explain")
  confusion = np.zeros([num_classes, num_classes], np.int64)
  seen = too_small = 0
  progress = progress_lib.Progress("pretext pairs", len(source.paths) if source.kind == "files" else None)
  for item in dataset:
    seen += 1
    progress.add(1)
    if not item["usable"]:
      too_small += 1
      continue
    logits = subject.pair_logits(item["patches"], item["first"], item["second"])
    predicted = np.argmax(logits.numpy(), -1)
    np.add.at(confusion, (item["label"].numpy(), predicted), 1)
  progress.finish()
  pairs = int(confusion.sum())
  if not pairs:
    raise errors.DataError(f"--data={source.description}: no image gave a pair ({seen} decoded, {too_small} too "
                           "small)")
  per_class = confusion.diagonal() / np.maximum(confusion.sum(1), 1)
  names = label_names(subject.rotation_classes)
  metrics = {"data": source.description, "accuracy": float(confusion.trace() / pairs), "chance": 1.0 / num_classes,
             "num_classes": num_classes, "rotation_classes": subject.rotation_classes,
             "flip_relabel": subject.flip_relabel,
             "per_class_accuracy": dict(zip(names, per_class.round(4).tolist())),
             "confusion_matrix": confusion.tolist(), "confusion_labels": names, "pairs": pairs,
             "images": seen - too_small, "too_small": too_small,
             "unreadable": (len(source.paths) - seen) if source.kind == "files" else 0,
             "pairs_per_image": config.pairs_per_image, "geometry": geometry.name,
             "color_mode": geometry.preprocessing(color_mode)}
  if geometry.color_modes:
    metrics["pixelation"] = pixelation
  if subject.rotation_classes:
    # The two halves of a rotation class: is the direction right, is the rotation right (method.md §9.6)?
    directions = len(patches_lib.NEIGHBOUR_OFFSETS)
    folded = confusion.reshape(shortcuts.ROTATIONS, directions, shortcuts.ROTATIONS, directions)
    metrics["direction_accuracy"] = float(np.trace(folded.sum((0, 2))) / pairs)
    metrics["rotation_accuracy"] = float(np.trace(folded.sum((1, 3))) / pairs)
  return Result(metrics, images={"confusion_true_rows_predicted_columns": confusion_image(confusion)})


def confusion_image(confusion, cell=24):
  """The row-normalised confusion matrix (rows: true label, columns: predicted, labels in reading order) as an
  image from white (0) to dark blue (1)."""
  confusion = np.asarray(confusion, np.float64)
  share = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
  colour = np.stack([1 - 0.9 * share, 1 - 0.8 * share, 1 - 0.45 * share], -1)
  image = np.kron(colour, np.ones([cell, cell, 1]))
  image[::cell, :] = image[:, ::cell] = 0.6
  return (image * 255).astype(np.uint8)
