"""prepare: TFRecord shards of a folder or list, with rejected files, resumable, and readable by training."""
import io
import json
import os
import shutil
import struct
import zlib

import numpy as np
import pytest
import tensorflow as tf

from context_keras import errors
from context_keras import prepare as PR
from context_keras.input import decoding as DEC
from context_keras.input import pipeline as D
from context_keras.input import sources as S
from helpers import run_module
from helpers import write_png

GOOD = ("astronaut.png", "coffee.png", "camera.png", "chelsea.png", "rocket.jpg", "no_time_for_that_tiny.gif")
SMALL = dict(batch_patches=64, batch_pairs=320)


def png_claiming(width, height):
  """A valid PNG signature and IHDR (with its CRC) claiming width x height, then a tiny IDAT and IEND."""
  def chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
  ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# Bad files and a word of the reason each must be rejected with.
BAD = {
    "corrupt.jpg": "cannot decode",
    "truncated.png": "cannot decode",
    "empty.jpg": "empty file",
    "text.jpg": "not an image",
    "bad_header.jpg": "corrupt header",
    "bomb.png": "header claims 30000x30000",
    "thin.png": "too elongated",
}


@pytest.fixture
def mixed_dir(tmp_path, photo_dir):
  """Good sample photos and one file of each kind of bad, in a folder with a subfolder."""
  folder = tmp_path / "images"
  (folder / "sub").mkdir(parents=True)
  for i, name in enumerate(GOOD):
    shutil.copy(os.path.join(photo_dir, name), folder / ("sub" if i % 2 else "") / name)
  rocket = open(os.path.join(photo_dir, "rocket.jpg"), "rb").read()
  noise = np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()
  middle = len(rocket) // 2
  (folder / "corrupt.jpg").write_bytes(rocket[:middle] + noise + rocket[middle + len(noise):])
  (folder / "bad_header.jpg").write_bytes(rocket[:300] + noise + rocket[300 + len(noise):])
  astronaut = open(os.path.join(photo_dir, "astronaut.png"), "rb").read()
  (folder / "truncated.png").write_bytes(astronaut[:len(astronaut) // 2])
  (folder / "empty.jpg").write_bytes(b"")
  (folder / "text.jpg").write_text("hello, I am not a JPEG")
  (folder / "bomb.png").write_bytes(png_claiming(30000, 30000))
  write_png(str(folder / "thin.png"), np.zeros((10, 500, 3), np.uint8))
  return folder


def read_records(output):
  """{filename: (encoded bytes, height, width)} of every record of every shard in `output`."""
  feature = {S.TFRECORD_IMAGE_KEY: tf.io.FixedLenFeature([], tf.string),
             "image/filename": tf.io.FixedLenFeature([], tf.string),
             "image/height": tf.io.FixedLenFeature([], tf.int64), "image/width": tf.io.FixedLenFeature([], tf.int64)}
  records = {}
  for shard in sorted(output.glob("*.tfrecord")):
    for record in tf.data.TFRecordDataset(str(shard)):
      example = tf.io.parse_single_example(record, feature)
      records[example["image/filename"].numpy().decode()] = (
          example[S.TFRECORD_IMAGE_KEY].numpy(), int(example["image/height"]), int(example["image/width"]))
  return records


def config(data, output, **kwargs):
  return PR.PrepareConfig(data=str(data), output=str(output), **{"num_shards": 3, "workers": 2, **kwargs})


def test_header_sizes_match_the_decoder():
  from PIL import Image
  rng = np.random.default_rng(0)
  for height, width in ((37, 53), (300, 17)):
    image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    for fmt, options in (("JPEG", {}), ("JPEG", {"progressive": True}), ("JPEG", {"exif": b"Exif\0\0" + b"x" * 3000}),
                         ("PNG", {}), ("GIF", {}), ("BMP", {}), ("WEBP", {"lossless": True}),
                         ("WEBP", {"quality": 50}), ("WEBP", {"exif": b"Exif\0\0abc"})):
      buffer = io.BytesIO()
      image.save(buffer, fmt, **options)
      contents = buffer.getvalue()
      kind, claimed_width, claimed_height = DEC.image_size_from_header(contents)
      assert (claimed_height, claimed_width) == tuple(DEC.decode(contents).shape[:2]) == (height, width), (fmt, options)
      assert kind.upper() == fmt
  assert DEC.image_size_from_header(png_claiming(30000, 20000)) == ("PNG", 30000, 20000)
  for junk in (b"", b"hello", b"\xff\xd8\xff\xe0\x00", b"\x89PNG\r\n\x1a\n", b"GIF89a\x01", b"BM\0",
               b"RIFF\0\0\0\0WEBPVP8 "):
    assert DEC.image_size_from_header(junk) is None, junk


def test_shards_rejected_and_index(mixed_dir, tmp_path, monkeypatch):
  decoded = []
  real_decode = DEC.decode
  monkeypatch.setattr(DEC, "decode", lambda contents: decoded.append(contents) or real_decode(contents))
  output = tmp_path / "shards"
  index = PR.prepare(config(mixed_dir, output))

  names = [f"train-{i:05d}-of-00003.tfrecord" for i in range(3)]
  assert sorted(p.name for p in output.glob("*.tfrecord")) == names
  assert not list(output.glob("*.partial"))
  records = read_records(output)
  expected = {os.path.relpath(p, mixed_dir): p for p in S.list_folder(str(mixed_dir)) if os.path.basename(p) in GOOD}
  assert sorted(records) == sorted(expected)
  for name, (contents, height, width) in records.items():
    assert contents == open(expected[name], "rb").read(), name  # the original bytes
    assert (height, width) == tuple(DEC.decode(contents).shape[:2])

  rejected = dict(line.split("\t") for line in (output / "rejected.txt").read_text().splitlines())
  assert sorted(rejected) == sorted(str(mixed_dir / name) for name in BAD)
  for name, word in BAD.items():
    assert word in rejected[str(mixed_dir / name)], (name, rejected[str(mixed_dir / name)])
  assert png_claiming(30000, 30000) not in decoded  # the bomb was refused from its header alone

  on_disk = json.loads((output / "index.json").read_text())
  assert on_disk == index
  assert index["num_shards"] == 3 and index["images"] == len(GOOD) + len(BAD)
  assert index["records"] == len(GOOD) and index["rejected"] == len(BAD) and index["reencoded"] == 0
  assert [s["file"] for s in index["shards"]] == names
  assert sum(s["records"] for s in index["shards"]) == len(GOOD)
  assert [s["bytes"] for s in index["shards"]] == [(output / n).stat().st_size for n in names]
  # Contiguous chunks of a seeded permutation: 13 images in 3 shards of 4, 4 and 5 (records + rejected).
  assert [s["records"] + s["rejected"] for s in index["shards"]] == [4, 4, 5]


def test_unreadable_and_missing_files(tmp_path, photo_dir, monkeypatch):
  shutil.copy(os.path.join(photo_dir, "coffee.png"), tmp_path / "coffee.png")
  shutil.copy(os.path.join(photo_dir, "rocket.jpg"), tmp_path / "secret.jpg")
  os.chmod(tmp_path / "secret.jpg", 0)
  listing = tmp_path / "train.txt"
  listing.write_text("coffee.png 1\nsecret.jpg 2\nmissing.jpg 3\n")
  output = tmp_path / "out"
  index = PR.prepare(config(listing, output, num_shards=2))
  rejected = dict(line.split("\t") for line in (output / "rejected.txt").read_text().splitlines())
  assert rejected.pop(str(tmp_path / "missing.jpg")) == "missing: no such file"
  if os.access(tmp_path / "secret.jpg", os.R_OK):  # root: mode 000 does not stop reading
    assert rejected == {} and index["records"] == 2
    assert read_records(output)["secret.jpg"][0] == open(tmp_path / "secret.jpg", "rb").read()
  else:
    assert rejected == {str(tmp_path / "secret.jpg"): "unreadable: permission denied"} and index["records"] == 1

  # Whoever runs the test, a read refused with EACCES (tf.io.gfile's PermissionDeniedError) gives that reason (and
  # does not stop the others).
  real_read = PR.paths_lib.read_bytes

  def refusing_read(path):
    if str(path).endswith("secret.jpg"):
      raise tf.errors.PermissionDeniedError(None, None, f"{path}; Permission denied")
    return real_read(path)
  monkeypatch.setattr(PR.paths_lib, "read_bytes", refusing_read)
  assert PR.examine(str(tmp_path / "secret.jpg")).reason == "unreadable: permission denied"
  assert PR.examine(str(tmp_path / "coffee.png")).reason is None


def test_resume_redoes_only_missing_shards(mixed_dir, tmp_path, monkeypatch):
  output = tmp_path / "shards"
  first_index = PR.prepare(config(mixed_dir, output))
  shards = sorted(output.glob("*.tfrecord"))
  before = {p.name: (p.read_bytes(), p.stat().st_ino, p.stat().st_mtime_ns) for p in shards}
  rejected_before = (output / "rejected.txt").read_text()
  shards[1].unlink()

  examined = []
  real_examine = PR.examine
  monkeypatch.setattr(PR, "examine", lambda path, *args: examined.append(path) or real_examine(path, *args))
  index = PR.prepare(config(mixed_dir, output, workers=1))
  assert index == first_index
  assert (output / "rejected.txt").read_text() == rejected_before
  assigned = PR.assign_shards(S.find_source(str(mixed_dir)).paths, 3, 0)
  assert examined == assigned[1]  # only the missing shard's images
  for path in sorted(output.glob("*.tfrecord")):
    contents, inode, mtime = before[path.name]
    assert path.read_bytes() == contents
    if path.name != shards[1].name:
      assert (path.stat().st_ino, path.stat().st_mtime_ns) == (inode, mtime), path.name  # kept, not rewritten

  # Everything complete: nothing is examined again.
  examined.clear()
  PR.prepare(config(mixed_dir, output))
  assert examined == []


def test_refuses_other_num_shards_or_input(mixed_dir, tmp_path):
  output = tmp_path / "shards"
  PR.prepare(config(mixed_dir, output))
  with pytest.raises(errors.UsageError, match="--num_shards=3, not 2"):
    PR.prepare(config(mixed_dir, output, num_shards=2))
  with pytest.raises(errors.UsageError, match="different input.*--seed=0 then, 1 now"):
    PR.prepare(config(mixed_dir, output, seed=1))
  (mixed_dir / "extra.png").write_bytes((mixed_dir / "astronaut.png").read_bytes())
  with pytest.raises(errors.UsageError, match="different input.*13 listed .* then, 14 listed"):
    PR.prepare(config(mixed_dir, output))


def test_max_pixels_reencodes_only_large_images(tmp_path, photo_dir):
  folder = tmp_path / "images"
  folder.mkdir()
  for name in GOOD:
    shutil.copy(os.path.join(photo_dir, name), folder / name)
  limit = 200_000
  index = PR.prepare(config(folder, tmp_path / "out", num_shards=2, max_pixels=limit))
  records = read_records(tmp_path / "out")
  reencoded = 0
  for name, (contents, height, width) in records.items():
    original = open(folder / name, "rb").read()
    original_height, original_width = DEC.decode(original).shape[:2]
    if original_height * original_width <= limit:
      assert contents == original, name
      continue
    reencoded += 1
    assert contents[:2] == b"\xff\xd8" and DEC.image_size_from_header(contents)[0] == "JPEG", name
    assert (height, width) == tuple(DEC.decode(contents).shape[:2])
    assert height * width <= limit < (height + 1) * (width + 1), name
    assert abs(width / height - original_width / original_height) < 0.01, name
  assert reencoded == index["reencoded"] == 4  # astronaut, coffee, camera, rocket; not chelsea nor the GIF


@pytest.mark.slow
def test_training_pipeline_reads_the_shards(mixed_dir, tmp_path):
  output = tmp_path / "shards"
  PR.prepare(config(mixed_dir, output))
  pattern = str(output / "*.tfrecord")
  source = S.find_source(pattern)
  assert source.kind == "tfrecord" and len(source.paths) == 3
  S.check_readable(source)
  batch = next(iter(D.make_dataset(D.InputConfig(data=pattern, **SMALL))))
  assert batch["patches"].shape == (64, 96, 96, 3)
  assert batch["patch_mask"].numpy().sum() > 0 and batch["pair_mask"].numpy().sum() > 0


@pytest.mark.slow
def test_program_progress_and_summary(tmp_path, photo_dir):
  folder = tmp_path / "images"
  folder.mkdir()
  for name in GOOD[:3]:
    shutil.copy(os.path.join(photo_dir, name), folder / name)
  result = run_module(["context_keras.prepare", f"--data={folder}", f"--output={tmp_path / 'out'}", "--num_shards=2",
                       "--workers=2"], cwd=tmp_path, timeout=120)
  assert result.returncode == 0, result.stderr
  assert "3/3 images (100%), 0 rejected" in result.stderr and "images/s, ETA" in result.stderr
  assert "Done in" in result.stderr and f"--data='{tmp_path / 'out'}/*.tfrecord'" in result.stderr
  assert json.loads((tmp_path / "out" / "index.json").read_text())["records"] == 3


