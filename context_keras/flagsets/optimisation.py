"""The optimisation group: the SGD update, its schedule, precision, and the divergence guard."""
from absl import flags

from context_keras import program
from context_keras import resources
from context_keras import trainer as trainer_lib

FLAGS = flags.FLAGS
GROUP = "optimisation"


def define():
  with program.flag_group(GROUP):
    program.define_float("learning_rate", 1e-5, "SGD learning rate (1e-5 in the validated code).", above=0)
    program.define_float("momentum", 0.0, "SGD momentum (0 in the validated code, 0.999 in the paper).", lower=0,
                         below=1)
    program.define_float("weight_decay", 0.0, "Decoupled weight decay per step, times the learning rate (0 "
                         "originally).", lower=0)
    flags.DEFINE_enum("lr_schedule", "constant", ["constant", "cosine"],
                      "constant (the original) or cosine decay to 0 over --train_steps.")
    program.define_integer("warmup_steps", 0, "Linear learning-rate warm-up from 0 over this many steps.", lower=0)
    flags.DEFINE_enum("loss_reduction", "sum", ["sum", "mean"],
                      "Softmax cross-entropy summed over the pairs of the global batch (the original's "
                      "normalization: NONE) or averaged over them.")
    flags.DEFINE_enum("mixed_precision", "none", ["none", "bfloat16", "float16", "auto"],
                      "Compute precision; variables stay float32. float16 uses dynamic loss scaling. auto: bfloat16 "
                      "where the hardware computes it natively (Ampere+ GPUs, CPUs with AMX or AVX-512 BF16), else "
                      "none; the run records and logs the choice.")
    flags.DEFINE_bool("jit_compile", False, "Compile the forward and backward pass with XLA.")
    program.define_float("divergence_factor", 10.0,
                         "Stop when a step's gradient norm exceeds this many times its running average (after 100 "
                         "steps), as the original's 10x update guard; 0 disables. NaN/Inf always stops.", lower=0)
    program.define_integer("inject_nan_at_step", 0, "Fault injection for tests of the divergence guard: the loss "
                           "of this step (counted from 1) becomes NaN. 0 = never.", lower=0)


def optim_config(train_steps):
  """The OptimConfig of the flags (the program checks --lr_schedule and --warmup_steps against train_steps)."""
  return trainer_lib.OptimConfig(
      learning_rate=FLAGS.learning_rate, momentum=FLAGS.momentum, weight_decay=FLAGS.weight_decay,
      lr_schedule=FLAGS.lr_schedule, warmup_steps=FLAGS.warmup_steps, train_steps=train_steps,
      loss_reduction=FLAGS.loss_reduction, mixed_precision=resources.resolve_precision(FLAGS.mixed_precision),
      jit_compile=FLAGS.jit_compile, divergence_factor=FLAGS.divergence_factor,
      inject_nan_at_step=FLAGS.inject_nan_at_step)
