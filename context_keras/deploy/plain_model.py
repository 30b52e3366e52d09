"""The folded backbone as a Keras model of Keras's own layers only (OUT/backbone.keras, method.md §11.3), which
keras.saving.load_model opens in safe mode in a process that has never seen context_keras, and which any Keras
optimizer trains as is.

  images [N, H, W, 3] (0-255, float or uint8; H, W >= one patch: 96, or 64 in the revisiting geometry)
    -> the preprocessing of the SavedModels (augment.standardize), in standard layers
    -> the layer "features": the folded backbone (input "preprocessed"), a copy of fold.fold_tower's model
    -> the backbone's named maps ({conv1 ... fc6}, {after_root ... pre_logits}), as the SavedModel's features
       signature returns them.

The copy is made layer by layer from the folded model: Keras layers are cloned with their weights; a layer of
context_keras is replaced by its STANDARD_FORMS entry, standard layers computing the same function.

Two constraints shape those forms. Keras has no activation, and no layer made for it, that raises to a power such
as LRN's -0.75 or takes a logarithm, so b^-0.75 is exp(-0.75 log b): exp is the "exponential" activation, and log a
1-sample STFT in "log" mode (_log), an audio layer whose output is the log of its input's magnitude. And Keras makes
every weight of a model trainable when a user sets `model.trainable = True` (the usual unfreezing after training a
new head), fixed kernels included. So the forms hold no weights of their own, except the STFT's kernel k, and _log
takes the STFT of b and of 1 through the same layer and subtracts: log(k b) - log(k) = log b whatever k becomes.
The file's trainable weights are the backbone's conv and fc weights (and the STFT kernels once a user sets
`trainable = True`).
"""
import keras
from keras import layers
import numpy as np

from context_keras.input import augment as augment_lib
from context_keras.model import caffe_layers

FEATURES_LAYER = "features"
FLOAT = {"dtype": "float32"}


def _channel_window_mean(x, size, name):
  """The mean of each channel's `size` neighbours (zeros beyond the first and last channel) for a map of any height
  and width: the channels become the rows of a zero-padded image that a (size x 1) average pooling slides over."""
  rows = layers.Permute((3, 1, 2), name=f"{name}_channels_first", **FLOAT)(x)
  rows = layers.ZeroPadding2D(((size // 2, size // 2), (0, 0)), name=f"{name}_pad", **FLOAT)(rows)
  rows = layers.AveragePooling2D((size, 1), strides=1, padding="valid", name=f"{name}_mean", **FLOAT)(rows)
  return layers.Permute((2, 3, 1), name=f"{name}_channels_last", **FLOAT)(rows)


def _channel_mean(x, name):
  """The mean over the channels of a [N, 1, 1, C] tensor, as [N, 1, 1, 1]."""
  columns = layers.Permute((3, 1, 2), name=f"{name}_channels_first", **FLOAT)(x)
  return layers.GlobalAveragePooling2D(keepdims=True, name=name, **FLOAT)(columns)


def _log(x, name):
  """log x elementwise (x >= 3.2e-4) for a 4-D map [N, H, W, C] of any height and width.

  STFTSpectrogram takes [N, T, C] signals, so it runs over each image row (TimeDistributed keeps H and W dynamic).
  A 1-sample frame with a 2-point FFT (a 1-point FFT divides by zero in keras.initializers.STFT) gives two bins per
  channel, |k x| each (channel-major), in "log" mode log(max(sqrt(max(|k x|^2, 1e-7)), 1e-7)), i.e. log|k x| for
  |k x| >= 3.2e-4; the mean of the two is kept. The same layer applied to ones gives log|k|, which is subtracted:
  with k = 1, as initialised, that is 0 and the result bit for bit log x, and if training moves k the result does
  not change (the gradient reaching k is rounding noise)."""
  channels = x.shape[-1]
  stft = layers.STFTSpectrogram(mode="log", frame_length=1, frame_step=1, fft_length=2, window=None, scaling=None,
                                padding="valid", trainable=False, name=f"{name}_stft", **FLOAT)
  per_row = keras.Sequential([
      keras.Input((None, channels)), stft,
      layers.Reshape((-1, channels, 2), name=f"{name}_bins", **FLOAT),
      layers.Permute((1, 3, 2), name=f"{name}_bins_first", **FLOAT),
      layers.AveragePooling2D((1, 2), name=f"{name}_bin_mean", **FLOAT),
      layers.Reshape((-1, channels), name=f"{name}_row", **FLOAT)], name=f"{name}_per_row")
  rows = layers.TimeDistributed(per_row, name=f"{name}_rows", **FLOAT)
  ones = layers.Rescaling(0.0, offset=1.0, name=f"{name}_ones", **FLOAT)(
      layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}_one_pixel", **FLOAT)(x))
  return layers.Subtract(name=name, **FLOAT)([rows(x), rows(ones)])


def _local_response_norm(layer, x):
  """caffe_layers.LocalResponseNorm: x * (k + alpha/n * sum over n neighbouring channels of x^2)^-beta; the sum's
  alpha/n is alpha times the window's mean."""
  config, name = layer.get_config(), layer.name
  squares = layers.Multiply(name=f"{name}_squares", **FLOAT)([x, x])
  window = _channel_window_mean(squares, config["local_size"], f"{name}_window")
  base = layers.Rescaling(config["alpha"], offset=config["bias"], name=f"{name}_base", **FLOAT)(window)
  log_base = _log(base, f"{name}_log")
  scaled = layers.Rescaling(-config["beta"], name=f"{name}_times_minus_beta", **FLOAT)(log_base)
  power = layers.Activation("exponential", name=f"{name}_power", **FLOAT)(scaled)
  return layers.Multiply(name=name, **FLOAT)([x, power])


# context_keras's layers that can appear in a folded backbone -> fn(layer, input) giving the same output in standard
# layers. CaffeBatchNorm never appears: folding removes it.
STANDARD_FORMS = {caffe_layers.LocalResponseNorm: _local_response_norm}


def _is_keras_layer(layer):
  return type(layer).__module__.startswith("keras.")


def _clone(layer):
  if _is_keras_layer(layer):
    return type(layer).from_config(layer.get_config())
  if type(layer) in STANDARD_FORMS:
    return layer  # never called: _call builds its standard form instead
  raise ValueError(f"layer {layer.name} ({type(layer).__name__}) has no standard Keras form "
                   "(plain_model.STANDARD_FORMS)")


def _call(layer, *args, **kwargs):
  form = STANDARD_FORMS.get(type(layer))
  return form(layer, *args) if form else layer(*args, **kwargs)


def standard_copy(folded):
  """The folded backbone (fold.fold_tower's model) rebuilt from standard layers, with its weights: preprocessed
  float input "preprocessed" [N, H, W, C] -> the same outputs."""
  preprocessed = keras.Input(folded.input.shape[1:], name="preprocessed")
  clone = keras.models.clone_model(folded, input_tensors=preprocessed, clone_function=_clone, call_function=_call)
  copy = keras.Model(clone.input, clone.output, name=FEATURES_LAYER)
  for layer in folded.layers:
    if layer.weights:
      copy.get_layer(layer.name).set_weights(layer.get_weights())
  return copy


def _image_mean(x, name):
  """Each image's and channel's mean [N, 1, 1, C] as the mean of its row means (augment.image_mean)."""
  rows = layers.TimeDistributed(layers.GlobalAveragePooling1D(keepdims=True, **FLOAT), name=f"{name}_rows",
                                **FLOAT)(x)
  return layers.GlobalAveragePooling2D(keepdims=True, name=name, **FLOAT)(rows)


def _project(centred):
  """augment.PROJECTION, x - a (a.x) / |a|^2 with a the green-magenta axis (-1, 2, -1), without weights."""
  axis = np.array(augment_lib._GREEN_MAGENTA)  # pylint: disable=protected-access
  weighted = layers.Rescaling(axis, name="along_axis", **FLOAT)(centred)
  channels_first = layers.Permute((3, 1, 2), name="along_axis_channels_first", **FLOAT)(weighted)
  mean = layers.AveragePooling2D((3, 1), name="along_axis_mean", **FLOAT)(channels_first)
  dot = layers.Permute((2, 3, 1), name="along_axis_channels_last", **FLOAT)(mean)  # a.x / 3
  spread = layers.Concatenate(name="along_axis_spread", **FLOAT)([dot, dot, dot])
  component = layers.Rescaling(3 * axis / np.dot(axis, axis), name="axis_component", **FLOAT)(spread)
  return layers.Subtract(name="projected", **FLOAT)([centred, component])


def _per_image_standardization(images):
  """augment.STANDARDIZATION (the revisiting geometry, method.md §8.2): (x - mean) / std over all pixels and channels
  of each image. tf.image.per_image_standardization divides by max(std, 1/sqrt(values)); here 1/std is
  exp(-0.5 log(variance)) and _log clamps at 3.2e-4, so the floor is std 0.018 instead of 1/sqrt(values) (0.009 for
  one 64-px patch, less for larger images): the two differ only on images whose values spread by less than 0.018
  grey levels, such as a uniform image with a few pixels one level off; a constant image gives zeros in both."""
  mean = _channel_mean(_image_mean(images, "mean"), "mean_all")
  centred = layers.Subtract(name="centred", **FLOAT)([images, mean])
  squares = layers.Multiply(name="squares", **FLOAT)([centred, centred])
  variance = _channel_mean(_image_mean(squares, "mean_square"), "variance")
  inverse_std = layers.Activation("exponential", name="inverse_std", **FLOAT)(
      layers.Rescaling(-0.5, name="times_minus_half", **FLOAT)(_log(variance, "variance_log")))
  return layers.Multiply(name="standardized", **FLOAT)([centred, inverse_std])


def standardize(images, color_mode):
  """augment.standardize in standard layers: per image, channel means subtracted; then drop, drop_gaussian: each
  channel to RMS 50/sqrt(3); project: the green-magenta projection, then RMS 50 over all values; none and
  chroma_blur: RMS 50.
  1/RMS is exp(-0.5 log(mean square)); a constant image gives zeros, as divide_no_nan does. `color_mode` may also be
  augment.STANDARDIZATION, the revisiting geometry's (_per_image_standardization)."""
  if color_mode == augment_lib.STANDARDIZATION:
    return _per_image_standardization(images)
  if color_mode not in augment_lib.COLOR_MODES:
    raise ValueError(f"color mode {color_mode!r} is not one of {augment_lib.PREPROCESSING_MODES}")
  centred = layers.Subtract(name="centred", **FLOAT)([images, _image_mean(images, "mean")])
  if color_mode == "project":
    centred = _project(centred)
  squares = layers.Multiply(name="squares", **FLOAT)([centred, centred])
  mean_square = _image_mean(squares, "mean_square")
  target = augment_lib.RMS_TARGET
  if color_mode in ("drop", "drop_gaussian"):
    target /= 3 ** 0.5
  else:  # one RMS over all values: the mean of the channels' mean squares
    mean_square = _channel_mean(mean_square, "mean_square_all")
  inverse_rms = layers.Activation("exponential", name="inverse_rms", **FLOAT)(
      layers.Rescaling(-0.5, name="times_minus_half", **FLOAT)(_log(mean_square, "mean_square_log")))
  unit = layers.Multiply(name="unit_rms", **FLOAT)([centred, inverse_rms])
  return layers.Rescaling(target, name="standardized", **FLOAT)(unit)


def backbone_model(folded, color_mode):
  """The Keras model of OUT/backbone.keras: uint8 or float images (0-255) -> the folded backbone's maps, the
  SavedModel's preprocessing (`color_mode`: the run's preprocessing mode, geometry.Geometry.preprocessing) built in.
  model.get_layer("features") takes preprocessed input instead."""
  images = keras.Input((None, None, 3), name="images")
  features = standard_copy(folded)
  return keras.Model(images, features(standardize(images, color_mode)), name="backbone")
