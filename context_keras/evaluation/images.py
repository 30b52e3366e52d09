"""Images for the protocols, and their features: a seeded subset of a source, the centre square, batched maps."""
import dataclasses

import numpy as np
import tensorflow as tf

from context_keras import errors
from context_keras.input import decoding
from context_keras.input import labelled
from context_keras.input import tfds_source

# The defaults the protocols share, as evaluate has one flag for each: images at most (pretext and neighbours; the
# paper's 500 held-out images, method.md §6.3), the labelled images' side, cross-validation folds, images or patches
# per forward pass.
IMAGES = 500
IMAGE_SIZE = 192
FOLDS = 5
BATCH_SIZE = 64


def select_images(source, limit, seed):
  """At most `limit` images of a sources.Source: a seeded random subset of the files, kept in listing order; of a
  TFDS split, its first `limit` examples (TFDS shuffled them when it prepared the split)."""
  if source.kind == tfds_source.KIND and limit and source.size > limit:
    return source.slice(0, limit)
  if source.kind != "files" or not limit or len(source.paths) <= limit:
    return source
  chosen = np.sort(np.random.default_rng(seed).choice(len(source.paths), limit, replace=False))
  paths = tuple(source.paths[i] for i in chosen)
  return dataclasses.replace(source, paths=paths, description=f"{limit} of {source.description}")


def image_seed(seed, index):
  """The stateless seed of image `index` of an evaluation: every protocol's randomness per image comes from it."""
  return tf.random.experimental.stateless_fold_in(tf.constant([seed, 0], tf.int64), index)


def resize_shorter(image, size):
  """Bilinear (antialiased) resize of an image so that its shorter side is `size`; float32."""
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = size / tf.reduce_min(shape)
  new = tf.maximum(tf.cast(tf.math.ceil(shape * scale), tf.int32), size)
  return tf.image.resize(tf.cast(image, tf.float32), new, method="bilinear", antialias=True)


def _uint8(image):
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def centre_crop(image, resize_size, size):
  """The shorter side resized to resize_size, then the central size x size crop; uint8 (the validation transform
  of the linear protocols: 256 then 224)."""
  resized = resize_shorter(image, resize_size)
  new = tf.shape(resized)[:2]
  top, left = (new[0] - size) // 2, (new[1] - size) // 2
  return tf.ensure_shape(_uint8(resized[top:top + size, left:left + size]), [size, size, 3])


def centre_square(image, size):
  """Bilinear resize of the shorter side to `size`, then the central size x size crop; uint8."""
  return centre_crop(image, size, size)


def random_resized_crop(image, size, seed, area=(0.08, 1.0), aspect=(3 / 4, 4 / 3)):
  """A random crop of `area` of the image and `aspect` ratio, resized to size x size (Inception's crop, as
  torchvision's RandomResizedCrop; when 10 draws fail, the whole image); uint8. Stateless: a function of seed."""
  begin, extent, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image), tf.zeros([1, 0, 4]), seed, min_object_covered=0.0, aspect_ratio_range=aspect, area_range=area,
      max_attempts=10, use_image_if_no_bounding_boxes=True)
  crop = tf.slice(image, begin, extent)
  resized = tf.image.resize(tf.cast(crop, tf.float32), [size, size], method="bilinear", antialias=True)
  return tf.ensure_shape(_uint8(resized), [size, size, 3])


def random_crop(image, resize_size, size, seed):
  """The shorter side resized to resize_size, then a random size x size crop (Kolesnikov et al.'s training
  crop); uint8."""
  crop = tf.image.stateless_random_crop(resize_shorter(image, resize_size), [size, size, 3], seed)
  return tf.ensure_shape(_uint8(crop), [size, size, 3])


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


def never_failing(records, transform, blank):
  """transform(*record) of every record of a dataset, in order, in parallel; blank(*record) for one whose transform
  raises (an image that cannot be read or decoded): one output per record, whatever happens."""
  def one(*record):
    example = tf.data.Dataset.from_tensors(record).map(transform).ignore_errors()
    return example.concatenate(tf.data.Dataset.from_tensors(blank(*record))).take(1)
  return records.interleave(one, cycle_length=16, block_length=1, num_parallel_calls=tf.data.AUTOTUNE,
                            deterministic=True)


def labelled_squares(lset, size):
  """A dataset of (uint8 centre square of `size`, label, usable) over a labelled set, in its order. An image file
  that cannot be used stops the reading (read_or_explain names it: the classes are what the folder says); a record of
  labelled shards that cannot be read (a damaged shard: labelled.DAMAGED) or decoded comes as a blank, not usable."""
  def square(index, contents, label):
    return centre_square(decoding.decode(contents), size), label, tf.constant(True)
  if lset.kind == "files":
    return labelled.records(lset).map(square, num_parallel_calls=tf.data.AUTOTUNE)

  def usable_square(index, contents, label):
    check = tf.debugging.assert_non_negative(label, message="a damaged shard's stand-in")
    with tf.control_dependencies([check]):
      return square(index, contents, label)
  return never_failing(labelled.records(lset), usable_square, lambda index, contents, label: (
      tf.zeros([size, size, 3], tf.uint8), tf.zeros_like(label), tf.constant(False)))


def read_or_explain(lset, flag, work):
  """work() reading the images of `lset`; an image that cannot be read or decoded becomes a UsageError naming it."""
  try:
    return work()
  except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError, tf.errors.PermissionDeniedError,
          tf.errors.UnknownError) as e:
    problem = first_unusable_image(lset.paths) if lset.kind == "files" else None
    raise errors.UsageError(f"{flag}: {problem or errors.tf_error_message(e, 300)}") from e


def first_unusable_image(paths):
  """'PATH cannot be used: reason' for the first of `paths` that cannot be read and decoded, or None."""
  for path in paths:
    try:
      decoding.decode(tf.io.read_file(path))
    except tf.errors.OpError as e:
      return f"{path} cannot be used: {errors.tf_error_message(e)}"
  return None
