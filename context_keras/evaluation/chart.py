"""A grouped bar chart rasterised with numpy and written with TensorFlow's PNG encoder, so that the ablation's plot
needs no plotting package. Text uses a built-in 3x5 pixel font (upper case, digits and a few signs), scaled up."""
import numpy as np
import tensorflow as tf

# Each glyph: 5 rows of 3 pixels, top to bottom, '#' on.
_GLYPHS = {
    "A": ".#. #.# ### #.# #.#",
    "B": "##. #.# ##. #.# ##.",
    "C": ".## #.. #.. #.. .##",
    "D": "##. #.# #.# #.# ##.",
    "E": "### #.. ##. #.. ###",
    "F": "### #.. ##. #.. #..",
    "G": ".## #.. #.# #.# .##",
    "H": "#.# #.# ### #.# #.#",
    "I": "### .#. .#. .#. ###",
    "J": "..# ..# ..# #.# .#.",
    "K": "#.# #.# ##. #.# #.#",
    "L": "#.. #.. #.. #.. ###",
    "M": "#.# ### ### #.# #.#",
    "N": "##. #.# #.# #.# #.#",
    "O": ".#. #.# #.# #.# .#.",
    "P": "##. #.# ##. #.. #..",
    "Q": ".#. #.# #.# ##. .##",
    "R": "##. #.# ##. #.# #.#",
    "S": ".## #.. .#. ..# ##.",
    "T": "### .#. .#. .#. .#.",
    "U": "#.# #.# #.# #.# ###",
    "V": "#.# #.# #.# #.# .#.",
    "W": "#.# #.# ### ### #.#",
    "X": "#.# #.# .#. #.# #.#",
    "Y": "#.# #.# .#. .#. .#.",
    "Z": "### ..# .#. #.. ###",
    "0": "### #.# #.# #.# ###",
    "1": ".#. ##. .#. .#. ###",
    "2": "##. ..# .#. #.. ###",
    "3": "##. ..# .#. ..# ##.",
    "4": "#.# #.# ### ..# ..#",
    "5": "### #.. ##. ..# ##.",
    "6": ".## #.. ### #.# ###",
    "7": "### ..# .#. .#. .#.",
    "8": "### #.# ### #.# ###",
    "9": "### #.# ### ..# ##.",
    ".": "... ... ... ... .#.",
    "%": "#.# ..# .#. #.. #.#",
    "-": "... ... ### ... ...",
    "_": "... ... ... ... ###",
    "/": "..# ..# .#. #.. #..",
    ":": "... .#. ... .#. ...",
    "+": "... .#. ### .#. ...",
    "(": ".#. #.. #.. #.. .#.",
    ")": ".#. ..# ..# ..# .#.",
    "=": "... ### ... ### ...",
    ",": "... ... ... .#. #..",
    " ": "... ... ... ... ...",
}
# Readable distinct colours for the series (RGB).
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


def _glyph(char):
  rows = _GLYPHS.get(char.upper(), _GLYPHS[" "]).split()
  return np.array([[c == "#" for c in row] for row in rows], bool)


def text_mask(text, scale=2):
  """A boolean image of `text` in the 3x5 font, one pixel column between characters, scaled by `scale`."""
  if not text:
    return np.zeros([5 * scale, 0], bool)
  columns = []
  for char in text:
    columns.extend([_glyph(char), np.zeros([5, 1], bool)])
  mask = np.concatenate(columns[:-1], axis=1)
  return np.kron(mask, np.ones([scale, scale], bool)).astype(bool)


def _draw_text(image, text, top, left, colour=(0, 0, 0), scale=2, vertical=False):
  mask = text_mask(text, scale)
  if vertical:
    mask = np.rot90(mask)
  h = max(0, min(mask.shape[0], image.shape[0] - top))
  w = max(0, min(mask.shape[1], image.shape[1] - left))
  if h and w and top >= 0 and left >= 0:
    region = image[top:top + h, left:left + w]
    region[mask[:h, :w]] = colour


def bar_chart(groups, series, values, title="", y_label="", bar_width=12, height=320):
  """uint8 [H, W, 3]: for each group (x axis) one bar per series, heights values[series][group] in [0, 1] (None:
  no bar), a y axis from 0 to 100 % with lines every 10 %, the group names under the axis and a legend of the
  series at the right."""
  scale = 2
  line = 5 * scale + 4
  plot_h = height - 3 * line - 20
  char_w = 4 * scale
  group_w = max(bar_width * len(series), max(len(g) for g in groups) * char_w) + 16
  legend_w = max(len(s) for s in series) * char_w + 30
  left, top = 60, 2 * line
  width = max(left + group_w * len(groups) + 20 + legend_w, left + len(title) * char_w + 10)
  image = np.full([height, width, 3], 255, np.uint8)
  _draw_text(image, title, 4, left, scale=scale)
  for tick in range(0, 11):
    y = top + plot_h - int(round(plot_h * tick / 10))
    image[y, left:left + group_w * len(groups)] = (225, 225, 225) if tick else (0, 0, 0)
    if tick % 2 == 0:
      _draw_text(image, f"{tick * 10}", y - 2 * scale, left - 8 * scale - 12, scale=scale)
  image[top:top + plot_h + 1, left] = 0
  _draw_text(image, y_label, top, 4, scale=scale, vertical=True)
  for g, name in enumerate(groups):
    x0 = left + g * group_w + 8
    for s, _ in enumerate(series):
      value = values[s][g]
      if value is None or not np.isfinite(value):
        continue
      bar = int(round(plot_h * min(max(value, 0.0), 1.0)))
      x = x0 + s * bar_width
      image[top + plot_h - bar:top + plot_h, x:x + bar_width - 2] = PALETTE[s % len(PALETTE)]
    _draw_text(image, name, top + plot_h + 6, x0, scale=scale)
  legend_x = left + group_w * len(groups) + 20
  for s, name in enumerate(series):
    y = top + s * line
    image[y:y + 5 * scale, legend_x:legend_x + 10] = PALETTE[s % len(PALETTE)]
    _draw_text(image, name, y, legend_x + 16, scale=scale)
  return image


def encode_png(image):
  """PNG bytes of a uint8 [H, W, 3] image (TensorFlow's encoder)."""
  return tf.io.encode_png(tf.constant(image, tf.uint8)).numpy()
