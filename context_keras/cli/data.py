"""The data group: where images come from, how patches are cut and augmented, and how batches are packed."""
from absl import flags

from context_keras import errors
from context_keras.cli import program
from context_keras.input import augment
from context_keras.input import pipeline as data_lib
from context_keras.input import shortcuts

FLAGS = flags.FLAGS
GROUP = "data"


def define_source(data=True):
  """--data, --data_root and --tfds_data_dir; with data=False only the last two (for a program whose images come in
  another flag)."""
  with program.flag_group(GROUP):
    if data:
      flags.DEFINE_string(
          "data", None,
          "Images: a folder (searched recursively for jpg, jpeg, png, bmp, gif and webp files in any letter case); "
          "a list file in the original's format (first token of each line, relative to --data_root or to the "
          "list's folder); a glob of TFRecord shards of encoded images (feature 'image/encoded'); or a split of a "
          "prepared TFDS dataset, tfds:NAME[:SPLIT] (default split: train). A path written 'package:NAME' means the "
          "folder of the installed Python package NAME. docs/data.md.")
    flags.DEFINE_string("data_root", None, "Folder that the names in a --data list file are relative to (default: "
                        "the list file's folder). Accepts 'package:NAME' like --data.")
  define_tfds_data_dir()


def define_tfds_data_dir():
  """--tfds_data_dir, once (the data and labelled-data groups both read tfds: sources)."""
  if "tfds_data_dir" in FLAGS:
    return
  with program.flag_group(GROUP):
    flags.DEFINE_string("tfds_data_dir", None, "TFDS data dir that tfds:NAME[:SPLIT] sources are prepared in "
                        "(default: TFDS's own, $TFDS_DATA_DIR or ~/tensorflow_datasets). Nothing is downloaded.")


def define_geometry():
  with program.flag_group(GROUP):
    flags.DEFINE_enum("geometry", "doersch", ["doersch", "revisiting"],
                      "Patch geometry: doersch = the original's random grids of 96-px patches, 48-px gaps, +-7 px "
                      "jitter and every 8-neighbour pair, augmented by --color_mode and --pixelation (method.md "
                      "§2); revisiting = Kolesnikov et al.'s: the image resized to 292x292, a random 255 crop, a "
                      "3x3 grid of 85-px cells with a random 64-px patch in each, grayscale with probability 0.66 "
                      "per image, per-patch standardisation, and the 8 (neighbour, centre) pairs (method.md §8.2). "
                      "A revisiting batch holds floor(min(--batch_patches/9, --batch_pairs/8)) images.")


def define_augmentation():
  with program.flag_group(GROUP):
    flags.DEFINE_enum("color_mode", "drop", augment.COLOR_MODES,
                      "Chromatic-aberration remedy per patch (method.md §2.4): drop = keep one random channel, "
                      "the other two uniform noise (the validated code); drop_gaussian = Gaussian noise at 1/100 of "
                      "the kept channel's std (the paper); project = the paper's green-magenta projection; none.")
    flags.DEFINE_bool("pixelation", True, "Randomly pixelate 33% of the patches (method.md §2.4 step 1).")
    flags.DEFINE_enum("augment_on", "auto", ["auto", *data_lib.AUGMENT_ON],
                      "Where the per-patch augmentation runs: host = in the input pipeline; device = in the training "
                      "step on each replica's device, the host only decoding, resizing and cutting uint8 patches "
                      "(docs/scale.md, Cores per GPU: the host cores each mode needs); auto = device when a GPU is "
                      "visible, else host. Both give the same pixels for the same seed (each patch is augmented from "
                      "its own key).")


def define_shortcut_fixes():
  """The later fixes for the shortcuts (Mundhenk et al. 2018, method.md §9); flags/mundhenk.cfg combines them."""
  with program.flag_group(GROUP):
    program.define_integer("chroma_blur_size", shortcuts.CHROMA_BLUR_SIZE,
                           "Side of the box blur of the a and b channels with --color_mode=chroma_blur (13 as "
                           "Mundhenk et al.'s patch set; 1 = no blur). Odd.", lower=1)
    flags.DEFINE_bool("yoked_jitter", False,
                      "Mundhenk et al.'s yoked jitter (method.md §9.4): all patches of a grid enlarged to one random "
                      "side in [96, 128] px and cropped back to 96 px at one random offset; replaces the original's "
                      "independent +-7 px jitter of each cell.")
    flags.DEFINE_enum("yoked_interpolation", "random", data_lib.YOKED_INTERPOLATIONS,
                      "Interpolation of --yoked_jitter: one of bilinear, area, bicubic, lanczos drawn per grid "
                      "(random, as the paper describes), or always one (their released code: bilinear).")
    flags.DEFINE_bool("random_aperture", False,
                      "Mundhenk et al.'s random aperture (method.md §9.5): each patch, with probability 1/2, keeps "
                      "only a random square window of 64-96 px (one window per grid), the rest filled with the "
                      "window's mean colour.")
    flags.DEFINE_bool("rotation_classes", False,
                      "Rotation with classification (method.md §9.6): every grid rotated by k x 90 degrees, k "
                      "random, and the label becomes direction + 8k: 32 classes.")
    flags.DEFINE_bool("flip_relabel", False,
                      "Mirror every grid left-right with probability 1/2, the direction label remapped so that it "
                      "still names where the second patch lies (method.md §9.6).")


def define_batching():
  with program.flag_group(GROUP):
    program.define_integer(
        "batch_patches", 511, "Patch capacity of one replica's batch. Whole grids are packed until the next one "
        "would not fit; the original used at most 511 patches (method.md §2.5).", lower=1)
    program.define_integer(
        "batch_pairs", 2560, "Pair capacity of one replica's batch. Grids give about 4.4-5.3 ordered pairs per "
        "patch, so about 5x --batch_patches keeps both capacities nearly full.", lower=1)
    program.define_integer("shuffle_buffer", 2048, "Records shuffled together when reading TFRecord shards or a "
                           "TFDS split (docs/data.md).",
                           lower=1)
    flags.DEFINE_string("data_service", None,
                        "grpc://HOST:PORT of a tf.data service dispatcher: decoding and patch building then run on "
                        "its workers (python -m context_keras.service), so CPU-only hosts can feed the accelerators.")
    program.define_integer("data_service_timeout", 60, "Seconds to wait at start for the tf.data service of "
                           "--data_service to deliver a first element (a dispatcher and at least one worker); then "
                           "the run stops with a message naming the address.", lower=1)


def input_config(seed):
  """The InputConfig of the flags (every group of this module defined); the config's own checks become usage errors."""
  try:
    return data_lib.InputConfig(data=FLAGS.data, data_root=FLAGS.data_root, tfds_data_dir=FLAGS.tfds_data_dir,
                                color_mode=FLAGS.color_mode,
                                pixelation=FLAGS.pixelation, batch_patches=FLAGS.batch_patches,
                                batch_pairs=FLAGS.batch_pairs, shuffle_buffer=FLAGS.shuffle_buffer, seed=seed,
                                data_service=FLAGS.data_service, geometry=FLAGS.geometry,
                                chroma_blur_size=FLAGS.chroma_blur_size, yoked_jitter=FLAGS.yoked_jitter,
                                yoked_interpolation=FLAGS.yoked_interpolation, random_aperture=FLAGS.random_aperture,
                                rotation_classes=FLAGS.rotation_classes, flip_relabel=FLAGS.flip_relabel,
                                augment_on=data_lib.resolve_augment_on(FLAGS.augment_on))
  except ValueError as e:
    raise errors.UsageError(f"Invalid flags: {e}") from e
