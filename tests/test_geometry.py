"""The geometry objects (input/geometry.py, method.md §2 and §8.2): each states what it cuts, and it is the one place
that names a geometry."""
import ast
import glob
import os

import numpy as np
import pytest
import tensorflow as tf

from context_keras.input import augment
from context_keras.input import geometry as G
from helpers import REPO


def test_only_the_geometry_module_names_a_geometry():
  """Everything else asks a Geometry object: no other module holds a geometry's name as a string."""
  names = set(G.GEOMETRIES)
  for path in glob.glob(os.path.join(REPO, "context_keras", "**", "*.py"), recursive=True):
    if path.endswith(os.path.join("input", "geometry.py")):
      continue
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
      assert not (isinstance(node, ast.Constant) and node.value in names), f"{path}:{node.lineno}: {node.value!r}"


# The doersch cut's first eager call takes seconds (its patch loop); test_data and test_patches cut it in many ways.
@pytest.mark.parametrize("geometry", [pytest.param(G.DOERSCH, marks=pytest.mark.slow), G.REVISITING],
                         ids=list(G.GEOMETRIES))
def test_each_geometry_cuts_what_it_states(geometry):
  image = np.random.default_rng(0).integers(0, 256, (300, 700, 3), dtype=np.uint8)
  contents = tf.io.encode_png(image)
  seed = tf.constant([4, 2], tf.int64)
  grids, augment_seed = geometry.cut(contents, seed)
  size = geometry.patch_size
  assert grids["usable"] and augment_seed.shape == [2]
  assert grids["patches"].shape[1:] == (size, size, 3) and grids["grid_height"].shape == [geometry.grids_per_image]
  cells = (grids["grid_height"] * grids["grid_width"]).numpy()
  first, second, label, per_grid = geometry.pairs(grids["grid_height"], grids["grid_width"])
  assert cells.sum() == len(grids["patches"]) and per_grid.numpy().sum() == len(first) == len(label)
  assert cells.max() <= geometry.largest_grid[0] and per_grid.numpy().max() <= geometry.largest_grid[1]
  assert int(tf.reduce_max(tf.maximum(first, second))) < cells.max()  # counted within a grid
  assert int(geometry.decoded_pixels(contents, seed)) >= int(tf.size(grids["patches"][0])) // 3
  assert geometry.evaluation_patches(tf.constant(image), seed)["patches"].shape[1:] == (size, size, 3)
  keys = augment.patch_keys(augment_seed, len(grids["patches"]))
  out = geometry.augment(grids["patches"], keys, "drop", True)
  assert out.dtype == tf.float32 and out.shape == grids["patches"].shape
  assert geometry.holds(300, 700) and geometry.holds(100, 3000) == (not geometry.color_modes)
  assert (geometry.preprocessing("project") == "project") == geometry.color_modes
  assert G.get(geometry.name) is geometry is G.with_patch_size(size)


def test_revisiting_batches_hold_a_fixed_number_of_images_and_it_refuses_what_it_does_not_use():
  assert G.REVISITING.images_per_batch(40, 36) == 4 and G.DOERSCH.images_per_batch(511, 2560) is None
  assert G.REVISITING.unused_settings("drop", False) == [
      "--color_mode=drop does nothing with --geometry=revisiting, which grays and standardises its patches instead "
      "(method.md §8.2)", "--nopixelation does nothing with --geometry=revisiting, which grays and standardises its "
      "patches instead (method.md §8.2)"]
  assert G.DOERSCH.unused_settings("drop", False) == [] and G.REVISITING.unused_settings() == []
  assert G.REVISITING.unsupported_fix(["--yoked_jitter"]).startswith("--yoked_jitter does not work with --geometry")
  assert G.DOERSCH.unsupported_fix(["--yoked_jitter"]) is None
  with pytest.raises(ValueError, match=r"^--geometry=square is not one of \('doersch', 'revisiting'\)"):
    G.get("square")
