"""EXIF orientation (context_keras/exif.py): the tag read in graph ops from JPEG, PNG and WebP bytes, and the eight
transforms checked pixel for pixel against Pillow's ImageOps.exif_transpose."""
import io
import struct

import numpy as np
from PIL import Image
from PIL import ImageOps
import pytest
import tensorflow as tf

from context_keras.input import exif

ORIENTATIONS = range(1, 9)
SHORT, LONG, ASCII = 3, 4, 2


def marked_image(height=24, width=40):
  """A gradient with a green block in the stored top-left corner: no two of the eight transforms look alike."""
  y, x = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  image = np.stack([x * 255 // (width - 1), y * 255 // (height - 1), np.full_like(x, 60)], -1).astype(np.uint8)
  image[:4, :6] = (0, 255, 0)
  return image


def tiff_block(order, entries, next_ifd=0):
  """A TIFF header and one IFD; `entries` are (tag, type, count, value) with the value packed into 4 bytes."""
  e = "<" if order == b"II" else ">"
  body = b"".join(struct.pack(e + "HHI", tag, kind, count) +
                  (struct.pack(e + "HH", value, 0) if kind == SHORT else struct.pack(e + "I", value))
                  for tag, kind, count, value in entries)
  return order + struct.pack(e + "HI", 42, 8) + struct.pack(e + "H", len(entries)) + body + struct.pack(e + "I",
                                                                                                        next_ifd)


def orientation_exif(k, order=b"MM"):
  """EXIF payload as JPEG's APP1 holds it, with a tag on each side of the orientation as a camera writes."""
  return b"Exif\0\0" + tiff_block(order, [(0x010F, ASCII, 4, int.from_bytes(b"Cam\0", "big")),
                                          (0x0112, SHORT, 1, k), (0x0131, ASCII, 4, int.from_bytes(b"Sw1\0", "big"))])


def encode(image, fmt, exif_bytes=None):
  options = {"exif": exif_bytes} if exif_bytes is not None else {}
  if fmt == "WEBP":
    options["lossless"] = True
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, fmt, **options)
  return buffer.getvalue()


def segment(marker, payload):
  return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def jpeg_with(segments, image=None):
  """A JPEG without EXIF from Pillow (its own JFIF APP0 first), with `segments` inserted after SOI."""
  plain = encode(marked_image() if image is None else image, "JPEG")
  return plain[:2] + b"".join(segments) + plain[2:]


def read(contents):
  return int(exif.orientation(contents))


def decode(contents):
  return tf.io.decode_image(contents, channels=3, expand_animations=False)


def pillow_upright(array, exif_bytes):
  """Pillow's exif_transpose of exactly these pixels (no second decoder involved)."""
  image = Image.fromarray(array)
  image.info["exif"] = exif_bytes
  return np.asarray(ImageOps.exif_transpose(image))


@pytest.mark.parametrize("order", [b"II", b"MM"])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_orientation_read_from_each_format_and_byte_order(fmt, order):
  for k in ORIENTATIONS:
    contents = encode(marked_image(), fmt, orientation_exif(k, order))
    assert Image.open(io.BytesIO(contents)).getexif()[0x0112] == k  # the crafted block is valid EXIF for Pillow
    assert read(contents) == k, (fmt, order, k)


def test_webp_exif_chunk_with_jpeg_prefix():
  """Some WebP writers keep the JPEG APP1 prefix ("Exif" and two zero bytes) in front of the TIFF header."""
  contents = encode(marked_image(), "WEBP", orientation_exif(7))
  at = contents.index(b"EXIF")
  size = struct.unpack("<I", contents[at + 4:at + 8])[0]
  chunk = b"Exif\0\0" + contents[at + 8:at + 8 + size]
  body = contents[12:at] + b"EXIF" + struct.pack("<I", len(chunk)) + chunk + contents[at + 8 + size + size % 2:]
  prefixed = b"RIFF" + struct.pack("<I", len(body) + 4) + b"WEBP" + body
  assert Image.open(io.BytesIO(prefixed)).getexif()[0x0112] == 7
  assert read(prefixed) == 7


@pytest.mark.parametrize("k", ORIENTATIONS)
def test_upright_pixels_match_pillow(k):
  exif_bytes = orientation_exif(k)
  jpeg = encode(marked_image(), "JPEG", exif_bytes)
  # Transforms of the same decoded array: JPEG decoders may differ by a grey level.
  pixels = decode(jpeg).numpy()
  upright = exif.apply_orientation(pixels, exif.orientation(jpeg)).numpy()
  np.testing.assert_array_equal(upright, pillow_upright(pixels, exif_bytes))
  # Lossless formats end to end: bytes in, the pixels Pillow shows out.
  for fmt in ("PNG", "WEBP"):
    contents = encode(marked_image(), fmt, exif_bytes)
    ours = exif.apply_orientation(decode(contents), exif.orientation(contents)).numpy()
    np.testing.assert_array_equal(ours, np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(contents)))))


def test_transforms_follow_the_exif_definition():
  """Independently of Pillow: where the stored top-left corner (the green block) ends up, and the size."""
  image = marked_image()
  height, width = image.shape[:2]
  corner = {1: (0, 0), 2: (0, -1), 3: (-1, -1), 4: (-1, 0), 5: (0, 0), 6: (0, -1), 7: (-1, -1), 8: (-1, 0)}
  for k in ORIENTATIONS:
    upright = exif.apply_orientation(image, k).numpy()
    assert upright.shape == ((height, width, 3) if k <= 4 else (width, height, 3))
    assert tuple(upright[corner[k]]) == (0, 255, 0), k
    assert sum(tuple(upright[y, x]) == (0, 255, 0) for y in (0, -1) for x in (0, -1)) == 1
  # 6 is 90 degrees clockwise: the stored left column becomes the top row, read right to left.
  np.testing.assert_array_equal(exif.apply_orientation(image, 6).numpy()[0], image[::-1, 0])
  for other in (0, 9, -1):
    np.testing.assert_array_equal(exif.apply_orientation(image, other).numpy(), image)
  grey = np.arange(12, dtype=np.float32).reshape(3, 4, 1)
  np.testing.assert_array_equal(exif.apply_orientation(grey, 8).numpy()[..., 0], np.rot90(grey[..., 0]))


def test_exif_found_after_other_segments():
  app1 = segment(0xE1, orientation_exif(6, b"II"))
  others = [segment(0xE2, b"ICC_PROFILE\0" + bytes(3000)),
            segment(0xE1, b"http://ns.adobe.com/xap/1.0/\0<x:xmpmeta/>"),  # an APP1 that is not EXIF
            segment(0xFE, b"a comment"),
            b"\xff\xff"]  # fill bytes before the next marker
  contents = jpeg_with(others + [app1])
  assert read(contents) == 6
  assert Image.open(io.BytesIO(contents)).getexif()[0x0112] == 6
  # An APP1 far into the file (after 100 KB of other segments) is still within the scanned bytes.
  assert read(jpeg_with([segment(0xE2, bytes(65000)), segment(0xE2, bytes(40000)), app1])) == 6
  np.testing.assert_array_equal(decode(contents).numpy(), decode(jpeg_with([])).numpy())


def test_absent_or_malformed_orientation_reads_as_1():
  plain = jpeg_with([])
  assert read(plain) == 1
  assert read(encode(marked_image(), "PNG")) == 1
  assert read(encode(marked_image(), "WEBP")) == 1
  assert read(encode(marked_image(), "BMP")) == 1
  assert read(encode(marked_image(), "GIF")) == 1

  def jpeg_tiff(tiff):
    return jpeg_with([segment(0xE1, b"Exif\0\0" + tiff)])

  assert read(jpeg_tiff(tiff_block(b"II", [(0x0112, SHORT, 1, 3)]))) == 3  # the control for the cases below
  for k in (0, 9, 0xFFFF):
    assert read(jpeg_tiff(tiff_block(b"II", [(0x0112, SHORT, 1, k)]))) == 1
  assert read(jpeg_tiff(tiff_block(b"II", [(0x0112, LONG, 1, 6)]))) == 1   # not the tag's type
  assert read(jpeg_tiff(tiff_block(b"MM", [(0x0112, SHORT, 2, 6)]))) == 1  # not one value
  assert read(jpeg_tiff(b"IM" + tiff_block(b"II", [(0x0112, SHORT, 1, 6)])[2:])) == 1  # no byte order
  assert read(jpeg_tiff(tiff_block(b"II", [(0x0112, SHORT, 1, 6)]).replace(b"*\0", b"+\0", 1))) == 1  # not 42
  assert read(jpeg_with([segment(0xE1, b"Exif\0\1" + tiff_block(b"II", [(0x0112, SHORT, 1, 6)]))])) == 1
  # The thumbnail's IFD1 may carry its own orientation; only IFD0 speaks for the image.
  ifd1 = struct.pack("<H", 1) + struct.pack("<HHIHH", 0x0112, SHORT, 1, 6, 0) + bytes(4)
  assert read(jpeg_tiff(tiff_block(b"II", [(0x010F, ASCII, 4, 0)], next_ifd=8 + 2 + 12 + 4) + ifd1)) == 1
  # An entry past the end of its APP1 segment does not count, even if the bytes that follow look like one.
  tiff = tiff_block(b"II", [(0x0112, SHORT, 1, 6)])
  assert read(plain[:2] + segment(0xE1, b"Exif\0\0" + tiff[:-8]) + tiff[-8:] + plain[2:]) == 1
  # EXIF after the first scan is not looked for.
  sos = plain.index(b"\xff\xda")
  assert read(plain[:sos] + plain[sos:-2] + segment(0xE1, orientation_exif(6)) + plain[-2:]) == 1


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_truncated_files(fmt):
  contents = encode(marked_image(), fmt, orientation_exif(6, b"II"))
  entry = contents.index(struct.pack("<HHIH", 0x0112, SHORT, 1, 6))
  for length in range(entry + 30):
    assert read(contents[:length]) == (6 if length >= entry + 12 else 1), length


def test_arbitrary_bytes_never_raise():
  rng = np.random.default_rng(0)
  valid = [encode(marked_image(), fmt, orientation_exif(6, order)) for fmt in ("JPEG", "PNG", "WEBP")
           for order in (b"II", b"MM")]
  inputs = [b"", b"\xff", b"\xff\xd8", b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"RIFF\0\0\0\0WEBP", b"\xff" * 200,
            b"\xff\xd8\xff\xe1\x00\x00", b"\xff\xd8\xff\xe1\x00\x01Exif\0\0",
            b"\xff\xd8" + segment(0xE1, b"Exif\0\0II*\0\xff\xff\xff\xff"),
            b"\xff\xd8" + segment(0xE1, b"Exif\0\0MM\0*\0\0\0\x08\xff\xff"),
            b"\x89PNG\r\n\x1a\n\xff\xff\xff\xffeXIf", b"RIFF\xff\xff\xff\xffWEBPEXIF\xff\xff\xff\xff"]
  for prefix in (b"", b"\xff\xd8", b"\x89PNG\r\n\x1a\n", b"RIFF\0\1\0\0WEBP", b"\xff\xd8\xff\xe1\x01\x00Exif\0\0"):
    inputs += [prefix + rng.integers(0, 256, rng.integers(0, 400), dtype=np.uint8).tobytes() for _ in range(60)]
  for contents in valid:
    for _ in range(60):  # a few bytes of a valid header changed
      mutated = bytearray(contents)
      for position in rng.integers(0, min(len(contents), 200), rng.integers(1, 4)):
        mutated[position] = rng.integers(0, 256)
      inputs.append(bytes(mutated))
  # Bytes that look like the fields of a valid header, at random places: lengths, markers, tags and offsets.
  pieces = [b"\xff", b"\xe1", b"Exif\0\0", b"II*\0", b"MM\0*", b"\x12\x01\x03\x00\x01\0\0\0", b"\xff\xff\xff\xff",
            b"\0\0\0\x08", b"\x08\0\0\0", b"eXIf", b"EXIF", b"\0\x02"]
  for _ in range(200):
    inputs.append(b"\xff\xd8" + b"".join(pieces[i] for i in rng.integers(0, len(pieces), rng.integers(1, 30))))
  results = list(tf.data.Dataset.from_tensor_slices(inputs).map(exif.orientation).as_numpy_iterator())
  assert len(results) == len(inputs)
  assert all(1 <= r <= 8 for r in results)
  assert sum(r != 1 for r in results) > 0  # the mutations left some headers readable


def test_in_a_tf_data_graph_without_python_callbacks():
  files = [encode(marked_image(), "JPEG", orientation_exif(k)) for k in ORIENTATIONS]
  upright = tf.data.Dataset.from_tensor_slices(files).map(
      lambda contents: exif.apply_orientation(decode(contents), exif.orientation(contents)),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  for k, (contents, image) in enumerate(zip(files, upright.as_numpy_iterator()), 1):
    np.testing.assert_array_equal(image, pillow_upright(decode(contents).numpy(), orientation_exif(k)))

  @tf.function
  def pipeline(contents):
    return exif.apply_orientation(decode(contents), exif.orientation(contents))

  graph = pipeline.get_concrete_function(tf.TensorSpec([], tf.string)).graph.as_graph_def()
  op_types = {node.op for node in graph.node}
  for function in graph.library.function:
    op_types.update(node.op for node in function.node_def)
  assert "While" in op_types or "StatelessWhile" in op_types  # the library's functions were searched too
  assert not any("PyFunc" in op for op in op_types), sorted(op_types)
