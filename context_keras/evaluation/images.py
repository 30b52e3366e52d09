"""Images for the protocols, and their features: a seeded subset of a source, the centre square, batched maps."""
import dataclasses

import numpy as np
import tensorflow as tf


def select_images(source, limit, seed):
  """At most `limit` images of a sources.Source: a seeded random subset of the files, kept in listing order."""
  if source.kind != "files" or not limit or len(source.paths) <= limit:
    return source
  chosen = np.sort(np.random.default_rng(seed).choice(len(source.paths), limit, replace=False))
  paths = tuple(source.paths[i] for i in chosen)
  return dataclasses.replace(source, paths=paths, description=f"{limit} of {source.description}")


def image_seed(seed, index):
  """The stateless seed of image `index` of an evaluation: every protocol's randomness per image comes from it."""
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
