"""Bad input for training, prepare and evaluate: broken, odd and hostile image files, unreadable files, symlink loops,
missing files, empty folders. Each file is used, or skipped and counted, or refused with a message naming it;
nothing crashes, no decompression bomb is decoded (peak memory is measured). (The programs' refusals at start, a
one-class labelled folder and invalid flags among them, and the runs they keep intact: test_usage.py, which builds
its bad files here.)

The same bad folder goes through the training pipeline in this process and through the three programs in
subprocesses, the unreadable file only there (see test_faults.py on how permissions are honoured for root).
"""
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
from PIL import Image
from PIL import ImageOps
import pytest
import tensorflow as tf

from context_keras import errors
from context_keras import prepare as PREP
from context_keras.input import decoding as DEC
from context_keras.input import pipeline as D
from context_keras.input import sources as S
from helpers import REPO
from helpers import demo_args
from helpers import made_once
from helpers import module_env
from helpers import peak_mb
from helpers import run_all
from helpers import skimage_photo_dir

SMALL = dict(batch_patches=64, batch_pairs=320)
PEAK_RSS_LIMIT_MB = 1500  # a decoded bomb alone takes 805 MB (the WebP) or 1.2 GB (the 20000^2 PNG), as uint8

# What happens to each file of the bad folder: used for training, too small (too elongated) for a grid, or
# unreadable (skipped); and the words prepare's rejected.txt gives as the reason.
USED = ("astronaut.png", "rocket.jpg", "grey.png", "rgba.png", "palette.png", "cmyk.jpg", "animated.gif",
        "photo.webp", "sixteen_bit.png", "small.png")
TOO_SMALL = {"thin.png": "too elongated"}
UNREADABLE = {
    "corrupt.jpg": "cannot decode", "truncated.jpg": "cannot decode", "corrupt.png": "cannot decode",
    "truncated.png": "cannot decode", "empty.jpg": "empty file (0 bytes)", "text.jpg": "not an image",
    "bomb.png": "PNG header claims 30000x30000", "bomb20k.png": "PNG header claims 20000x20000",
    "bomb.jpg": "JPEG header claims 30000x30000", "bomb.webp": "WebP header claims 16383x16383",
    "bomb.gif": "GIF header claims 65535x65535", "bomb.bmp": "BMP header claims 30000x30000",
    "dangling.jpg": "missing: no such file",
}
SECRET = {"secret.jpg": "unreadable: permission denied"}  # mode 000: in the subprocesses only


# ------------------------------------------------------------------------------------------------------------
# The bad files


def _pil_bytes(image, fmt, **options):
  buffer = io.BytesIO()
  image.save(buffer, fmt, **options)
  return buffer.getvalue()


def _png_chunk(kind, body):
  return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bomb(side):
  """A real decompression bomb: a valid 1-bit grey PNG of side x side black pixels (49 KB for 20000) that decodes to
  side^2 * 3 bytes of RGB (1.2 GB for 20000; TensorFlow itself refuses 30000, whose RGB exceeds 2^31 bytes)."""
  row = b"\0" * (1 + (side + 7) // 8)
  compressor = zlib.compressobj(9)
  idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
  return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)) +
          _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b""))


def webp_bomb():
  """A real 38-byte decompression bomb: a lossless WebP of one colour (its entropy codes take no bits per pixel)
  with its header set to 16383 x 16383, WebP's largest, which decodes to 805 MB of RGB."""
  small = _pil_bytes(Image.new("RGB", (64, 48), (10, 200, 30)), "WEBP", lossless=True, method=0, quality=0)
  bits = int.from_bytes(small[21:25], "little")
  bits = (bits & ~((1 << 28) - 1)) | (16383 - 1) | ((16383 - 1) << 14)
  return small[:21] + bits.to_bytes(4, "little") + small[25:]


def jpeg_claiming(jpeg, width, height):
  """A JPEG whose frame header (SOF) claims width x height; the rest is the original's."""
  i = 2
  while i < len(jpeg):
    marker, length = jpeg[i + 1], int.from_bytes(jpeg[i + 2:i + 4], "big")
    if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
      return jpeg[:i + 5] + struct.pack(">HH", height, width) + jpeg[i + 9:]
    i += 2 + length
  raise ValueError("no SOF marker")


def write_bad_folder(folder):
  """Every kind of file of USED, TOO_SMALL and UNREADABLE, a dangling symlink and a symlink loop, in `folder`."""
  folder.mkdir(parents=True, exist_ok=True)
  photos = skimage_photo_dir()
  rocket = open(os.path.join(photos, "rocket.jpg"), "rb").read()
  astronaut = open(os.path.join(photos, "astronaut.png"), "rb").read()
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 255, (200, 300, 3), dtype=np.uint8)
  noise = rng.integers(0, 256, 4000, dtype=np.uint8).tobytes()
  gif = _pil_bytes(Image.new("P", (8, 8)), "GIF")
  bmp = _pil_bytes(Image.new("RGB", (8, 8)), "BMP")
  files = {
      "astronaut.png": astronaut, "rocket.jpg": rocket,
      "corrupt.jpg": rocket[:len(rocket) // 2] + noise + rocket[len(rocket) // 2 + len(noise):],
      "truncated.jpg": rocket[:len(rocket) // 2],
      "corrupt.png": astronaut[:len(astronaut) // 2] + noise + astronaut[len(astronaut) // 2 + len(noise):],
      "truncated.png": astronaut[:len(astronaut) // 2],
      "empty.jpg": b"", "text.jpg": b"hello, I am not a JPEG\n",
      "grey.png": _pil_bytes(Image.fromarray(rgb[..., 0]), "PNG"),
      "rgba.png": _pil_bytes(Image.fromarray(np.dstack([rgb, rgb[..., :1]])), "PNG"),
      "palette.png": _pil_bytes(Image.fromarray(rgb).convert("P"), "PNG"),
      "cmyk.jpg": _pil_bytes(Image.fromarray(rgb).convert("CMYK"), "JPEG"),
      "animated.gif": _pil_bytes(Image.fromarray(rgb).convert("P"), "GIF", save_all=True, duration=100, loop=0,
                                 append_images=[Image.fromarray(255 - rgb).convert("P")]),
      "photo.webp": _pil_bytes(Image.fromarray(rgb), "WEBP"),
      "sixteen_bit.png": tf.io.encode_png(rgb.astype(np.uint16) * 257).numpy(),
      "small.png": _pil_bytes(Image.fromarray(rgb[:30, :40]), "PNG"),  # smaller than a patch: upscaled, as always
      "thin.png": _pil_bytes(Image.fromarray(np.tile(rgb[:10], (1, 2, 1))), "PNG"),  # 600 x 10
      "bomb.png": png_bomb(30000), "bomb20k.png": png_bomb(20000), "bomb.webp": webp_bomb(),
      "bomb.jpg": jpeg_claiming(rocket, 30000, 30000),
      "bomb.gif": gif[:6] + struct.pack("<HH", 65535, 65535) + gif[10:],
      "bomb.bmp": bmp[:18] + struct.pack("<ii", 30000, 30000) + bmp[26:],
  }
  for name, contents in files.items():
    (folder / name).write_bytes(contents)
  (folder / "dangling.jpg").symlink_to("no_such_file.jpg")
  (folder / "sub").mkdir()
  (folder / "sub" / "loop").symlink_to("..", target_is_directory=True)
  return rgb


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp("bad") / "images"
  rgb = write_bad_folder(folder)
  return folder, rgb


def assert_prefix_counts(totals, per_epoch):
  """Counts over a prefix of the image stream, which visits every file once per epoch in a new order: after
  e epochs and r more images, each kind's count lies between e * its share and that plus min(share, r)."""
  epochs, rest = divmod(sum(totals.values()), sum(per_epoch.values()))
  assert epochs >= 1, totals
  for kind, share in per_epoch.items():
    assert epochs * share <= totals[kind] <= epochs * share + min(share, rest), (kind, totals, per_epoch)


# ------------------------------------------------------------------------------------------------------------
# In this process: decoding and the training pipeline


@pytest.mark.slow
def test_each_file_is_decoded_or_refused_before_decoding(bad_folder):
  folder, rgb = bad_folder
  listed = S.find_source(str(folder)).paths
  # The symlink loop is not followed twice: every file once, the dangling link included.
  assert sorted(os.path.basename(p) for p in listed) == sorted([*USED, *TOO_SMALL, *UNREADABLE])
  for name in USED + tuple(TOO_SMALL):
    contents = tf.io.read_file(str(folder / name))
    image = DEC.decode(contents)
    assert image.dtype == tf.uint8 and image.shape[2] == 3, name
    usable = D.image_grids(contents, tf.constant([0, 1], tf.int64))["usable"]
    assert bool(usable) == (name in USED), name
  decoded = {name: DEC.decode(tf.io.read_file(str(folder / name))).numpy() for name in USED}
  for name in ("rgba.png", "sixteen_bit.png"):  # alpha dropped; 16 bits scaled to 8
    np.testing.assert_array_equal(decoded[name], rgb, err_msg=name)
  assert (decoded["grey.png"] == rgb[..., :1]).all()  # grey repeated in 3 channels
  assert decoded["animated.gif"].shape == (200, 300, 3) and decoded["small.png"].shape == (30, 40, 3)
  for name in UNREADABLE:
    with pytest.raises((tf.errors.InvalidArgumentError, tf.errors.NotFoundError)) as info:
      DEC.decode(tf.io.read_file(str(folder / name)))
    if name.startswith("bomb"):
      assert "image header claims more pixels than MAX_DECODE_PIXELS" in str(info.value), name
      width, height = {"bomb20k.png": (20000, 20000), "bomb.webp": (16383, 16383),
                       "bomb.gif": (65535, 65535)}.get(name, (30000, 30000))
      assert DEC.image_size_from_header((folder / name).read_bytes())[1:] == (width, height), name


@pytest.mark.slow
def test_training_pipeline_skips_counts_and_names_bad_files(bad_folder):
  """Each batch counts the images skipped since the previous one, and carries their stream positions and reasons
  (graph code: the host names them, sources.stream_image); every pass names exactly the bad files."""
  folder, _ = bad_folder
  source = S.find_source(str(folder))
  S.check_readable(source)
  totals = {"images": 0, "too_small": 0, "unreadable": 0}
  named = []
  for batch in D.make_dataset(D.InputConfig(data=str(folder), **SMALL), source):
    n, m = int(batch["patch_mask"].numpy().sum()), int(batch["pair_mask"].numpy().sum())
    assert n > 0 and m > 0 and batch["first"].numpy()[:m].max() < n
    assert np.isfinite(batch["patches"].numpy()).all()
    for kind in totals:
      totals[kind] += int(batch[kind])
    named += [(S.stream_image(source, 0, 0, 1, int(index)), D.SKIPPED_REASONS[int(reason)])
              for index, reason in zip(batch["skipped"].numpy(), batch["skipped_reason"].numpy()) if index >= 0]
    if sum(totals.values()) >= 3 * len(source.paths):
      break
  assert_prefix_counts(totals, {"images": len(USED), "too_small": len(TOO_SMALL), "unreadable": len(UNREADABLE)})
  expected = {**{name: "unreadable" for name in UNREADABLE}, **{name: "too small for a grid" for name in TOO_SMALL}}
  assert {os.path.basename(path): reason for path, reason in named} == expected
  assert len(named) <= totals["too_small"] + totals["unreadable"] and len(named) >= 2 * len(expected)


@pytest.mark.slow
def test_list_files_naming_missing_files_empty_folders_and_loops(tmp_path, photo_dir):
  listing = tmp_path / "train.txt"
  listing.write_text("astronaut.png 0\nmissing_one.jpg 1\ncoffee.png 2\nsub/missing_two.png 3\n")
  source = S.find_source(str(listing), photo_dir)
  assert len(source.paths) == 4
  S.check_readable(source)
  totals = {"images": 0, "too_small": 0, "unreadable": 0}
  for batch in D.make_dataset(D.InputConfig(data=str(listing), data_root=photo_dir, **SMALL), source).take(25):
    for kind in totals:
      totals[kind] += int(batch[kind])
  assert_prefix_counts(totals, {"images": 2, "too_small": 0, "unreadable": 2})
  # Nothing usable: stops at start, naming the list and the first missing file.
  only_missing = tmp_path / "missing.txt"
  only_missing.write_text("gone.jpg\nalso_gone.png\n")
  with pytest.raises(errors.DataError, match=r"none of the 2 images tried can be used .*gone\.jpg; No such file") \
      as info:
    S.check_readable(S.find_source(str(only_missing)))
  assert str(only_missing) in str(info.value)
  # An empty folder, and one holding nothing but a symlink loop.
  (tmp_path / "empty").mkdir()
  (tmp_path / "loop_only" / "a").mkdir(parents=True)
  (tmp_path / "loop_only" / "a" / "loop").symlink_to("..", target_is_directory=True)
  for name in ("empty", "loop_only"):
    with pytest.raises(errors.DataError, match=f"folder {re.escape(str(tmp_path / name))} holds no jpg/jpeg/png"):
      S.find_source(str(tmp_path / name))


def test_list_file_with_a_byte_order_mark_keeps_its_first_entry(tmp_path, photo_dir):
  """Editors on Windows save UTF-8 with a byte-order mark; it must not become part of the first file name."""
  listing = tmp_path / "bom.txt"
  listing.write_bytes("\ufeffastronaut.png 0\ncoffee.png 1\n".encode("utf-8"))
  source = S.find_source(str(listing), photo_dir)
  assert source.paths == (os.path.join(photo_dir, "astronaut.png"), os.path.join(photo_dir, "coffee.png"))
  one_line = tmp_path / "one.txt"
  one_line.write_bytes(b"\xef\xbb\xbfastronaut.png\n")
  S.check_readable(S.find_source(str(one_line), photo_dir))  # used, not "none of the 1 images tried can be used"


def test_a_single_image_or_a_binary_file_as_data_is_named_as_such(tmp_path, photo_dir):
  photo = os.path.join(photo_dir, "rocket.jpg")
  with pytest.raises(errors.DataError, match=rf"{re.escape(photo)} is a single image, not a list file; give its "
                                             rf"folder \(--data={re.escape(photo_dir)}\)"):
    S.find_source(photo)
  renamed = tmp_path / "photo.dat"  # known by its content, whatever its name
  shutil.copy(photo, renamed)
  with pytest.raises(errors.DataError, match="is a single image, not a list file"):
    S.find_source(str(renamed))
  binary = tmp_path / "weights.bin"
  binary.write_bytes(bytes(range(256)) * 4)
  with pytest.raises(errors.DataError, match=rf"{re.escape(str(binary))} is not a list file \(byte 128 is not UTF-8 "
                                             r"text\): give a folder of images, a list file or a glob of TFRecord"):
    S.find_source(str(binary))
  text = tmp_path / "BMW.txt"  # a list whose first name happens to start like a BMP header is still a list
  text.write_text("BMW_at_night_with_a_long_name.png 1\nrocket.jpg 2\n")
  assert len(S.find_source(str(text), photo_dir).paths) == 2


def _write_shard(path, compression=None, images=5):
  """A shard of `images` PNGs of smooth colour ramps (a few KB each, big enough for a grid), as prepare writes them."""
  y, x = np.meshgrid(np.arange(300), np.arange(400), indexing="ij")
  with tf.io.TFRecordWriter(str(path), options=compression) as writer:
    for i in range(images):
      ramp = np.stack([x * 255 // 399, y * 255 // 299, np.full_like(x, 40 * i)], -1).astype(np.uint8)
      contents = tf.io.encode_png(ramp).numpy()
      writer.write(PREP.make_example(PREP.Outcome(contents=contents, height=300, width=400), f"{i}.png"))


@pytest.fixture(scope="module")
def shard_folder(tmp_path_factory):
  """Shards a (plain), b (a corrupt record in the middle), c (cut short), d (GZIP), e (ZLIB), 5 photos each."""
  folder = tmp_path_factory.mktemp("shards")
  for name, compression in (("a", None), ("b", None), ("c", None), ("d", "GZIP"), ("e", "ZLIB")):
    _write_shard(folder / f"{name}.tfrecord", compression)
  corrupt = bytearray((folder / "b.tfrecord").read_bytes())
  corrupt[len(corrupt) // 2] ^= 0xFF
  (folder / "b.tfrecord").write_bytes(bytes(corrupt))
  whole = (folder / "c.tfrecord").read_bytes()
  (folder / "c.tfrecord").write_bytes(whole[:len(whole) * 3 // 4])
  return folder


@pytest.mark.slow
def test_damaged_and_compressed_shards(shard_folder, capfd, caplog):
  """GZIP and ZLIB shards are read (told by their content); a corrupt or cut-short shard gives its records up to
  the damage, then counts ONE unreadable image per pass over it, in stream order (not hundreds ahead of the shuffle
  buffer), and is named once; a file that is no TFRecord at all is left out at start, named."""
  source = S.find_source(str(shard_folder / "*.tfrecord"))
  assert source.description.endswith("(GZIP/ZLIB)") and [f[0] for f in source.shards] == ["", "", "", "GZIP", "ZLIB"]
  read, damaged = 0, []
  iterator = iter(S.finite_images(source))
  while True:
    try:
      next(iterator)
      read += 1
    except StopIteration:
      break
    except tf.errors.InvalidArgumentError as e:
      damaged.append(re.search(r"TFRecord shard (\S+) is corrupt or cut short here", str(e)).group(1))
  assert damaged == [str(shard_folder / "b.tfrecord"), str(shard_folder / "c.tfrecord")]
  assert 15 + 2 <= read <= 15 + 8  # a, d, e whole; b and c up to their damage
  capfd.readouterr()
  totals = {"images": 0, "too_small": 0, "unreadable": 0}
  for batch in D.make_dataset(D.InputConfig(data=str(shard_folder / "*.tfrecord"), **SMALL), source).take(5):
    for kind in totals:
      totals[kind] += int(batch[kind])
  passes = (totals["images"] + totals["unreadable"]) / (read + 2)
  assert totals["images"] > 0 and totals["too_small"] == 0, totals
  assert totals["unreadable"] <= 2 * (passes + 2), (totals, passes)  # was 346 unreadable for 30 images
  named = capfd.readouterr().err
  for shard in ("b", "c"):
    assert named.count(f"TFRecord shard {shard_folder / shard}.tfrecord is corrupt or cut short after") == 1, named
  assert "a.tfrecord is" not in named and "d.tfrecord is" not in named and "e.tfrecord is" not in named

  (shard_folder / "notes.tfrecord").write_text("not a shard\n")
  try:
    assert S.find_source(str(shard_folder / "*.tfrecord")).paths == source.paths
    assert f"TFRecord shard {shard_folder / 'notes.tfrecord'}: not a TFRecord file" in caplog.text
  finally:
    os.remove(shard_folder / "notes.tfrecord")


def test_damaged_or_compressed_shard_sorting_first_at_start(shard_folder, tmp_path):
  """The start-up check reads past a damaged first shard, reads a GZIP one, and stops with a DataError naming the
  shard (not a DataLossError traceback) when no shard gives an image."""
  for first, name in (("b", "0_corrupt"), ("d", "0_gzip")):
    folder = tmp_path / name
    folder.mkdir()
    shutil.copy(shard_folder / f"{first}.tfrecord", folder / "0.tfrecord")
    shutil.copy(shard_folder / "a.tfrecord", folder / "1.tfrecord")
    S.check_readable(S.find_source(str(folder / "*.tfrecord")))
  broken = tmp_path / "broken"
  broken.mkdir()
  whole = (shard_folder / "a.tfrecord").read_bytes()
  first_record = 16 + int.from_bytes(whole[:8], "little")
  (broken / "0.tfrecord").write_bytes(whole[:first_record - 5])  # cut inside its first record
  (broken / "1.tfrecord").write_bytes(b"\x1f\x8b" + whole[2:40])  # a GZIP header, then nothing of GZIP
  with pytest.raises(errors.DataError, match=rf"none of the 2 images tried can be used \(first problem: "
                                             rf"{re.escape(str(broken / '0.tfrecord'))} record 0: "
                                             rf"{re.escape(str(broken / '0.tfrecord'))} is corrupt or cut short after "
                                             r"0 readable records\)"):
    S.check_readable(S.find_source(str(broken / "*.tfrecord")))
  os.remove(broken / "0.tfrecord")
  (broken / "1.tfrecord").write_bytes(b"\x1f\x8b\x08\0")
  (broken / "2.tfrecord").write_bytes(b"\x89PNG\r\n\x1a\n" + whole[:40])
  with pytest.raises(errors.DataError, match=rf"none of the 2 TFRecord shards can be read \(first problem: "
                                             rf"{re.escape(str(broken / '1.tfrecord'))}: a GZIP file cut short\)"):
    S.find_source(str(broken / "*.tfrecord"))


def test_batch_sizes_whose_step_cannot_fit_are_refused_with_the_estimate(monkeypatch):
  """The estimate of one step's memory comes from the layer shapes of the tower in use: it grows with the width
  and linearly with the batch; about 2.7 GB for flags/deepcontext.cfg (measured peak of the whole process: 3.1 GB,
  docs/speed.md); a batch beyond the memory available is refused, naming both batch flags and the estimate."""
  from context_keras.model import networks as M  # pylint: disable=import-outside-toplevel
  from context_keras.training import resources as R  # pylint: disable=import-outside-toplevel
  full, narrow = (M.build(M.ModelConfig(width_multiplier=w)) for w in (1.0, 0.0625))
  default = sum(R.step_memory(full, 511, 2560, 1, 4).values())
  assert 2.0e9 < default < 4.0e9, default
  assert sum(R.step_memory(narrow, 511, 2560, 1, 4).values()) < default / 4
  one, two = (R.step_memory(full, patches, 5 * patches, replicas, 4) for patches, replicas in ((511, 1), (1022, 1)))
  assert two["activations and their gradients"] == 2 * one["activations and their gradients"]
  assert R.step_memory(full, 511, 2560, 1, 4, activations_on_host=False)["activations and their gradients"] == 0
  monkeypatch.setattr(R, "available_memory", lambda: 2e9)
  with pytest.raises(errors.UsageError, match=r"--batch_patches=511 and --batch_pairs=2560 need about 2\.\d\d GB "
                                              r"for one training step on 1 replica\(s\) \(activations and their "
                                              r"gradients 1\.\d\d GB, input batches .* of the alexnet_bn tower\), more "
                                              r"than the 2\.00 GB of memory available here: lower both"):
    R.check_step_memory(full, D.InputConfig(data="unused"), 1, "float32", "alexnet_bn")
  R.check_step_memory(narrow, D.InputConfig(data="unused"), 1, "float32", "alexnet_bn")


@pytest.mark.slow  # builds a ResNet-50 of twice the width (94M weights)
def test_memory_estimate_covers_the_backbone_export_of_every_tower(monkeypatch):
  """Training ends (and, with --export_every, pauses) by exporting the backbone with its weights as constants, which
  takes about 22 times the tower's weights: for a wide tower that, not the step, is the peak. ResNet-50 at twice the
  width, one image per step in the revisiting geometry, peaked at 9.8 GB here (3.9 GB during its steps; method.md
  §4.5); the estimate must cover it, and refuse it where less is available, naming what to lower."""
  from context_keras.model import networks as M  # pylint: disable=import-outside-toplevel
  from context_keras.training import resources as R  # pylint: disable=import-outside-toplevel
  one_image = D.InputConfig(data="unused", geometry="revisiting", batch_patches=9, batch_pairs=8)
  wide = M.build(M.ModelConfig(backbone="resnet50", width_multiplier=2, head="revisiting", patch_size=64))
  monkeypatch.setattr(R, "available_memory", lambda: 40e9)
  needed = R.check_step_memory(wide, one_image, 1, "float32", "resnet50", width_multiplier=2.0)
  assert 8.5e9 <= needed <= 12e9, needed
  monkeypatch.setattr(R, "available_memory", lambda: 6e9)
  with pytest.raises(errors.UsageError, match=r"Invalid flags: the resnet50 tower at --width_multiplier=2\.0 needs "
                                              r"about \d+\.\d+ GB to export its backbone .* more than the 6\.00 GB of "
                                              r"memory available here: lower --width_multiplier"):
    R.check_step_memory(wide, one_image, 1, "float32", "resnet50", width_multiplier=2.0)
  # Every tower: the export's share grows with the square of the width, the step's about linearly.
  for backbone in ("alexnet_bn", "vgg16_bn", "resnet18"):
    small, double = (R.export_memory(M.build(M.ModelConfig(backbone=backbone, width_multiplier=w)))
                     for w in (0.0625, 0.125))
    assert 3 < double / small < 4.5, backbone


# ------------------------------------------------------------------------------------------------------------
# Phone photos: the EXIF orientation

# How a camera stores an upright picture U under each EXIF orientation (TIFF 6.0, tag 274): the stored pixels S
# are the inverse of the transform the tag asks for, which is what a viewer applies to show U.
STORED = {1: lambda u: u, 2: lambda u: u[:, ::-1], 3: lambda u: u[::-1, ::-1], 4: lambda u: u[::-1],
          5: lambda u: u.transpose(1, 0, 2), 6: lambda u: np.rot90(u, 1), 7: lambda u: u[::-1, ::-1].transpose(1, 0, 2),
          8: lambda u: np.rot90(u, -1)}


def _with_orientation(stored, fmt, k):
  exif = Image.Exif()
  exif[0x0112] = k
  return _pil_bytes(Image.fromarray(np.ascontiguousarray(stored)), fmt, exif=exif.tobytes(),
                    **({"quality": 95} if fmt == "JPEG" else {}))


@pytest.mark.slow
def test_exif_orientation_is_honoured_in_decoding_training_and_prepare(tmp_path):
  """A photo stored under each of the 8 EXIF orientations, as PNG (lossless) and JPEG: decoding gives the upright
  pixels (those Pillow's exif_transpose shows), training cuts the same grids from it as from the upright photo, and
  prepare records the upright size and, when it downscales, re-encodes upright."""
  upright = np.asarray(Image.open(os.path.join(skimage_photo_dir(), "chelsea.png")).convert("RGB"))  # 451 x 300
  height, width = upright.shape[:2]
  seed = tf.constant([3, 4], tf.int64)
  expected_grids = D.image_grids(_pil_bytes(Image.fromarray(upright), "PNG"), seed)
  for k, store in STORED.items():
    png = _with_orientation(store(upright), "PNG", k)
    assert DEC.image_size_from_header(png)[1:] == (width, height)[::1 if k <= 4 else -1], k  # stored sideways
    np.testing.assert_array_equal(np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(png)))), upright,
                                  err_msg=f"the test's table, orientation {k}")
    decoded = DEC.decode(png).numpy()
    np.testing.assert_array_equal(decoded, upright, err_msg=f"PNG, orientation {k}")
    grids = D.image_grids(png, seed)
    np.testing.assert_array_equal(grids["patches"].numpy(), expected_grids["patches"].numpy(), err_msg=str(k))
    # JPEG: the same decoder's stored pixels, turned upright as the tag says.
    jpeg = _with_orientation(store(upright), "JPEG", k)
    raw = tf.io.decode_image(jpeg, channels=3).numpy()
    np.testing.assert_array_equal(DEC.decode(jpeg).numpy(), np.asarray(ImageOps.exif_transpose(
        _exif_image(raw, k))), err_msg=f"JPEG, orientation {k}")
    assert np.abs(DEC.decode(jpeg).numpy().astype(int) - upright).mean() < 3, k  # and close to the photo
    for name, contents in (("png", png), ("jpg", jpeg)):
      (tmp_path / f"{k}.{name}").write_bytes(contents)
      kept = PREP.examine(str(tmp_path / f"{k}.{name}"))
      assert (kept.height, kept.width, kept.contents) == (height, width, contents), (k, name)
      if k not in (3, 6):  # a re-encoding for two of them: a rotation and a sideways one
        continue
      small = PREP.examine(str(tmp_path / f"{k}.{name}"), max_pixels=height * width // 4)
      assert small.reencoded and (small.height, small.width) == (height // 2, width // 2), (k, name)
      again = DEC.decode(small.contents).numpy()  # no orientation left in the re-encoded bytes
      assert again.shape == (height // 2, width // 2, 3)
      smaller = tf.image.resize(upright, again.shape[:2], method="area").numpy()
      assert np.abs(again - smaller).mean() < 3, (k, name)


def _exif_image(pixels, k):
  image = Image.fromarray(pixels)
  exif = Image.Exif()
  exif[0x0112] = k
  image.info["exif"] = exif.tobytes()
  return image


# ------------------------------------------------------------------------------------------------------------
# The programs, in subprocesses


def _result_json(text):
  return json.loads([line for line in text.splitlines() if line.startswith('{"mode"')][-1])


@pytest.mark.slow
def test_programs_on_the_bad_folder(bad_folder, small_run, ordinary_user, tmp_path):
  """train, prepare and evaluate (pretext, neighbors) on the bad folder plus an unreadable file, as an ordinary
  user: each finishes (exit 0), skips and counts (or lists) exactly the bad files, and stays within modest memory."""
  folder = tmp_path / "images"
  shutil.copytree(bad_folder[0], folder, symlinks=True)
  shutil.copy(folder / "rocket.jpg", folder / "secret.jpg")
  (folder / "secret.jpg").chmod(0)
  eval_args = ["--model_dir=" + str(small_run), f"--data={folder}", "--pairs_per_image=16", "--queries=4"]
  results = run_all([
      (demo_args(tmp_path / "run", f"--data={folder}", "--data_root=", "--train_steps=20", "--checkpoint_every=10"),
       ordinary_user),
      (["context_keras.prepare", f"--data={folder}", f"--output={tmp_path / 'shards'}", "--num_shards=2"],
       ordinary_user),
      (["context_keras.evaluate", "--mode=pretext", f"--eval_dir={tmp_path / 'eval'}", *eval_args], ordinary_user),
      (["context_keras.evaluate", "--mode=neighbors", f"--eval_dir={tmp_path / 'eval'}", *eval_args], ordinary_user),
  ], tmp_path, measure=True)
  for code, text in results:
    assert code == 0 and "Traceback" not in text, text[-3000:]
    assert peak_mb(text) < PEAK_RSS_LIMIT_MB, (peak_mb(text), text[-1000:])
  unreadable = {**UNREADABLE, **SECRET}
  train, prepare, pretext, neighbors = (text for _, text in results)
  print("peak memory (MB) of train, prepare, pretext, neighbors:", [peak_mb(text) for _, text in results])

  assert f"Data: folder {folder} ({len(USED) + len(TOO_SMALL) + len(unreadable)} images)" in train
  counts = re.findall(r"step 20/20 .* images (\d+) \(too small (\d+), unreadable (\d+)\)", train)
  assert counts and "Training finished at step 20." in train, train[-3000:]
  totals = dict(zip(("images", "too_small", "unreadable"), (int(c) for c in counts[-1])))
  assert_prefix_counts(totals, {"images": len(USED), "too_small": len(TOO_SMALL), "unreadable": len(unreadable)})
  # Each skipped image named once, with its reason, in RUN/skipped.txt; the first five in the log too.
  skipped = [line.split("\t") for line in (tmp_path / "run" / "skipped.txt").read_text().splitlines()]
  assert {path: reason for _, reason, path in skipped} == {
      **{str(folder / name): "unreadable" for name in unreadable},
      **{str(folder / name): "too small for a grid" for name in TOO_SMALL}}, skipped
  assert len(skipped) == len(unreadable) + len(TOO_SMALL) and all(0 < int(step) <= 20 for step, _, _ in skipped)
  for step, reason, path in skipped[:5]:
    assert f"Skipped {path}: {reason} (by step {step})." in train
  assert f"More skipped images are named in {tmp_path / 'run' / 'skipped.txt'} only." in train
  assert f"Skipped {skipped[5][2]}:" not in train

  rejected = dict(line.split("\t") for line in (tmp_path / "shards" / "rejected.txt").read_text().splitlines())
  assert sorted(rejected) == sorted(str(folder / name) for name in {**TOO_SMALL, **unreadable})
  for name, reason in {**TOO_SMALL, **unreadable}.items():
    assert reason in rejected[str(folder / name)], (name, rejected[str(folder / name)])
  index = json.loads((tmp_path / "shards" / "index.json").read_text())
  assert index["records"] == len(USED) and index["rejected"] == len(TOO_SMALL) + len(unreadable)

  result = _result_json(pretext)
  assert (result["images"], result["too_small"], result["unreadable"]) == (len(USED), len(TOO_SMALL),
                                                                           len(unreadable))
  assert result["pairs"] == 16 * len(USED)
  assert _result_json(neighbors)["images"] == len(USED)


# Large camera photos: (width, height, how many). Decoded at full size and cast to float32 before resizing, eight
# 48-megapixel JPEGs took a trainer to 3.5 GB and four 90-megapixel ones to 6.8 GB.
HUGE_PHOTOS = {"48mp": (8000, 6000, 8), "90mp": (11000, 8200, 4)}
HUGE_PEAK_RSS_LIMIT_MB = 2000


@pytest.fixture(scope="session")
def huge_jpegs(tmp_path_factory):
  """Folders of large JPEGs: two sample photos upscaled, with Gaussian noise of 8 grey levels so that they weigh
  what a camera's do (0.25 bytes per pixel at quality 90: 12 MB for 48 megapixels; the noise is a 1000-px tile
  repeated, which weighs the same as noise drawn afresh and takes a third of the time), copied to make up the count
  (decoding a copy costs what decoding another photo would). Made once per session."""
  from PIL import ImageChops  # pylint: disable=import-outside-toplevel
  with made_once(tmp_path_factory, "huge_jpegs") as (root, make):
    if make:
      tile = np.asarray(Image.merge("RGB", [Image.effect_noise((1000, 1000), 8) for _ in range(3)]))
      for kind, (width, height, count) in HUGE_PHOTOS.items():
        (root / kind).mkdir()
        noise = Image.fromarray(np.tile(tile, (-(-height // 1000), -(-width // 1000), 1))[:height, :width])
        for i, name in enumerate(("astronaut.png", "coffee.png")):
          photo = Image.open(os.path.join(skimage_photo_dir(), name)).convert("RGB")
          ImageChops.add(photo.resize((width, height), Image.BILINEAR), noise, offset=-128).save(
              root / kind / f"{kind}_{i}.jpg", quality=90)
        for i in range(2, count):
          shutil.copy(root / kind / f"{kind}_{i % 2}.jpg", root / kind / f"{kind}_{i}.jpg")
  return root


@pytest.mark.slow
def test_huge_jpegs_train_in_bounded_memory(huge_jpegs, tmp_path):
  """Eight 48-megapixel and four 90-megapixel JPEGs, each set trained on with the default parallelism: peak memory
  under 2 GB, because a JPEG is decoded at 1/2-1/8 of its sides when that still gives its resize target, and
  resized in uint8 (docs/guarantees.md, Memory; method.md §4.5)."""
  results = run_all([(demo_args(tmp_path / kind, f"--data={huge_jpegs / kind}", "--data_root=", "--train_steps=10",
                                "--checkpoint_every=10"), None) for kind in HUGE_PHOTOS], tmp_path, measure=True)
  peaks = {kind: peak_mb(text) for kind, (_, text) in zip(HUGE_PHOTOS, results)}
  print("peak memory (MB) on huge JPEGs:", peaks)
  for (code, text), kind in zip(results, HUGE_PHOTOS):
    assert code == 0 and "Training finished at step 10." in text, text[-3000:]
    images = int(re.findall(r"step 10/10 .* images (\d+) \(too small 0, unreadable 0\)", text)[-1])
    assert images >= HUGE_PHOTOS[kind][2], (kind, images)  # every photo went into a batch
    assert peaks[kind] < HUGE_PEAK_RSS_LIMIT_MB, (kind, peaks[kind])


# The training input pipeline alone with every AUTOTUNE forced to N calls on an N-thread pool: what a host of N cores
# runs (tf.data's AUTOTUNE goes up to one call per core), forced on this 2-core machine. Prints its peak memory.
FORCED_PARALLELISM = """
import sys
import tensorflow as tf
folder, n = sys.argv[1], int(sys.argv[2])
tf.data.AUTOTUNE = n
from context_keras.input import pipeline as data
from context_keras.training.resources import peak_rss_mb
options = tf.data.Options()
options.threading.private_threadpool_size = n
dataset = data.make_dataset(data.InputConfig(data=folder, batch_patches=64, batch_pairs=320)).with_options(options)
images = sum(int(batch["images"]) for batch in dataset.take(8))
print("IMAGES", images, "PEAK_RSS_MB", int(peak_rss_mb()))
"""
FORCED_PEAK_RSS_LIMIT_MB = 2000


def forced_peak(folder, threads=16):
  """(images, peak MB) of FORCED_PARALLELISM on `folder`."""
  result = subprocess.run([sys.executable, "-c", FORCED_PARALLELISM, str(folder), str(threads)], env=module_env(),
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return tuple(map(int, re.findall(r"IMAGES (\d+) PEAK_RSS_MB (\d+)", result.stdout)[-1]))


@pytest.mark.slow
def test_sixteen_parallel_decodes_of_huge_jpegs_stay_bounded(huge_jpegs):
  """The bound on a 16-core host for the 90-megapixel JPEGs: the formula's T + N (w + E) is 1.5 GB for the pipeline
  alone (1.84 GB with a training step's S); each decode reads its own file, where a read-ahead stage once kept 16
  more of them in memory (1.70 GB measured then, 1.34 GB now; docs/guarantees.md, Memory)."""
  images, peak = forced_peak(huge_jpegs / "90mp")
  print(f"16-way decoding of 90-megapixel JPEGs: peak {peak} MB, {images} images")
  assert images >= 4 and peak < FORCED_PEAK_RSS_LIMIT_MB - 350, peak  # 350 MB: S of the tests' small model


@pytest.mark.slow
def test_sixteen_parallel_decodes_of_images_that_cannot_be_reduced_stay_bounded(tmp_path):
  """What a 16-core host does with 30-megapixel PNGs and 24-megapixel progressive JPEGs, which no reduced decode
  makes small (a PNG is decoded at full size; libjpeg holds a progressive JPEG's coefficients at full size): such
  decodes run one at a time (data.grids_of_images), so 16-way parallelism keeps the pipeline's peak under 2 GB
  (1.38 GB measured on the PNGs); when all 16 ran at once it reached 2.5 GB
  (PNGs) and 2.6 GB (progressive JPEGs) (docs/guarantees.md, Memory)."""
  photo = Image.open(os.path.join(skimage_photo_dir(), "astronaut.png")).convert("RGB").resize((6000, 5000))
  (tmp_path / "png").mkdir()
  (tmp_path / "progressive").mkdir()
  photo.save(tmp_path / "png" / "0.png", compress_level=1)
  photo.resize((6000, 4000)).save(tmp_path / "progressive" / "0.jpg", quality=90, progressive=True)
  for kind, name in (("png", "0.png"), ("progressive", "0.jpg")):
    for i in range(1, 16):
      shutil.copy(tmp_path / kind / name, tmp_path / kind / f"{i}{os.path.splitext(name)[1]}")
  for kind in ("png", "progressive"):
    images, peak = forced_peak(tmp_path / kind)
    print(f"16-way decoding of {kind}: peak {peak} MB, {images} images")
    assert images >= 8, kind
    assert peak < FORCED_PEAK_RSS_LIMIT_MB, (kind, peak)


@pytest.mark.slow
def test_resume_on_another_listing_or_with_other_fixes(small_run, tmp_path):
  """Resuming on a listing of --data that gained a file says that the input cannot resume at its exact position.
  Resuming with the shortcut fixes switched (on here; off alike) says so in one line and keeps the new span in
  config.json; the export at the end lists both spans. (The same listing resumes silently: test_train's
  test_train_resume_and_export; a finished run resumed with other flags rewrites nothing: test_usage.)"""
  run, fixes_run = tmp_path / "grown", tmp_path / "fixes"
  shutil.copytree(small_run, run)
  shutil.copytree(small_run, fixes_run)
  grown = tmp_path / "grown.txt"
  grown.write_text(open(f"{REPO}/flags/demo_photos.txt", encoding="utf-8").read() + "coffee.png\nchelsea.png\n"
                   "page.png\n")
  fixes = ["--color_mode=chroma_blur", "--yoked_jitter", "--random_aperture", "--flip_relabel"]
  (code, text), (fixed_code, fixed) = run_all([(demo_args(run, f"--data={grown}", "--train_steps=12"), None),
                                               (demo_args(fixes_run, "--train_steps=12", *fixes), None)], tmp_path)
  assert code == fixed_code == 0 and "Traceback" not in text + fixed, (text + fixed)[-3000:]
  assert ("Resuming at step 10 with other training flags than the run's steps 0-10: --color_mode=chroma_blur (then "
          "drop), --yoked_jitter=True (then False), --random_aperture=True (then False), --flip_relabel=True (then "
          "False), --train_steps=12 (then 10).") in fixed, fixed[-3000:]
  spans = json.loads((fixes_run / "config.json").read_text())["spans"]
  assert [(s["from_step"], s["input"]["color_mode"], s["optimisation"]["train_steps"]) for s in spans] == [
      (0, "drop", 10), (10, "chroma_blur", 12)]
  metadata = json.loads((fixes_run / "export" / "backbone_12" / "assets.extra" / "context_keras.json").read_text())
  assert metadata["spans"] == spans and metadata["step"] == 12
  assert ("The input cannot resume at its exact position (the listing of --data changed since the checkpoint: 18 "
          "images then, 21 now, or other names): reading a fresh stream.") in text, text[-3000:]


