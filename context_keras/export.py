"""Exports a trained run: python -m context_keras.export --model_dir=RUN --output=OUT [--checkpoint=...]
[--rescale_data=IMAGES] [--litert] [--litert_float16] [--onnx] [--pooling=auto|caffe|trained]

writes (serving.py describes each)
  OUT/backbone/           SavedModel of the tower with its batch norm folded into the preceding conv/dense weights
                          (method.md §5.1, 8.5) and fc6 as a convolution, so it takes images of any size >= one
                          patch (96 px; 64 for the revisiting geometry). serving_default = features(images: uint8
                          [N, H, W, 3]) -> the backbone's named maps (conv1 ... fc6; after_root ... pre_logits), with
                          the preprocessing (augment.standardize) built in. Pools follow Caffe's ceil rounding
                          (--pooling, method.md §11.4).
  OUT/backbone.keras      the same backbone as a Keras file of standard layers (plain_model.py): keras.saving.load_model
                          opens it without context_keras, and any optimizer fine-tunes it.
  OUT/pair_classifier/    SavedModel: serving_default = logits(patch_a, patch_b: uint8 [N, P, P, 3]) -> 8 logits.
  OUT/context_model.keras the two-input training model (unfolded, with its BN statistics) as a Keras file.
  OUT/rescale.json        with --rescale_data: Krähenbühl et al.'s rescaling of the backbone (method.md §5.2,
                          rescale.py; chain towers only: alexnet_bn, vgg16_bn), which OUT/backbone, backbone.keras and
                          the conversions then hold.
  OUT/backbone.tflite, OUT/backbone_float16.tflite, OUT/backbone.onnx   with --litert, --litert_float16, --onnx:
                          OUT/backbone converted for LiteRT and ONNX runtimes (convert.py, method.md §11).
Everything is written into a folder beside OUT that then replaces it (writes.atomic_folder): a kill leaves the old
export or the new one, never a mixture; other files in OUT (evaluation results) are kept.

python -m context_keras.export --freeze=SAVED_MODEL --output=NEW instead writes a copy of an existing SavedModel (of
any version) with its weights as constants, which TensorFlow Lite's converter needs (convert.freeze_saved_model).
"""
import inspect
import json
import os

from absl import flags
from absl import logging
import tensorflow as tf

from context_keras import errors
from context_keras.cli import data as data_flags
from context_keras.cli import program
from context_keras.deploy import convert
from context_keras.deploy import plain_model
from context_keras.deploy import rescale as rescale_lib
from context_keras.deploy import serving
from context_keras.input import sources
from context_keras.model import fold
from context_keras.storage import paths as paths_lib
from context_keras.storage import writes
from context_keras.training import restore

FLAGS = flags.FLAGS

# Everything an export writes into OUT: an entry of these names in an older OUT is replaced or dropped, anything
# else in it is kept.
OWNED = (serving.BACKBONE_DIR, serving.BACKBONE_KERAS_FILE, serving.PAIR_CLASSIFIER_DIR, serving.CONTEXT_MODEL_FILE,
         serving.RESCALE_FILE, convert.LITERT_FILE, convert.LITERT_FLOAT16_FILE, convert.ONNX_FILE)


def check_output(output):
  """--output must be new, empty or an earlier export: the export replaces it. Returns it normalised
  (paths_lib.normalise: `a/missing/../b` is `a/b`, checked and written alike)."""
  given, output = output, writes.check_target(output, "output")
  if tf.io.gfile.isdir(output):
    entries = paths_lib.listdir(output)
    if entries and not set(entries) & set(OWNED):
      raise errors.UsageError(f"--output={given} is a folder that holds no export ({', '.join(sorted(entries)[:5])}"
                              f"{' ...' if len(entries) > 5 else ''}); an export replaces its folder: give a new or "
                              "empty one")
  return output



def export_run(model_dir, output, checkpoint=None, rescale_data=None, data_root=None, rescale_options=None,
               pooling="auto", litert=False, litert_float16=False, onnx=False, onnx_opset=convert.ONNX_OPSET,
               tfds_data_dir=None):
  """Writes OUT/backbone, OUT/backbone.keras, OUT/pair_classifier, OUT/context_model.keras (and OUT/rescale.json,
  the LiteRT and ONNX files on request) as one folder that replaces OUT; returns a summary."""
  output = check_output(output)
  if onnx:
    convert.check_onnx()
  run = restore.load_run(model_dir, checkpoint)
  folded = fold.fold_tower(run.networks.tower, run.model_config, pooling)
  if rescale_data:
    check_rescalable(folded, run.model_config)
  logging.info("Exporting %s (step %d) to %s.", run.checkpoint, run.step, output)
  caffe_pooling = fold.caffe_pooling(run.model_config, pooling)
  about = serving.provenance(run.step, run.checkpoint, run.config.input, spans=run.config.spans)
  summary = dict(run.describe(), output=output, pooling="caffe" if caffe_pooling else "trained")

  report = None
  if rescale_data:
    options = dict(rescale_options or {})
    num_patches = options.pop("num_patches", rescale_lib.NUM_PATCHES)
    source = sources.find_source(rescale_data, data_root, tfds_data_dir)
    patches = rescale_lib.sample_patches(source, num_patches, options.get("seed", 0), run.patch_geometry)
    logging.info("Rescaling on %d patches from %s.", len(patches), source.description)
    report = rescale_lib.rescale(folded, serving.preprocess(patches, run.preprocessing), **options)
    report = dict(data=source.description, patches=len(patches), **report)
    about["rescaled"] = True
    calibration = report["between_layer"]
    summary["rescale"] = {"converged": calibration["converged"],
                          "max_deviation_before": calibration["before"]["max_deviation"],
                          "max_deviation_after": calibration["after"]["max_deviation"]}

  written = []
  with writes.atomic_folder(output, owned=OWNED) as staging:
    def path(name):
      written.append(name)
      return os.path.join(staging, name)

    backbone = path(serving.BACKBONE_DIR)
    serving.save_backbone(folded, backbone, run.preprocessing,
                          serving.metadata(run.model_config, run.color_mode, folded, caffe_pooling, run.geometry,
                                           **about))
    plain_model.backbone_model(folded, run.preprocessing).save(path(serving.BACKBONE_KERAS_FILE))
    # The pair classifier keeps the unrescaled tower: rescaling changes the features its head was trained on.
    serving.save_pair_classifier(run.networks, run.model_config, path(serving.PAIR_CLASSIFIER_DIR), run.preprocessing,
                                 serving.metadata(run.model_config, run.color_mode, geometry=run.geometry,
                                                  **dict(about, rescaled=False)))
    run.networks.context_model.save(path(serving.CONTEXT_MODEL_FILE))
    if report is not None:
      writes.atomic_write_json(path(serving.RESCALE_FILE), report)
    if litert:
      logging.info("Converting the backbone for LiteRT.")
      convert.to_litert(backbone, path(convert.LITERT_FILE))
    if litert_float16:
      logging.info("Converting the backbone for LiteRT with float16 weights.")
      convert.to_litert(backbone, path(convert.LITERT_FLOAT16_FILE), float16=True)
    if onnx:
      logging.info("Converting the backbone's features function to ONNX (opset %d).", onnx_opset)
      convert.to_onnx(backbone, path(convert.ONNX_FILE), opset=onnx_opset)
  summary["written"] = written
  return summary


def check_rescalable(folded, model_config):
  """Krähenbühl et al.'s calibration (method.md §5.2) is defined layer after layer of a feed-forward chain; a ResNet's
  residual additions have no such order (scaling a branch changes its share of every sum), so it is refused."""
  if not fold.is_chain(folded):
    raise errors.UsageError(f"--rescale_data: rescaling (method.md §5.2) handles chain towers (alexnet_bn, "
                            f"vgg16_bn); --backbone={model_config.backbone} adds residual branches, for which "
                            "Krähenbühl et al.'s per-layer calibration is not defined. Export without --rescale_data")


# The rescaling's settings: its function's own defaults (rescale.rescale), and the patches export_run samples.
RESCALING = {"num_patches": rescale_lib.NUM_PATCHES, **{
    name: parameter.default for name, parameter in inspect.signature(rescale_lib.rescale).parameters.items()
    if parameter.default is not inspect.Parameter.empty}}


def rescale_options():
  """export_run's rescale_options from the rescaling flags."""
  return {"num_patches": FLAGS.rescale_patches, "bias": FLAGS.rescale_bias,
          "within_layer_step": FLAGS.rescale_within_layer, "iterations": FLAGS.rescale_iterations,
          "tolerance": FLAGS.rescale_tolerance, "seed": FLAGS.rescale_seed}


def define_flags():
  with program.flag_group("export"):
    flags.DEFINE_string("model_dir", None, "Run directory of context_keras.train to export (its config.json, or "
                        "flags.txt for older runs, gives the architecture and preprocessing).")
    flags.DEFINE_string("output", None, "Folder the export replaces: backbone/, backbone.keras, pair_classifier/, "
                        "context_model.keras and what the flags below add. It must be new, empty or an earlier "
                        "export; its other files (evaluation results) are kept.")
    flags.DEFINE_string("checkpoint", None, "Checkpoint to export: a path (RUN/ckpt-N) or a step N; default the "
                        "latest.")
    flags.DEFINE_enum("pooling", "auto", list(fold.POOLINGS), "Max pooling of the exported backbone: Caffe's ceil "
                      "rounding, the training tower's, or auto = caffe for alexnet_bn (docs/flags.md#export).")
  with program.flag_group("deployment"):
    flags.DEFINE_bool("litert", False, "Also write OUT/backbone.tflite: OUT/backbone (both functions) converted for "
                      "LiteRT (TensorFlow Lite); it matches the SavedModel to about 1e-6.")
    flags.DEFINE_bool("litert_float16", False, "Also write OUT/backbone_float16.tflite: the same with float16 "
                      "weights, half the size, about 1e-3 from the SavedModel.")
    flags.DEFINE_bool("onnx", False, "Also write OUT/backbone.onnx: the features function converted by tf2onnx "
                      f"({convert.ONNX_EXTRA}).")
    program.define_integer("onnx_opset", convert.ONNX_OPSET, "ONNX opset of --onnx.", lower=convert.ONNX_OPSETS[0],
                           upper=convert.ONNX_OPSETS[1])
    flags.DEFINE_string("freeze", None, "Instead of exporting a run: copy this SavedModel of an earlier version to "
                        "--output, its weights frozen into constants (docs/flags.md#export).")
  with program.flag_group("rescaling"):
    flags.DEFINE_string("rescale_data", None, "Images (any form --data takes) to run Krähenbühl et al.'s rescaling "
                        "of the backbone on; without it the backbone is exported as folded (docs/flags.md#rescaling).")
    program.define_integer("rescale_patches", RESCALING["num_patches"], "Patches for the rescaling statistics "
                           "(magic_init: 10 batches of 16).", lower=1)
    program.define_float("rescale_bias", RESCALING["bias"], "beta: the mean each unit's pre-activation gets from the "
                         "within-layer step (magic_init's --bias).")
    flags.DEFINE_bool("rescale_within_layer", RESCALING["within_layer_step"], "Apply the within-layer step to every "
                      "layer first; magic_init applies it to new, all-zero layers only (docs/flags.md#rescaling).")
    program.define_integer("rescale_iterations", RESCALING["iterations"], "Most between-layer calibration "
                           "iterations (magic_init: 10).", lower=0)
    program.define_float("rescale_tolerance", RESCALING["tolerance"], "Calibration stops once every "
                         "|log r_k / log r* - 1| is below this (magic_init: 0.01).", above=0)
    program.define_integer("rescale_seed", RESCALING["seed"], "Seed of the patches and the random gradients of the "
                           "rescaling.", lower=0)
  data_flags.define_source(data=False)


def freeze(source, output):
  if not paths_lib.is_file(os.path.join(source, "saved_model.pb")):
    raise errors.UsageError(f"--freeze={source} is not a SavedModel folder (no saved_model.pb)")
  if paths_lib.same(source, output):
    raise errors.UsageError(f"--freeze={source} and --output are the same folder: write the frozen copy elsewhere")
  writes.check_complete(source, "freeze")
  given, output = output, writes.check_target(output, "output")
  if (tf.io.gfile.isdir(output) and paths_lib.listdir(output)
      and not paths_lib.is_file(os.path.join(output, "saved_model.pb"))):
    raise errors.UsageError(f"--output={given} is a folder that holds no SavedModel; the frozen copy replaces its "
                            "folder: give a new or empty one")
  signatures = convert.freeze_saved_model(source, output)
  return {"freeze": source, "output": output, "signatures": signatures}


def main():
  if not FLAGS.output:
    raise errors.UsageError("--output is required")
  if FLAGS.freeze:
    others = [name for name in ("model_dir", "checkpoint", "rescale_data", "litert", "litert_float16", "onnx")
              if FLAGS[name].present]
    if others:
      raise errors.UsageError("--freeze copies an existing SavedModel: it takes no "
                              + ", ".join("--" + name for name in others))
    summary = freeze(FLAGS.freeze, FLAGS.output)
    logging.info("Frozen copy of %s written to %s.", FLAGS.freeze, FLAGS.output)
  else:
    if not FLAGS.model_dir:
      raise errors.UsageError("--model_dir is required (or --freeze)")
    summary = export_run(FLAGS.model_dir, FLAGS.output, FLAGS.checkpoint, FLAGS.rescale_data, FLAGS.data_root,
                         rescale_options(), FLAGS.pooling, FLAGS.litert, FLAGS.litert_float16, FLAGS.onnx,
                         FLAGS.onnx_opset, tfds_data_dir=FLAGS.tfds_data_dir)
    logging.info("Written to %s: %s.", FLAGS.output, ", ".join(summary["written"]))
  print(json.dumps(summary), flush=True)


if __name__ == "__main__":
  program.run(main, define_flags)
