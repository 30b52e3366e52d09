"""The model group: which tower and head, how wide, and their batch norm."""
from absl import flags

from context_keras import errors
from context_keras.cli import program
from context_keras.input import geometry as geometry_lib
from context_keras.model import networks as model_lib

FLAGS = flags.FLAGS
GROUP = "model"


# Every default is the config field's, so that a flag left out and a config built without it agree.
DEFAULTS = model_lib.ModelConfig()


def define():
  with program.flag_group(GROUP):
    flags.DEFINE_enum("backbone", DEFAULTS.backbone, sorted(model_lib.BACKBONES),
                      "Patch tower: the original's CaffeNet with BN, the paper's VGG-16 with BN, or Kolesnikov et "
                      "al.'s ResNets (docs/flags.md#model).")
    flags.DEFINE_enum("head", DEFAULTS.head, model_lib.HEADS,
                      "Pair head: the original's fc7-fc9 on the two features, or Kolesnikov et al.'s embedding and "
                      "fc head (docs/flags.md#model).")
    program.define_float("width_multiplier", DEFAULTS.width_multiplier,
                         "Scales every conv and fc width: 2 = Kolesnikov et al.'s 2x ResNet; small values make quick "
                         "tests and demos.", above=0, upper=4)
    flags.DEFINE_enum("resnet_version", str(DEFAULTS.resnet_version), [str(v) for v in model_lib.RESNET_VERSIONS],
                      "ResNet units: 1 = post-activation (conv-BN-ReLU, as their code), 2 = pre-activation "
                      "(BN-ReLU-conv).")
    program.define_integer("resnet_stem_stride", DEFAULTS.resnet_stem_stride,
                           "Stride of the ResNet's 7x7 root convolution: 1 = Kolesnikov et al.'s for patch tasks, 2 = "
                           "the ImageNet ResNet's (docs/flags.md#model).", lower=1, upper=4)
    flags.DEFINE_list("resnet_strides", [str(s) for s in DEFAULTS.resnet_strides],
                      "Strides of the first unit of the ResNet's 4 stages: 1,2,2,1 for patch tasks, 1,2,2,2 = the "
                      "ImageNet ResNet's (docs/flags.md#model).")
    program.define_float("bn_momentum", DEFAULTS.bn_momentum,
                         "Decay of the batch-norm moving statistics of the tower and the doersch head; short runs want "
                         "0.99 (docs/flags.md#model).", lower=0, below=1)
    flags.DEFINE_bool("sync_batchnorm", DEFAULTS.sync_batchnorm,
                      "Batch statistics over all replicas instead of each replica's batch (the original's: one GPU).")


def model_config(num_classes=model_lib.ModelConfig.num_classes):
  """The ModelConfig of the flags; needs the data group's --geometry (the patch size). num_classes: the pretext task's
  (data.InputConfig.num_classes)."""
  try:
    strides = tuple(int(s) for s in FLAGS.resnet_strides)
  except ValueError as e:
    raise errors.UsageError(f"Invalid flags: --resnet_strides={','.join(FLAGS.resnet_strides)} must be integers") from e
  config = model_lib.ModelConfig(
      backbone=FLAGS.backbone, width_multiplier=FLAGS.width_multiplier, sync_batchnorm=FLAGS.sync_batchnorm,
      bn_momentum=FLAGS.bn_momentum, head=FLAGS.head, patch_size=geometry_lib.get(FLAGS.geometry).patch_size,
      resnet_version=int(FLAGS.resnet_version), resnet_stem_stride=FLAGS.resnet_stem_stride, resnet_strides=strides,
      num_classes=num_classes)
  try:
    model_lib.check(config)
  except ValueError as e:
    raise errors.UsageError(f"Invalid flags: {e}") from e
  return config
