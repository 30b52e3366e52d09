"""The flags of how a job runs, shared by every program that trains (train, linear_eval, detect): devices, the
compiled loop's length, logging and checkpoint intervals, the control files. Each program gives its own defaults as
a controller.RunOptions; the flags' defaults are those fields."""
from absl import flags

from context_keras.cli import program
from context_keras.training import controller

FLAGS = flags.FLAGS
STRATEGIES = ["auto", "mirrored", "multi_worker", "one_device"]


def define(kind, defaults):
  """The run flags of a job of `kind` (controller.JobKind) with `defaults` (controller.RunOptions)."""
  folder = kind.folder_flag.upper()
  with program.flag_group("run"):
    program.define_integer("steps_per_loop", defaults.steps_per_loop, "Training steps per compiled call. "
                           "Checkpoints, logs and control files are honoured at exact steps whatever this is.",
                           lower=1)
    program.define_integer("log_every", defaults.log_every, "Steps between progress lines and scalar summaries.",
                           lower=1)
    program.define_integer("checkpoint_every", defaults.checkpoint_every, "Steps between checkpoints.", lower=1)
    program.define_integer("keep_checkpoints", defaults.keep_checkpoints, f"Checkpoints kept in --{kind.folder_flag}.",
                           lower=1)
    flags.DEFINE_string("quit_file", kind.quit_file, f"When this file (or {folder}/{kind.quit_file}, which speaks to "
                        "this job alone) appears, the job finishes its step, checkpoints and exits 0.")
    flags.DEFINE_string("pause_file", kind.pause_file, f"When this file (or {folder}/{kind.pause_file}) appears, the "
                        "job checkpoints and waits, idle, until it is removed.")
    flags.DEFINE_enum("strategy", defaults.strategy, STRATEGIES, "auto: MultiWorkerMirroredStrategy when TF_CONFIG "
                      "names several tasks, else MirroredStrategy over the GPUs or --cpu_replicas CPU devices.")
    program.define_integer("cpu_replicas", defaults.cpu_replicas, "Split the CPU into this many logical devices, "
                           "one replica each (MirroredStrategy without GPUs, for testing).", lower=1)
    flags.DEFINE_bool("deterministic", defaults.deterministic, "TensorFlow's op determinism on top of the seeded "
                      "input: the same seed gives the same numbers, resumed or not (slower).")


def options():
  """The RunOptions of the parsed run flags."""
  return controller.RunOptions(
      strategy=FLAGS.strategy, cpu_replicas=FLAGS.cpu_replicas, deterministic=FLAGS.deterministic,
      quit_file=FLAGS.quit_file, pause_file=FLAGS.pause_file, steps_per_loop=FLAGS.steps_per_loop,
      log_every=FLAGS.log_every, checkpoint_every=FLAGS.checkpoint_every, keep_checkpoints=FLAGS.keep_checkpoints)
