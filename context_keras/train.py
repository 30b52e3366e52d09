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

from context_keras import errors
from context_keras.cli import data as data_flags
from context_keras.cli import model as model_flags
from context_keras.cli import optimisation as optimisation_flags
from context_keras.cli import program
from context_keras.input import pipeline as data_lib
from context_keras.input import sources
from context_keras.training import actions as actions_lib
from context_keras.training import control as control_lib
from context_keras.training import distribute
from context_keras.training import resources
from context_keras.training import restore as restore_lib
from context_keras.training import run_dir
from context_keras.training import trainer as trainer_lib
from context_keras.training import warm_start

FLAGS = flags.FLAGS


def define_flags():
  data_flags.define_source()
  data_flags.define_geometry()
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
                        "checkpoint and exits 0. Relative paths are in the working directory, as the original's, so "
                        "it speaks to every run started there; RUN/train_quit speaks to this run alone. A file that "
                        "exists at start is not obeyed unless created again.")
    flags.DEFINE_string("pause_file", "train_pause", "When this file (or RUN/train_pause) appears the run writes a "
                        "checkpoint and waits, idle, until it is removed.")
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
  program.define_check(schedule_problem)
  program.define_check(profile_problem)


def schedule_problem():
  """What --train_steps makes of the learning-rate schedule."""
  if FLAGS.lr_schedule == "cosine" and not FLAGS.train_steps and not FLAGS.train_epochs:
    return "--lr_schedule=cosine needs --train_steps > 0 (or --train_epochs) to know where the cosine ends"
  if FLAGS.train_steps and FLAGS.warmup_steps >= FLAGS.train_steps:
    return (f"--warmup_steps={FLAGS.warmup_steps} is not less than --train_steps={FLAGS.train_steps}: the learning "
            "rate would never reach --learning_rate")
  return None


def profile_problem():
  steps = FLAGS.profile_steps
  if steps and (len(steps) != 2 or not all(v.isdigit() for v in steps) or int(steps[0]) >= int(steps[1])):
    return f"--profile_steps={','.join(steps)} must be two step numbers A,B with A < B"
  return None


def profile_span():
  """(A, B) of --profile_steps (checked by profile_problem), or (0, 0)."""
  steps = FLAGS.profile_steps
  return (int(steps[0]), int(steps[1])) if steps else (0, 0)


def run():
  # From here on SIGINT and SIGTERM end the process at once, until the loop can stop gracefully.
  signals = control_lib.Signals()
  profile = profile_span()
  model_dir = run_dir.create(FLAGS.model_dir)
  if FLAGS.init_from and not tf.train.latest_checkpoint(model_dir):
    warm_start.find_source(FLAGS.init_from)  # a bad path stops here, before any work
  # MultiWorkerMirroredStrategy must exist before other TensorFlow work.
  strategy = distribute.make_strategy(FLAGS.strategy, FLAGS.cpu_replicas)
  signals.install()
  is_chief, task = distribute.worker_role(strategy)
  # The chief writes the run; another worker writes its checkpoints and exports to a scratch folder (all workers
  # must save, because saving distributed variables can involve every worker) that it removes at the end.
  write_dir = model_dir if is_chief else run_dir.worker_scratch(model_dir, task)
  with contextlib.ExitStack() as stack:
    if is_chief:
      stack.enter_context(run_dir.lock(model_dir))
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
    model_config = model_flags.model_config(input_config.num_classes)
    source = sources.find_source(input_config.data, input_config.data_root)
    config = run_dir.RunConfig(model=model_config, input=input_config,
                               optimisation=optim_config(input_config, source, strategy.num_replicas_in_sync))
    precision = config.optimisation.mixed_precision
    if precision != "none":
      keras.mixed_precision.set_global_policy("mixed_" + precision)
    if FLAGS.mixed_precision == "auto":
      logging.info("Precision: %s (--mixed_precision=auto on this hardware).", precision)
    keras.utils.set_random_seed(FLAGS.seed)
    # Every worker restores the chief's latest checkpoint.
    latest = tf.train.latest_checkpoint(model_dir)
    if latest:
      run_dir.check_resume(model_dir, config.model)
      step = run_dir.checkpoint_step(latest)
      if FLAGS.train_steps and step >= FLAGS.train_steps:
        # Before anything is written: flags.txt and config.json keep saying how the checkpoints were made.
        logging.info("Step %d of %s already reaches --train_steps=%d: nothing to train.", step, latest,
                     FLAGS.train_steps)
        return 0

    sources.check_readable(source, geometry=input_config.geometry)
    logging.info("Data: %s%s.", source.description, f", processed by the tf.data service at "
                 f"{config.input.data_service}" if config.input.data_service else "")
    if config.input.data_service:
      distribute.check_data_service(config.input.data_service, FLAGS.data_service_timeout)

    on_device = config.input.augment_on == "device"
    logging.info("Augmentation: %s%s.", "in the training step, on each replica's device" if on_device else
                 "in the input pipeline, on the host", "" if FLAGS.augment_on != "auto" else
                 " (--augment_on=auto: a GPU is visible)" if on_device else " (--augment_on=auto: no GPU visible)")
    # tf.timestamp is refused under op determinism, so the input wait is then not measured.
    trainer = trainer_lib.Trainer(strategy, config.model, config.optimisation, time_input=not FLAGS.deterministic,
                                  seed=FLAGS.seed,
                                  augment=data_lib.step_augmentation(config.input, config.optimisation.jit_compile))
    resources.check_step_memory(trainer.networks, config.input, distribute.local_replicas(strategy),
                                keras.mixed_precision.global_policy().compute_dtype, config.model.backbone,
                                activations_on_host=not tf.config.list_logical_devices("GPU"))
    counters = {k: tf.Variable(0, dtype=tf.int64, trainable=False, name=k) for k in trainer_lib.COUNTERS}
    with strategy.scope():
      checkpoint = tf.train.Checkpoint(**trainer.checkpoint_items(), **counters)
      manager = tf.train.CheckpointManager(checkpoint, write_dir, max_to_keep=FLAGS.keep_checkpoints,
                                           checkpoint_name=run_dir.CHECKPOINT_PREFIX)
      if latest:
        restore(latest, trainer, counters)
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
    control = stack.enter_context(control_lib.Control(
        control_lib.run_files(model_dir, run_dir.QUIT_FILE, FLAGS.quit_file, is_chief),
        control_lib.run_files(model_dir, run_dir.PAUSE_FILE, FLAGS.pause_file, is_chief), trainer.request, signals))

    checkpoints = actions_lib.Checkpoints(manager, FLAGS.checkpoint_every, trainer)
    exports = actions_lib.Exports(write_dir, FLAGS.export_every, trainer, config.model, config.input,
                                  lambda: checkpoints.latest)
    profiler = actions_lib.Profile(*profile, run_dir.train_dir(write_dir))
    summary_writer = actions_lib.SummaryWriter(writer, run_dir.train_dir(write_dir), lambda: checkpoints.latest)
    periodic = [actions_lib.Summaries(summary_writer, FLAGS.log_every, trainer, counters, config.train_steps),
                actions_lib.PairImages(summary_writer, FLAGS.image_summary_every),
                actions_lib.Histograms(summary_writer, FLAGS.histogram_every, trainer.trainable_variables),
                checkpoints, exports, profiler]
    try:
      return train(trainer, iterator, counters, control, periodic, checkpoints, exports, profiler,
                   config.train_steps)
    except distribute.LOST_WORKER_ERRORS as e:
      if not distribute.is_multi_worker(strategy):
        raise
      return worker_lost(e, task, trainer, checkpoints, model_dir)


def worker_lost(error, task, trainer, checkpoints, model_dir):
  """What a worker says when another one of a multi-worker run dies or stops answering (TensorFlow's coordination
  service notices within seconds and aborts the collective ops of all): which, when, and where the job resumes."""
  lost = distribute.lost_tasks(error, task)
  try:
    when = f"at step {trainer.current_step() + 1}"
  except (tf.errors.OpError, RuntimeError):
    when = f"after step {checkpoints.last_step}"
  logging.error("Lost %s %s (%s). Restart the whole job, every worker with the same command and TF_CONFIG: all "
                "resume from %s. Exit code %d means: restart the job.",
                " and ".join(lost) if lost else "another worker", when, errors.tf_error_message(error, 200),
                tf.train.latest_checkpoint(model_dir) or "scratch (no checkpoint yet)", program.EXIT_WORKER_LOST)
  return program.EXIT_WORKER_LOST


def restore(latest, trainer, counters):
  """Restores the trainer and counters from checkpoint `latest` (a checkpoint written before the input listing was
  recorded has none, which is then left at zero)."""
  items = dict(trainer.checkpoint_items(), **counters)
  if not tf.train.load_checkpoint(latest).has_tensor(f"{trainer_lib.LISTING_KEY}/.ATTRIBUTES/VARIABLE_VALUE"):
    del items[trainer_lib.LISTING_KEY]
  restore_lib.resume(latest, items)


def optim_config(input_config, source, replicas):
  """The optimisation config, its epochs counted in steps of the global batch (revisiting geometry)."""
  images_per_step = input_config.images_per_batch and input_config.images_per_batch * replicas
  epoch_images = None
  if optimisation_flags.uses_epochs() and images_per_step:
    epoch_images = FLAGS.epoch_images or sources.count_images(source)
    if not epoch_images:
      raise errors.UsageError(f"--data={source.description}: the number of images of an epoch is unknown (no "
                              f"{sources.PREPARED_INDEX} of context_keras.prepare beside the shards); give "
                              "--epoch_images")
    logging.info("An epoch: %d images, %d steps of %d images.", epoch_images, epoch_images // images_per_step,
                 images_per_step)
  config = optimisation_flags.optim_config(FLAGS.train_steps, images_per_step, epoch_images)
  if FLAGS.lr_scale_images:
    logging.info("Learning rate %.4g: %.4g per %d images, for %d images per step.", config.learning_rate,
                 FLAGS.learning_rate, FLAGS.lr_scale_images, images_per_step)
  return config


def recorded_init_from(model_dir):
  """What a resumed run started from, as its config.json says (None for older runs or random initialisation)."""
  try:
    return run_dir.read_config(model_dir).init_from
  except errors.UsageError:
    return None


def input_stream(strategy, input_config, source, trainer, latest):
  """The distributed batches, resuming where the checkpoint's batches ended: the positions are in the checkpoint,
  the buffers of a tf.data iterator (hundreds of MB of patches) are not. A fresh stream must not repeat the first.
  The positions index the listing of --data, so a listing that changed since the checkpoint (its fingerprint is
  in the checkpoint too) cannot resume them either."""
  positions = trainer.input_positions.numpy()
  recorded_listing, recorded_images = (int(v) for v in trainer.input_listing.numpy())
  listing = source.fingerprint()
  trainer.input_listing.assign([listing, len(source.paths)])
  reason = None
  if latest and input_config.data_service:
    reason = "tf.data service"
  elif latest and len(positions) != strategy.num_replicas_in_sync:
    reason = "the replica count changed"
  elif latest and recorded_images and recorded_listing != listing:
    reason = (f"the listing of --data changed since the checkpoint: {recorded_images} "
              f"{'shards' if source.kind == 'tfrecord' else 'images'} then, {len(source.paths)} now, or other names")
  if reason:
    logging.warning("The input cannot resume at its exact position (%s): reading a fresh stream.", reason)
    input_config = dataclasses.replace(input_config, seed=input_config.seed + trainer.current_step())
  return distribute.distributed_batches(strategy, input_config, source, positions)


def train(trainer, iterator, counters, control, periodic, checkpoints, exports, profiler, train_steps):
  """The loop: compiled calls of up to --steps_per_loop steps, each ending where a periodic action is due."""
  step = trainer.current_step()
  if train_steps and step >= train_steps:
    logging.info("Step %d already reaches the run's %d steps: nothing to train.", step, train_steps)
    return 0
  while not train_steps or step < train_steps:
    profiler.before(step)
    num_steps = actions_lib.steps_to_next(step, train_steps, periodic, FLAGS.steps_per_loop)
    start = time.perf_counter()
    values = trainer.train_loop(iterator, tf.constant(num_steps))
    before, step = step, trainer.current_step()
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
    # A call whose every update was skipped (float16 overflows) left the step where it was: nothing new is due.
    for action in periodic:
      if step > before or output.status != trainer_lib.STATUS_OK or action.every_call:
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
