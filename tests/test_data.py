"""The input pipeline: sources, decoding, packing into static-shape batches, counting what is skipped; the lean host
path (uint8 patches, reduced JPEG decoding) and augmentation on the host or in the step."""
import dataclasses
import io
import os

import numpy as np
import pytest
import tensorflow as tf

from context_keras import errors
from context_keras.input import augment as A
from context_keras.input import decoding as DEC
from context_keras.input import patches as P
from context_keras.input import pipeline as D
from context_keras.input import sources as S
from helpers import write_png

SMALL = dict(batch_patches=64, batch_pairs=320)


def test_folder_listing_recursive_any_case(tiny_image_dir):
  (tiny_image_dir / "notes.txt").write_text("not an image")
  (tiny_image_dir / "a" / "loop").symlink_to(tiny_image_dir, target_is_directory=True)
  source = S.find_source(str(tiny_image_dir))
  assert source.kind == "files"
  assert [os.path.relpath(p, tiny_image_dir) for p in source.paths] == ["a/b/three.Png", "a/two.PNG", "one.png"]


def test_list_file_relative_to_root_or_list_folder(tmp_path, photo_dir):
  listing = tmp_path / "train.txt"
  listing.write_text("astronaut.png 0\n\ncoffee.png 7 extra\n")
  source = S.find_source(str(listing), data_root=photo_dir)
  assert source.paths == (os.path.join(photo_dir, "astronaut.png"), os.path.join(photo_dir, "coffee.png"))
  source = S.find_source(str(listing))
  assert source.paths[0] == str(tmp_path / "astronaut.png")


def test_package_paths(photo_dir):
  assert S.resolve_path("package:skimage.data") == photo_dir
  with pytest.raises(errors.DataError, match="no installed Python package"):
    S.resolve_path("package:no_such_package_here")


@pytest.mark.slow
def test_tfrecord_source_yields_batches(tmp_path, photo_dir):
  shard = str(tmp_path / "train-00000.tfrecord")
  with tf.io.TFRecordWriter(shard) as writer:
    for name in ("astronaut.png", "coffee.png", "chelsea.png"):
      contents = open(os.path.join(photo_dir, name), "rb").read()
      feature = {S.TFRECORD_IMAGE_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[contents]))}
      writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
  source = S.find_source(str(tmp_path / "train-*.tfrecord"))
  assert source.kind == "tfrecord" and len(source.paths) == 1
  S.check_readable(source)
  batch = next(iter(D.make_dataset(D.InputConfig(data=shard, **SMALL), source)))
  assert batch["patch_mask"].numpy().sum() > 0


@pytest.mark.parametrize("make, message", [
    (lambda p: str(p / "missing"), "does not exist"),
    (lambda p: (p / "empty").mkdir() or str(p / "empty"), "holds no"),
    (lambda p: (p / "list.txt").write_text("\n# nothing\n") and str(p / "list.txt"), "names no image"),
    (lambda p: str(p / "*.tfrecord"), "no TFRecord shard"),
])
def test_bad_data_names_the_path(tmp_path, make, message):
  data = make(tmp_path)
  with pytest.raises(errors.DataError, match=message) as info:
    S.find_source(data)
  assert data in str(info.value)


def test_no_readable_image_stops_at_start(tmp_path):
  (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
  (tmp_path / "text.png").write_text("hello")
  write_png(str(tmp_path / "thin.png"), np.zeros((10, 500, 3), np.uint8))
  with pytest.raises(errors.DataError, match="none of the 3 images") as info:
    S.check_readable(S.find_source(str(tmp_path)))
  assert str(tmp_path) in str(info.value)


@pytest.mark.slow
def test_batches_static_shapes_and_valid_pairs(demo_list, photo_dir):
  config = D.InputConfig(data=demo_list, data_root=photo_dir, **SMALL)
  for batch in D.make_dataset(config).take(4):
    assert batch["patches"].shape == (64, 96, 96, 3)
    assert batch["first"].shape == batch["label"].shape == (320,)
    patch_mask, pair_mask = batch["patch_mask"].numpy(), batch["pair_mask"].numpy()
    n, m = patch_mask.sum(), pair_mask.sum()
    assert patch_mask[:n].all() and not patch_mask[n:].any(), "padding comes last"
    assert pair_mask[:m].all() and m > 3 * n
    first, second = batch["first"].numpy()[:m], batch["second"].numpy()[:m]
    assert first.max() < n and second.max() < n
    labels = batch["label"].numpy()[:m]
    assert set(labels) == set(range(8))
    # Every ordered pair appears with its reverse, carrying the opposite label.
    opposite = {i: P.NEIGHBOUR_OFFSETS.index((-dx, -dy)) for i, (dx, dy) in enumerate(P.NEIGHBOUR_OFFSETS)}
    pairs = dict(zip(zip(first, second), labels))
    assert all(pairs[(b, a)] == opposite[label] for (a, b), label in pairs.items())
    # Patches are RMS-normalised to 50 (method.md §2.4); padding is zero.
    patches = batch["patches"].numpy()
    np.testing.assert_allclose(np.sqrt((patches[:n] ** 2).mean(axis=(1, 2, 3))), 50, rtol=1e-3)
    assert not patches[n:].any()


@pytest.mark.slow
def test_same_seed_same_batches_and_exact_resume(demo_list, photo_dir):
  """In device mode, whose batches carry each patch's uint8 pixels and augmentation key: the host mode's batches are
  these augmented (test_device_mode_batches_hold_uint8_patches_and_their_keys), so they resume as exactly."""
  config = D.InputConfig(data=demo_list, data_root=photo_dir, augment_on="device", **SMALL)
  first_run = list(D.make_dataset(config).take(5))
  again = list(D.make_dataset(config).take(2))
  for a, b in zip(first_run, again):
    for key in ("patches", "patch_keys", "label"):
      np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())
  other = next(iter(D.make_dataset(dataclasses.replace(config, seed=1))))
  assert not np.array_equal(other["patches"].numpy(), first_run[0]["patches"].numpy())
  # Starting at a batch's resume position continues with exactly the batches that followed it.
  start = tuple(int(v) for v in first_run[1]["resume"].numpy())
  resumed = list(D.make_dataset(config, start=start).take(3))
  for a, b in zip(first_run[2:], resumed):
    for key in ("patches", "patch_keys", "label"):
      np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())


@pytest.mark.slow
def test_batches_that_hold_one_grid_each_resume_exactly(demo_list, photo_dir):
  """At the smallest capacity (the largest grid), one image's grids fill several batches, which the packer (one image
  per step) completes in one step: each batch holds whole grids, its pairs inside its own patches, and starting at
  a resume position inside an image continues with exactly the batches that followed."""
  cells, pairs = P.max_grid_cells(), P.max_grid_pairs()
  config = D.InputConfig(data=demo_list, data_root=photo_dir, augment_on="device", batch_patches=cells,
                         batch_pairs=pairs)
  run = list(D.make_dataset(config).take(8))
  resumes = [tuple(int(v) for v in b["resume"].numpy()) for b in run]
  # Batches i and i + 1 both end inside image resumes[i][0]: that image's grids went into at least three batches.
  inside = [i for i in range(len(run) - 3) if resumes[i][1] > 0 and resumes[i + 1][0] == resumes[i][0]]
  assert inside, f"no image filled several batches: {resumes}"
  for batch in run:
    n, m = int(batch["patch_mask"].numpy().sum()), int(batch["pair_mask"].numpy().sum())
    assert 0 < n <= cells and 0 < m <= pairs
    assert batch["first"].numpy()[:m].max() < n and batch["second"].numpy()[:m].max() < n
  i = inside[0]
  resumed = list(D.make_dataset(config, start=resumes[i]).take(3))
  for a, b in zip(run[i + 1:], resumed):
    for key in ("patches", "patch_keys", "first", "second", "label", "resume"):
      np.testing.assert_array_equal(a[key].numpy(), b[key].numpy(), err_msg=f"{key} after batch {i}")


def test_pipelines_share_the_stream_without_overlap(tiny_image_dir):
  source = S.find_source(str(tiny_image_dir))
  seen = []
  for pipeline in range(2):
    names = S.training_images(source, seed=3, shuffle_buffer=1, pipeline_id=pipeline, num_pipelines=2)
    seen.append([x["path"].numpy() for x in names.take(3)])
  # Three files, two pipelines: the first epoch is split between them, none read by both.
  assert len(set(seen[0][:1] + seen[1][:1])) == 2


@pytest.mark.slow
def test_broken_and_small_images_are_skipped_and_counted(tmp_path, photo_dir):
  for name in ("astronaut.png", "coffee.png"):
    (tmp_path / name).write_bytes(open(os.path.join(photo_dir, name), "rb").read())
  (tmp_path / "zero.jpg").write_bytes(b"")
  (tmp_path / "text.jpg").write_text("definitely not a jpeg")
  good = open(os.path.join(photo_dir, "chelsea.png"), "rb").read()
  (tmp_path / "truncated.png").write_bytes(good[:len(good) // 3])
  write_png(str(tmp_path / "thin.png"), np.zeros((20, 1000, 3), np.uint8))  # too elongated for any grid
  config = D.InputConfig(data=str(tmp_path), **SMALL)
  totals = {"images": 0, "too_small": 0, "unreadable": 0}
  for batch in D.make_dataset(config).take(30):
    for k in totals:
      totals[k] += int(batch[k])
  # 6 files per epoch: 2 good, 3 unreadable, 1 too small; the ratios hold over the batches.
  assert totals["images"] > 10
  assert totals["unreadable"] == pytest.approx(1.5 * totals["images"], abs=4)
  assert totals["too_small"] == pytest.approx(0.5 * totals["images"], abs=3)


def test_decode_formats(tmp_path):
  from PIL import Image  # test extra
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
  cases = {"grey.png": Image.fromarray(rgb[..., 0]), "rgba.png": Image.fromarray(np.dstack([rgb, rgb[..., :1]])),
           "palette.gif": Image.fromarray(rgb).convert("P"), "photo.webp": Image.fromarray(rgb),
           "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"), "bitmap.bmp": Image.fromarray(rgb)}
  for name, image in cases.items():
    image.save(tmp_path / name)
    decoded = DEC.decode(tf.io.read_file(str(tmp_path / name)))
    assert decoded.shape == (30, 40, 3), name
  grey = DEC.decode(tf.io.read_file(str(tmp_path / "grey.png"))).numpy()
  assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()


def test_capacity_must_hold_the_largest_grid():
  with pytest.raises(ValueError, match="batch_patches"):
    D.InputConfig(data="x", batch_patches=8)
  with pytest.raises(ValueError, match="batch_pairs"):
    D.InputConfig(data="x", batch_pairs=40)


@pytest.mark.slow
def test_revisiting_batches_hold_whole_images_and_resume_exactly(tiny_image_dir):
  """The revisiting geometry through the same packer: every batch holds floor(min(patches/9, pairs/8)) images of 9
  standardised 64-px patches and their 8 (neighbour, centre) pairs; it counts images and resumes exactly. Any
  decodable image holds the geometry: an elongated one the doersch geometry refuses is used."""
  write_png(tiny_image_dir / "long.png", np.full((20, 600, 3), 7, np.uint8))
  config = D.InputConfig(data=str(tiny_image_dir), geometry="revisiting", batch_patches=40, batch_pairs=36)
  assert config.images_per_batch == 4 and config.patch_size == 64
  batches = list(D.make_dataset(config).take(4))
  first, second, label = (t.numpy() for t in P.revisiting_pairs())
  for batch in batches:
    assert batch["patches"].shape == (40, 64, 64, 3) and int(batch["images"]) == 4
    assert int(batch["too_small"]) == int(batch["unreadable"]) == 0
    assert batch["patch_mask"].numpy().sum() == 36 and batch["pair_mask"].numpy().sum() == 32
    offsets = np.repeat(np.arange(4) * 9, 8)
    np.testing.assert_array_equal(batch["first"].numpy()[:32], np.tile(first, 4) + offsets)
    np.testing.assert_array_equal(batch["second"].numpy()[:32], np.tile(second, 4) + offsets)
    np.testing.assert_array_equal(batch["label"].numpy()[:32], np.tile(label, 4))
    std = batch["patches"].numpy()[:36].std(axis=(1, 2, 3))
    assert np.all((np.abs(std - 1) < 1e-3) | (std == 0))  # a constant patch stays 0
  assert [int(b["resume"][0]) for b in batches] == [4, 8, 12, 16]
  resumed = list(D.make_dataset(config, start=tuple(int(v) for v in batches[1]["resume"].numpy())).take(2))
  for a, b in zip(batches[2:], resumed):
    np.testing.assert_array_equal(a["patches"].numpy(), b["patches"].numpy())
  with pytest.raises(ValueError, match="batch_pairs"):
    D.InputConfig(data="x", geometry="revisiting", batch_patches=9, batch_pairs=7)


# ------------------------------------------------------------------------------------------------------------
# The lean host path: uint8 patches, resizing in uint8, reduced JPEG decoding


def float_path_patches(image, seed):
  """The patches the host path cut before --augment_on (same seeds): a float32 copy of the whole image, resized and
  cut in float."""
  resize_seed, grid_seed, _ = tf.unstack(P.split_seed(seed, 3))
  height, width = P.resized_shape(tf.shape(image)[0], tf.shape(image)[1], P.resize_target(resize_seed))
  resized = tf.image.resize(tf.cast(image, tf.float32), tf.stack([height, width]), antialias=False)
  ys, xs, _, _ = P.sample_grids(grid_seed, height, width)
  return P.crop_patches(resized, ys, xs).numpy()


def test_uint8_patches_carry_the_pixels_of_the_float_path(photo_dir):
  differences = []
  for i, name in enumerate(("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg")):
    contents = tf.io.read_file(os.path.join(photo_dir, name))
    seed = tf.constant([i, 5], tf.int64)
    cut = D.image_grids(contents, seed)
    assert cut["patches"].dtype == tf.uint8 and cut["patch_keys"].shape == (cut["patches"].shape[0], 3)
    before = float_path_patches(DEC.decode(contents), seed)
    # Exactly the float path's pixels, rounded: the same geometry, within half a grey level.
    np.testing.assert_array_equal(cut["patches"].numpy(), np.round(before).astype(np.uint8))
    differences.append(np.abs(cut["patches"].numpy() - before).mean())
  assert max(differences) < 0.26  # rounding: a quarter of a grey level on average
  # Augmentation takes the uint8 patches as floats of the same grey levels.
  keys = cut["patch_keys"]
  np.testing.assert_array_equal(A.augment(cut["patches"], keys).numpy(),
                                A.augment(tf.cast(cut["patches"], tf.float32), keys).numpy())


def test_uint8_resize_is_the_float_resize_rounded():
  image = tf.constant(np.random.default_rng(7).integers(0, 256, (1500, 1400, 3), dtype=np.uint8))
  # Larger than FLOAT_RESIZE_MAX_PIXELS: resized from uint8, with no float copy; the same numbers.
  assert 1500 * 1400 > P.FLOAT_RESIZE_MAX_PIXELS
  for size in ((300, 280), (1700, 1600)):
    expected = tf.image.resize(tf.cast(image, tf.float32), size, antialias=False).numpy()
    np.testing.assert_array_equal(P.resize_uint8(image, *size).numpy(), np.round(expected).astype(np.uint8))


def big_jpeg(photo_dir, name, scale, mode=None, progressive=False):
  """A sample photo upscaled (bicubic) and encoded as a JPEG, as a stand-in for a camera's large photo."""
  from PIL import Image  # test extra
  image = Image.open(os.path.join(photo_dir, name)).convert("RGB")
  image = image.resize((image.width * scale, image.height * scale), Image.BICUBIC)
  image = image.convert(mode) if mode else image
  buffer = io.BytesIO()
  image.save(buffer, "JPEG", quality=90, progressive=progressive)
  return buffer.getvalue()


@pytest.mark.slow  # in-process, but among the fast tier's slowest (docs/testing.md)
def test_large_jpegs_are_decoded_reduced(photo_dir):
  contents = big_jpeg(photo_dir, "astronaut.png", 4)  # 2048 x 2048
  full = DEC.decode(contents)
  # (target pixels, the ratio that keeps at least that many, the largest mean difference from the full decode)
  for target, ratio, within in ((1_048_577, 1, 0.5), (1_048_576, 2, 1.0), (450_000, 2, 1.0), (262_145, 2, 1.0),
                                (262_144, 4, 1.5)):
    reduced = DEC.decode(contents, target_pixels=target)
    assert reduced.shape == (2048 // ratio, 2048 // ratio, 3), target
    # Resized to the target, a decode at half size gives the pixels of the full one within a grey level on average
    # (0.7 here); at a quarter somewhat more, because libjpeg averages 4x4 pixels where the full decode's resize,
    # without anti-aliasing (method.md §1.2), samples one of them.
    side = int(target ** 0.5)
    expected = tf.image.resize(tf.cast(full, tf.float32), (side, side), antialias=False).numpy()
    got = P.resize_uint8(reduced, side, side).numpy()
    assert np.abs(got - expected).mean() < within, target
  # Grey and CMYK JPEGs too; other formats are decoded at full size.
  for mode in ("L", "CMYK"):
    assert DEC.decode(big_jpeg(photo_dir, "coffee.png", 3, mode), target_pixels=150_000).shape == (600, 900, 3)
  png = tf.io.encode_png(full)
  assert DEC.decode(png, target_pixels=150_000).shape == (2048, 2048, 3)


@pytest.mark.slow
def test_large_decodes_leave_the_parallel_stage_and_give_the_same_grids(photo_dir):
  """A large PNG (no reduced decoding) and a large progressive JPEG (libjpeg holds its coefficients at full size) are
  decoded in the one-at-a-time stage, a baseline JPEG of the same size in the parallel one, each told from its
  header; every image's grids are image_grids's, in stream order, a corrupt one an error element skipped in place."""
  jpeg = big_jpeg(photo_dir, "astronaut.png", 4)  # 2048 x 2048 = 4.2 MP, decoded at 1/2 or 1/4
  progressive = big_jpeg(photo_dir, "astronaut.png", 4, progressive=True)
  png = tf.io.encode_png(DEC.decode(jpeg)).numpy()
  small = tf.io.encode_png(DEC.decode(jpeg, target_pixels=150_000)[:500]).numpy()  # 500 x 512
  stream = [small, png, b"\x89PNG corrupt", jpeg, png, progressive, small]
  base_seed = tf.constant([3, 0], tf.int64)
  seeds = [tf.random.experimental.stateless_fold_in(base_seed, tf.constant(i, tf.int64)) for i in range(len(stream))]
  target = P.resize_target(P.split_seed(seeds[1], 3)[0])
  assert int(DEC.decoded_pixels(png, target)) == 2048 * 2048 > D.PARALLEL_DECODE_MAX_PIXELS
  assert int(D.decoded_pixels(png, seeds[1])) == 2048 * 2048
  assert int(D.decoded_pixels(progressive, seeds[5])) == 2 * 2048 * 2048
  assert 0 < int(D.decoded_pixels(jpeg, seeds[3])) <= D.PARALLEL_DECODE_MAX_PIXELS
  height, width, _ = DEC.decode(jpeg, target).shape  # reduced, as decoded_pixels predicts
  assert int(DEC.decoded_pixels(jpeg, target)) == height * width < 2048 * 2048 // 2
  assert int(D.decoded_pixels(small, seeds[0])) == 500 * 512
  out = list(D.grids_of_images(tf.data.Dataset.from_tensor_slices(stream), base_seed).ignore_errors())
  assert [int(index) for index, _ in out] == [0, 1, 3, 4, 5, 6]
  for index, grids in out:
    expected = D.image_grids(stream[int(index)], seeds[int(index)])
    assert set(grids) == set(expected)
    for key in expected:
      np.testing.assert_array_equal(grids[key].numpy(), expected[key].numpy(), err_msg=f"{key} of image {index}")
  assert all(bool(grids["usable"]) and grids["patches"].shape[0] > 0 for _, grids in out)


# ------------------------------------------------------------------------------------------------------------
# Augmentation on the host or in the step: the same pixels


@pytest.fixture(scope="module")
def raw_and_host_batches(demo_list, photo_dir):
  """The first batch of the demo photos as the pipeline gives it with --augment_on=device and with host."""
  config = D.InputConfig(data=demo_list, data_root=photo_dir, **SMALL)
  raw = next(iter(D.make_dataset(dataclasses.replace(config, augment_on="device"))))
  return config, raw, next(iter(D.make_dataset(config)))


@pytest.mark.slow
def test_device_mode_batches_hold_uint8_patches_and_their_keys(raw_and_host_batches):
  config, raw, host = raw_and_host_batches
  assert raw["patches"].dtype == tf.uint8 and raw["patch_keys"].dtype == tf.uint32
  assert host["patches"].dtype == tf.float32
  for key in ("first", "second", "label", "patch_mask", "pair_mask", "resume"):
    np.testing.assert_array_equal(raw[key].numpy(), host[key].numpy())
  # The step's augmentation of the device-mode batch is the host pipeline's batch.
  device = tf.function(D.step_augmentation(dataclasses.replace(config, augment_on="device")))(raw)
  np.testing.assert_array_equal(device["patches"].numpy(), host["patches"].numpy())


# chroma_blur: tests/test_shortcuts.py, with the other fixes of method.md §9.
@pytest.mark.slow
@pytest.mark.parametrize("color_mode", [mode for mode in A.COLOR_MODES if mode != "chroma_blur"])
@pytest.mark.parametrize("pixelation", [True, False])
def test_device_and_host_augmentation_are_equal_patch_for_patch(raw_and_host_batches, color_mode, pixelation):
  config, raw, _ = raw_and_host_batches
  config = dataclasses.replace(config, color_mode=color_mode, pixelation=pixelation)
  # The host mode's map, in tf.data, as make_dataset applies it.
  host = next(iter(tf.data.Dataset.from_tensors(raw).map(lambda batch: D.augment_batch(batch, config))))
  device_config = dataclasses.replace(config, augment_on="device")
  # In a compiled function as in the step: on a CPU (only the pixelated third resampled), on a GPU (static
  # shapes), and under XLA (--jit_compile) for one configuration only, which compiles slowly.
  variants = [(False, False), (True, False)] + ([(True, True)] if color_mode == "drop_gaussian" and pixelation else [])
  n = int(raw["patch_mask"].numpy().sum())
  for static_shapes, jit in variants:
    step = tf.function(lambda batch: D.augment_batch(batch, device_config, static_shapes), jit_compile=jit)
    device = step(raw)["patches"].numpy()
    # Within 1e-5 of the patches' scale (RMS 50): float32 sums in another order (XLA's) move the mean and RMS of
    # a patch by about 1e-7 of them. Without XLA the two are bit for bit the same here.
    np.testing.assert_allclose(device[:n], host["patches"].numpy()[:n], rtol=0, atol=1e-5 * A.RMS_TARGET,
                               err_msg=f"static_shapes={static_shapes} jit={jit}")
    assert not device[n:].any() and not host["patches"].numpy()[n:].any(), "padding stays zero"


@pytest.mark.slow
def test_revisiting_device_and_host_augmentation_are_equal_patch_for_patch(demo_list, photo_dir):
  """The revisiting geometry in both modes: the device mode's batches hold the uint8 64-px patches and their keys,
  and the step's augmentation of them is the host pipeline's batch; grayscale is drawn once per image."""
  config = D.InputConfig(data=demo_list, data_root=photo_dir, geometry="revisiting", batch_patches=40, batch_pairs=36)
  device_config = dataclasses.replace(config, augment_on="device")
  step = tf.function(D.step_augmentation(device_config))
  gray = []
  for raw, host in zip(D.make_dataset(device_config).take(3), D.make_dataset(config).take(3)):
    assert raw["patches"].dtype == tf.uint8 and raw["patches"].shape == (40, 64, 64, 3)
    for key in ("first", "second", "label", "patch_mask", "pair_mask", "resume"):
      np.testing.assert_array_equal(raw[key].numpy(), host[key].numpy())
    device, expected = step(raw)["patches"].numpy(), host["patches"].numpy()
    np.testing.assert_allclose(device[:36], expected[:36], rtol=0, atol=1e-5)
    assert not device[36:].any() and not expected[36:].any(), "padding stays zero"
    gray.append(np.all(device[:36] == device[:36, :, :, :1], axis=(1, 2, 3)).reshape(4, 9))
  gray = np.concatenate(gray)
  assert np.all(gray == gray[:, :1]), "all the patches of an image are gray, or none"
  assert gray[:, 0].any() and not gray[:, 0].all()


# Ops that TensorFlow's oneDNN graph rewrite inspects by dtype: for any but these, where oneDNN is on (CPUs with
# AVX-512 VNNI/BF16 or AMX, or TF_ENABLE_ONEDNN_OPTS=1) it logs an error-level line into every run that builds the
# graph, "oneDNN supports DT_UINT8 only on platforms with AVX-512" (docs/method.md §4.2).
ONEDNN_CHECKED_OPS = {"Transpose", "ConjugateTranspose", "MatMul", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3",
                      "Einsum"}
ONEDNN_QUIET_TYPES = {tf.float32.as_datatype_enum, tf.float64.as_datatype_enum}


def onednn_complaints(graph_def):
  """(op, dtype) of every node of the graph and its function library that oneDNN's rewrite would log about."""
  nodes = list(graph_def.node) + [n for function in graph_def.library.function for n in function.node_def]
  return {(n.op, tf.as_dtype(n.attr["T"].type).name) for n in nodes
          if n.op in ONEDNN_CHECKED_OPS and n.attr["T"].type not in ONEDNN_QUIET_TYPES}


@pytest.mark.slow  # 9 CPU-seconds of tracing
def test_input_and_evaluation_graphs_hold_no_op_that_onednn_logs_about(tiny_image_dir):
  """Decoding (EXIF orientations 5-8 transpose), the grid transforms (--rotation_classes, --flip_relabel), the
  augmentations and the evaluation's patch grids move uint8 pixels with gathers and slices, not Transpose."""
  from context_keras.evaluation import features  # pylint: disable=import-outside-toplevel
  from context_keras.evaluation import pretext  # pylint: disable=import-outside-toplevel
  images = tf.data.Dataset.from_tensor_slices([str(p) for p in sorted(tiny_image_dir.rglob("*.*"))]).map(
      tf.io.read_file)
  config = D.InputConfig(data=str(tiny_image_dir), **SMALL, rotation_classes=True, flip_relabel=True,
                         color_mode="chroma_blur", yoked_jitter=True, random_aperture=True)
  graph = tf.compat.v1.GraphDef.FromString(
      D.batches_from_images(images, config, seed=0)._as_serialized_graph().numpy())  # pylint: disable=protected-access
  assert len(graph.library.function) > 5  # the map functions and their branches are searched too
  assert not onednn_complaints(graph)
  pairs = tf.autograph.experimental.do_not_convert(
      lambda image: pretext.pretext_pairs(image, tf.constant([3, 4], tf.int64), 64, "drop", True, flip_relabel=True,
                                          rotation_classes=True)["patches"])
  traced = [tf.function(features.cut_patch_grid).get_concrete_function(tf.TensorSpec([None, 99, 99, 3], tf.uint8)),
            tf.function(pairs).get_concrete_function(tf.TensorSpec([None, None, 3], tf.uint8))]
  for function in traced:
    assert not onednn_complaints(function.graph.as_graph_def()), function
