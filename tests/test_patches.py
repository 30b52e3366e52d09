"""Pair geometry (method.md §2.2-2.3) and per-patch augmentation (method.md §2.4), pinned on the pure TF functions."""
import numpy as np
import pytest
import tensorflow as tf

from context_keras.input import augment as A
from context_keras.input import patches as P


def coordinate_image(height, width):
  """An image whose channel 0 holds the row and channel 1 the column of each pixel."""
  y, x = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  return tf.constant(np.stack([y, x, np.zeros_like(y)], -1).astype(np.float32))


@pytest.mark.parametrize("height,width,seed", [(248, 248, 0), (387, 387, 1), (580, 774, 2), (300, 1400, 3),
                                               (1200, 260, 4)])
def test_grids_pairs_and_labels_match_true_offsets(height, width, seed):
  image = coordinate_image(height, width)
  ys, xs, grid_h, grid_w = P.sample_grids(tf.constant([seed, 7], tf.int64), height, width)
  cut = P.crop_patches(image, ys, xs).numpy()
  # Each patch is exactly the image region at its corner.
  np.testing.assert_array_equal(cut[:, 0, 0, 0], ys.numpy())
  np.testing.assert_array_equal(cut[:, 0, 0, 1], xs.numpy())
  np.testing.assert_array_equal(cut[:, -1, -1, 0], ys.numpy() + P.PATCH_SIZE - 1)
  # Patches lie inside the image (clamping).
  assert ys.numpy().min() >= 0 and xs.numpy().min() >= 0
  assert ys.numpy().max() <= height - P.PATCH_SIZE and xs.numpy().max() <= width - P.PATCH_SIZE
  assert len(grid_h) == P.GRIDS_PER_IMAGE
  offset = 0
  seen_pairs = 0
  for h, w in zip(grid_h.numpy(), grid_w.numpy()):
    assert h >= 1 and w >= 1
    n = h * w
    gy, gx = ys.numpy()[offset:offset + n], xs.numpy()[offset:offset + n]
    first, second, label = (t.numpy() for t in P.grid_pairs(h, w))
    assert len(first) == P.num_grid_pairs(h, w)
    pairs = set(zip(first, second))
    assert all((b, a) in pairs for a, b in pairs), "both orders of every adjacency"
    for a, b, lbl in zip(first, second, label):
      dy, dx = gy[b] - gy[a], gx[b] - gx[a]
      ex, ey = P.NEIGHBOUR_OFFSETS[lbl]
      for d, e in ((dx, ex), (dy, ey)):
        if e == 0:
          assert abs(d) <= 2 * P.JITTER
        else:
          # The gap survives jitter and clamping: neighbours are a pitch apart, give or take 2 x jitter.
          assert np.sign(d) == e and P.PITCH - 2 * P.JITTER <= abs(d) <= P.PITCH + 2 * P.JITTER
          assert abs(d) - P.PATCH_SIZE >= P.GAP - 2 * P.JITTER
    seen_pairs += len(first)
    offset += n
  assert offset == len(ys)


@pytest.mark.slow
def test_grid_size_rule_and_jitter_range():
  height, width = 600, 800
  starts_seen, jitters = set(), []
  for seed in range(200):
    ys, xs, grid_h, grid_w = P.sample_grids(tf.constant([seed, 0], tf.int64), height, width, num_grids=1)
    # Without jitter and clamping, corner (0, 0) is the grid start, in [0, 143].
    h, w = int(grid_h[0]), int(grid_w[0])
    x0 = xs.numpy().reshape(h, w)
    # Interior cells are never clamped, so their jitter is visible: corner - start - idx * pitch.
    base_x = x0[:, 1:] - np.arange(1, w) * P.PITCH
    jitters.extend((base_x - np.median(base_x)).ravel())
    # The rule floor((W + gap - start) / pitch), checked against the start recovered from a middle cell.
    start_x = int(np.round(np.median(x0 - np.arange(w) * P.PITCH)))
    assert w in ((width + P.GAP - start_x) // P.PITCH + d for d in (-1, 0, 1))
    starts_seen.add(start_x)
  jitters = np.array(jitters)
  assert np.abs(jitters).max() <= 2 * P.JITTER + 1
  assert min(starts_seen) < 20 and max(starts_seen) > 120


def test_labels_are_reading_order():
  first, second, label = (t.numpy() for t in P.grid_pairs(3, 3))
  centre = 4
  got = {int(s): int(lab) for f, s, lab in zip(first, second, label) if f == centre}
  # Second patch at row-major cell c of a 3x3 grid around the centre has label c (skipping the centre).
  assert got == {0: 0, 1: 1, 2: 2, 3: 3, 5: 4, 6: 5, 7: 6, 8: 7}
  assert len(first) == 40  # 20 adjacencies in a 3x3 grid, both orders


def keys(n, seed=0):
  return A.patch_keys(tf.constant([seed, 99], tf.int64), n)


def test_resize_keeps_aspect_and_target_range():
  for seed in range(20):
    image = tf.zeros([300, 500, 3], tf.uint8)
    out = P.random_resize(image, tf.constant([seed, 1], tf.int64))
    h, w = out.shape[0], out.shape[1]
    assert P.MIN_TARGET_PIXELS * 0.99 <= h * w <= P.MAX_TARGET_PIXELS
    assert abs(w / h - 500 / 300) < 0.01


def test_pixelate_identity_and_blocks():
  rng = np.random.default_rng(0)
  patches = tf.constant(rng.uniform(0, 255, (3, 96, 96, 3)).astype(np.float32))
  same = A.pixelate(patches, tf.constant([96, 96, 96]))
  np.testing.assert_allclose(same.numpy(), patches.numpy(), atol=1e-3)
  # Down to 10x10 and back: the result has rank <= 10 per channel.
  low = A.pixelate(patches, tf.constant([10, 10, 10])).numpy()
  assert np.linalg.matrix_rank(low[0, :, :, 0], tol=1e-2) <= 10
  # Matches tf.image.resize twice (bilinear, half-pixel centres, no anti-aliasing).
  for side in (10, 37, 95):
    expected = tf.image.resize(tf.image.resize(patches, [side, side], antialias=False), [96, 96], antialias=False)
    got = A.pixelate(patches, tf.constant([side] * 3))
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-2)


def test_random_pixelate_probability_and_area():
  # Only the pixelated third resampled; the static-shape variant, which resamples every patch, gives the same
  # patches (test_data.test_device_and_host_augmentation_are_equal_patch_for_patch).
  patches = tf.constant(np.random.default_rng(1).integers(0, 256, (2000, 96, 96, 1)).astype(np.float32))
  out = A.random_pixelate(patches, keys(2000)).numpy()
  changed = np.any(np.abs(out - patches.numpy()) > 1e-3, axis=(1, 2, 3))
  assert 0.29 < changed.mean() < 0.37
  # The side of each pixelated patch: the rank of the round trip, one per patch (area uniform in [100, 9025)).
  sides = np.array([np.linalg.matrix_rank(p[:, :, 0], tol=1e-2) for p in out[changed][:200]])
  assert sides.min() >= 10 and sides.max() <= 95
  assert abs(np.mean(sides ** 2) - (100 + 9025) / 2) < 500


@pytest.mark.slow  # in-process, but among the fast tier's slowest (docs/testing.md)
def test_color_drop_statistics():
  rng = np.random.default_rng(2)
  patches = tf.constant(rng.uniform(0, 255, (1200, 96, 96, 3)).astype(np.float32))
  out = A.color_transform(patches, keys(1200, 5), "drop").numpy()
  noise_like = np.all((out >= -0.5) & (out < 0.5), axis=(1, 2))  # [n, 3]
  assert np.all(noise_like.sum(1) == 2), "exactly two channels become noise"
  kept = np.argmin(noise_like, axis=1)
  counts = np.bincount(kept, minlength=3) / len(kept)
  assert np.all(np.abs(counts - 1 / 3) < 0.04)
  kept_values = out[np.arange(len(out)), :, :, kept]
  np.testing.assert_allclose(kept_values.mean(axis=(1, 2)), 0, atol=1e-3)
  noise = out[noise_like[:, None, None, :].repeat(96, 1).repeat(96, 2)]
  assert abs(noise.std() - 1 / np.sqrt(12)) < 0.005 and abs(noise.mean()) < 0.005


def test_color_drop_gaussian_and_project():
  rng = np.random.default_rng(3)
  patches = tf.constant(rng.uniform(0, 255, (200, 96, 96, 3)).astype(np.float32))
  out = A.color_transform(patches, keys(200, 1), "drop_gaussian").numpy()
  stds = out.std(axis=(1, 2))  # [n, 3]
  kept_std = stds.max(1)
  noise_std = np.sort(stds, 1)[:, :2]
  np.testing.assert_allclose(noise_std / kept_std[:, None], 0.01, rtol=0.05)
  projected = A.color_transform(patches, keys(200, 1), "project").numpy()
  # Nothing is left along the green-magenta axis a = [-1, 2, -1].
  np.testing.assert_allclose(projected @ np.array([-1.0, 2.0, -1.0]), 0, atol=1e-2)


def test_rms_normalize():
  patches = tf.constant(np.random.default_rng(4).normal(0, 7, (5, 96, 96, 3)).astype(np.float32))
  out = A.rms_normalize(patches).numpy()
  np.testing.assert_allclose(np.sqrt((out ** 2).mean(axis=(1, 2, 3))), 50, rtol=1e-4)
  assert np.all(np.isfinite(A.rms_normalize(tf.zeros([1, 96, 96, 3])).numpy()))


def test_augment_is_deterministic_per_key_whatever_the_batch():
  patches = tf.constant(np.random.default_rng(5).integers(0, 256, (12, 96, 96, 3), dtype=np.uint8))
  a = A.augment(patches, keys(12, 9))
  np.testing.assert_array_equal(a.numpy(), A.augment(patches, keys(12, 9)).numpy())
  assert not np.allclose(a.numpy(), A.augment(patches, keys(12, 10)).numpy())
  # Each patch depends on its own pixels and key only: alone, or in another batch in another order, it is the same.
  order = [7, 3, 11, 0]
  some = A.augment(tf.gather(patches, order), tf.gather(keys(12, 9), order))
  np.testing.assert_allclose(some.numpy(), a.numpy()[order], rtol=1e-6, atol=1e-5)
  # The same pixels from uint8 or from floats of the same grey levels.
  np.testing.assert_array_equal(A.augment(tf.cast(patches, tf.float32), keys(12, 9)).numpy(), a.numpy())


def test_keyed_uniforms_are_uniform_and_independent():
  k = keys(4000, 3)
  draws = A.uniform(k, A.STREAM_NOISE, 64).numpy()
  assert draws.min() >= 0 and draws.max() < 1
  np.testing.assert_allclose(draws.mean(), 0.5, atol=0.002)
  np.testing.assert_allclose(draws.var(), 1 / 12, rtol=0.01)
  np.testing.assert_allclose(np.histogram(draws, 16, (0, 1))[0] / draws.size, 1 / 16, atol=0.0015)
  # Neighbouring values of a patch, the same value of two patches and two streams of a patch are uncorrelated.
  centred = draws - 0.5
  for a, b in [(centred[:, :-1], centred[:, 1:]), (centred[:-1], centred[1:]),
               (centred, A.uniform(k, A.STREAM_PIXELATION, 64).numpy() - 0.5)]:
    assert abs(np.mean(a * b)) / (1 / 12) < 0.01
  # Per image: one value for every patch of an image, different between images.
  shared = A.uniform(tf.concat([k[:3], keys(2, 4)], 0), A.STREAM_NOISE, 5, per_image=True).numpy()
  assert (shared[:3] == shared[0]).all() and (shared[3:] == shared[3]).all() and not (shared[0] == shared[3]).all()


def test_largest_grid_bounds():
  assert P.max_grid_cells() >= 16 and P.max_grid_pairs() >= P.num_grid_pairs(4, 4)
  assert not P.can_hold_grid(100, 2000) and P.can_hold_grid(100, 100)


# ------------------------------------------------------------------------------------------------------------
# The revisiting geometry (method.md §8.2)


@pytest.mark.parametrize("seed", range(6))
def test_revisiting_patches_lie_in_their_cells_and_pairs_point_the_right_way(seed):
  """A 292x292 image holding its own coordinates (the resize is then the identity): every patch lies inside the
  255 crop, inside its own 85-px cell, at an offset of 0-21 px in it; each pair's label is where the second patch
  (the centre) lies seen from the first."""
  size = P.REVISITING_RESIZE
  y, x = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
  # uint8, as training cuts it: the low bytes of the row and column, and their high bits in channel 2.
  image = np.stack([y % 256, x % 256, 2 * (y // 256) + x // 256], -1).astype(np.uint8)
  cut = P.cut_revisiting(tf.constant(image), tf.constant([seed, 3], tf.int64))
  assert cut["patches"].dtype == tf.uint8
  patches = cut["patches"].numpy().astype(np.int64)
  patches = np.stack([patches[..., 0] + 256 * (patches[..., 2] // 2), patches[..., 1] + 256 * (patches[..., 2] % 2)],
                     -1)
  assert patches.shape == (9, 64, 64, 2) and bool(cut["usable"])
  assert cut["grid_height"].numpy().tolist() == cut["grid_width"].numpy().tolist() == [3]
  ys, xs = patches[:, 0, 0, 0], patches[:, 0, 0, 1]
  np.testing.assert_array_equal(patches[:, -1, -1, 0], ys + 63)
  np.testing.assert_array_equal(patches[:, -1, -1, 1], xs + 63)
  rows, cols = np.arange(9) // 3, np.arange(9) % 3
  for corner, index in ((ys, rows), (xs, cols)):
    # Some crop offset in [0, 37] puts every patch at 0-21 px into its cell: the range it can have is not empty.
    in_cell = corner - index * P.REVISITING_CELL
    lowest = max(0, int(np.max(in_cell)) - P.REVISITING_JITTER)
    assert lowest <= min(int(np.min(in_cell)), P.REVISITING_RESIZE - P.REVISITING_CROP)
  first, second, label = (t.numpy() for t in P.revisiting_pairs())
  assert (second == 4).all() and sorted(first) == [0, 1, 2, 3, 5, 6, 7, 8]
  for a, b, lbl in zip(first, second, label):
    dx, dy = P.NEIGHBOUR_OFFSETS[lbl]
    for d, e in ((xs[b] - xs[a], dx), (ys[b] - ys[a], dy)):
      if e == 0:
        assert abs(d) <= P.REVISITING_JITTER
      else:  # a cell apart, give or take the offsets: the gap between the patches is 0-42 px
        assert np.sign(d) == e and P.REVISITING_PATCH <= abs(d) <= P.REVISITING_CELL + P.REVISITING_JITTER


def test_revisiting_offsets_cover_their_range():
  """The top-left patch's corner is the crop's offset (0-37) plus its cell offset (0-21): both ends are reached."""
  seeds = tf.stack([tf.range(400, dtype=tf.int64), tf.zeros([400], tf.int64)], 1)
  corners = tf.function(lambda s: tf.map_fn(lambda seed: P.revisiting_corners(seed)[0][0], s,
                                            fn_output_signature=tf.int32))(seeds).numpy()
  assert corners.min() <= 2 and corners.max() >= P.REVISITING_RESIZE - P.REVISITING_CROP + P.REVISITING_JITTER - 2


def test_revisiting_augment_grays_whole_images_and_standardises_each_patch():
  rng = np.random.default_rng(6)
  patches = tf.constant(rng.uniform(0, 255, (9, 64, 64, 3)).astype(np.float32))
  # 200 images of the same 9 patches, each image with its own keys.
  keys = tf.concat([A.patch_keys(tf.constant([i, 1], tf.int64), 9) for i in range(200)], 0)
  small = tf.tile(patches[:, :4, :4], [200, 1, 1, 1])
  outputs = A.revisiting_augment(small, keys).numpy().reshape(200, 9, 4, 4, 3)
  gray = np.abs(outputs[..., 0] - outputs[..., 1]).max(axis=(2, 3)) < 1e-5  # [image, patch]
  assert np.all(gray.all(1) | ~gray.any(1)), "one draw per image"
  assert 0.58 < gray[:, 0].mean() < 0.74
  # Each patch depends on its pixels and key only: alone, or with padding zeroed.
  np.testing.assert_array_equal(A.revisiting_augment(small[9:18], keys[9:18]).numpy(), outputs[1])
  padded = A.revisiting_augment(small[:12], keys[:12], valid=tf.range(12) < 9).numpy()
  np.testing.assert_array_equal(padded[:9], outputs[0])
  assert not padded[9:].any()
  out = A.revisiting_augment(patches, A.patch_keys(tf.constant([0, 1], tf.int64), 9)).numpy()
  np.testing.assert_allclose(out.mean(axis=(1, 2, 3)), 0, atol=1e-5)
  np.testing.assert_allclose(out.std(axis=(1, 2, 3)), 1, rtol=1e-4)
  # The grayscale is the mean of R, G and B, as theirs.
  chosen = A.grayscale(patches, tf.constant([True] + [False] * 8)).numpy()
  np.testing.assert_allclose(chosen[0, ..., 2], patches.numpy()[0].mean(-1), rtol=1e-6)
  np.testing.assert_array_equal(chosen[1:], patches.numpy()[1:])
  # Inference: the same standardisation without the random grayscale.
  np.testing.assert_allclose(A.standardize(patches, A.STANDARDIZATION).numpy(),
                             tf.image.per_image_standardization(patches).numpy())
