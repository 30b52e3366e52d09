"""The data group: where images come from, how patches are cut and augmented, and how batches are packed."""
from absl import flags

from context_keras import errors
from context_keras.cli import program
from context_keras.input import augment
from context_keras.input import geometry as geometry_lib
from context_keras.input import pipeline as data_lib

FLAGS = flags.FLAGS
GROUP = "data"
# Every default is the config field's, so that a flag left out and a config built without it agree.
DEFAULTS = data_lib.InputConfig(data=None)


def define_source(data=True):
  """--data, --data_root and --tfds_data_dir; with data=False only the last two (for a program whose images come in
  another flag)."""
  with program.flag_group(GROUP):
    if data:
      flags.DEFINE_string("data", None, "Images: a folder, a list file of the original's format, a glob of "
                          "TFRecord shards or tfds:NAME[:SPLIT]; 'package:NAME' is an installed package's folder "
                          "(docs/data.md).")
    flags.DEFINE_string("data_root", DEFAULTS.data_root, "Folder the names of a list file are relative to (default: "
                        "the list's folder). Accepts 'package:NAME' like --data.")
  define_tfds_data_dir()


def define_tfds_data_dir():
  """--tfds_data_dir, once (the data and labelled-data groups both read tfds: sources)."""
  if "tfds_data_dir" in FLAGS:
    return
  with program.flag_group(GROUP):
    flags.DEFINE_string("tfds_data_dir", DEFAULTS.tfds_data_dir, "TFDS data dir that tfds: sources are prepared in "
                        "(default: TFDS's own). Nothing is downloaded (docs/data.md).")


def define_geometry():
  with program.flag_group(GROUP):
    flags.DEFINE_enum("geometry", DEFAULTS.geometry, list(geometry_lib.GEOMETRIES),
                      "How patches are cut and paired: the original's random grids of 96-px patches, or Kolesnikov "
                      "et al.'s 3x3 grid of 64-px patches (docs/flags.md#geometry).")


def define_augmentation(where=True):
  """--color_mode and --pixelation; with where=True also --augment_on (for a program that trains)."""
  with program.flag_group(GROUP):
    flags.DEFINE_enum("color_mode", DEFAULTS.color_mode, augment.COLOR_MODES,
                      "Chromatic-aberration remedy per patch: drop a channel, Gaussian noise, a projection, none, or "
                      "Mundhenk et al.'s chroma blur (docs/flags.md#augmentation).")
    flags.DEFINE_bool("pixelation", DEFAULTS.pixelation, "Pixelate 33% of the patches at random (method.md §2.4 step "
                      "1).")
    if where:
      flags.DEFINE_enum("augment_on", "auto", ["auto", *data_lib.AUGMENT_ON],
                        "Where the per-patch augmentation runs: the input pipeline (host) or the training step "
                        "(device); auto = device with a GPU (docs/flags.md#augmentation).")


def define_shortcut_fixes():
  """The later fixes for the shortcuts (Mundhenk et al. 2018, method.md §9); flags/mundhenk.cfg combines them."""
  with program.flag_group(GROUP):
    program.define_integer("chroma_blur_size", DEFAULTS.chroma_blur_size, "Side of the a/b box blur of "
                           "--color_mode=chroma_blur; odd, 1 = none (docs/flags.md#shortcut-fixes).", lower=1)
    flags.DEFINE_bool("yoked_jitter", DEFAULTS.yoked_jitter, "One random rescale and crop offset per grid instead of "
                      "the +-7 px jitter of each cell (docs/flags.md#shortcut-fixes).")
    flags.DEFINE_enum("yoked_interpolation", DEFAULTS.yoked_interpolation, data_lib.YOKED_INTERPOLATIONS,
                      "Interpolation of --yoked_jitter: drawn per grid, or always one (docs/flags.md#shortcut-fixes).")
    flags.DEFINE_bool("random_aperture", DEFAULTS.random_aperture, "Half of the patches keep only a random square "
                      "window (docs/flags.md#shortcut-fixes).")
    flags.DEFINE_bool("rotation_classes", DEFAULTS.rotation_classes, "Rotate every grid by k x 90 degrees; the label "
                      "becomes direction + 8k, 32 classes (docs/flags.md#shortcut-fixes).")
    flags.DEFINE_bool("flip_relabel", DEFAULTS.flip_relabel, "Mirror grids at random, their labels remapped "
                      "(docs/flags.md#shortcut-fixes).")


def define_batching():
  with program.flag_group(GROUP):
    program.define_integer("batch_patches", DEFAULTS.batch_patches, "Patch capacity of one replica's batch, filled "
                           "with whole grids (docs/flags.md#batching).", lower=1)
    program.define_integer("batch_pairs", DEFAULTS.batch_pairs, "Pair capacity of one replica's batch; about 5x "
                           "--batch_patches keeps both nearly full (docs/flags.md#batching).", lower=1)
    program.define_integer("shuffle_buffer", DEFAULTS.shuffle_buffer, "Records shuffled together when reading "
                           "TFRecord shards or a TFDS split.", lower=1)
    flags.DEFINE_string("data_service", DEFAULTS.data_service, "grpc://HOST:PORT of a tf.data service dispatcher "
                        "whose workers decode and cut (docs/flags.md#batching).")
    program.define_integer("data_service_timeout", 60, "Seconds to wait at start for --data_service's first "
                           "element before stopping with a message.", lower=1)


def input_config(seed):
  """The InputConfig of the flags (every group of this module defined); the config's own checks become usage errors,
  and so does a setting given that the geometry does not use (geometry.Geometry.unused_settings)."""
  try:
    config = data_lib.InputConfig(
        data=FLAGS.data, data_root=FLAGS.data_root, tfds_data_dir=FLAGS.tfds_data_dir, color_mode=FLAGS.color_mode,
        pixelation=FLAGS.pixelation, batch_patches=FLAGS.batch_patches, batch_pairs=FLAGS.batch_pairs,
        shuffle_buffer=FLAGS.shuffle_buffer, seed=seed, data_service=FLAGS.data_service, geometry=FLAGS.geometry,
        chroma_blur_size=FLAGS.chroma_blur_size, yoked_jitter=FLAGS.yoked_jitter,
        yoked_interpolation=FLAGS.yoked_interpolation, random_aperture=FLAGS.random_aperture,
        rotation_classes=FLAGS.rotation_classes, flip_relabel=FLAGS.flip_relabel,
        augment_on=data_lib.resolve_augment_on(FLAGS.augment_on))
  except ValueError as e:
    raise errors.UsageError(f"Invalid flags: {e}") from e
  unused = config.patch_geometry.unused_settings(*given("color_mode", "pixelation"))
  if unused:
    raise errors.UsageError(f"Invalid flags: {'; '.join(unused)}")
  return config


def given(*names):
  """The values of the named flags that were given (on the command line or in a flagfile), None for the others."""
  return [FLAGS[name].value if FLAGS[name].present else None for name in names]
