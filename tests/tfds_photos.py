"""A TFDS dataset for the tests, made here (no download): 256-px crops of three of scikit-image's sample photos, the
photo being the class, in two splits. Each crop's encoded JPEG is what TFDS stores (its image feature keeps the
bytes), one of them with an EXIF orientation; each also carries VOC-like objects (its class, and the next class
marked difficult) for multi-label reading.

Importing this module registers the builder in the process (tfds.builder finds its code); a subprocess that does not
import it reads the prepared files through TFDS's read-only builder.
"""
import io

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from helpers import skimage_photo_dir

NAME = "context_keras_photos"
CLASSES = ("astronaut", "coffee", "chelsea")
PER_CLASS = {"train": 8, "validation": 3}
SIDE = 256  # above 247 px, so that every crop holds a grid of the original geometry
# Stored SIDE x EXIF_WIDTH with EXIF orientation 6: it is to be turned 90 degrees, to EXIF_WIDTH x SIDE.
EXIF_ROTATED, EXIF_WIDTH = "train/astronaut/0", 300


def crop_bytes(photo, rng, orientation=None, width=SIDE):
  """A random SIDE x width crop of a photo (H x W x 3) as JPEG bytes, with an EXIF orientation if given."""
  top, left = rng.integers(0, photo.shape[0] - SIDE + 1), rng.integers(0, photo.shape[1] - width + 1)
  crop = Image.fromarray(photo[top:top + SIDE, left:left + width])
  options = {}
  if orientation:
    exif = Image.Exif()
    exif[0x0112] = orientation
    options["exif"] = exif.tobytes()
  buffer = io.BytesIO()
  crop.save(buffer, "JPEG", quality=90, **options)
  return buffer.getvalue()


def photos():
  folder = skimage_photo_dir()
  files = {"astronaut": "astronaut.png", "coffee": "coffee.png", "chelsea": "chelsea.png"}
  return {name: np.asarray(Image.open(f"{folder}/{files[name]}").convert("RGB")) for name in CLASSES}


class ContextKerasPhotos(tfds.core.GeneratorBasedBuilder):
  """Photo crops, labelled by their photo."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(names=CLASSES),
        "file_name": tfds.features.Text(),
        "objects": tfds.features.Sequence({"label": tfds.features.ClassLabel(names=CLASSES),
                                           "is_difficult": tfds.features.Scalar(np.bool_)}),
    }))

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {split: self._generate_examples(split) for split in PER_CLASS}

  def _generate_examples(self, split):
    rng = np.random.default_rng(list(PER_CLASS).index(split))
    for k, (name, photo) in enumerate(photos().items()):
      for i in range(PER_CLASS[split]):
        key = f"{split}/{name}/{i}"
        rotated = key == EXIF_ROTATED
        image = crop_bytes(photo, rng, 6 if rotated else None, EXIF_WIDTH if rotated else SIDE)
        yield key, {"image": image, "label": k, "file_name": key,
                    "objects": {"label": [k, (k + 1) % len(CLASSES)], "is_difficult": [False, True]}}


def build(data_dir, num_shards=3):
  """Prepares the dataset in data_dir, its splits in `num_shards` files each; returns the builder."""
  builder = ContextKerasPhotos(data_dir=str(data_dir))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=num_shards))
  return builder
