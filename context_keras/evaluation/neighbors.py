"""Nearest neighbours, the paper's section 4.1 (method.md §6.4): fc6 (the tower's output, or --layer) features of
--queries random patches,
normalised correlation against all patches of the set (other images only), the top --top_k, drawn as one row per
query; with compare_random_init also the rows of a random-init network."""
import dataclasses

import numpy as np
import tensorflow as tf

from context_keras import errors
from context_keras.evaluation import images as images_lib
from context_keras.evaluation.result import Result
from context_keras.input import decoding
from context_keras.input import geometry as geometry_lib
from context_keras.input import sources
from context_keras.model import networks as model_lib
from context_keras.training import progress as progress_lib

NAME = "neighbors"
IMAGE_FILE = "neighbors.png"
TRAINED_COLOUR = (40, 90, 200)
RANDOM_COLOUR = (170, 170, 170)


@dataclasses.dataclass(frozen=True)
class Config:
  data: str
  data_root: str | None = None
  tfds_data_dir: str | None = None
  images: int = images_lib.IMAGES
  layer: str | None = None
  queries: int = 20
  top_k: int = 8
  batch_size: int = images_lib.BATCH_SIZE
  seed: int = 0
  compare_random_init: bool = False


def patch_database(source, seed, geometry=geometry_lib.DOERSCH):
  """One random grid of un-augmented patches per image (training geometry): uint8 [N, P, P, 3], image ids [N]."""
  def cut(index, contents):
    patches = geometry.evaluation_patches(decoding.decode(contents), images_lib.image_seed(seed, index))["patches"]
    return patches, tf.fill(tf.shape(patches)[:1], index)
  chunks = []
  progress = progress_lib.Progress("patch database", len(source.paths) if source.kind == "files" else None)
  for chunk in sources.finite_images(source).map(cut).ignore_errors():
    chunks.append(chunk)
    progress.add(1)
  progress.finish()
  if not chunks:
    raise errors.DataError(f"--data={source.description}: no image could be cut into patches")
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
  size = patches.shape[1]
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


def evaluate(subject, config):
  """Nearest neighbours of random query patches, for the subject and, with compare_random_init, its random init."""
  layer = config.layer or model_lib.output_name(subject.model_config.backbone)
  if layer not in subject.feature_layers:
    raise errors.UsageError(f"--layer={layer} is not one of {', '.join(subject.feature_layers)}")
  seed, top_k, batch_size = config.seed, config.top_k, config.batch_size
  source = images_lib.select_images(sources.find_source(config.data, config.data_root, config.tfds_data_dir),
                                    config.images, seed)
  random_subject = subject.random_init(seed) if config.compare_random_init else None
  patches, image_ids = patch_database(source, seed, subject.patch_geometry)
  if len(np.unique(image_ids)) < 2:
    raise errors.DataError(f"--data={source.description}: nearest neighbours need patches of at least 2 images")
  top_k = min(top_k, len(patches) - 1)
  chosen = np.sort(np.random.default_rng(seed).choice(len(patches), min(config.queries, len(patches)),
                                                      replace=False))
  dataset = tf.data.Dataset.from_tensor_slices(patches)
  result = {"data": source.description, "layer": layer, "queries": len(chosen), "database_patches": len(patches),
            "images": int(len(np.unique(image_ids))), "top_k": top_k, "image": IMAGE_FILE}
  rows = {}
  for name, who in (("", subject), ("random_init_", random_subject)):
    if who is None:
      continue
    features = normalised(images_lib.batched_features(who.features, dataset, [layer], batch_size,
                                                  pool=False)[layer])
    neighbours, similarity = nearest_neighbours(features, image_ids, chosen, top_k)
    result[name + "mean_top1_similarity"] = float(similarity[:, 0].mean())
    result[name + "mean_topk_similarity"] = float(similarity.mean())
    rows[name] = neighbours
  drawn = []
  for q, query in enumerate(chosen):
    drawn.append((query, rows[""][q], TRAINED_COLOUR))
    if "random_init_" in rows:
      drawn.append((query, rows["random_init_"][q], RANDOM_COLOUR))
  return Result(result, images={"queries_then_neighbours": neighbours_image(patches, drawn)},
                files={"image": ("queries_then_neighbours", IMAGE_FILE)})
