"""Folding batch norm into the layer before it (method.md §5.1, 8.5): a float32 copy of a tower or head without any
batch-norm layer, for any graph of layers (chains, and the ResNets' residual additions).

Training's exports, the export program and every evaluation use fold_tower; the pair classifier folds the head too.
The copy can also replace 'same' max pooling by Caffe's ceil-mode pooling (method.md §11.4), which the training
tower stands in for at 96 px but not at other sizes.
"""
import contextlib

import keras
from keras import layers
import numpy as np

from context_keras.model import caffe_layers
from context_keras.model import networks as model_lib


@contextlib.contextmanager
def float32_policy():
  """Builds serving copies in float32 whatever precision training used."""
  previous = keras.config.dtype_policy()
  keras.config.set_dtype_policy("float32")
  try:
    yield
  finally:
    keras.config.set_dtype_policy(previous)


def _clone(layer, **overrides):
  config = dict(layer.get_config(), dtype="float32", **overrides)
  return type(layer).from_config(config)


def call_nodes(model):
  """The model's own call nodes (not those of other models its layers were called in), inputs first."""
  return [node for depth in sorted(model._nodes_by_depth, reverse=True)  # pylint: disable=protected-access
          for node in model._nodes_by_depth[depth] if not node.is_input]  # pylint: disable=protected-access


def is_chain(model):
  """Whether every layer of a single-input model takes one tensor, which no other layer takes: a feed-forward
  chain (alexnet_bn, vgg16_bn), not a graph with residual additions (the ResNets)."""
  seen = set()
  for node in call_nodes(model):
    inputs = node.input_tensors
    if len(inputs) != 1 or id(inputs[0]) in seen:
      return False
    seen.add(id(inputs[0]))
  return True


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


def _bn_affine(layer):
  """(a, c) of a batch-norm layer in inference: y = a x + c per channel, float64, from the moving statistics and
  the learned scale and shift: a = gamma / sqrt(var + eps), c = beta - a mean."""
  mean, variance = (np.asarray(t, np.float64) for t in layer.moving_statistics())
  gamma, beta = (np.asarray(t, np.float64) for t in layer.affine())
  a = gamma / np.sqrt(variance + layer.epsilon)
  return a, beta - a * mean


def fold_batchnorm(model, fully_convolutional=False, outputs=None, caffe_pooling=False):
  """A float32 copy of a model (the tower or the head) with every CaffeBatchNorm folded away (method.md §5.1):
  with a = gamma/s, s = sqrt(var + eps), from the moving statistics, a BN whose input is a conv or dense layer's
  output (and nothing else's input) is folded into that layer, W' = a W, b' = a (b - mu) + beta, so that W'x + b'
  is the BN output of inference; any other BN (the pre-activation ones of a ResNet v2, on a residual sum) becomes
  the same per-channel affine map as a 1x1 depthwise convolution. No BN remains.

  Activations fused into a layer are split off (`<name>_relu`), so that a conv's output is its pre-activation (for
  rescale.py). With fully_convolutional, the input takes any height and width, a Flatten + Dense (fc6) becomes a
  valid convolution over the flattened map's extent (3x3 for a 96-px patch), as the paper's detection network turns
  fc6 into conv6 (method.md §6.1), and a global average pool keeps its 1x1 map. `outputs`: names of layers whose
  outputs the model returns as a dict (a conv or dense layer after its BN and ReLU, any other layer as is); default,
  the model's output. With caffe_pooling, every 'same' max pooling becomes Caffe's ceil-mode pooling (_caffe_pool):
  identical wherever the two agree (all sizes of a 96-px patch), Caffe's sizes and windows elsewhere; each such
  pool must take a ReLU's output.
  """
  nodes = call_nodes(model)
  consumers = {}
  for node in nodes:
    for tensor in node.input_tensors:
      consumers[id(tensor)] = consumers.get(id(tensor), 0) + 1
  main_input = model.inputs[0]
  with float32_policy():
    shape = (None, None, main_input.shape[-1]) if fully_convolutional else tuple(main_input.shape[1:])
    new_input = keras.Input(shape, name="images" if fully_convolutional else main_input.name)
    tensors = {id(main_input): new_input}  # old tensor -> new tensor
    weights = {}      # new conv/dense layer -> [kernel, bias] as float64, folded later by its BN
    linear = {}       # old tensor -> new conv/dense layer whose linear output it is (a BN may still fold into it)
    parameter_of = {}  # new tensor -> name of the conv/dense layer whose (normalised) output it is
    flattened = {}    # new tensor -> spatial extent of the map a skipped Flatten would have flattened
    activated = {}    # layer name -> its output (a conv/dense layer: after its BN and ReLU)
    non_negative = set()  # new tensors that are a ReLU's output, or a max pool of one
    for node in nodes:
      layer = node.operation
      old_x = node.input_tensors[0]
      out = node.outputs[0]
      if isinstance(layer, caffe_layers.CaffeBatchNorm):
        a, c = _bn_affine(layer)
        x = tensors[id(old_x)]
        producer = linear.get(id(old_x))
        if producer is not None and consumers[id(old_x)] == 1:
          kernel, bias = weights[producer]
          weights[producer] = [kernel * a, bias * a + c]
          linear[id(out)] = producer
        else:
          if len(x.shape) != 4:
            raise ValueError(f"{layer.name} follows no conv or dense layer and is not on a map: it cannot be folded")
          affine = layers.DepthwiseConv2D(1, name=layer.name, dtype="float32")
          x = affine(x)
          weights[affine] = [a.reshape(1, 1, -1, 1), c]
          parameter_of[id(x)] = None
        tensors[id(out)] = x
        activated[layer.name] = x
        continue
      x = tensors[id(old_x)]
      if isinstance(layer, layers.Flatten) and fully_convolutional:
        tensors[id(out)] = x
        flattened[id(x)] = tuple(old_x.shape[1:3])
        continue
      if isinstance(layer, (layers.Conv2D, layers.Dense)):
        kernel = np.asarray(layer.kernel, np.float64)
        bias = np.asarray(layer.bias, np.float64) if layer.use_bias else np.zeros(kernel.shape[-1])
        activation = layer.get_config()["activation"]
        if isinstance(layer, layers.Dense) and fully_convolutional:
          if id(x) not in flattened:
            raise ValueError(f"{layer.name}: a dense layer of a fully convolutional copy must follow a Flatten")
          extent = flattened[id(x)]
          new = layers.Conv2D(kernel.shape[-1], extent, padding="valid", name=layer.name, dtype="float32")
          # Keras flattens (h, w, c) row-major, so the dense kernel is the conv kernel, reshaped.
          kernel = kernel.reshape(extent + (-1, kernel.shape[-1]))
        else:
          new = _clone(layer, activation="linear", use_bias=True)
        y = new(x)
        weights[new] = [kernel, bias]
        parameter_of[id(y)] = layer.name
        activated[layer.name] = y
        if activation in ("linear", None):
          linear[id(out)] = new
        else:
          y = layers.Activation(activation, name=f"{layer.name}_{activation}", dtype="float32")(y)
          activated[layer.name] = y
          if activation == "relu":
            non_negative.add(id(y))
        tensors[id(out)] = y
        continue
      if caffe_pooling and isinstance(layer, layers.MaxPooling2D) and layer.padding == "same":
        if id(x) not in non_negative:
          raise ValueError(f"{layer.name} does not follow a ReLU: its Caffe pooling would pad with zeros that a "
                           "max does not ignore")
        y = _caffe_pool(layer, x)
      else:
        if isinstance(layer, layers.GlobalAveragePooling2D) and fully_convolutional:
          new = _clone(layer, keepdims=True)
        else:
          new = _clone(layer)
        args, kwargs = node.arguments.fill_in(tensors)
        y = new(*args, **kwargs)
      if _is_relu(layer) or (isinstance(layer, layers.MaxPooling2D) and id(x) in non_negative):
        non_negative.add(id(y))
      tensors[id(out)] = y
      activated[layer.name] = y
      if isinstance(layer, (layers.ReLU, layers.Activation)) and parameter_of.get(id(x)):
        activated[parameter_of[id(x)]] = y
    if outputs is None:
      result = keras.Model(new_input, tensors[id(model.outputs[0])], name=f"{model.name}_folded")
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

