"""EXIF orientation, read and applied in TensorFlow graph ops (no Python callback), for tf.data maps and eager code.

TensorFlow's decoders ignore the EXIF orientation tag, so a phone photo stored sideways with orientation 6 decodes
sideways. For context prediction the direction between two patches is the label, so such a photo would teach wrong
directions. Turn every decoded image upright first:

  image = apply_orientation(tf.io.decode_image(contents, channels=3, expand_animations=False), orientation(contents))

This module is the one place where EXIF is parsed. It reads the orientation from a JPEG's APP1 "Exif" segment, a
PNG's eXIf chunk (before the image data) and a WebP's EXIF chunk; other formats carry none and read as 1. Only the
first IFD of the TIFF block is read, where the tag lives, and only its standard form (type SHORT, one value). Callers
that take already-decoded pixels (the exported uint8 signature) cannot see the tag: their input must already be
upright.
"""
import tensorflow as tf

ORIENTATION_TAG = 0x0112
SCAN_BYTES = 1 << 17  # JPEG and PNG: metadata lies near the start; WebP puts EXIF after the bitstream, so whole file
MAX_SEGMENTS = 64     # JPEG segments, PNG or WebP chunks walked before giving up
MAX_ENTRIES = 256     # IFD0 entries examined; cameras write a few dozen at most

_JPEG, _PNG, _WEBP, _OTHER = range(4)


def _fourcc(name):
  return int.from_bytes(name, "big")


# Each step of the walk reads the bytes at its position once and takes every field it needs from them as one
# weighted sum: the walk runs for every image the pipeline decodes, and a field per read cost it an op per byte.
def _fields(*fields):
  """Weights [width][len(fields)] (nested lists: no tensor is made at import, which would start TensorFlow before
  the programs configure its devices) that turn the `width` bytes at a position into the unsigned integers (offset,
  size, little-endian) given, one per column."""
  width = max(offset + size for offset, size, _ in fields)
  weights = [[0] * len(fields) for _ in range(width)]
  for column, (offset, size, little) in enumerate(fields):
    for i in range(size):
      weights[offset + i][column] = 256 ** (i if little else size - 1 - i)
  return weights


# JPEG segment: 0xFF, marker, length (big-endian, counting itself), then APP1's "Exif\0\0".
_JPEG_SEGMENT = _fields((0, 1, False), (1, 1, False), (2, 2, False), (4, 4, False), (8, 2, False))
# PNG chunk: length (big-endian), type, data, CRC.
_PNG_CHUNK = _fields((0, 4, False), (4, 4, False))
# RIFF chunk: type, length (little-endian), data padded to an even length; some writers keep JPEG's "Exif\0\0" in
# front of the TIFF header.
_WEBP_CHUNK = _fields((0, 4, False), (4, 4, True), (8, 4, False), (12, 2, False))


def _segment_walk(fmt, read, first, size):
  """The TIFF block (start, end) of the first EXIF segment or chunk found walking from `first`, (-1, -1) if none
  within MAX_SEGMENTS steps."""
  not_found = tf.constant(-1, tf.int64)

  def walk(step):
    def body(count, pos, start, end, stop):
      next_pos, start, end, stop = step(pos)
      return count + 1, next_pos, start, end, stop | (next_pos >= size)

    _, _, start, end, _ = tf.while_loop(
        lambda count, pos, start, end, stop: ~stop & (count < MAX_SEGMENTS), body,
        (tf.constant(0), first, not_found, not_found, first >= size))
    return start, end

  def jpeg(pos):
    lead, marker, length, name, zero = tf.unstack(read(pos, _JPEG_SEGMENT))
    fill = tf.equal(marker, 0xFF)  # any number of 0xFF may precede a marker
    standalone = tf.equal(marker, 0x01) | ((marker >= 0xD0) & (marker <= 0xD8))  # TEM, RSTn, SOI: no length field
    exif = tf.equal(marker, 0xE1) & tf.equal(name, _fourcc(b"Exif")) & tf.equal(zero, 0)
    # A scan (SOS) or end of image means no metadata follows; a non-marker or bad length means a broken file.
    broken = ~tf.equal(lead, 0xFF) | (~fill & ~standalone & (length < 2))
    stop = exif | broken | tf.equal(marker, 0xDA) | tf.equal(marker, 0xD9)
    step = tf.where(fill, tf.constant(1, tf.int64), tf.where(standalone, tf.constant(2, tf.int64), 2 + length))
    return pos + step, tf.where(exif, pos + 10, not_found), tf.where(exif, pos + 2 + length, not_found), stop

  def png(pos):
    length, kind = tf.unstack(read(pos, _PNG_CHUNK))
    exif = tf.equal(kind, _fourcc(b"eXIf"))
    stop = exif | tf.equal(kind, _fourcc(b"IDAT")) | tf.equal(kind, _fourcc(b"IEND"))
    return pos + 12 + length, tf.where(exif, pos + 8, not_found), tf.where(exif, pos + 8 + length, not_found), stop

  def webp(pos):
    kind, length, prefix, zero = tf.unstack(read(pos, _WEBP_CHUNK))
    exif = tf.equal(kind, _fourcc(b"EXIF"))
    prefixed = tf.equal(prefix, _fourcc(b"Exif")) & tf.equal(zero, 0)
    start = pos + 8 + tf.where(prefixed, tf.constant(6, tf.int64), tf.constant(0, tf.int64))
    next_pos = pos + 8 + length + tf.bitwise.bitwise_and(length, 1)
    return next_pos, tf.where(exif, start, not_found), tf.where(exif, pos + 8 + length, not_found), exif

  return tf.switch_case(fmt, [lambda: walk(jpeg), lambda: walk(png), lambda: walk(webp),
                              lambda: (not_found, not_found)])


# Graph code (tf.while_loop, tf.switch_case): AutoGraph would only add tracing time.
@tf.function(input_signature=[tf.TensorSpec([], tf.string)], autograph=False)
def orientation(contents):
  """EXIF orientation 1..8 of an encoded image, as a scalar int32.

  1 (upright) when there is no EXIF orientation, or it is malformed, out of range or cut short, or the bytes are
  not a JPEG, PNG or WebP: never an error, whatever the bytes.
  """
  head = tf.strings.join([tf.strings.substr(contents, 0, 12), b"\0" * 12])  # short files compare as padded
  is_webp = tf.equal(tf.strings.substr(head, 0, 4), b"RIFF") & tf.equal(tf.strings.substr(head, 8, 4), b"WEBP")
  fmt = tf.case([(tf.equal(tf.strings.substr(head, 0, 2), b"\xff\xd8"), lambda: _JPEG),
                 (tf.equal(tf.strings.substr(head, 0, 8), b"\x89PNG\r\n\x1a\n"), lambda: _PNG),
                 (is_webp, lambda: _WEBP)], default=lambda: _OTHER)
  window = tf.strings.substr(contents, 0, tf.where(is_webp, tf.strings.length(contents), SCAN_BYTES))
  # One zero byte after the window: every read past the end is clamped onto it, so no read can fail.
  raw = tf.io.decode_raw(tf.strings.join([window, b"\0"]), tf.uint8)
  size = tf.cast(tf.strings.length(window), tf.int64)

  def read(pos, weights):
    """The integers `weights` (_fields) names, of the bytes at `pos` (a scalar); bytes past the window read as 0."""
    index = tf.clip_by_value(pos + tf.range(len(weights), dtype=tf.int64), 0, size)
    return tf.reduce_sum(tf.cast(tf.gather(raw, index), tf.int64)[:, tf.newaxis] * tf.constant(weights, tf.int64), 0)

  def number(pos, width, little):
    """Unsigned integer of `width` bytes at `pos` (any shape of positions); bytes past the window read as 0."""
    index = tf.clip_by_value(tf.expand_dims(pos, -1) + tf.range(width, dtype=tf.int64), 0, size)
    digits = tf.cast(tf.gather(raw, index), tf.int64)
    weights = 256 ** tf.range(width, dtype=tf.int64)
    return tf.reduce_sum(digits * tf.where(little, weights, tf.reverse(weights, [0])), -1)

  first = tf.constant([2, 8, 12, 0], tf.int64)[fmt]  # after SOI, the PNG signature, the RIFF/WEBP header
  # A JPEG's EXIF segment starts "Exif\0\0": when those bytes occur nowhere in the window, the walk (which would go
  # through every segment up to the scan: most JPEGs carry no EXIF) cannot find one. One pass over the bytes.
  jpeg_without_exif = tf.equal(fmt, _JPEG) & tf.equal(tf.size(tf.strings.split(window, sep=b"Exif\0\0")), 1)
  start, end = _segment_walk(tf.where(jpeg_without_exif, _OTHER, fmt), read, first, size)

  def from_tiff():
    # The TIFF block: byte order, 42, offset of IFD0 (from the block's start), then 12-byte entries.
    end_ = tf.minimum(end, size)
    little = tf.equal(number(start, 2, False), 0x4949)  # "II"; "MM" is big-endian
    tiff = ((little | tf.equal(number(start, 2, False), 0x4D4D)) & tf.equal(number(start + 2, 2, little), 42))
    ifd = start + number(start + 4, 4, little)
    index = tf.range(MAX_ENTRIES, dtype=tf.int64)
    entry = ifd + 2 + 12 * index
    match = ((index < number(ifd, 2, little)) & (entry + 12 <= end_) &
             tf.equal(number(entry, 2, little), ORIENTATION_TAG) & tf.equal(number(entry + 2, 2, little), 3) &
             tf.equal(number(entry + 4, 4, little), 1))
    value = number(entry + 8, 2, little)[tf.argmax(tf.cast(match, tf.int32))]
    valid = tiff & tf.reduce_any(match) & (value >= 1) & (value <= 8)
    return tf.cast(tf.where(valid, value, 1), tf.int32)

  # Most photos carry no EXIF block at all (the walk found none): they skip the IFD's reads.
  return tf.cond(start >= 0, from_tiff, lambda: tf.constant(1, tf.int32))


def _transposed(image, reverse_rows=False, reverse_columns=False):
  """image [H, W, C] with rows and columns swapped ([W, H, C]), then its rows and/or columns reversed: one gather of
  whole pixels, exact for any dtype.

  Not tf.transpose: where TensorFlow uses oneDNN (CPUs with AVX-512 VNNI/BF16 or AMX, or TF_ENABLE_ONEDNN_OPTS=1),
  its graph rewrite inspects every Transpose and, for any dtype but float32, logs an error-level line ("oneDNN
  supports DT_UINT8 only on platforms with AVX-512") into every run whose graph decodes an image, even when no
  photo needs turning (docs/method.md §4.2). A gather is not rewritten, and costs about what the transpose did.
  """
  shape = tf.shape(image)  # int32: decoding refuses images over MAX_DECODE_PIXELS (1e8 < 2^31)
  height, width = shape[0], shape[1]
  out = tf.range(height * width)             # output pixel, row-major over [W, H]
  row, column = out % height, out // height  # the stored pixel it comes from, before the reversals
  row = height - 1 - row if reverse_columns else row
  column = width - 1 - column if reverse_rows else column
  pixels = tf.gather(tf.reshape(image, tf.stack([height * width, shape[2]])), row * width + column)
  return tf.reshape(pixels, tf.stack([width, height, shape[2]]))


def apply_orientation(image, orientation):
  """`image` [H, W, C] (any dtype) turned upright as EXIF orientation 1..8 asks; other values leave it unchanged.

  The orientation names where the stored rows and columns belong (TIFF 6.0, tag 274): 2 mirrors left-right, 3
  rotates 180 degrees, 4 mirrors top-bottom, 5 transposes (swaps rows and columns), 6 rotates 90 degrees
  clockwise, 7 transposes across the other diagonal, 8 rotates 90 degrees counter-clockwise. A 5-8 image comes out
  W x H.
  """
  image = tf.convert_to_tensor(image)
  branches = [lambda: image,
              lambda: tf.reverse(image, [1]),
              lambda: tf.reverse(image, [0, 1]),
              lambda: tf.reverse(image, [0]),
              lambda: _transposed(image),
              lambda: _transposed(image, reverse_columns=True),
              lambda: _transposed(image, reverse_rows=True, reverse_columns=True),
              lambda: _transposed(image, reverse_rows=True)]
  return tf.switch_case(tf.cast(orientation, tf.int32) - 1, branches, default=lambda: image)
