"""The exported backbone for other runtimes (method.md §11): TensorFlow Lite (LiteRT) flatbuffers and ONNX, converted
from the SavedModel with the standard tools, and freezing, which gives SavedModels of earlier versions (whose
weights were variables, which the LiteRT converter left unfrozen) their weights as constants.

The LiteRT converter is part of TensorFlow; ONNX needs the optional tf2onnx (`pip install 'context_keras[onnx]'`).
"""
import os

import tensorflow as tf
from tensorflow.python.framework import convert_to_constants  # pylint: disable=no-name-in-module

from context_keras import errors
from context_keras.storage import writes

LITERT_FILE = "backbone.tflite"
LITERT_FLOAT16_FILE = "backbone_float16.tflite"
ONNX_FILE = "backbone.onnx"
# tf2onnx 1.17 converts opsets 13-18 (its default is 15); 17 is the oldest with every op the backbone needs in its
# current form, and onnxruntime has run it for years.
ONNX_OPSET = 17
ONNX_OPSETS = (13, 18)
ONNX_EXTRA = "pip install 'context_keras[onnx]'"
SERVING_DEFAULT = "serving_default"


def _signature_keys(saved_model):
  """The named signatures of a SavedModel, without the serving_default alias."""
  return sorted(key for key in tf.saved_model.load(saved_model).signatures if key != SERVING_DEFAULT)


def to_litert(saved_model, path, float16=False):
  """Converts every signature of `saved_model` (features and patch_features for a backbone) into one LiteRT
  flatbuffer at `path`, written atomically. With float16 the weights are stored as float16 (half the size; the
  model still computes in float32, and differs from the SavedModel by about 1e-3, not 1e-6)."""
  converter = tf.lite.TFLiteConverter.from_saved_model(saved_model, signature_keys=_signature_keys(saved_model))
  if float16:
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_types = [tf.float16]
  writes.atomic_write(path, converter.convert())
  return path


def check_onnx():
  """Stops with a UsageError when tf2onnx, which ONNX conversion needs, is not installed."""
  try:
    import tf2onnx  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError as e:
    raise errors.UsageError(f"--onnx needs the tf2onnx package ({ONNX_EXTRA}): {e}") from e


def to_onnx(saved_model, path, signature="features", opset=ONNX_OPSET):
  """Converts one signature of `saved_model` (ONNX models have one function) into an ONNX model at `path`, with
  the signature's input and output names; N, H and W stay dynamic."""
  check_onnx()
  import tf2onnx  # pylint: disable=import-outside-toplevel
  loaded = tf.saved_model.load(saved_model)
  specs = loaded.signatures[signature].structured_input_signature[1]
  input_signature = [tf.TensorSpec(specs[name].shape, specs[name].dtype, name=name) for name in sorted(specs)]
  proto, _ = tf2onnx.convert.from_function(getattr(loaded, signature), input_signature=input_signature, opset=opset)
  writes.atomic_write(path, proto.SerializeToString())
  return path


def _frozen_caller(frozen, names, outputs):
  """Calls a frozen ConcreteFunction by its input names and gives back its outputs as the original's dict (a frozen
  graph returns them as a flat list, in tf.nest's sorted-key order)."""
  def call(*args):
    return tf.nest.pack_sequence_as(outputs, frozen(**dict(zip(names, args))))
  return call


def _frozen(function):
  """A tf.function computing the signature function `function` with its variables turned into constants."""
  frozen = convert_to_constants.convert_variables_to_constants_v2(function)
  specs = function.structured_input_signature[1]
  names = sorted(specs)
  return tf.function(_frozen_caller(frozen, names, {key: 0 for key in function.structured_outputs}),
                     input_signature=[tf.TensorSpec(specs[n].shape, specs[n].dtype, name=n) for n in names])


def freeze_saved_model(source, path):
  """Writes to `path` (atomically) a copy of the SavedModel `source` whose every signature is the same function with
  all variables turned into constants, as this version's exports hold them: what LiteRT's converter needs. Works on
  any SavedModel with signatures (OUT/backbone, OUT/pair_classifier, RUN/export/backbone_<step> of any version);
  assets.extra (context_keras.json) is copied. Returns the signature names."""
  try:
    loaded = tf.saved_model.load(source)
  except (OSError, ValueError) as e:
    raise errors.UsageError(f"--freeze={source}: cannot load it as a SavedModel: {str(e)[:200]}") from e
  if not loaded.signatures:
    raise errors.UsageError(f"--freeze={source}: the SavedModel has no signatures to freeze")
  module, signatures = tf.Module(), {}
  for key, function in loaded.signatures.items():
    if key != SERVING_DEFAULT:
      setattr(module, key, _frozen(function))
      signatures[key] = getattr(module, key).get_concrete_function()
  default = loaded.signatures.get(SERVING_DEFAULT)
  if default is not None:
    # serving_default usually duplicates one of the others: the one with the same inputs and outputs.
    same = [key for key, function in loaded.signatures.items() if key != SERVING_DEFAULT and
            function.structured_input_signature == default.structured_input_signature and
            set(function.structured_outputs) == set(default.structured_outputs)]
    if same:
      signatures[SERVING_DEFAULT] = signatures[same[0]]
    else:
      module.serving_default = _frozen(default)
      signatures[SERVING_DEFAULT] = module.serving_default.get_concrete_function()
  extra = os.path.join(source, "assets.extra")
  with writes.atomic_folder(path) as staging:
    tf.saved_model.save(module, staging, signatures=signatures)
    if tf.io.gfile.isdir(extra):
      writes.copy_tree(extra, os.path.join(staging, "assets.extra"))
  return sorted(signatures)
