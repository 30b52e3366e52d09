"""A small detection set made offline, written as a VOCdevkit folder: scikit-image's sample photos as backgrounds,
with objects cut from other sample photos pasted at known boxes (docs/detection.md §5). For the tests and the CPU
evidence run:

  python tests/voc_set.py OUT [--train=120] [--test=60] [--seed=0]

writes OUT/Annotations, OUT/JPEGImages and OUT/ImageSets/Main/{trainval,test}.txt. Classes carry VOC names (cat,
person, motorbike, horse); objects under MIN_EASY pixels on a side are marked difficult, as VOC marks hard ones.
"""
import argparse
import os

import numpy as np
import tensorflow as tf

# class -> (sample photo, crop (top, left, bottom, right)): the object's pixels.
OBJECTS = {"cat": ("chelsea.png", (20, 100, 280, 380)), "person": ("astronaut.png", (0, 120, 260, 360)),
           "motorbike": ("motorcycle_left.png", (60, 60, 500, 700)), "horse": ("horse.png", (0, 0, 328, 400))}
BACKGROUNDS = ("brick.png", "grass.png", "gravel.png", "rocket.jpg", "coffee.png", "hubble_deep_field.jpg",
               "camera.png", "moon.png")
MIN_EASY = 32
SIDES = (160, 256)       # image sides are drawn from this range
OBJECT_SIDES = (24, 120)


def _photo(name):
  import skimage.data  # pylint: disable=import-outside-toplevel  (test extra)
  path = os.path.join(os.path.dirname(skimage.data.__file__), name)
  image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False).numpy()
  return image


def _resize(image, height, width):
  return tf.cast(tf.round(tf.image.resize(tf.cast(image, tf.float32), [height, width])), tf.uint8).numpy()


def _iou(a, b):
  """Intersection over union of (x0, y0, x1, y1) boxes."""
  iw = min(a[2], b[2]) - max(a[0], b[0])
  ih = min(a[3], b[3]) - max(a[1], b[1])
  if iw <= 0 or ih <= 0:
    return 0.0
  inter = iw * ih
  return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def annotation_xml(image_id, height, width, objects):
  """A VOC annotation; objects: (name, difficult, xmin, ymin, xmax, ymax) in the devkit's convention."""
  parts = [f"<annotation><folder>VOC2007</folder><filename>{image_id}.jpg</filename>",
           f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size><segmented>0</segmented>"]
  for name, difficult, x0, y0, x1, y1 in objects:
    parts.append(f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
                 f"<difficult>{int(difficult)}</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
                 f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>")
  parts.append("</annotation>")
  return "".join(parts)


def make_image(rng, sprites, backgrounds):
  """(image uint8 [H, W, 3], objects in the devkit's convention)."""
  height, width = (int(v) for v in rng.integers(SIDES[0], SIDES[1] + 1, 2))
  background = backgrounds[rng.integers(len(backgrounds))]
  top = rng.integers(0, max(1, background.shape[0] - height // 2))
  left = rng.integers(0, max(1, background.shape[1] - width // 2))
  image = _resize(background[top:, left:], height, width).copy()
  placed, objects = [], []
  for _ in range(int(rng.integers(1, 4))):
    name = list(sprites)[rng.integers(len(sprites))]
    side = int(rng.integers(OBJECT_SIDES[0], min(OBJECT_SIDES[1], min(height, width) - 1) + 1))
    aspect = float(rng.uniform(0.75, 1.33))
    h, w = max(8, int(side / aspect ** 0.5)), max(8, int(side * aspect ** 0.5))
    h, w = min(h, height - 1), min(w, width - 1)
    for _ in range(20):
      y, x = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
      box = (x, y, x + w, y + h)
      if all(_iou(box, other) == 0 for other in placed):  # no object hides another
        break
    else:
      continue
    sprite = _resize(sprites[name], h, w)
    if rng.random() < 0.5:
      sprite = sprite[:, ::-1]
    image[y:y + h, x:x + w] = np.clip(sprite.astype(np.float32) * rng.uniform(0.8, 1.2), 0, 255).astype(np.uint8)
    placed.append(box)
    # Pixels x .. x + w - 1 (0-based) are x + 1 .. x + w in the devkit's 1-based inclusive numbering.
    objects.append((name, min(h, w) < MIN_EASY, x + 1, y + 1, x + w, y + h))
  return image, objects


def write(root, train=120, test=60, seed=0):
  """Writes the set into `root` (a VOCdevkit/VOC2007-like folder); returns {split: [ids]}."""
  rng = np.random.default_rng(seed)
  sprites = {name: _photo(photo)[top:bottom, left:right]
             for name, (photo, (top, left, bottom, right)) in OBJECTS.items()}
  backgrounds = [_photo(name) for name in BACKGROUNDS]
  for part in ("Annotations", "JPEGImages", os.path.join("ImageSets", "Main")):
    os.makedirs(os.path.join(root, part), exist_ok=True)
  splits = {"trainval": [f"{i:06d}" for i in range(train)], "test": [f"{i:06d}" for i in range(train, train + test)]}
  for ids in splits.values():
    for image_id in ids:
      image, objects = make_image(rng, sprites, backgrounds)
      tf.io.write_file(os.path.join(root, "JPEGImages", f"{image_id}.jpg"), tf.io.encode_jpeg(image, quality=92))
      with open(os.path.join(root, "Annotations", f"{image_id}.xml"), "w", encoding="utf-8") as f:
        f.write(annotation_xml(image_id, image.shape[0], image.shape[1], objects))
  for split, ids in splits.items():
    with open(os.path.join(root, "ImageSets", "Main", f"{split}.txt"), "w", encoding="utf-8") as f:
      f.write("".join(f"{i}\n" for i in ids))
  return splits


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("root")
  parser.add_argument("--train", type=int, default=120)
  parser.add_argument("--test", type=int, default=60)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  write(args.root, args.train, args.test, args.seed)
