"""Trains context prediction: python -m context_keras.train --flagfile=flags/deepcontext.cfg --data=... --model_dir=...

Reads top to bottom: the flags -> run(): run directory, strategy, data, trainer, restore, the periodic actions ->
train(): the loop of compiled multi-step calls, with what a stop, a pause or divergence does.
"""
import contextlib
import dataclasses
import shutil
import time

from absl import flags
from absl import logging
import keras
import tensorflow as tf

from context_keras import actions as actions_lib
from context_keras import control as control_lib
from context_keras import data as data_lib
from context_keras import distribute
from context_keras import errors
from context_keras import program
from context_keras import resources
from context_keras import run_dir
from context_keras import sources
from context_keras import trainer as trainer_lib
from context_keras import warm_start
from context_keras.flagsets import data as data_flags
from context_keras.flagsets import model as model_flags
from context_keras.flagsets import optimisation as optimisation_flags

FLAGS = flags.FLAGS


def define_flags():
  data_flags.define_source()
  data_flags.define_augmentation()
  data_flags.define_shortcut_fixes()
  data_flags.define_batching()
  model_flags.define()
  optimisation_flags.define()
  with program.flag_group("run"):
    flags.DEFINE_string("model_dir", None, "Run directory: checkpoints, TensorBoard logs, flags, exports. A run "
                        "resumes from its latest checkpoint here.")
    program.define_integer("train_steps", 0, "Total steps of the run (a resumed run stops there); 0 = until told "
                           "to stop (quit file, SIGINT or SIGTERM). The original ran 1.7M steps.", lower=0)
    flags.DEFINE_string("init_from", None, "Start a new run from trained weights: a run directory (its latest "
                        "checkpoint), a checkpoint (RUN/ckpt-N) or an exported backbone (OUT/backbone, "
                        "RUN/export/backbone_N). The tower is loaded (and the pair head, from a run or checkpoint, "
                        "where it matches); the step and the optimizer start at 0. Recorded in RUN/config.json; "
                        "ignored when --model_dir already holds a checkpoint (the run resumes).")
    program.define_integer("seed", 0, "Seed of all randomness: data order, grids, augmentation and "
                           "initialisation.", lower=0)
    program.define_integer("steps_per_loop", 10, "Training steps per compiled call. Checkpoints, logs and control "
                           "files are honoured at exact steps whatever this is.", lower=1)
    program.define_integer("log_every", 20, "Steps between progress lines and scalar summaries.", lower=1)
    program.define_integer("checkpoint_every", 2000, "Steps between checkpoints (2000 as the original).", lower=1)
    program.define_integer("keep_checkpoints", 5, "Checkpoints kept in --model_dir.", lower=1)
    program.define_integer("export_every", 0, "Steps between SavedModel exports of the backbone (0 = only at the "
                           "end).", lower=0)
    program.define_integer("image_summary_every", 1000, "Steps between TensorBoard images of pairs as the model "
                           "sees them.", lower=1)
    program.define_integer("histogram_every", 1000, "Steps between weight histograms.", lower=1)
    flags.DEFINE_string("quit_file", "train_quit", "When this file appears the run finishes its step, writes a "
                        "checkpoint and exits 0. Relative paths are in the working directory, as the original's.")
    flags.DEFINE_string("pause_file", "train_pause", "When this file appears the run writes a checkpoint and "
                        "waits, idle, until it is removed.")
    flags.DEFINE_enum("strategy", "auto", ["auto", "mirrored", "multi_worker", "one_device"],
                      "auto: MultiWorkerMirroredStrategy when TF_CONFIG names a cluster of several tasks, else "
                      "MirroredStrategy over the visible GPUs (CUDA_VISIBLE_DEVICES picks them) or over "
                      "--cpu_replicas CPU devices, else the default strategy.")
    program.define_integer("cpu_replicas", 1, "Split the CPU into this many logical devices, one replica each (for "
                           "testing MirroredStrategy without GPUs).", lower=1)
    flags.DEFINE_bool("deterministic", False, "TensorFlow's op determinism on top of the seeded input: the same "
                      "seed gives the same losses (slower; GPU kernels without a deterministic version raise).")
    flags.DEFINE_list("profile_steps", [], "A,B: write a tf.profiler trace of steps A to B to "
                      "RUN/train/plugins/profile (view it in TensorBoard's Profile tab, from the "
                      "tensorboard-plugin-profile package).")


def profile_span():
  """(A, B) of --profile_steps, or (0, 0)."""
  steps = FLAGS.profile_steps
  if not steps:
    return 0, 0
  if len(steps) != 2 or not all(v.isdigit() for v in steps) or int(steps[0]) >= int(steps[1]):
    raise errors.UsageError(f"Invalid flags: --profile_steps={','.join(steps)} must be two step numbers A,B with "
                            "A < B")
  return int(steps[0]), int(steps[1])


def run():
  profile = profile_span()
  model_dir = run_dir.create(FLAGS.model_dir)
  if FLAGS.init_from and not tf.train.latest_checkpoint(model_dir):
    warm_start.find_source(FLAGS.init_from)  # a bad path stops here, before any work
  # MultiWorkerMirroredStrategy must exist before other TensorFlow work.
  strategy = distribute.make_strategy(FLAGS.strategy, FLAGS.cpu_replicas)
  is_chief, task = distribute.worker_role(strategy)
  # The chief writes the run; another worker writes its checkpoints and exports to a scratch folder (all workers
  # must save, because saving distributed variables can involve every worker) that it removes at the end.
  write_dir = model_dir if is_chief else run_dir.worker_scratch(model_dir, task)
  with contextlib.ExitStack() as stack:
    if is_chief:
      stack.enter_context(run_dir.Lock(model_dir))
      stack.enter_context(run_dir.LogFile(model_dir))
    else:
      stack.callback(shutil.rmtree, write_dir, ignore_errors=True)
    name = ("MultiWorkerMirroredStrategy" if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            else type(strategy).__name__)
    logging.info("Strategy: %s with %d replica(s)%s.", name, strategy.num_replicas_in_sync,
                 "" if task == "chief" else f"; this is {task}{' (chief)' if is_chief else ''}")
    if FLAGS.deterministic:
      tf.config.experimental.enable_op_determinism()
    input_config = data_flags.input_config(FLAGS.seed)
    config = run_dir.RunConfig(model=model_flags.model_config(input_config.num_classes), input=input_config,
                               optimisation=optimisation_flags.optim_config(FLAGS.train_steps))
    precision = config.optimisation.mixed_precision
    if precision != "none":
      keras.mixed_precision.set_global_policy("mixed_" + precision)
    if FLAGS.mixed_precision == "auto":
      logging.info("Precision: %s (--mixed_precision=auto on this hardware).", precision)
    keras.utils.set_random_seed(FLAGS.seed)

    source = sources.find_source(config.input.data, config.input.data_root)
    sources.check_readable(source)
    logging.info("Data: %s%s.", source.description, f", processed by the tf.data service at "
                 f"{config.input.data_service}" if config.input.data_service else "")

    on_device = config.input.augment_on == "device"
    logging.info("Augmentation: %s%s.", "in the training step, on each replica's device" if on_device else
                 "in the input pipeline, on the host", "" if FLAGS.augment_on != "auto" else
                 " (--augment_on=auto: a GPU is visible)" if on_device else " (--augment_on=auto: no GPU visible)")
    # tf.timestamp is refused under op determinism, so the input wait is then not measured.
    trainer = trainer_lib.Trainer(strategy, config.model, config.optimisation, time_input=not FLAGS.deterministic,
                                  augment=data_lib.step_augmentation(config.input, config.optimisation.jit_compile))
    counters = {k: tf.Variable(0, dtype=tf.int64, trainable=False, name=k) for k in trainer_lib.COUNTERS}
    with strategy.scope():
      checkpoint = tf.train.Checkpoint(**trainer.checkpoint_items(), **counters)
      manager = tf.train.CheckpointManager(checkpoint, write_dir, max_to_keep=FLAGS.keep_checkpoints,
                                           checkpoint_name=run_dir.CHECKPOINT_PREFIX)
      # Every worker restores the chief's latest checkpoint.
      latest = tf.train.latest_checkpoint(model_dir)
      if latest:
        checkpoint.restore(latest).assert_existing_objects_matched()
        logging.info("Resumed from %s at step %d.", latest, trainer.current_step())
        config = dataclasses.replace(config, init_from=recorded_init_from(model_dir))
        if FLAGS.init_from:
          logging.info("--init_from=%s is not used: the run resumes from its own checkpoint.", FLAGS.init_from)
      else:
        logging.info("Starting a new run in %s.", model_dir)
        if FLAGS.init_from:
          config = dataclasses.replace(config, init_from=warm_start.initialise(trainer.networks, config.model,
                                                                               FLAGS.init_from))
      iterator = iter(input_stream(strategy, config.input, source, trainer, latest))

    if is_chief:
      try:
        run_dir.write_flags(model_dir, [f.serialize() for f in program.defined_flags().values()
                                        if f.value is not None])
        run_dir.write_config(model_dir, config)
        writer = tf.summary.create_file_writer(run_dir.train_dir(model_dir))
        actions_lib.write_hparams(writer, {k: f.value for k, f in program.defined_flags().items()})
      except (OSError, tf.errors.OpError) as e:
        raise run_dir.write_failure("the flags and TensorBoard log", model_dir, e, latest) from e
    else:
      writer = tf.summary.create_noop_writer()
    stack.callback(actions_lib.close_writer, writer)
    control = stack.enter_context(control_lib.Control(FLAGS.quit_file, FLAGS.pause_file, trainer.request))

    checkpoints = actions_lib.Checkpoints(manager, FLAGS.checkpoint_every, trainer)
    exports = actions_lib.Exports(write_dir, FLAGS.export_every, trainer, config.model, config.input.color_mode,
                                  lambda: checkpoints.latest)
    profiler = actions_lib.Profile(*profile, run_dir.train_dir(write_dir))
    summary_writer = actions_lib.SummaryWriter(writer, run_dir.train_dir(write_dir), lambda: checkpoints.latest)
    periodic = [actions_lib.Summaries(summary_writer, FLAGS.log_every, trainer, counters, FLAGS.train_steps),
                actions_lib.PairImages(summary_writer, FLAGS.image_summary_every),
                actions_lib.Histograms(summary_writer, FLAGS.histogram_every, trainer.trainable_variables),
                checkpoints, exports, profiler]
    return train(trainer, iterator, counters, control, periodic, checkpoints, exports, profiler)


def recorded_init_from(model_dir):
  """What a resumed run started from, as its config.json says (None for older runs or random initialisation)."""
  try:
    return run_dir.read_config(model_dir).init_from
  except errors.UsageError:
    return None


def input_stream(strategy, input_config, source, trainer, latest):
  """The distributed batches, resuming where the checkpoint's batches ended: the positions are in the checkpoint,
  the buffers of a tf.data iterator (hundreds of MB of patches) are not. A fresh stream must not repeat the first."""
  positions = trainer.input_positions.numpy()
  if latest and (len(positions) != strategy.num_replicas_in_sync or input_config.data_service):
    logging.warning("The input cannot resume at its exact position (%s): reading a fresh stream.",
                    "tf.data service" if input_config.data_service else "the replica count changed")
    input_config = dataclasses.replace(input_config, seed=input_config.seed + trainer.current_step())
  return distribute.distributed_batches(strategy, input_config, source, positions)


def train(trainer, iterator, counters, control, periodic, checkpoints, exports, profiler):
  """The loop: compiled calls of up to --steps_per_loop steps, each ending where a periodic action is due."""
  step, train_steps = trainer.current_step(), FLAGS.train_steps
  if train_steps and step >= train_steps:
    logging.info("Step %d already reaches --train_steps=%d: nothing to train.", step, train_steps)
    return 0
  while not train_steps or step < train_steps:
    profiler.before(step)
    num_steps = actions_lib.steps_to_next(step, train_steps, periodic, FLAGS.steps_per_loop)
    start = time.perf_counter()
    values = trainer.train_loop(iterator, tf.constant(num_steps))
    step = trainer.current_step()
    output = actions_lib.LoopOutput(step=step, steps=int(values["steps"]), status=int(values["status"]),
                                    values=values, seconds=time.perf_counter() - start)
    for k, variable in counters.items():
      variable.assign_add(values[k])
    if output.status in (trainer_lib.STATUS_NOT_FINITE, trainer_lib.STATUS_EXPLODED):
      what = "loss or gradient is NaN/Inf" if output.status == trainer_lib.STATUS_NOT_FINITE else (
          f"gradient norm exceeded {FLAGS.divergence_factor}x its running average")
      logging.error("Diverged at step %d: %s. Nothing was checkpointed after step %d; lower --learning_rate or "
                    "examine the run, then re-run to resume from %s.", step, what, checkpoints.last_step,
                    checkpoints.latest or "scratch")
      return 1
    for action in periodic:
      action(output)
    if output.status == trainer_lib.STATUS_STOP_REQUESTED:
      if control.honour(int(values["request"]), step, checkpoints.save):
        logging.info("Weights digest: %.10e", trainer_lib.weights_digest(trainer))
        return 0
  profiler.stop()
  checkpoints.save("end of training")
  exports.export()
  logging.info("Training finished at step %d. Peak memory: %.0f MB.", step, resources.peak_rss_mb())
  logging.info("Weights digest: %.10e", trainer_lib.weights_digest(trainer))
  return 0


if __name__ == "__main__":
  program.run(run, define_flags)
