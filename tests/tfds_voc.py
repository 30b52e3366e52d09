"""A VOC-like TFDS dataset for the tests, made here (no download): the images and annotations of a VOCdevkit folder
written by voc_set.py (its manual_dir), stored as TFDS's voc stores PASCAL VOC: the JPEG's bytes, image/filename,
objects {label, bbox (ymin, xmin, ymax, xmax) over the annotated size, pose, is_truncated, is_difficult}, labels and
labels_no_difficult; splits train and validation (the two halves of the folder's trainval) and test. Its class names
are in neither the devkit's nor alphabetical order, so that reading them by name is tested.

Importing this module registers the builder in the process (tfds.builder finds its code); a subprocess that does not
import it reads the prepared files through TFDS's read-only builder.
"""
import os

import numpy as np
import tensorflow_datasets as tfds
import voc_set

from context_keras.input import voc

NAME = "context_keras_voc"
CONFIG = "2007"
CLASSES = tuple(voc_set.OBJECTS)  # cat, person, motorbike, horse
POSES = ("frontal", "rear", "left", "right", "unspecified")


class ContextKerasVoc(tfds.core.GeneratorBasedBuilder):
  """A VOCdevkit folder of voc_set.py, as TFDS's voc builder stores one."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=CONFIG)]
  MANUAL_DOWNLOAD_INSTRUCTIONS = "a VOCdevkit folder written by tests/voc_set.py"

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(encoding_format="jpeg"),
        "image/filename": tfds.features.Text(),
        "objects": tfds.features.Sequence({
            "label": tfds.features.ClassLabel(names=CLASSES), "bbox": tfds.features.BBoxFeature(),
            "pose": tfds.features.ClassLabel(names=POSES), "is_truncated": np.bool_, "is_difficult": np.bool_}),
        "labels": tfds.features.Sequence(tfds.features.ClassLabel(names=CLASSES)),
        "labels_no_difficult": tfds.features.Sequence(tfds.features.ClassLabel(names=CLASSES)),
    }))

  def _split_generators(self, dl_manager):
    root = dl_manager.manual_dir
    trainval = split_ids(root, "trainval")
    half = len(trainval) // 2
    return {"train": self._generate_examples(root, trainval[:half]),
            "validation": self._generate_examples(root, trainval[half:]),
            "test": self._generate_examples(root, split_ids(root, "test"))}

  def _generate_examples(self, root, ids):
    for image_id in ids:
      with open(os.path.join(root, voc.ANNOTATIONS, f"{image_id}.xml"), "rb") as f:
        annotation = voc.parse_annotation(f.read())
      scale = np.array([annotation.height, annotation.width, annotation.height, annotation.width], np.float64)
      objects = [{"label": name, "bbox": np.array([y0, x0, y1, x1], np.float64) / scale, "pose": "unspecified",
                  "is_truncated": False, "is_difficult": hard}
                 for name, hard, x0, y0, x1, y1 in annotation.objects]
      yield image_id, {
          "image": os.path.join(root, voc.IMAGES, f"{image_id}{voc.IMAGE_SUFFIX}"),
          "image/filename": f"{image_id}{voc.IMAGE_SUFFIX}", "objects": objects,
          "labels": sorted({o["label"] for o in objects}),
          "labels_no_difficult": sorted({o["label"] for o in objects if not o["is_difficult"]})}


def split_ids(root, split):
  with open(os.path.join(root, voc.IMAGE_SETS, f"{split}.txt"), encoding="utf-8") as f:
    return f.read().split()


def build(data_dir, devkit, num_shards=2):
  """Prepares the dataset in data_dir from the VOCdevkit folder `devkit`, each split in `num_shards` files."""
  builder = ContextKerasVoc(config=CONFIG, data_dir=str(data_dir))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(devkit),
                                                                            num_shards=num_shards))
  return builder
