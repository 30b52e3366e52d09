"""Exports a trained run: python -m context_keras.export --model_dir=RUN --output=OUT [--checkpoint=...]
[--rescale_data=IMAGES]

writes
  OUT/backbone/           SavedModel of the tower with its batch norm folded into the preceding conv/dense weights
                          (spec 5.1) and fc6 as a 3x3 convolution, so it takes images of any size >= 96 px.
                          serving_default = features(images: uint8 [N, H, W, 3]) -> conv1 ... conv5, pool5, fc6 maps,
                          with the preprocessing (patches.standardize) built in.
  OUT/pair_classifier/    SavedModel: serving_default = logits(patch_a, patch_b: uint8 [N, 96, 96, 3]) -> 8 logits.
  OUT/context_model.keras the two-input training model (unfolded, with its BN statistics) as a Keras file.
  OUT/rescale.json        with --rescale_data: Krähenbühl et al.'s rescaling of OUT/backbone (spec 5.2, rescale.py).

The SavedModels need only TensorFlow (tf.saved_model.load works in a process that never imports context_keras);
OUT/backbone/assets.extra/context_keras.json describes them. train.py calls export_backbone() at the end of
training (RUN/export/backbone_<step>). The command's flags are defined only when this module runs as the program:
train.py imports it, and already defines --model_dir.
"""
import contextlib
import dataclasses
import json
import os
import sys

from absl import app
from absl import flags
from absl import logging
import keras
from keras import layers
import numpy as np
import tensorflow as tf

from context_keras import data as data_lib
from context_keras import model as model_lib
from context_keras import patches as patches_lib

FLAGS = flags.FLAGS

# train.RUN_FLAGS_FILE, the flagfile train.py writes in every run; not imported from there because train.py imports
# this module (tests/test_export.py checks that the two agree).
RUN_FLAGS_FILE = "flags.txt"
BACKBONE_DIR = "backbone"
PAIR_CLASSIFIER_DIR = "pair_classifier"
CONTEXT_MODEL_FILE = "context_model.keras"
RESCALE_FILE = "rescale.json"
# SavedModel's folder for files of higher-level libraries, which loaders ignore.
METADATA_FILE = os.path.join("assets.extra", "context_keras.json")
# The backbone's named outputs: each conv/fc after its (folded) BN and ReLU, and the last pooling (spec 3.1).
FEATURE_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "pool5", "fc6")
PREPROCESSING = ("uint8 RGB -> float; per image, each channel's mean is subtracted; then, by the run's --color_mode "
                 "(spec 2.4): drop/drop_gaussian: each channel scaled to RMS 50/sqrt(3) (the expected conv1 input "
                 "over the kept channel); project: the green-magenta projection, then RMS 50; none: RMS 50")


class ExportError(Exception):
  """A flag or path that export or evaluation cannot use; the message names it."""


@contextlib.contextmanager
def float32_policy():
  """Builds serving copies in float32 whatever precision training used."""
  previous = keras.config.dtype_policy()
  keras.config.set_dtype_policy("float32")
  try:
    yield
  finally:
    keras.config.set_dtype_policy(previous)


# --------------------------------------------------------------------------------------------------------------
# A run directory: its flags and checkpoints (train.py's layout)


def read_run_flags(model_dir):
  """The flags recorded in RUN/flags.txt, {name: value as written}; booleans as 'true'/'false'."""
  path = os.path.join(model_dir, RUN_FLAGS_FILE)
  if not os.path.isdir(model_dir):
    raise ExportError(f"--model_dir={model_dir} does not exist")
  if not os.path.isfile(path):
    raise ExportError(f"--model_dir={model_dir} has no {RUN_FLAGS_FILE}: not a run directory of context_keras.train")
  values = {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.strip()
      if not line.startswith("--"):
        continue
      name, sep, value = line[2:].partition("=")
      if not sep:  # a boolean: --name or --noname
        negated = name.startswith("no") and name[2:] in FLAGS
        name, value = (name[2:], "false") if negated else (name, "true")
      values[name] = value
  return values


def run_flag(values, name):
  """Typed value of a flag (defined in this process) as recorded in a run, or its default."""
  flag = FLAGS[name]
  return flag.parser.parse(values[name]) if name in values else flag.default


def run_model_config(values):
  """The ModelConfig a run was trained with: its fields are the model flags of model.py."""
  return model_lib.ModelConfig(**{f.name: run_flag(values, f.name) for f in dataclasses.fields(model_lib.ModelConfig)})


def find_checkpoint(model_dir, checkpoint=None):
  """Path of RUN's checkpoint to use: --checkpoint (a path, or a step number N for RUN/ckpt-N), else the latest."""
  if checkpoint:
    path = os.path.join(model_dir, f"ckpt-{checkpoint}") if str(checkpoint).isdigit() else checkpoint
    if not tf.io.gfile.exists(path + ".index"):
      raise ExportError(f"--checkpoint={checkpoint}: no checkpoint {path} (no {path}.index)")
    return path
  if not os.path.isdir(model_dir):
    raise ExportError(f"--model_dir={model_dir} does not exist")
  path = tf.train.latest_checkpoint(model_dir)
  if not path:
    raise ExportError(f"--model_dir={model_dir} holds no checkpoint (ckpt-N) yet")
  return path


def checkpoint_step(path):
  """The training step a checkpoint was written at."""
  reader = tf.train.load_checkpoint(path)
  key = "optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"
  if reader.has_tensor(key):
    return int(reader.get_tensor(key))
  suffix = path.rsplit("-", 1)[-1]
  return int(suffix) if suffix.isdigit() else 0


def build_networks(model_config):
  with float32_policy():
    return model_lib.build(model_config)


def restore(networks, path):
  """Loads the tower and head of a training checkpoint (train.Trainer.checkpoint_items) into `networks`."""
  status = tf.train.Checkpoint(tower=networks.tower, head=networks.head).restore(path)
  try:
    status.assert_existing_objects_matched()
  except AssertionError as e:
    raise ExportError(f"checkpoint {path} does not match the run's architecture: {str(e)[:300]}") from e
  status.expect_partial()  # the optimizer and the run's counters are not needed here


@dataclasses.dataclass
class Run:
  """A trained run, restored: everything export and evaluation need to rebuild and describe it."""
  model_dir: str
  checkpoint: str
  step: int
  model_config: model_lib.ModelConfig
  color_mode: str
  pixelation: bool
  train_steps: int
  networks: model_lib.Networks

  def describe(self):
    return {"model_dir": self.model_dir, "checkpoint": self.checkpoint, "step": self.step,
            "backbone": self.model_config.backbone, "width_multiplier": self.model_config.width_multiplier,
            "color_mode": self.color_mode}


def load_run(model_dir, checkpoint=None):
  """Rebuilds a run's architecture from RUN/flags.txt and restores a checkpoint (default: the latest)."""
  values = read_run_flags(model_dir)
  path = find_checkpoint(model_dir, checkpoint)
  model_config = run_model_config(values)
  networks = build_networks(model_config)
  restore(networks, path)
  train_steps = values.get("train_steps", "0")
  return Run(model_dir=model_dir, checkpoint=path, step=checkpoint_step(path), model_config=model_config,
             color_mode=run_flag(values, "color_mode"), pixelation=run_flag(values, "pixelation"),
             train_steps=int(train_steps) if train_steps.isdigit() else 0, networks=networks)


# --------------------------------------------------------------------------------------------------------------
# Folding batch norm (spec 5.1)


def _producer(tensor):
  """The layer that produced a symbolic Keras tensor."""
  return tensor._keras_history.operation  # pylint: disable=protected-access


def _clone(layer, **overrides):
  config = dict(layer.get_config(), dtype="float32", **overrides)
  return type(layer).from_config(config)


def fold_batchnorm(model, fully_convolutional=False, outputs=None):
  """A float32 copy of a chain model (the tower or the head) with every CaffeBatchNorm folded into the conv/dense
  layer before it: W' = W/s, b' = (b - mu)/s with s = sqrt(var + eps) from the moving statistics (spec 5.1), so that
  W'x + b' is the BN output of inference. No BN remains.

  Activations fused into a layer are split off (`<name>_relu`), so that a conv's output is its pre-activation (for
  rescale.py). With fully_convolutional, the input takes any height and width and the Flatten + Dense (fc6) becomes
  a valid convolution over the flattened map's extent (3x3 for a 96-px patch), as the paper's detection network
  turns fc6 into conv6 (spec 6.1). `outputs`: names of layers whose activated outputs the model returns as a dict
  (a conv or dense layer after its ReLU, a pooling layer as is); default, the last layer's output.
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
    for layer in model.layers:
      if isinstance(layer, layers.InputLayer):
        continue
      inputs = layer.input if isinstance(layer.input, (list, tuple)) else [layer.input]
      if _producer(inputs[0]) is not previous:
        raise ValueError(f"fold_batchnorm handles chains of layers; {layer.name} does not follow {previous.name}")
      previous = layer
      if isinstance(layer, model_lib.CaffeBatchNorm):
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
        if activation not in ("linear", None):
          x = layers.Activation(activation, name=f"{layer.name}_{activation}", dtype="float32")(x)
          activated[layer.name] = x
        continue
      x = _clone(layer)(x)
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


def fold_tower(tower):
  """The backbone: the tower folded, fully convolutional, returning FEATURE_LAYERS."""
  return fold_batchnorm(tower, fully_convolutional=True, outputs=FEATURE_LAYERS)


# --------------------------------------------------------------------------------------------------------------
# SavedModels


def preprocess(images, color_mode):
  """What the SavedModels apply to their uint8 input (README 'Export and evaluation'): patches.standardize."""
  return patches_lib.standardize(tf.cast(images, tf.float32), color_mode)


def _flat_fc6(maps):
  fc6 = maps["fc6"]
  return tf.reshape(fc6, [tf.shape(fc6)[0], fc6.shape[-1]])


class BackboneModule(tf.Module):
  """The folded backbone behind two functions (also its signatures).

  features(images):      uint8 [N, H, W, 3], H and W >= 96 -> {conv1 ... conv5, pool5, fc6} float32 maps (after
                         ReLU; pool5 after pooling), the preprocessing built in.
  patch_features(patches): float32 [N, 96, 96, 3] already preprocessed as in training -> {"fc6": [N, C]}.
  """

  def __init__(self, folded, color_mode):
    super().__init__()
    self.model = folded
    self.color_mode = color_mode

  @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
  def features(self, images):
    size = tf.shape(images)[1:3]
    check = tf.debugging.assert_greater_equal(
        size, patches_lib.PATCH_SIZE, message=f"images must be at least {patches_lib.PATCH_SIZE}x"
        f"{patches_lib.PATCH_SIZE} pixels (one patch)")
    with tf.control_dependencies([check]):
      x = preprocess(images, self.color_mode)
    return self.model(x, training=False)

  @tf.function(input_signature=[tf.TensorSpec([None, patches_lib.PATCH_SIZE, patches_lib.PATCH_SIZE, 3],
                                              tf.float32, name="patches")])
  def patch_features(self, patches):
    return {"fc6": _flat_fc6(self.model(patches, training=False))}


class PairClassifierModule(tf.Module):
  """The context model, folded: where is patch B relative to patch A (labels as patches.NEIGHBOUR_OFFSETS).

  logits(patch_a, patch_b):              uint8 [N, 96, 96, 3] each, preprocessing built in -> {"logits": [N, 8]}.
  logits_preprocessed(patch_a, patch_b): float32 patches preprocessed as in training -> {"logits": [N, 8]}.
  """

  def __init__(self, folded_tower, folded_head, color_mode):
    super().__init__()
    self.tower = folded_tower
    self.head = folded_head
    self.color_mode = color_mode

  @tf.function(input_signature=[tf.TensorSpec([None, patches_lib.PATCH_SIZE, patches_lib.PATCH_SIZE, 3], tf.uint8,
                                              name=name) for name in ("patch_a", "patch_b")])
  def logits(self, patch_a, patch_b):
    return self.logits_preprocessed(preprocess(patch_a, self.color_mode), preprocess(patch_b, self.color_mode))

  @tf.function(input_signature=[tf.TensorSpec([None, patches_lib.PATCH_SIZE, patches_lib.PATCH_SIZE, 3],
                                              tf.float32, name=name) for name in ("patch_a", "patch_b")])
  def logits_preprocessed(self, patch_a, patch_b):
    n = tf.shape(patch_a)[0]
    fc6 = _flat_fc6(self.tower(tf.concat([patch_a, patch_b], 0), training=False))
    return {"logits": self.head(tf.concat([fc6[:n], fc6[n:]], -1), training=False)}


def metadata(model_config, color_mode, folded=None, **extra):
  """What a SavedModel's assets.extra/context_keras.json says: enough to rebuild the architecture (evaluate.py's
  random-init baseline) and to use it."""
  info = {"backbone": model_config.backbone, "width_multiplier": model_config.width_multiplier,
          "color_mode": color_mode, "preprocessing": PREPROCESSING, "min_size": patches_lib.PATCH_SIZE,
          "neighbour_offsets_dx_dy": patches_lib.NEIGHBOUR_OFFSETS}
  if folded is not None:
    info["features"] = {name: int(t.shape[-1]) for name, t in folded.output.items()}
  info.update(extra)
  return info


def write_metadata(path, info):
  os.makedirs(os.path.join(path, os.path.dirname(METADATA_FILE)), exist_ok=True)
  with open(os.path.join(path, METADATA_FILE), "w", encoding="utf-8") as f:
    json.dump(info, f, indent=1)


def read_metadata(path):
  try:
    with open(os.path.join(path, METADATA_FILE), encoding="utf-8") as f:
      return json.load(f)
  except OSError as e:
    raise ExportError(f"--saved_model={path}: no {METADATA_FILE}; not written by context_keras.export") from e


def save_backbone(folded, path, color_mode, info, serving_default="features"):
  """Writes the folded backbone as a SavedModel with signatures features and patch_features; `serving_default`
  names the one that is also the default."""
  module = BackboneModule(folded, color_mode)
  signatures = {"features": module.features.get_concrete_function(),
                "patch_features": module.patch_features.get_concrete_function()}
  signatures["serving_default"] = signatures[serving_default]
  tf.saved_model.save(module, path, signatures=signatures)
  write_metadata(path, dict(info, serving_default=serving_default))
  return path


def export_backbone(tower, model_config, path, color_mode="drop"):
  """The folded, fully convolutional backbone of `tower` as a SavedModel at `path` (train.py's end-of-training export).

  The same module as the export command's OUT/backbone, both signatures included, but serving_default stays
  patch_features (preprocessed float32 patches -> {"fc6": [N, C]}), the contract RUN/export/backbone_<step> has
  always had; features (uint8 images) is the other signature.
  """
  folded = fold_tower(tower)
  return save_backbone(folded, path, color_mode, metadata(model_config, color_mode, folded),
                       serving_default="patch_features")


def save_pair_classifier(networks, path, color_mode, info):
  module = PairClassifierModule(fold_tower(networks.tower), fold_batchnorm(networks.head), color_mode)
  signatures = {"logits": module.logits.get_concrete_function(),
                "logits_preprocessed": module.logits_preprocessed.get_concrete_function()}
  signatures["serving_default"] = signatures["logits"]
  tf.saved_model.save(module, path, signatures=signatures)
  write_metadata(path, dict(info, serving_default="logits"))
  return path


def load_context_model(path):
  """OUT/context_model.keras as a Keras model: its custom layers are model.py's."""
  custom = {cls.__name__: cls for cls in (model_lib.CaffeBatchNorm, model_lib.LocalResponseNorm)}
  return keras.saving.load_model(path, custom_objects=custom)


# --------------------------------------------------------------------------------------------------------------
# Images for rescaling and evaluation


def encoded_images(source, limit=None):
  """A finite dataset of (index, encoded bytes) over a data.Source in its listing order (every file once; the
  records of TFRecord shards in order), at most `limit` of them."""
  if source.kind == "files":
    paths = source.paths[:limit] if limit else source.paths
    contents = tf.data.Dataset.from_tensor_slices(list(paths)).map(tf.io.read_file)
  else:
    feature = {data_lib.TFRECORD_IMAGE_KEY: tf.io.FixedLenFeature([], tf.string)}
    contents = tf.data.TFRecordDataset(list(source.paths)).map(
        lambda r: tf.io.parse_single_example(r, feature)[data_lib.TFRECORD_IMAGE_KEY])
    if limit:
      contents = contents.take(limit)
  return contents.enumerate()


def sample_patches(source, num_patches, seed):
  """About num_patches real patches (float32 0-255, un-augmented) from the images of `source`, one random grid per
  image with the training geometry (patches.grid_patches), images in a seeded order, cycling until there are
  enough. Returns float32 [n, 96, 96, 3]."""
  order = np.random.default_rng(seed).permutation(len(source.paths)) if source.kind == "files" else None
  if order is not None:
    source = dataclasses.replace(source, paths=tuple(source.paths[i] for i in order))
  chunks, total = [], 0
  for rounds in range(10):
    def cut(index, contents, rounds=rounds):
      image_seed = tf.random.experimental.stateless_fold_in(tf.constant([seed, rounds], tf.int64), index)
      return patches_lib.grid_patches(data_lib.decode(contents), image_seed)[0]
    for patches in encoded_images(source).map(cut).ignore_errors():
      chunks.append(patches.numpy())
      total += len(chunks[-1])
      if total >= num_patches:
        return np.concatenate(chunks)[:num_patches]
    if not total:
      break
  if not total:
    raise ExportError(f"{source.description}: no image could be decoded and cut into {patches_lib.PATCH_SIZE}-px "
                      "patches")
  return np.concatenate(chunks)


# --------------------------------------------------------------------------------------------------------------
# The command


def export_run(model_dir, output, checkpoint=None, rescale_data=None, data_root=None, rescale_options=None):
  """Writes OUT/backbone, OUT/pair_classifier, OUT/context_model.keras (and OUT/rescale.json); returns a summary."""
  run = load_run(model_dir, checkpoint)
  if os.path.exists(output) and not os.path.isdir(output):
    raise ExportError(f"--output={output} is a file, not a directory")
  try:
    os.makedirs(output, exist_ok=True)
  except OSError as e:
    raise ExportError(f"--output={output} cannot be created: {e.strerror}") from e
  logging.info("Exporting %s (step %d) to %s.", run.checkpoint, run.step, output)
  about = {"checkpoint": run.checkpoint, "step": run.step, "pixelation": run.pixelation, "rescaled": False}
  summary = dict(run.describe(), output=output)

  folded = fold_tower(run.networks.tower)
  if rescale_data:
    from context_keras import rescale as rescale_lib  # pylint: disable=import-outside-toplevel
    options = dict(rescale_options or {})
    num_patches = options.pop("num_patches", rescale_lib.NUM_PATCHES)
    source = data_lib.find_source(rescale_data, data_root)
    patches = sample_patches(source, num_patches, options.get("seed", 0))
    logging.info("Rescaling on %d patches from %s.", len(patches), source.description)
    report = rescale_lib.rescale(folded, preprocess(patches, run.color_mode), **options)
    report = dict(data=source.description, patches=len(patches), **report)
    with open(os.path.join(output, RESCALE_FILE), "w", encoding="utf-8") as f:
      json.dump(report, f, indent=1)
    about["rescaled"] = True
    calibration = report["between_layer"]
    summary["rescale"] = {"converged": calibration["converged"],
                          "max_deviation_before": calibration["before"]["max_deviation"],
                          "max_deviation_after": calibration["after"]["max_deviation"]}
  save_backbone(folded, os.path.join(output, BACKBONE_DIR), run.color_mode,
                metadata(run.model_config, run.color_mode, folded, **about))
  # The pair classifier keeps the unrescaled tower: rescaling changes the features its head was trained on.
  save_pair_classifier(run.networks, os.path.join(output, PAIR_CLASSIFIER_DIR), run.color_mode,
                       metadata(run.model_config, run.color_mode, **dict(about, rescaled=False)))
  run.networks.context_model.save(os.path.join(output, CONTEXT_MODEL_FILE))
  summary["written"] = [BACKBONE_DIR, PAIR_CLASSIFIER_DIR, CONTEXT_MODEL_FILE] + (
      [RESCALE_FILE] if rescale_data else [])
  return summary


def define_flags():
  """The command's flags; see the module docstring for why they are defined here and not at import."""
  flags.DEFINE_string("model_dir", None, "Run directory of context_keras.train to export (its flags.txt gives the "
                      "architecture and preprocessing).")
  flags.DEFINE_string("output", None, "Folder to write backbone/, pair_classifier/, context_model.keras and, with "
                      "--rescale_data, rescale.json into.")
  flags.DEFINE_string("checkpoint", None, "Checkpoint to export: a path (RUN/ckpt-N) or a step N; default the latest.")
  flags.DEFINE_string("rescale_data", None, "Images (folder, list file, TFRecord glob or package:NAME, as --data; "
                      "list files are relative to --data_root) to run Krähenbühl et al.'s rescaling of the backbone "
                      "on (spec 5.2). Without it the backbone is exported as folded.")
  flags.DEFINE_integer("rescale_patches", 160, "Patches for the rescaling statistics (magic_init: 10 batches of 16).")
  flags.DEFINE_float("rescale_bias", 0.1, "beta: the mean each unit's pre-activation gets from the within-layer "
                     "step (magic_init's --bias).")
  flags.DEFINE_bool("rescale_within_layer", True, "Apply the within-layer step (Algorithm 1) to every layer before "
                    "the between-layer calibration; magic_init applies it only to new, all-zero layers.")
  flags.DEFINE_integer("rescale_iterations", 10, "Most between-layer calibration iterations (magic_init: 10).")
  flags.DEFINE_float("rescale_tolerance", 0.01, "Calibration stops once every |log r_k / log r* - 1| is below this "
                     "(magic_init: 0.01).")
  flags.DEFINE_integer("rescale_seed", 0, "Seed of the patches and the random gradients of the rescaling.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  try:
    for name in ("model_dir", "output"):
      if not FLAGS[name].value:
        raise ExportError(f"--{name} is required")
    options = {"num_patches": FLAGS.rescale_patches, "bias": FLAGS.rescale_bias,
               "within_layer_step": FLAGS.rescale_within_layer, "iterations": FLAGS.rescale_iterations,
               "tolerance": FLAGS.rescale_tolerance, "seed": FLAGS.rescale_seed}
    if FLAGS.rescale_patches < 1:
      raise ExportError(f"--rescale_patches={FLAGS.rescale_patches} must be >= 1")
    summary = export_run(FLAGS.model_dir, FLAGS.output, FLAGS.checkpoint, FLAGS.rescale_data, FLAGS.data_root,
                         options)
  except (ExportError, data_lib.DataError) as e:
    logging.error("%s", e)
    sys.exit(2)
  logging.info("Written to %s: %s.", FLAGS.output, ", ".join(summary["written"]))
  print(json.dumps(summary), flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
