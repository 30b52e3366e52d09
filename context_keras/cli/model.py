"""The model group: which tower and head, how wide, and their batch norm."""
from absl import flags

from context_keras import errors
from context_keras.cli import program
from context_keras.input import geometry as geometry_lib
from context_keras.model import networks as model_lib

FLAGS = flags.FLAGS
GROUP = "model"


def define():
  with program.flag_group(GROUP):
    flags.DEFINE_enum("backbone", "alexnet_bn", sorted(model_lib.BACKBONES),
                      "Patch tower: alexnet_bn = CaffeNet without groups, BN without scale/shift on conv3-5 and fc6 "
                      "(method.md §3.1-3.2); vgg16_bn = the paper's VGG-style tower, VGG-16's 13 convolutions with "
                      "BN, then the same fc6; resnet50 (resnet18, resnet34: basic blocks) = Kolesnikov et al.'s "
                      "ResNet with BN, output pre_logits (method.md §8.1, 8.3).")
    flags.DEFINE_enum("head", "doersch", model_lib.HEADS,
                      "Pair head: doersch = fc7 (BN) -> fc8 -> fc9 on the two concatenated features (method.md §3.4); "
                      "revisiting = Kolesnikov et al.'s: each patch to a 1000-d embedding, concatenated, fc 4096 -> "
                      "BN -> ReLU -> dropout 0.5 -> 8 logits (method.md §8.2).")
    program.define_float("width_multiplier", 1.0,
                         "Scales every conv and fc width (1.0 = the original's 96-256-384-384-256 convs and 4096-d "
                         "fc, VGG-16's 64-512, ResNet-50's 64-2048; 2 = Kolesnikov et al.'s 2x wide ResNet). Small "
                         "values make quick tests and demos.", above=0, upper=4)
    flags.DEFINE_enum("resnet_version", "1", ["1", "2"],
                      "ResNet units: 1 = post-activation (conv-BN-ReLU, the stride on the 3x3 conv, as their "
                      "code), 2 = pre-activation (BN-ReLU-conv).")
    program.define_integer("resnet_stem_stride", model_lib.RESNET_STEM_STRIDE,
                           "Stride of the ResNet's 7x7 root convolution: 1 = Kolesnikov et al.'s reduced "
                           "down-sampling for patch tasks, 2 = the ImageNet ResNet. The 3x3/2 max-pool after it "
                           "stays in both.", lower=1, upper=4)
    flags.DEFINE_list("resnet_strides", [str(s) for s in model_lib.RESNET_STRIDES],
                      "Strides of the first unit of the ResNet's four stages: 1,2,2,1 = Kolesnikov et al.'s for "
                      "patch tasks (8x down-sampling in all, a 64-px patch ends 8x8), 1,2,2,2 = the ImageNet ResNet.")
    program.define_float("bn_momentum", model_lib.BN_MOMENTUM,
                         "Decay of the batch-norm moving statistics of the tower and the doersch head (Caffe's "
                         "moving_average_fraction, 0.999 as the original; Kolesnikov et al.'s ResNet: 0.99). Runs of "
                         "a few thousand steps want less (0.99), or the statistics that export and evaluation use lag "
                         "behind the weights.", lower=0, below=1)
    flags.DEFINE_bool("sync_batchnorm", False,
                      "Batch statistics over all replicas instead of per replica. Off by default: each replica then "
                      "normalises over one batch of at most --batch_patches patches, as the original did on one GPU.")


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
