"""Folding batch norm into the layer before it (method.md §5.1): a float32 copy of a chain model without any BN.

Training's exports, the export program and every evaluation use fold_tower; the pair classifier folds the head too.
The copy can also replace 'same' max pooling by Caffe's ceil-mode pooling (method.md §11.4), which the training
tower stands in for at 96 px but not at other sizes.
"""
import contextlib

import keras
from keras import layers
import numpy as np

from context_keras import caffe_layers
from context_keras import model as model_lib


@contextlib.contextmanager
def float32_policy():
  """Builds serving copies in float32 whatever precision training used."""
  previous = keras.config.dtype_policy()
  keras.config.set_dtype_policy("float32")
  try:
    yield
  finally:
    keras.config.set_dtype_policy(previous)


def _producer(tensor):
  """The layer that produced a symbolic Keras tensor."""
  return tensor._keras_history.operation  # pylint: disable=protected-access


def _clone(layer, **overrides):
  config = dict(layer.get_config(), dtype="float32", **overrides)
  return type(layer).from_config(config)


POOLINGS = ("auto", "caffe", "trained")


def _is_relu(layer):
  if isinstance(layer, layers.ReLU):
    config = layer.get_config()
    return not config.get("negative_slope") and not config.get("threshold")
  return isinstance(layer, layers.Activation) and layer.get_config()["activation"] == "relu"


def _caffe_pool(layer, x):
  """Caffe's max pooling with pad 0 and ceil rounding, ceil((H - k)/s) + 1 windows each clipped at the bottom/right
  edge, as standard layers: pad bottom and right by s - 1, then pool 'valid' (floor((H + s - 1 - k)/s) + 1 is the
  same count, and every window keeps at least one real row when k >= s). The padding is zeros, which a max ignores
  only because the input is a ReLU output (>= 0); the caller checks that."""
  (kh, kw), (sh, sw) = layer.pool_size, layer.strides
  if kh < sh or kw < sw:
    raise ValueError(f"{layer.name}: Caffe pooling needs windows at least as large as the strides")
  x = layers.ZeroPadding2D(((0, sh - 1), (0, sw - 1)), name=f"{layer.name}_pad", dtype="float32")(x)
  return _clone(layer, padding="valid")(x)


def fold_batchnorm(model, fully_convolutional=False, outputs=None, caffe_pooling=False):
  """A float32 copy of a chain model (the tower or the head) with every CaffeBatchNorm folded into the conv/dense
  layer before it: W' = W/s, b' = (b - mu)/s with s = sqrt(var + eps) from the moving statistics (method.md §5.1),
  so that W'x + b' is the BN output of inference. No BN remains.

  Activations fused into a layer are split off (`<name>_relu`), so that a conv's output is its pre-activation (for
  rescale.py). With fully_convolutional, the input takes any height and width and the Flatten + Dense (fc6) becomes
  a valid convolution over the flattened map's extent (3x3 for a 96-px patch), as the paper's detection network
  turns fc6 into conv6 (method.md §6.1). `outputs`: names of layers whose activated outputs the model returns as a dict
  (a conv or dense layer after its ReLU, a pooling layer as is); default, the last layer's output. With
  caffe_pooling, every 'same' max pooling becomes Caffe's ceil-mode pooling (_caffe_pool): identical wherever the
  two agree (all sizes of a 96-px patch), Caffe's sizes and windows elsewhere; each such pool must follow a ReLU.
  """
  main_input = model.inputs[0]
  with float32_policy():
    shape = (None, None, main_input.shape[-1]) if fully_convolutional else tuple(main_input.shape[1:])
    new_input = keras.Input(shape, name="images" if fully_convolutional else main_input.name)
    x = new_input
    previous = _producer(main_input)
    weights = {}          # new weighted layer -> [kernel, bias] as float64, folded later by its BN
    activated = {}        # layer name -> its output after any following BN/ReLU
    last_weighted = None  # (old layer, new layer) whose output x still is (before its activation)
    flattened = None      # spatial extent of the map a skipped Flatten would have flattened
    after_relu = False    # whether x is a ReLU's output (>= 0)
    for layer in model.layers:
      if isinstance(layer, layers.InputLayer):
        continue
      inputs = layer.input if isinstance(layer.input, (list, tuple)) else [layer.input]
      if _producer(inputs[0]) is not previous:
        raise ValueError(f"fold_batchnorm handles chains of layers; {layer.name} does not follow {previous.name}")
      previous = layer
      if isinstance(layer, caffe_layers.CaffeBatchNorm):
        if last_weighted is None or _producer(inputs[0]) is not last_weighted[0]:
          raise ValueError(f"{layer.name} does not directly follow a conv or dense layer: it cannot be folded")
        mean, variance = (np.asarray(t, np.float64) for t in layer.moving_statistics())
        scale = np.sqrt(variance + layer.epsilon)
        kernel, bias = weights[last_weighted[1]]
        weights[last_weighted[1]] = [kernel / scale, (bias - mean) / scale]
        continue
      if isinstance(layer, layers.Flatten) and fully_convolutional:
        flattened = tuple(layer.input.shape[1:3])
        continue
      if isinstance(layer, (layers.Conv2D, layers.Dense)):
        kernel, bias = (np.asarray(w, np.float64) for w in layer.get_weights())
        activation = layer.get_config()["activation"]
        if isinstance(layer, layers.Dense) and fully_convolutional:
          if flattened is None:
            raise ValueError(f"{layer.name}: a dense layer of a fully convolutional copy must follow a Flatten")
          new = layers.Conv2D(kernel.shape[-1], flattened, padding="valid", name=layer.name, dtype="float32")
          # Keras flattens (h, w, c) row-major, so the dense kernel is the 3x3 conv kernel, reshaped.
          kernel = kernel.reshape(flattened + (-1, kernel.shape[-1]))
          flattened = None
        else:
          new = _clone(layer, activation="linear")
        x = new(x)
        weights[new] = [kernel, bias]
        last_weighted = (layer, new)
        activated[layer.name] = x
        after_relu = activation == "relu"
        if activation not in ("linear", None):
          x = layers.Activation(activation, name=f"{layer.name}_{activation}", dtype="float32")(x)
          activated[layer.name] = x
        continue
      if caffe_pooling and isinstance(layer, layers.MaxPooling2D) and layer.padding == "same":
        if not after_relu:
          raise ValueError(f"{layer.name} does not follow a ReLU: its Caffe pooling would pad with zeros that a "
                           "max does not ignore")
        x = _caffe_pool(layer, x)
      else:
        x = _clone(layer)(x)
        after_relu = _is_relu(layer) or (after_relu and isinstance(layer, layers.MaxPooling2D))
      if isinstance(layer, (layers.ReLU, layers.Activation)) and last_weighted is not None:
        activated[last_weighted[0].name] = x
      else:
        activated[layer.name] = x
        last_weighted = None
    if outputs is None:
      result = keras.Model(new_input, x, name=f"{model.name}_folded")
    else:
      missing = [name for name in outputs if name not in activated]
      if missing:
        raise ValueError(f"{model.name} has no layer {missing}")
      result = keras.Model(new_input, {name: activated[name] for name in outputs}, name=f"{model.name}_folded")
  for layer, (kernel, bias) in weights.items():
    layer.set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
  return result


def caffe_pooling(model_config, pooling="auto"):
  """Whether a backbone is exported with Caffe's ceil-mode pooling: `pooling` is one of POOLINGS; auto = the
  backbone's own choice (model.Backbone.caffe_pooling: AlexNet-BN's original was a Caffe network)."""
  if pooling not in POOLINGS:
    raise ValueError(f"pooling {pooling!r} is not one of {POOLINGS}")
  return model_lib.BACKBONES[model_config.backbone].caffe_pooling if pooling == "auto" else pooling == "caffe"


def fold_tower(tower, model_config, pooling="auto"):
  """The backbone: the tower folded, fully convolutional, returning the maps of its backbone's named layers
  (model.BACKBONES[...].features), with Caffe's pooling where caffe_pooling(model_config, pooling) says so."""
  return fold_batchnorm(tower, fully_convolutional=True, outputs=model_lib.BACKBONES[model_config.backbone].features,
                        caffe_pooling=caffe_pooling(model_config, pooling))

