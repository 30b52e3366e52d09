"""Exports a trained run: python -m context_keras.export --model_dir=RUN --output=OUT [--checkpoint=...]
[--rescale_data=IMAGES]

writes (serving.py describes each)
  OUT/backbone/           SavedModel of the tower with its batch norm folded into the preceding conv/dense weights
                          (method.md §5.1, 8.5) and fc6 as a convolution, so it takes images of any size >= one
                          patch (96 px; 64 for the revisiting geometry). serving_default = features(images: uint8
                          [N, H, W, 3]) -> the backbone's named maps (conv1 ... fc6; after_root ... pre_logits), with
                          the preprocessing (augment.standardize) built in.
  OUT/pair_classifier/    SavedModel: serving_default = logits(patch_a, patch_b: uint8 [N, P, P, 3]) -> 8 logits.
  OUT/context_model.keras the two-input training model (unfolded, with its BN statistics) as a Keras file.
  OUT/rescale.json        with --rescale_data: Krähenbühl et al.'s rescaling of OUT/backbone
                          (method.md §5.2, rescale.py); chain towers only (alexnet_bn, vgg16_bn).
"""
import json
import os

from absl import flags
from absl import logging

from context_keras import errors
from context_keras import fold
from context_keras import program
from context_keras import rescale as rescale_lib
from context_keras import restore
from context_keras import serving
from context_keras import sources
from context_keras import writes
from context_keras.flagsets import data as data_flags

FLAGS = flags.FLAGS


def export_run(model_dir, output, checkpoint=None, rescale_data=None, data_root=None, rescale_options=None):
  """Writes OUT/backbone, OUT/pair_classifier, OUT/context_model.keras (and OUT/rescale.json); returns a summary."""
  run = restore.load_run(model_dir, checkpoint)
  folded = fold.fold_tower(run.networks.tower, run.model_config)
  if rescale_data:
    check_rescalable(folded, run.model_config)
  writes.check_folder(output, "output")
  logging.info("Exporting %s (step %d) to %s.", run.checkpoint, run.step, output)
  about = {"checkpoint": run.checkpoint, "step": run.step, "pixelation": run.pixelation, "rescaled": False}
  summary = dict(run.describe(), output=output)

  if rescale_data:
    options = dict(rescale_options or {})
    num_patches = options.pop("num_patches", rescale_lib.NUM_PATCHES)
    source = sources.find_source(rescale_data, data_root)
    patches = rescale_lib.sample_patches(source, num_patches, options.get("seed", 0), run.geometry)
    logging.info("Rescaling on %d patches from %s.", len(patches), source.description)
    report = rescale_lib.rescale(folded, serving.preprocess(patches, run.preprocessing), **options)
    report = dict(data=source.description, patches=len(patches), **report)
    writes.atomic_write_json(os.path.join(output, serving.RESCALE_FILE), report)
    about["rescaled"] = True
    calibration = report["between_layer"]
    summary["rescale"] = {"converged": calibration["converged"],
                          "max_deviation_before": calibration["before"]["max_deviation"],
                          "max_deviation_after": calibration["after"]["max_deviation"]}
  serving.save_backbone(folded, os.path.join(output, serving.BACKBONE_DIR),
                        serving.metadata(run.model_config, run.color_mode, folded, run.geometry, **about))
  # The pair classifier keeps the unrescaled tower: rescaling changes the features its head was trained on.
  serving.save_pair_classifier(run.networks, run.model_config, os.path.join(output, serving.PAIR_CLASSIFIER_DIR),
                               serving.metadata(run.model_config, run.color_mode, geometry=run.geometry,
                                                **dict(about, rescaled=False)))
  run.networks.context_model.save(os.path.join(output, serving.CONTEXT_MODEL_FILE))
  summary["written"] = [serving.BACKBONE_DIR, serving.PAIR_CLASSIFIER_DIR, serving.CONTEXT_MODEL_FILE] + (
      [serving.RESCALE_FILE] if rescale_data else [])
  return summary


def check_rescalable(folded, model_config):
  """Krähenbühl et al.'s calibration (method.md §5.2) is defined layer after layer of a feed-forward chain; a ResNet's
  residual additions have no such order (scaling a branch changes its share of every sum), so it is refused."""
  if not fold.is_chain(folded):
    raise errors.UsageError(f"--rescale_data: rescaling (method.md §5.2) handles chain towers (alexnet_bn, "
                            f"vgg16_bn); --backbone={model_config.backbone} adds residual branches, for which "
                            "Krähenbühl et al.'s per-layer calibration is not defined. Export without --rescale_data")


def define_flags():
  with program.flag_group("export"):
    flags.DEFINE_string("model_dir", None, "Run directory of context_keras.train to export (its config.json, or "
                        "flags.txt for older runs, gives the architecture and preprocessing).")
    flags.DEFINE_string("output", None, "Folder to write backbone/, pair_classifier/, context_model.keras and, with "
                        "--rescale_data, rescale.json into.")
    flags.DEFINE_string("checkpoint", None, "Checkpoint to export: a path (RUN/ckpt-N) or a step N; default the "
                        "latest.")
  with program.flag_group("rescaling"):
    flags.DEFINE_string("rescale_data", None, "Images (folder, list file, TFRecord glob or package:NAME, as --data; "
                        "list files are relative to --data_root) to run Krähenbühl et al.'s rescaling of the backbone "
                        "on (method.md §5.2). Without it the backbone is exported as folded.")
    program.define_integer("rescale_patches", rescale_lib.NUM_PATCHES, "Patches for the rescaling statistics "
                           "(magic_init: 10 batches of 16).", lower=1)
    flags.DEFINE_float("rescale_bias", rescale_lib.BIAS, "beta: the mean each unit's pre-activation gets from the "
                       "within-layer step (magic_init's --bias).")
    flags.DEFINE_bool("rescale_within_layer", True, "Apply the within-layer step (Algorithm 1) to every layer "
                      "before the between-layer calibration; magic_init applies it only to new, all-zero layers.")
    program.define_integer("rescale_iterations", rescale_lib.ITERATIONS, "Most between-layer calibration "
                           "iterations (magic_init: 10).", lower=0)
    program.define_float("rescale_tolerance", rescale_lib.TOLERANCE, "Calibration stops once every "
                         "|log r_k / log r* - 1| is below this (magic_init: 0.01).", above=0)
    program.define_integer("rescale_seed", 0, "Seed of the patches and the random gradients of the rescaling.",
                           lower=0)
  data_flags.define_source(data=False)


def main():
  for name in ("model_dir", "output"):
    if not FLAGS[name].value:
      raise errors.UsageError(f"--{name} is required")
  options = {"num_patches": FLAGS.rescale_patches, "bias": FLAGS.rescale_bias,
             "within_layer_step": FLAGS.rescale_within_layer, "iterations": FLAGS.rescale_iterations,
             "tolerance": FLAGS.rescale_tolerance, "seed": FLAGS.rescale_seed}
  summary = export_run(FLAGS.model_dir, FLAGS.output, FLAGS.checkpoint, FLAGS.rescale_data, FLAGS.data_root,
                       options)
  logging.info("Written to %s: %s.", FLAGS.output, ", ".join(summary["written"]))
  print(json.dumps(summary), flush=True)


if __name__ == "__main__":
  program.run(main, define_flags)
