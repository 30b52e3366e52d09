"""Encoded image bytes to upright RGB pixels, with a guard against decompression bombs read from the header.

image_size_from_header (Python) and decode's in-graph check read the same header fields of every format that
tf.io.decode_image reads, so that a small file claiming a huge image is refused before anything is allocated.
decode turns every image upright by its EXIF orientation (exif.py), which TensorFlow's decoders ignore.
"""
import re

import tensorflow as tf

from context_keras.input import exif

# Larger than any camera's photo; a header that claims more is taken for a decompression bomb.
MAX_DECODE_PIXELS = 100_000_000
FORMATS = "JPEG, PNG, GIF, BMP or WebP"

# What decoding a corrupt JPEG writes to file descriptor 2 from C++, while the pipeline skips the image and counts it
# as unreadable: libjpeg's warnings and errors, whole lines without prefix or level (its message table, jerror.h:
# the messages a decoder can meet on bad data), and TensorFlow's own decoder logging at error level
# (jpeg_mem.cc: "Premature end of JPEG data"). cli/program.py holds them back (docs/method.md §4.2).
DECODER_MESSAGES = re.compile(
    r"^(Corrupt JPEG data: .*|Premature end of (JPEG|input) file|Unsupported marker type 0x[0-9a-f]{2}|"
    r"Improper call to JPEG library in state \d+|Invalid JPEG file structure: .*|Not a JPEG file: .*|"
    r"Bogus (marker length|Huffman table definition|sampling factors|JPEG colorspace|D[AHQ][CT] (index|value) .*)|"
    r"(Huffman|Quantization|Arithmetic) table 0x[0-9a-f]{2} was not defined|Huffman code size table overflow|"
    r"Missing Huffman code table entry|Invalid SOS parameters for sequential JPEG|Invalid component ID \d+ in SOS|"
    r"Inconsistent progression sequence for .*|Invalid progressive parameters .*|Unsupported JPEG (process|data "
    r"precision).*|Sampling factors too large for interleaved scan|JPEG datastream contains no image|"
    r"Empty JPEG image \(DNL not supported\)|Empty input file|Warning: unknown JFIF revision number .*|"
    r"Unknown Adobe color transform code \d+|Application transferred too (few|many) scanlines|"
    r"Didn't expect more than one scan|DCT coefficient out of range|Too many color components: .*|"
    r"Maximum supported image dimension is \d+ pixels)$|"
    r"^[IWE]\d{4} .* jpeg_(mem|handle)\.cc:\d+\] ")


_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # JPEG frame headers (not DHT, JPG, DAC)


def image_size_from_header(contents):
  """(format, width, height) that an encoded image's header claims, or None.

  Reads only the header bytes (JPEG SOF, PNG IHDR, GIF logical screen, BMP DIB header, WebP VP8/VP8L/VP8X),
  without decoding, so that a small file claiming a huge image (a decompression bomb) can be refused before the
  decoder allocates it. None when `contents` does not start like one of the formats tf.io.decode_image reads, or
  its header is cut short.
  """
  b = contents
  n = len(b)

  def int_at(start, size, order="little"):
    return int.from_bytes(b[start:start + size], order)

  if b.startswith(b"\x89PNG\r\n\x1a\n"):
    return ("PNG", int_at(16, 4, "big"), int_at(20, 4, "big")) if n >= 24 and b[12:16] == b"IHDR" else None
  if b[:6] in (b"GIF87a", b"GIF89a"):
    return ("GIF", int_at(6, 2), int_at(8, 2)) if n >= 10 else None
  if b.startswith(b"BM"):
    if n >= 22 and int_at(14, 4) == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
      return "BMP", int_at(18, 2), int_at(20, 2)
    if n >= 26:  # BITMAPINFOHEADER and later: signed 32-bit sizes, a negative height means top-down rows
      width = int.from_bytes(b[18:22], "little", signed=True)
      height = int.from_bytes(b[22:26], "little", signed=True)
      return ("BMP", width, abs(height)) if width >= 0 else None
    return None
  if b.startswith(b"RIFF") and b[8:12] == b"WEBP":
    chunk = b[12:16]
    if chunk == b"VP8 " and n >= 30 and b[23:26] == b"\x9d\x01\x2a":  # lossy: 14-bit sizes after the start code
      return "WebP", int_at(26, 2) & 0x3FFF, int_at(28, 2) & 0x3FFF
    if chunk == b"VP8L" and n >= 25 and b[20] == 0x2F:  # lossless: 14-bit sizes minus one, packed
      bits = int_at(21, 4)
      return "WebP", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and n >= 30:  # extended: 24-bit canvas sizes minus one
      return "WebP", int_at(24, 3) + 1, int_at(27, 3) + 1
    return None
  if b.startswith(b"\xff\xd8"):
    i = 2
    while i < n:
      while i < n and b[i] != 0xFF:  # stray bytes before a marker, skipped as libjpeg does
        i += 1
      while i < n and b[i] == 0xFF:  # fill bytes
        i += 1
      if i >= n:
        return None
      marker = b[i]
      i += 1
      if marker in (0x00, 0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # no segment follows
        continue
      if marker in (0xD9, 0xDA):  # end of image, or a scan, before any frame header
        return None
      if marker in _SOF_MARKERS:
        return ("JPEG", int_at(i + 5, 2, "big"), int_at(i + 3, 2, "big")) if i + 7 <= n else None
      if i + 2 > n:
        return None
      i += int_at(i, 2, "big")
    return None
  return None



def _claimed_pixels(contents):
  """Pixels that a PNG, GIF, BMP, WebP or JPEG header claims, read in graph ops before any decoding; 0 otherwise."""
  # The 32 header bytes, padded so that short files read zeros, not out of range (not the whole file: a copy of a
  # 20 MB photo per decode would count N times in the pipeline's memory, method.md §4.5).
  padded = tf.strings.join([tf.strings.substr(contents, 0, 32), tf.constant(b"\0" * 32)])

  def number(start, size, big_endian):
    digits = tf.cast(tf.io.decode_raw(tf.strings.substr(padded, start, size), tf.uint8), tf.int64)
    weights = 256 ** tf.range(size, dtype=tf.int64)
    return tf.reduce_sum(digits * (tf.reverse(weights, [0]) if big_endian else weights))

  head = tf.strings.substr(padded, 0, 4)
  png = number(16, 4, True) * number(20, 4, True)
  gif = number(6, 2, False) * number(8, 2, False)
  bmp_height = number(22, 4, False)
  bmp = number(18, 4, False) * tf.where(bmp_height >= 2**31, 2**32 - bmp_height, bmp_height)  # top-down rows
  # WebP (as image_size_from_header): 14-bit sizes (VP8), 14-bit sizes minus one (VP8L), 24-bit ones minus one (VP8X).
  chunk = tf.strings.substr(padded, 12, 4)
  lossless = number(21, 4, False)
  webp = tf.case([
      (tf.equal(chunk, b"VP8 "), lambda: tf.bitwise.bitwise_and(number(26, 2, False), 0x3FFF) *
       tf.bitwise.bitwise_and(number(28, 2, False), 0x3FFF)),
      (tf.equal(chunk, b"VP8L"), lambda: (tf.bitwise.bitwise_and(lossless, 0x3FFF) + 1) *
       (tf.bitwise.bitwise_and(tf.bitwise.right_shift(lossless, 14), 0x3FFF) + 1)),
      (tf.equal(chunk, b"VP8X"), lambda: (number(24, 3, False) + 1) * (number(27, 3, False) + 1))],
      default=lambda: tf.constant(0, tf.int64))
  is_webp = tf.equal(head, b"RIFF") & tf.equal(tf.strings.substr(padded, 8, 4), b"WEBP")
  is_jpeg = tf.equal(tf.strings.substr(head, 0, 2), b"\xff\xd8")
  jpeg = tf.cond(is_jpeg, lambda: tf.reduce_prod(tf.cast(tf.io.extract_jpeg_shape(contents)[:2], tf.int64)),
                 lambda: tf.constant(0, tf.int64))
  return tf.case([(tf.equal(head, b"\x89PNG"), lambda: png), (tf.equal(head, b"GIF8"), lambda: gif),
                  (tf.equal(tf.strings.substr(head, 0, 2), b"BM"), lambda: bmp), (is_webp, lambda: webp)],
                 default=lambda: jpeg)


JPEG_RATIOS = (1, 2, 4, 8)  # the scalings libjpeg's decoder can apply while decoding (method.md §1.2)


def _jpeg_ratio_index(pixels, target_pixels):
  """Index into JPEG_RATIOS of the largest ratio r with pixels / r^2 >= target_pixels: an image decoded at 1/r of
  its sides still has at least the target's pixels, so each side is at least the side it is resized to."""
  pixels = tf.cast(pixels, tf.int64)
  target = tf.cast(target_pixels, tf.int64)
  return tf.reduce_sum(tf.cast([pixels >= r * r * target for r in JPEG_RATIOS[1:]], tf.int32))


def _ratio_index(contents, claimed, target_pixels):
  """Index into JPEG_RATIOS of the scaling decode applies: 0 (full size) unless a JPEG can be reduced."""
  return tf.where(tf.equal(tf.strings.substr(contents, 0, 3), b"\xff\xd8\xff"),
                  _jpeg_ratio_index(claimed, target_pixels), 0)


# Frame headers of progressive JPEGs. libjpeg holds every DCT coefficient of such an image until its last scan: 2
# bytes per sample at full size (3 bytes per pixel with 4:2:0 chroma, 6 with 4:4:4) whatever the decode's ratio; a
# baseline JPEG is decoded a few rows of blocks at a time.
_PROGRESSIVE_SOF = (0xC2, 0xC6, 0xCA, 0xCE)


def _jpeg_frame_marker(contents):
  """The marker of a JPEG's frame header (0xC0 baseline, 0xC2 progressive, ...), walking its segments as
  image_size_from_header does (int32); 0 when none comes before the first scan or within 1,000 steps."""
  size = tf.strings.length(contents)

  def step(i, found):
    # The 4 bytes a step needs, read at once (the walk runs for every JPEG the pipeline takes); zeros past the end,
    # where the walk then stops. Not the whole file padded: that would copy it.
    four = tf.strings.substr(tf.strings.join([tf.strings.substr(contents, i, 4), b"\0" * 4]), 0, 4)
    lead, marker, high, low = tf.unstack(tf.cast(tf.io.decode_raw(four, tf.uint8), tf.int32), num=4)
    at_marker = tf.equal(lead, 0xFF)
    frame = (marker >= 0xC0) & (marker <= 0xCF) & tf.logical_not(
        tf.equal(marker, 0xC4) | tf.equal(marker, 0xC8) | tf.equal(marker, 0xCC))
    no_segment = (tf.equal(marker, 0x00) | tf.equal(marker, 0x01) | tf.equal(marker, 0xD8) |
                  ((marker >= 0xD0) & (marker <= 0xD7)))
    scan_or_end = tf.equal(marker, 0xDA) | tf.equal(marker, 0xD9)
    # Stray bytes and fill bytes (0xFF 0xFF) are stepped over one at a time, as libjpeg does.
    after = tf.where(tf.logical_not(at_marker) | tf.equal(marker, 0xFF), i + 1,
                     tf.where(no_segment, i + 2, i + 2 + high * 256 + low))
    found = tf.where(at_marker & frame, marker, tf.where(at_marker & scan_or_end, 0, found))
    return after, found

  _, found = tf.while_loop(lambda i, found: (found < 0) & (i < size), step, (tf.constant(2), tf.constant(-1)),
                           maximum_iterations=1000)
  return tf.maximum(found, 0)


def decoded_pixels(contents, target_pixels):
  """The memory decode(contents, target_pixels) holds, in RGB pixels (3 bytes each), from the header alone (int64):
  a baseline JPEG's claimed pixels divided by its ratio squared; twice a progressive JPEG's full claimed pixels (its
  coefficients, at worst 6 bytes per pixel, whatever the ratio); the claimed pixels of any other format (0 for no
  known header). The input pipeline tells by it which images are cheap enough to decode many at once
  (data.PARALLEL_DECODE_MAX_PIXELS)."""
  claimed = _claimed_pixels(contents)
  ratio_index = _ratio_index(contents, claimed, target_pixels)
  ratio = tf.gather(tf.constant(JPEG_RATIOS, tf.int64), ratio_index)
  is_jpeg = tf.equal(tf.strings.substr(contents, 0, 3), b"\xff\xd8\xff")
  progressive = tf.cond(is_jpeg, lambda: tf.reduce_any(tf.equal(_jpeg_frame_marker(contents), _PROGRESSIVE_SOF)),
                        lambda: tf.constant(False))
  return tf.where(progressive, 2 * claimed, claimed // (ratio * ratio))


def decode_stored(contents):
  """RGB uint8 [H, W, 3] as stored, without the EXIF orientation (the boxes of detection annotations refer to the
  stored pixels, as PASCAL VOC's devkit reads them), with decode's guard against decompression bombs."""
  check = tf.debugging.assert_less_equal(_claimed_pixels(contents), tf.constant(MAX_DECODE_PIXELS, tf.int64),
                                         message="image header claims more pixels than MAX_DECODE_PIXELS")
  with tf.control_dependencies([check]):
    return tf.io.decode_image(contents, channels=3, expand_animations=False)


def decode(contents, target_pixels=None):
  """Upright RGB uint8 [H, W, 3] of any supported format; grey becomes 3 channels, alpha is dropped (method.md
  §1.1), and the EXIF orientation is applied, so that a phone photo stored sideways (orientation 6) comes out as
  it was taken: for context prediction the direction between two patches is the label.

  An image whose header claims more than MAX_DECODE_PIXELS is refused before decoding (an error, so the pipeline
  skips and counts it): a small file can claim a huge image, a decompression bomb.

  With target_pixels (the size the caller will resize to), a JPEG of at least 4x that many pixels is decoded at
  1/2, 1/4 or 1/8 of its sides, the most that keeps at least target_pixels: libjpeg scales in its inverse DCT, so
  neither the time nor the memory of a full-size decode is spent. Other formats are decoded at full size.
  """
  claimed = _claimed_pixels(contents)
  check = tf.debugging.assert_less_equal(claimed, tf.constant(MAX_DECODE_PIXELS, tf.int64),
                                         message="image header claims more pixels than MAX_DECODE_PIXELS")
  with tf.control_dependencies([check]):
    def full():
      return tf.io.decode_image(contents, channels=3, expand_animations=False)

    if target_pixels is None:
      image = full()
    else:
      ratio = _ratio_index(contents, claimed, target_pixels)
      branches = [full] + [lambda r=r: tf.io.decode_jpeg(contents, channels=3, ratio=r) for r in JPEG_RATIOS[1:]]
      image = tf.ensure_shape(tf.switch_case(ratio, branches), [None, None, 3])
  # Here, before training's random resize, which would be cheaper: flips do not commute exactly with the bilinear
  # resize (they differ by up to 0.04 grey levels), so upright-then-resize is the one order that gives every caller
  # (training, prepare, evaluation) the same pixels. (A reduced JPEG decode is turned the same way.)
  return exif.apply_orientation(image, exif.orientation(contents))
