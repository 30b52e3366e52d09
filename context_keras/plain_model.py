"""The folded backbone as a Keras model of Keras's own layers only (OUT/backbone.keras, method.md §11.3), which
keras.saving.load_model opens in safe mode in a process that has never seen context_keras, and which any Keras
optimizer trains as is.

  images [N, H, W, 3] (0-255, float or uint8; H, W >= 96)
    -> the preprocessing of the SavedModels (augment.standardize), in standard layers
    -> the layer "features": the folded backbone (input "preprocessed"), a copy of fold.fold_tower's model
    -> {conv1 ... fc6} maps, as the SavedModel's features signature returns them.

The copy is made layer by layer from the folded model: Keras layers are cloned with their weights; a layer of
context_keras is replaced by its STANDARD_FORMS entry, standard layers computing the same function. Keras has no
layer or activation that raises to a power such as LRN's -0.75 or takes a plain logarithm, so b^-0.75 is written
exp(-0.75 log b), exp as the "exponential" activation and log as a 1-sample STFT in "log" mode (_log), whose
output log(max(sqrt(max(x^2, 1e-7)), 1e-7)) is log x for every x >= 3.2e-4: the LRN's base is >= 1. TensorFlow's
own LRN kernel computes exp(-beta log b) too, so the two agree bit for bit. The fixed kernels these forms need
(the LRN's channel band, the STFT's, the pick of one STFT bin) are made non-trainable when built, so they stay
fixed even when a user sets `trainable = True` on the whole model.
"""
import keras
from keras import layers
import numpy as np

from context_keras import augment as augment_lib
from context_keras import caffe_layers

FEATURES_LAYER = "features"


def _fixed_conv(kernel, name):
  """A 1x1 convolution with a constant, never trained kernel [1, 1, in, out]."""
  return layers.Conv2D(kernel.shape[-1], 1, use_bias=False, trainable=False, name=name, dtype="float32",
                       kernel_initializer=keras.initializers.Constant(kernel.astype(np.float32)))


def _log(x, name):
  """log x elementwise (x >= 3.2e-4) for a 4-D map of any height and width, in standard layers.

  STFTSpectrogram takes [N, T, C] signals, so it runs over each image row (TimeDistributed keeps H and W dynamic).
  A 1-sample frame with a 2-point FFT gives two bins per channel, each |x| (a 1-point FFT would divide by zero in
  keras.initializers.STFT), in the order channel-major; a fixed 1x1 convolution keeps the first of each pair."""
  channels = x.shape[-1]
  stft = layers.STFTSpectrogram(mode="log", frame_length=1, frame_step=1, fft_length=2, window=None, scaling=None,
                                padding="valid", trainable=False, name=f"{name}_stft", dtype="float32")
  bins = layers.TimeDistributed(stft, name=f"{name}_rows", dtype="float32")(x)
  pick = np.zeros((1, 1, 2 * channels, channels))
  pick[0, 0, 2 * np.arange(channels), np.arange(channels)] = 1.0
  return _fixed_conv(pick, name)(bins)


def _local_response_norm(layer, x):
  """caffe_layers.LocalResponseNorm: x * (k + alpha/n * sum over n neighbouring channels of x^2)^-beta."""
  config, name, channels = layer.get_config(), layer.name, x.shape[-1]
  size = config["local_size"]
  index = np.arange(channels)
  band = (np.abs(index[:, None] - index[None, :]) <= size // 2)[None, None]
  squares = layers.Multiply(name=f"{name}_squares", dtype="float32")([x, x])
  window = _fixed_conv(band, f"{name}_window")(squares)
  base = layers.Rescaling(config["alpha"] / size, offset=config["bias"], name=f"{name}_base", dtype="float32")(window)
  log_base = _log(base, f"{name}_log")
  scaled = layers.Rescaling(-config["beta"], name=f"{name}_times_minus_beta", dtype="float32")(log_base)
  power = layers.Activation("exponential", name=f"{name}_power", dtype="float32")(scaled)
  return layers.Multiply(name=name, dtype="float32")([x, power])


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
  rows = layers.TimeDistributed(layers.GlobalAveragePooling1D(keepdims=True, dtype="float32"),
                                name=f"{name}_rows", dtype="float32")(x)
  return layers.GlobalAveragePooling2D(keepdims=True, name=name, dtype="float32")(rows)


def standardize(images, color_mode):
  """augment.standardize in standard layers: per image, channel means subtracted; then drop, drop_gaussian: each
  channel to RMS 50/sqrt(3); project: the green-magenta projection, then RMS 50 over all values; none: RMS 50.
  1/RMS is exp(-0.5 log(mean square)); a constant image gives zeros, as divide_no_nan does."""
  if color_mode not in augment_lib.COLOR_MODES:
    raise ValueError(f"color mode {color_mode!r} is not one of {augment_lib.COLOR_MODES}")
  centred = layers.Subtract(name="centred", dtype="float32")([images, _image_mean(images, "mean")])
  if color_mode == "project":
    centred = _fixed_conv(np.array(augment_lib.PROJECTION).T[None, None], "projected")(centred)
  squares = layers.Multiply(name="squares", dtype="float32")([centred, centred])
  mean_square = _image_mean(squares, "mean_square")
  target = augment_lib.RMS_TARGET
  if color_mode in ("drop", "drop_gaussian"):
    target /= 3 ** 0.5
  else:  # one RMS over all values: the mean of the channels' mean squares
    channels = mean_square.shape[-1]
    mean_square = _fixed_conv(np.full((1, 1, channels, 1), 1.0 / channels), "mean_square_all")(mean_square)
  inverse_rms = layers.Activation("exponential", name="inverse_rms", dtype="float32")(
      layers.Rescaling(-0.5, name="times_minus_half", dtype="float32")(_log(mean_square, "mean_square_log")))
  unit = layers.Multiply(name="unit_rms", dtype="float32")([centred, inverse_rms])
  return layers.Rescaling(target, name="standardized", dtype="float32")(unit)


def backbone_model(folded, color_mode):
  """The Keras model of OUT/backbone.keras: uint8 or float images (0-255) -> the folded backbone's maps, the
  SavedModel's preprocessing built in. model.get_layer("features") takes preprocessed input instead."""
  images = keras.Input((None, None, 3), name="images")
  features = standard_copy(folded)
  return keras.Model(images, features(standardize(images, color_mode)), name="backbone")
