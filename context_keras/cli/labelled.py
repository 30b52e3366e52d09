"""The labelled-data group: the training and validation splits of the labelled evaluations (evaluate's linear, knn
and finetune modes, and the linear_eval job), each in one of the forms labelled.py reads (with --tfds_data_dir of the
data group for tfds: splits)."""
from absl import flags

from context_keras.cli import data as data_flags
from context_keras.cli import program

FLAGS = flags.FLAGS
GROUP = "labelled data"
FORMS = ("class sub-folders, images with a labels file, labelled TFRecord shards (ours or the converters') or "
         "tfds:NAME[:SPLIT] (docs/data.md)")


def define_splits():
  with program.flag_group(GROUP):
    flags.DEFINE_string("train_data", None, f"Labelled training images: {FORMS}.")
    flags.DEFINE_string("train_labels", None, "Labels file of --train_data: lines 'NAME LABEL' (NAME relative to "
                        "--train_data, with or without its extension; '#' starts a comment); multi-label: 'NAME "
                        "LABEL1,LABEL2,...', '?LABEL' for an ignored (difficult) class.")
    flags.DEFINE_string("val_data", None, f"Labelled validation images (the training set's classes): {FORMS}.")
    flags.DEFINE_string("val_labels", None, "Labels file of --val_data (as --train_labels; a label may also be a "
                        "0-based index into the training set's sorted classes), e.g. ImageNet's validation images "
                        "mapped to their synsets.")
  data_flags.define_tfds_data_dir()
