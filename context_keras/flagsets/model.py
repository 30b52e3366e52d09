"""The model group: which tower, how wide, and its batch norm."""
from absl import flags

from context_keras import model as model_lib
from context_keras import program

FLAGS = flags.FLAGS
GROUP = "model"


def define():
  with program.flag_group(GROUP):
    flags.DEFINE_enum("backbone", "alexnet_bn", sorted(model_lib.BACKBONES),
                      "Patch tower: alexnet_bn = CaffeNet without groups, BN without scale/shift on conv3-5 and fc6 "
                      "(method.md §3.1-3.2).")
    program.define_float("width_multiplier", 1.0,
                         "Scales every conv and fc width (1.0 = the original's 96-256-384-384-256 convs and 4096-d "
                         "fc). Small values make quick tests and demos.", above=0, upper=4)
    program.define_float("bn_momentum", model_lib.BN_MOMENTUM,
                         "Decay of the batch-norm moving statistics (Caffe's moving_average_fraction, 0.999 as the "
                         "original). Runs of a few thousand steps want less (0.99), or the statistics that export "
                         "and evaluation use lag behind the weights.", lower=0, below=1)
    flags.DEFINE_bool("sync_batchnorm", False,
                      "Batch statistics over all replicas instead of per replica. Off by default: each replica then "
                      "normalises over one batch of at most --batch_patches patches, as the original did on one GPU.")


def model_config(num_classes=model_lib.ModelConfig.num_classes):
  """The ModelConfig of the flags; num_classes: the pretext task's (data.InputConfig.num_classes)."""
  return model_lib.ModelConfig(backbone=FLAGS.backbone, width_multiplier=FLAGS.width_multiplier,
                               sync_batchnorm=FLAGS.sync_batchnorm, bn_momentum=FLAGS.bn_momentum,
                               num_classes=num_classes)
