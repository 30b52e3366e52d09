"""Starting a new run from trained weights (train --init_from, method.md §11.7): another run's latest checkpoint, one
checkpoint of a run, or an exported backbone (OUT/backbone, RUN/export/backbone_<step>).

From a run or a checkpoint the tower is copied whole, batch-norm statistics included, and the pair head where its
layers match. An exported backbone has its batch norm folded into the conv/dense weights (method.md §5.1): those
weights are copied (fc6's 3x3 convolution back into the dense layer), and the new run's BN layers start with fresh
statistics, which its first training steps set; the head starts from its random initialisation. A tower whose BN has
a learned scale and shift (the modern towers, method.md §8.5) gets them from the export too: the shift of a BN after a
bias-free conv is that conv's folded bias, and a BN that was not folded into a layer (a ResNet v2's pre-activation,
exported as a per-channel affine map) takes that map as its scale and shift; so with fresh statistics (mean 0,
variance 1) the new tower computes the exported features. Either way the optimizer and the step start anew: it is a
new run, not a resumed one.
"""
import dataclasses
import os

from absl import logging
from keras import layers
import numpy as np
import tensorflow as tf

from context_keras import errors
from context_keras.deploy import serving
from context_keras.model import caffe_layers
from context_keras.model import fold
from context_keras.model import networks as model_lib
from context_keras.storage import paths as paths_lib
from context_keras.training import restore
from context_keras.training import run_dir

RUN, CHECKPOINT, BACKBONE = "run", "checkpoint", "backbone"
# The ModelConfig fields that can leave a layer of the tower or head missing, or of another shape: the flags a
# mismatch names when the source differs in them.
SHAPING_FIELDS = model_lib.ARCHITECTURE_FIELDS + ("resnet_version", "patch_size", "head")


@dataclasses.dataclass(frozen=True)
class Source:
  kind: str   # RUN, CHECKPOINT or BACKBONE
  path: str   # as given


def find_source(path):
  """What --init_from names; a UsageError when it is none of the three."""
  if paths_lib.is_file(os.path.join(path, "saved_model.pb")) or tf.io.gfile.isdir(
      os.path.join(path, serving.BACKBONE_DIR)):
    serving.read_backbone_metadata(path, "init_from")  # an exported backbone of context_keras, which says so
    return Source(BACKBONE, path)
  if run_dir.recorded_in(path):
    return Source(RUN, path)
  if tf.io.gfile.exists(path + ".index"):
    return Source(CHECKPOINT, path)
  raise errors.UsageError(f"--init_from={path} is neither a run directory (with {run_dir.CONFIG_FILE}), a checkpoint "
                          "(RUN/ckpt-N, with its .index file) nor an exported backbone (OUT/backbone, "
                          "RUN/export/backbone_N)")


def hint(theirs, ours):
  """Why a layer can be missing or of another shape: the flags in which the source's ModelConfig (`theirs`; None when
  it recorded none) differs from this run's."""
  differences = run_dir.model_differences(theirs, ours, SHAPING_FIELDS) if theirs is not None else []
  if not differences:
    return "check --backbone and --width_multiplier"
  return "; ".join(f"--{flag}={then} there, {now} here" for flag, then, now in differences)


def _mismatch(source, name, what, theirs, ours, why):
  return errors.UsageError(f"--init_from={source}: layer {name}'s {what} has shape {tuple(theirs)} there but "
                           f"{tuple(ours)} in this run's tower ({why})")


def _copy_layers(source, target, origin, strict, why):
  """Copies the weights of `origin`'s layers into the same-named layers of `target`; a missing layer or another
  shape is an error when `strict` (`why`: the hint it gives), else that layer keeps its weights. Returns the names of
  the layers copied."""
  copied = []
  for layer in target.layers:
    if not layer.weights:
      continue
    try:
      other = origin.get_layer(layer.name)
    except ValueError:
      if strict:
        raise errors.UsageError(f"--init_from={source} has no layer {layer.name} ({why})") from None
      continue
    values = other.get_weights()
    shapes = [(w.path.rsplit("/", 1)[-1], np.shape(v), tuple(w.shape)) for w, v in zip(layer.weights, values)]
    bad = [s for s in shapes if s[1] != s[2]] + ([("weights", (len(values),), (len(layer.weights),))]
                                                 if len(values) != len(layer.weights) else [])
    if bad:
      if strict:
        raise _mismatch(source, layer.name, *bad[0], why)
      continue
    for weight, value in zip(layer.weights, values):
      weight.assign(value)
    copied.append(layer.name)
  return copied


def _from_run(networks, model_config, source):
  model_dir = source.path if source.kind == RUN else paths_lib.parent(source.path)
  run = restore.load_run(model_dir, None if source.kind == RUN else source.path)
  why = hint(run.model_config, model_config)
  _copy_layers(source.path, networks.tower, run.networks.tower, strict=True, why=why)
  head = _copy_layers(source.path, networks.head, run.networks.head, strict=False, why=why)
  missing = [layer.name for layer in networks.head.layers if layer.weights and layer.name not in head]
  if missing:
    logging.warning("--init_from=%s: head layers %s do not match this run's and keep their initialisation.",
                    source.path, ", ".join(missing))
  return {"checkpoint": run.checkpoint, "step": run.step, "head": not missing}


def _from_backbone(networks, model_config, source):
  info = serving.read_backbone_metadata(source.path, "init_from")
  if info.get("backbone") != model_config.backbone:
    raise errors.UsageError(f"--init_from={source.path} is a {info.get('backbone')} backbone; this run trains "
                            f"--backbone={model_config.backbone}")
  weights = serving.read_weights(source.path)
  # Exports of earlier versions recorded no ModelConfig.
  why = hint(model_lib.ModelConfig(**info["model"]) if "model" in info else None, model_config)
  for layer in networks.tower.layers:
    if not isinstance(layer, (layers.Conv2D, layers.Dense)):
      continue
    for weight in layer.weights:
      key = f"{layer.name}/{weight.path.rsplit('/', 1)[-1]}"
      if key not in weights:
        raise errors.UsageError(f"--init_from={source.path} has no weight {key} ({why})")
      value = weights[key]
      if isinstance(layer, layers.Dense) and value.ndim == 4:
        # The export's fully convolutional fc6: a kh x kw x C x D kernel over the map a Flatten flattened (h, w, c
        # row-major), which reshapes back into the dense kernel.
        if value.size != np.prod(weight.shape):
          raise _mismatch(source.path, layer.name, "kernel", value.shape, weight.shape, why)
        value = value.reshape(weight.shape)
      if tuple(value.shape) != tuple(weight.shape):
        raise _mismatch(source.path, layer.name, key.rsplit("/", 1)[-1], value.shape, weight.shape, why)
      weight.assign(value)
  _affine_from_backbone(networks.tower, weights, source, why)
  return {"checkpoint": info.get("checkpoint"), "step": info.get("step"), "rescaled": info.get("rescaled", False),
          "head": False}


def _affine_from_backbone(tower, weights, source, why):
  """The learned scale and shift of each BN with them, from the folded export, for fresh statistics (mean 0,
  variance 1): gamma * x / sqrt(1 + eps) + beta must give the export's a * x + c, where (a, c) is (1, the folded
  bias) after a bias-free conv, or the export's per-channel affine map (a DepthwiseConv2D named as the BN)."""
  for node in fold.call_nodes(tower):
    layer = node.operation
    if not isinstance(layer, caffe_layers.CaffeBatchNorm) or layer.beta is None:
      continue
    producer = node.input_tensors[0]._keras_history.operation  # pylint: disable=protected-access
    if isinstance(producer, (layers.Conv2D, layers.Dense)):
      # Folded into that layer: its bias holds the shift, unless the layer has a bias of its own, which was copied.
      key = f"{producer.name}/bias"
      scale = np.ones(layer.beta.shape)
      shift = np.zeros(layer.beta.shape) if producer.use_bias else weights.get(key)
    else:
      key = f"{layer.name}/bias"
      scale, shift = weights.get(f"{layer.name}/kernel"), weights.get(key)
      scale = None if scale is None else scale.reshape(-1)
    if shift is None or scale is None:
      raise errors.UsageError(f"--init_from={source.path} has no weight {key} ({why})")
    if tuple(shift.shape) != tuple(layer.beta.shape):
      raise _mismatch(source.path, layer.name, "shift", shift.shape, layer.beta.shape, why)
    layer.beta.assign(shift)
    if layer.gamma is not None:
      layer.gamma.assign(scale * np.sqrt(1 + layer.epsilon))


def initialise(networks, model_config, path):
  """Loads the weights that --init_from=`path` names into a new run's `networks` (model.Networks); returns what
  RUN/config.json records about it."""
  source = find_source(path)
  if source.kind == BACKBONE:
    about = _from_backbone(networks, model_config, source)
  else:
    about = _from_run(networks, model_config, source)
  record = {"source": path, "kind": source.kind, **about}
  logging.info("Initialised from %s %s (%s): the tower%s.", source.kind, path,
               f"step {about['step']}" if about.get("step") is not None else "step unknown",
               " and the pair head" if about["head"] else "; the pair head keeps its random initialisation")
  return record
