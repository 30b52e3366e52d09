"""The optimisation group: the SGD update, its schedule (in steps or epochs), L2 weight decay, precision, and the
divergence guard."""
from absl import flags

from context_keras import errors
from context_keras.cli import program
from context_keras.training import resources
from context_keras.training import trainer as trainer_lib

FLAGS = flags.FLAGS
GROUP = "optimisation"
EPOCH_FLAGS = ("train_epochs", "warmup_epochs", "lr_decay_epochs")


# Every default is the config field's, so that a flag left out and a config built without it agree.
DEFAULTS = trainer_lib.OptimConfig()


def define():
  with program.flag_group(GROUP):
    program.define_float("learning_rate", DEFAULTS.learning_rate, "SGD learning rate (the validated code's); with "
                         "--lr_scale_images, the rate of a step of that many images.", above=0)
    program.define_integer("lr_scale_images", 0, "N > 0: --learning_rate is per N images, scaled linearly to the "
                           "images of a global step; revisiting geometry (docs/flags.md#optimisation).", lower=0)
    program.define_float("momentum", DEFAULTS.momentum, "SGD momentum (0 in the validated code, 0.999 in the paper, "
                         "0.9 in Kolesnikov et al.'s).", lower=0, below=1)
    program.define_float("weight_decay", DEFAULTS.weight_decay, "Decoupled weight decay per step, times the learning "
                         "rate.", lower=0)
    program.define_float("l2_tower", DEFAULTS.l2_tower, "L2 penalty (l2/2)|w|^2 on the tower's kernels and the "
                         "revisiting head's embedding; Kolesnikov et al.: 1e-4 (docs/flags.md#optimisation).",
                         lower=0)
    program.define_float("l2_head", DEFAULTS.l2_head, "The same penalty on the pair head's kernels; Kolesnikov et "
                         "al.: 5e-4.", lower=0)
    flags.DEFINE_enum("lr_schedule", DEFAULTS.lr_schedule, ["constant", "cosine", "steps"],
                      "constant (the original's); cosine to 0 over --train_steps; steps: times --lr_decay_factor at "
                      "each of --lr_decay_epochs or --lr_decay_steps.")
    flags.DEFINE_list("lr_decay_epochs", [], "With --lr_schedule=steps: the epochs at which the rate decays "
                      "(Kolesnikov et al.: 15,25 of 35).")
    flags.DEFINE_list("lr_decay_steps", [str(s) for s in DEFAULTS.lr_decay_steps], "With --lr_schedule=steps: the "
                      "steps at which the rate decays, instead of --lr_decay_epochs.")
    program.define_float("lr_decay_factor", DEFAULTS.lr_decay_factor, "With --lr_schedule=steps: the factor of each "
                         "decay.", above=0, upper=1)
    program.define_integer("warmup_steps", DEFAULTS.warmup_steps, "Linear learning-rate warm-up from 0 over this many "
                           "steps.", lower=0)
    program.define_float("warmup_epochs", 0, "Linear warm-up over this many epochs, instead of --warmup_steps "
                         "(Kolesnikov et al.: 5).", lower=0)
    program.define_float("train_epochs", 0, "Total epochs of the run, instead of --train_steps (Kolesnikov et al.: "
                         "35).", lower=0)
    program.define_integer("epoch_images", 0, "Images in an epoch, for the *_epochs flags; 0 = the images of --data "
                           "(docs/flags.md#optimisation).", lower=0)
    flags.DEFINE_enum("loss_reduction", DEFAULTS.loss_reduction, ["sum", "mean"],
                      "The softmax cross-entropy's sum over the pairs of the global batch (the original's) or their "
                      "mean (Kolesnikov et al.'s).")
    flags.DEFINE_enum("mixed_precision", DEFAULTS.mixed_precision, ["none", "bfloat16", "float16", "auto"],
                      "Compute precision; variables stay float32. auto: bfloat16 where the hardware has it "
                      "(docs/flags.md#optimisation).")
    flags.DEFINE_bool("jit_compile", DEFAULTS.jit_compile, "Compile the forward and backward pass with XLA.")
    program.define_float("divergence_factor", DEFAULTS.divergence_factor,
                         "Stop when a step's gradient norm exceeds this many times its running average; 0 disables "
                         "(docs/flags.md#optimisation).", lower=0)
    program.define_integer("inject_nan_at_step", DEFAULTS.inject_nan_at_step, "Fault injection for tests: the loss "
                           "of this step (from 1) becomes NaN; 0 = never.", lower=0)


def uses_epochs():
  """Whether a flag counts in epochs (or scales the rate by images), so that train.py must count images."""
  return any(FLAGS[name].value for name in EPOCH_FLAGS) or FLAGS.lr_scale_images > 0


def _numbers(name, kind):
  try:
    values = [kind(v) for v in FLAGS[name].value]
  except ValueError as e:
    raise errors.UsageError(f"Invalid flags: --{name}={','.join(FLAGS[name].value)} must be numbers") from e
  if any(v < 0 for v in values) or values != sorted(values):
    raise errors.UsageError(f"Invalid flags: --{name}={','.join(FLAGS[name].value)} must be increasing and >= 0")
  return values


def optim_config(train_steps, images_per_step=None, epoch_images=None):
  """The OptimConfig of the flags, with every epoch turned into steps.

  images_per_step: images of a global step when it is fixed (revisiting geometry), else None; epoch_images: the
  images of an epoch when counted (needed when uses_epochs()). The config records steps and the rate actually used.
  """
  why = "a batch of the doersch geometry holds a varying number of images"
  if uses_epochs() and not images_per_step:
    given = [f"--{n}" for n in EPOCH_FLAGS if FLAGS[n].value] + (["--lr_scale_images"] if FLAGS.lr_scale_images
                                                                 else [])
    raise errors.UsageError(f"Invalid flags: {', '.join(given)} need --geometry=revisiting ({why}); give steps "
                            "(--train_steps, --warmup_steps, --lr_decay_steps) and the rate itself")
  steps_per_epoch = None
  if any(FLAGS[name].value for name in EPOCH_FLAGS):
    steps_per_epoch = epoch_images // images_per_step
    if steps_per_epoch < 1:
      raise errors.UsageError(f"Invalid flags: an epoch of {epoch_images} images is less than one step of "
                              f"{images_per_step} images")

  def steps(epochs):
    return int(round(epochs * steps_per_epoch))

  if FLAGS.train_epochs:
    if train_steps:
      raise errors.UsageError("Invalid flags: give --train_steps or --train_epochs, not both")
    train_steps = steps(FLAGS.train_epochs)
  if FLAGS.warmup_epochs and FLAGS.warmup_steps:
    raise errors.UsageError("Invalid flags: give --warmup_steps or --warmup_epochs, not both")
  warmup_steps = steps(FLAGS.warmup_epochs) if FLAGS.warmup_epochs else FLAGS.warmup_steps
  if FLAGS.lr_decay_epochs and FLAGS.lr_decay_steps:
    raise errors.UsageError("Invalid flags: give --lr_decay_steps or --lr_decay_epochs, not both")
  decay_steps = ([steps(e) for e in _numbers("lr_decay_epochs", float)] if FLAGS.lr_decay_epochs
                 else _numbers("lr_decay_steps", int))
  if FLAGS.lr_schedule == "cosine" and not train_steps:
    raise errors.UsageError("Invalid flags: --lr_schedule=cosine needs --train_steps > 0 to know where the cosine "
                            "ends")
  if FLAGS.lr_schedule == "steps" and not decay_steps:
    raise errors.UsageError("Invalid flags: --lr_schedule=steps needs --lr_decay_epochs or --lr_decay_steps")
  learning_rate = FLAGS.learning_rate
  if FLAGS.lr_scale_images:
    learning_rate *= images_per_step / FLAGS.lr_scale_images
  return trainer_lib.OptimConfig(
      learning_rate=learning_rate, momentum=FLAGS.momentum, weight_decay=FLAGS.weight_decay,
      lr_schedule=FLAGS.lr_schedule, warmup_steps=warmup_steps, lr_decay_steps=tuple(decay_steps),
      lr_decay_factor=FLAGS.lr_decay_factor, train_steps=train_steps, l2_tower=FLAGS.l2_tower, l2_head=FLAGS.l2_head,
      loss_reduction=FLAGS.loss_reduction, mixed_precision=resources.resolve_precision(FLAGS.mixed_precision),
      jit_compile=FLAGS.jit_compile, divergence_factor=FLAGS.divergence_factor,
      inject_nan_at_step=FLAGS.inject_nan_at_step)
