"""The later fixes for the shortcuts (method.md §9): labels under flips and rotations checked against where the
patches really are, chroma blur, the yoked rescale and the aperture, and the class count through head and evaluation."""
import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from context_keras.evaluation import pretext
from context_keras.evaluation import subject as subject_lib
from context_keras.input import augment as A
from context_keras.input import patches as P
from context_keras.input import pipeline as data_lib
from context_keras.input import shortcuts as S
from context_keras.model import networks as model_lib
import helpers

SIDE = 560


def coordinate_photo(side=SIDE):
  """uint8 image: red = x and green = y, each scaled to 0-255 over the image, blue constant. Bilinear resizing keeps
  ramps linear, so a patch's mean red and green say where its centre was, and their gradients which way x and y run
  in it after any flip or rotation."""
  ramp = np.round(np.arange(side) * 255.0 / (side - 1))
  x, y = np.meshgrid(ramp, ramp)
  return np.stack([x, y, np.full_like(x, 128)], -1).astype(np.uint8)


def decode(patch):
  """(centre (x, y) in the image's ramp units, the array-space directions (col, row) in which x and y increase)."""
  patch = np.asarray(patch, np.float64)
  centre = patch[..., 0].mean(), patch[..., 1].mean()
  axes = []
  for channel in (0, 1):
    slopes = [np.mean(np.diff(patch[..., channel], axis=axis)) for axis in (1, 0)]  # along cols, along rows
    axes.append(tuple(int(np.sign(s)) if abs(s) > 0.1 else 0 for s in slopes))
  return centre, axes


def rotation_of(x_axis, y_axis):
  """(flip, k) whose transform sends the image's x axis to x_axis and y axis to y_axis (array directions), found by
  transforming a tiny ramp with numpy, independently of shortcuts.transform_patches."""
  ramp = np.stack(np.meshgrid(np.arange(3), np.arange(3)), -1)  # [row, col, (x, y)]
  for flip in (0, 1):
    for k in range(4):
      seen = np.rot90(ramp[:, ::-1] if flip else ramp, k)
      if decode(seen)[1] == [x_axis, y_axis]:
        return flip, k
  raise AssertionError(f"no transform gives axes {x_axis}, {y_axis}")


def check_pairs(patches, first, second, label, rotation_classes):
  """Every pair's label names where its second patch lies as the network sees it (and the rotation): returns the
  (flip, k) seen."""
  seen_transforms = set()
  decoded = {i: decode(patches[i]) for i in set(first) | set(second)}
  for a, b, lbl in zip(first, second, label):
    (ca, axes), (cb, axes_b) = decoded[a], decoded[b]
    assert axes == axes_b, "the patches of a pair are transformed alike"
    flip, k = rotation_of(*axes)
    seen_transforms.add((flip, k))
    # Offset in the image, then in what the network sees: x runs along axes[0], y along axes[1].
    # Neighbours are a pitch (144 px, over 50 ramp units at any resize) apart, the jitter moves them < 10 units.
    dx, dy = (int(np.sign(d)) if abs(d) > 25 else 0 for d in (cb[0] - ca[0], cb[1] - ca[1]))
    seen = (int(dx * axes[0][0] + dy * axes[1][0]), int(dx * axes[0][1] + dy * axes[1][1]))
    assert P.NEIGHBOUR_OFFSETS[lbl % 8] == seen, (lbl, seen, flip, k)
    assert lbl // 8 == (k if rotation_classes else 0)
    assert lbl < S.num_classes(rotation_classes)
  return seen_transforms


@pytest.mark.slow  # 12 s
def test_pipeline_labels_name_where_the_second_patch_is(tmp_path):
  rotation_classes = flip_relabel = True  # the pretext test below covers each alone
  helpers.write_png(tmp_path / "coords.png", coordinate_photo())
  config = data_lib.InputConfig(data=str(tmp_path), batch_patches=64, batch_pairs=320, color_mode="none",
                                pixelation=False, rotation_classes=rotation_classes, flip_relabel=flip_relabel,
                                augment_on="device")
  batches = data_lib.batches_from_images(tf.data.Dataset.from_tensors(tf.io.read_file(str(tmp_path / "coords.png")))
                                         .repeat(6), config, seed=0)
  seen = set()
  for batch in batches.take(1):
    n = int(batch["pair_mask"].numpy().sum())
    seen |= check_pairs(batch["patches"].numpy(), batch["first"].numpy()[:n], batch["second"].numpy()[:n],
                        batch["label"].numpy()[:n], rotation_classes)
  assert len({k for _, k in seen}) > 1 and len({f for f, _ in seen}) > 1


@pytest.mark.parametrize("rotation_classes,flip_relabel", [(True, True), (True, False), (False, True)])
def test_pretext_evaluation_labels_follow_the_same_transforms(monkeypatch, rotation_classes, flip_relabel):
  monkeypatch.setattr(pretext.augment_lib, "augment", lambda patches, *args, **kwargs: tf.cast(patches, tf.float32))
  found = pretext.pretext_pairs(tf.constant(coordinate_photo()), tf.constant([3, 4], tf.int64), 256, "none", False,
                                flip_relabel=flip_relabel, rotation_classes=rotation_classes)
  seen = check_pairs(found["patches"].numpy(), found["first"].numpy(), found["second"].numpy(),
                     found["label"].numpy(), rotation_classes)
  # Every pair is checked above; the grids (4-6 here) must also have been transformed in more than one way.
  assert (len({k for _, k in seen}) > 1) == rotation_classes and (len({f for f, _ in seen}) > 1) == flip_relabel


def test_label_table_is_a_permutation_per_transform():
  for rotation_classes in (False, True):
    table = S.label_table(rotation_classes)
    for flip in (0, 1):
      for k in range(4):
        assert sorted(table[flip, k] % 8) == list(range(8))
        assert set(table[flip, k] // 8) == {k if rotation_classes else 0}
  assert len(S.label_names(True)) == 32 and S.label_names(True)[9] == "up r90"


def sample_patches(n=4):
  import skimage.data  # pylint: disable=import-outside-toplevel
  image = skimage.data.astronaut()
  return tf.constant(np.stack([image[96 * i:96 * (i + 1), 150:246] for i in range(n)]).astype(np.float32))


def test_chroma_blur_keeps_lightness_and_blurs_only_chroma():
  patches = sample_patches()
  np.testing.assert_allclose(S.blur_chroma(patches, 1).numpy(), patches.numpy(), atol=1e-3)
  lab = S.rgb_to_lab(patches).numpy()
  blurred = S.rgb_to_lab(S.blur_chroma(patches, 13, clip=False)).numpy()
  np.testing.assert_allclose(blurred[..., 0], lab[..., 0], atol=2e-3)
  expected = tf.nn.avg_pool2d(lab[..., 1:], 13, 1, "SAME").numpy()
  np.testing.assert_allclose(blurred[..., 1:], expected, atol=0.05)
  # Blurring smooths: the chroma's pixel-to-pixel differences shrink a lot, the lightness's not at all.
  assert np.abs(np.diff(blurred[..., 1:], axis=1)).mean() < 0.3 * np.abs(np.diff(lab[..., 1:], axis=1)).mean()


def test_yoked_rescale_matches_resizing_and_cropping():
  patches = sample_patches(2)
  identity = S.yoked_rescale(patches, tf.constant([96, 96]), tf.constant([0, 0]), tf.constant([0, 0]),
                             tf.constant([2, 3]))
  np.testing.assert_array_equal(identity.numpy(), patches.numpy())
  out = S.yoked_rescale(patches, tf.constant([128, 110]), tf.constant([5, 14]), tf.constant([32, 0]),
                        tf.constant([0, 1])).numpy()
  for i, (side, oy, ox, method) in enumerate([(128, 5, 32, "bilinear"), (110, 14, 0, "area")]):
    reference = tf.round(tf.image.resize(patches[i:i + 1], [side, side], method=method))[0, oy:oy + 96, ox:ox + 96]
    # The same weights; rounding may tip the other way where the two float sums straddle a half.
    difference = np.abs(out[i] - reference.numpy())
    assert difference.max() <= 1 and (difference > 0).mean() < 0.02


def test_aperture_windows_and_fill():
  rng = np.random.default_rng(0)
  patches = tf.constant(rng.uniform(0, 255, (100, 96, 96, 3)).astype(np.float32))
  side, top, left = S.aperture_window(tf.constant(rng.uniform(size=(100, 3)), tf.float32), 96)
  side, top, left = side.numpy(), top.numpy(), left.numpy()
  assert side.min() == 64 and side.max() == 96 and (top + side).max() <= 96 and (left + side).max() <= 96
  masked = rng.uniform(size=100) < 0.5
  out = S.aperture(patches, masked, side, top, left).numpy()
  for i in range(0, 100, 9):
    window = out[i, top[i]:top[i] + side[i], left[i]:left[i] + side[i]]
    np.testing.assert_array_equal(window, patches.numpy()[i, top[i]:top[i] + side[i], left[i]:left[i] + side[i]])
    outside = np.ones([96, 96], bool)
    outside[top[i]:top[i] + side[i], left[i]:left[i] + side[i]] = False
    if masked[i] and outside.any():
      np.testing.assert_allclose(out[i][outside], np.broadcast_to(window.mean((0, 1)), out[i][outside].shape),
                                 rtol=1e-5)
    elif not masked[i]:
      np.testing.assert_array_equal(out[i], patches.numpy()[i])


@pytest.mark.slow  # 11 s: a network and an evaluation
def test_class_count_reaches_head_pair_classifier_and_pretext_evaluation(tmp_path):
  config = model_lib.ModelConfig(width_multiplier=0.0625, num_classes=S.num_classes(True))
  networks = model_lib.build(config)
  assert networks.context_model.output.shape[-1] == 32 and networks.head.output.shape[-1] == 32
  helpers.write_png(tmp_path / "coords.png", coordinate_photo())
  base = subject_lib.Subject(about={}, step=0, model_config=config, color_mode="none", pixelation=False,
                             features=None, rotation_classes=True, flip_relabel=True)
  metrics = pretext.evaluate(base.random_init(0), pretext.Config(data=str(tmp_path), pairs_per_image=32)).metrics
  assert metrics["num_classes"] == 32 and np.asarray(metrics["confusion_matrix"]).shape == (32, 32)
  assert metrics["chance"] == 1 / 32 and len(metrics["per_class_accuracy"]) == 32
  assert 0 <= metrics["rotation_accuracy"] <= 1 and metrics["direction_accuracy"] >= metrics["accuracy"]

  # The revisiting head too (method.md §8.2).
  revisiting = model_lib.ModelConfig(backbone="resnet18", head="revisiting", patch_size=64, width_multiplier=0.0625,
                                     num_classes=32)
  assert model_lib.build(revisiting).context_model.output.shape[-1] == 32


@pytest.mark.parametrize("fix", [dict(color_mode="chroma_blur"), dict(yoked_jitter=True), dict(random_aperture=True),
                                 dict(rotation_classes=True), dict(flip_relabel=True)])
def test_fixes_are_refused_with_the_revisiting_geometry(fix):
  """Each fix names itself and --geometry=revisiting, which does not apply it yet (method.md §9.9)."""
  data_lib.InputConfig(data="x", **fix)
  (name, value), = fix.items()
  flag = f"--{name}=chroma_blur" if name == "color_mode" else f"--{name}"
  with pytest.raises(ValueError, match=f"^{flag} does not work with --geometry=revisiting"):
    data_lib.InputConfig(data="x", geometry="revisiting", **fix)


@pytest.mark.slow  # 7-11 s
def test_large_decodes_keep_the_grid_transforms(monkeypatch):
  """An image too large for the parallel decode stage gets the same grids, flips and rotations in the one-at-a-time
  stage as image_grids gives it (its placeholder has their structure). The bound is lowered to keep this fast."""
  monkeypatch.setattr(data_lib, "PARALLEL_DECODE_MAX_PIXELS", 300 * 300)
  large, small = (tf.io.encode_png(coordinate_photo(side)).numpy() for side in (400, 200))
  config = data_lib.InputConfig(data="x", rotation_classes=True, flip_relabel=True)
  base_seed = tf.constant([5, 0], tf.int64)
  out = list(data_lib.grids_of_images(tf.data.Dataset.from_tensor_slices([small, large]), base_seed, config=config))
  for (index, grids), contents in zip(out, (small, large)):
    expected = data_lib.image_grids(contents, tf.random.experimental.stateless_fold_in(base_seed, index), config)
    assert sorted(grids) == sorted(expected) and "flip" in grids and "rotation" in grids
    for key in expected:
      np.testing.assert_array_equal(grids[key].numpy(), expected[key].numpy(), err_msg=key)
    assert grids["patch_keys"].shape[1] == 3


@pytest.mark.slow  # 20 s
def test_fixes_give_the_same_pixels_on_host_and_device(demo_list, photo_dir):
  config = data_lib.InputConfig(data=demo_list, data_root=photo_dir, batch_patches=64, batch_pairs=320,
                                color_mode="chroma_blur", yoked_jitter=True, random_aperture=True,
                                rotation_classes=True, flip_relabel=True)
  raw = next(iter(data_lib.make_dataset(dataclasses.replace(config, augment_on="device"))))
  host = next(iter(data_lib.make_dataset(config)))
  n = int(raw["patch_mask"].numpy().sum())
  # Static shapes, as on a GPU (the fixes' ops have them anyway); within test_data's tolerance for that mode.
  device = tf.function(data_lib.step_augmentation(dataclasses.replace(config, augment_on="device"),
                                                  jit_compile=True))(raw)["patches"].numpy()
  np.testing.assert_allclose(device[:n], host["patches"].numpy()[:n], rtol=0, atol=1e-5 * 50)
  np.testing.assert_array_equal(raw["label"].numpy(), host["label"].numpy())


def ramp_patches(n):
  """uint8 patches [n, 96, 96, 3]: red rises along columns, green along rows, the same for every patch."""
  ramp = np.arange(96) * 2 + 30
  x, y = np.meshgrid(ramp, ramp)
  return tf.constant(np.broadcast_to(np.stack([x, y, np.full_like(x, 90)], -1), (n, 96, 96, 3)).astype(np.uint8))


def test_yoked_patches_of_a_grid_share_scale_and_offset_and_grids_differ():
  cells = tf.constant([6, 6, 9, 4])
  keys = A.patch_keys(tf.constant([5, 6], tf.int64), 25, cells)
  out = A.augment(ramp_patches(25), keys, color_mode="none", pixelation=False,
                  ops=S.PatchOps(yoked_jitter=True, yoked_interpolation="bilinear")).numpy()
  # The ramp after enlarging by s and cropping at o: red at column j is 2 (j + o + 1/2) 96 / s - 1 + 30, so its
  # slope gives the scale and its start the offset (after centring and RMS scaling, the slope of red relative to
  # the slope of green is 1 when both axes share the scale, and the red/green ramps recover both).
  def fit(patch):
    red = patch[48, 10:86, 0]
    green = patch[10:86, 48, 1]
    return np.round(np.polyfit(np.arange(76), red, 1), 3), np.round(np.polyfit(np.arange(76), green, 1), 3)

  fits = [fit(p) for p in out]
  starts = np.cumsum([0, 6, 6, 9, 4])
  per_grid = []
  for g in range(4):
    members = fits[starts[g]:starts[g + 1]]
    for f in members[1:]:
      np.testing.assert_allclose(np.concatenate(f), np.concatenate(members[0]), atol=2e-3)
    per_grid.append(np.concatenate(members[0]))
  assert len({tuple(v) for v in per_grid}) == 4, "each grid its own draw"


def test_pair_preview_places_rotation_classes_by_their_direction():
  from context_keras.training import actions  # pylint: disable=import-outside-toplevel
  patch = np.zeros([96, 96, 3], np.float32)
  image = actions.preview_image({"first": patch[np.newaxis], "second": patch[np.newaxis] + 1,
                                 "label": np.array([8 * 3 + 4]), "valid": np.array([True])})
  cell = 96 + 8
  assert image.shape == (1, 3 * cell, 3 * cell, 3) and image[0, cell + 5, 2 * cell + 5, 0] == 0  # right of centre
