"""The input pipeline: sources, decoding, packing into static-shape batches, counting what is skipped."""
import os

import numpy as np
import pytest
import tensorflow as tf

from context_keras import data as D
from context_keras import decoding as DEC
from context_keras import errors
from context_keras import patches as P
from context_keras import sources as S
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
    assert all(pairs[(b, a)] == opposite[l] for (a, b), l in pairs.items())
    # Patches are RMS-normalised to 50 (method.md §2.4); padding is zero.
    patches = batch["patches"].numpy()
    np.testing.assert_allclose(np.sqrt((patches[:n] ** 2).mean(axis=(1, 2, 3))), 50, rtol=1e-3)
    assert not patches[n:].any()


def test_same_seed_same_batches_and_exact_resume(demo_list, photo_dir):
  config = D.InputConfig(data=demo_list, data_root=photo_dir, **SMALL)
  first_run = list(D.make_dataset(config).take(6))
  again = list(D.make_dataset(config).take(6))
  for a, b in zip(first_run, again):
    np.testing.assert_array_equal(a["patches"].numpy(), b["patches"].numpy())
  other = next(iter(D.make_dataset(D.InputConfig(data=demo_list, data_root=photo_dir, seed=1, **SMALL))))
  assert not np.array_equal(other["patches"].numpy(), first_run[0]["patches"].numpy())
  # Starting at a batch's resume position continues with exactly the batches that followed it.
  start = tuple(int(v) for v in first_run[2]["resume"].numpy())
  resumed = list(D.make_dataset(config, start=start).take(3))
  for a, b in zip(first_run[3:], resumed):
    np.testing.assert_array_equal(a["patches"].numpy(), b["patches"].numpy())
    np.testing.assert_array_equal(a["label"].numpy(), b["label"].numpy())


def test_pipelines_share_the_stream_without_overlap(tiny_image_dir):
  source = S.find_source(str(tiny_image_dir))
  seen = []
  for pipeline in range(2):
    names = S.training_images(source, seed=3, shuffle_buffer=1, pipeline_id=pipeline, num_pipelines=2)
    seen.append([bytes(x.numpy()[:64]) + bytes(x.numpy()[-64:]) for x in names.take(3)])
  # Three files, two pipelines: the first epoch is split between them, none read by both.
  assert len(set(seen[0][:1] + seen[1][:1])) == 2


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
