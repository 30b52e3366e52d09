"""Trains context prediction: python -m context_keras.train --flagfile=flags/deepcontext.cfg --data=... --model_dir=...

Reads top to bottom: the flags -> run(): the job (training/controller.py: strategy, roles, lock, log), the data,
the trainer, restore or warm start, the periodic actions, and the controller's loop -> what divergence does.
"""
import dataclasses
import os

from absl import flags
from absl import logging
import keras
import tensorflow as tf

from context_keras import errors
from context_keras.cli import data as data_flags
from context_keras.cli import model as model_flags
from context_keras.cli import optimisation as optimisation_flags
from context_keras.cli import program
from context_keras.cli import run as run_flags
from context_keras.input import pipeline as data_lib
from context_keras.input import sources
from context_keras.training import actions as actions_lib
from context_keras.training import controller
from context_keras.training import distribute
from context_keras.training import resources
from context_keras.training import restore as restore_lib
from context_keras.training import run_dir
from context_keras.training import trainer as trainer_lib
from context_keras.training import warm_start

FLAGS = flags.FLAGS
KIND = controller.JobKind(holder="training", folder_flag="model_dir", log_file=run_dir.LOG_FILE,
                          quit_file=run_dir.QUIT_FILE, pause_file=run_dir.PAUSE_FILE)


def define_flags():
  data_flags.define_source()
  data_flags.define_geometry()
  data_flags.define_augmentation()
  data_flags.define_shortcut_fixes()
  data_flags.define_batching()
  model_flags.define()
  optimisation_flags.define()
  run_flags.define(KIND, controller.RunOptions(steps_per_loop=10, log_every=20, checkpoint_every=2000,
                                               keep_checkpoints=5))
  with program.flag_group("run"):
    flags.DEFINE_string("model_dir", None, "Run directory: checkpoints, TensorBoard logs, flags, exports. A run "
                        "resumes from its latest checkpoint here.")
    program.define_integer("train_steps", optimisation_flags.DEFAULTS.train_steps, "Total steps of the run; 0 = until "
                           "told to stop (quit file, SIGINT, SIGTERM). The original ran 1.7M.", lower=0)
    flags.DEFINE_string("init_from", None, "Start a new run from the weights of a run, a checkpoint or an exported "
                        "backbone; ignored when the run resumes (docs/flags.md#run).")
    program.define_integer("seed", data_flags.DEFAULTS.seed, "Seed of all randomness: data order, grids, "
                           "augmentation and initialisation.", lower=0)
    program.define_integer("export_every", 0, "Steps between SavedModel exports of the backbone (0 = only at the "
                           "end).", lower=0)
    program.define_integer("image_summary_every", 1000, "Steps between TensorBoard images of pairs as the model "
                           "sees them.", lower=1)
    program.define_integer("histogram_every", 1000, "Steps between weight histograms.", lower=1)
    flags.DEFINE_list("profile_steps", [], "A,B: a tf.profiler trace of steps A to B in RUN/train/plugins/profile "
                      "(TensorBoard's Profile tab).")
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
  job = controller.Job(KIND, run_flags.options())
  profile = profile_span()
  model_dir = run_dir.create(FLAGS.model_dir)
  if FLAGS.init_from and not tf.train.latest_checkpoint(model_dir):
    warm_start.find_source(FLAGS.init_from)  # a bad path stops here, before any work
  with job.running(model_dir):
    strategy = job.strategy
    input_config = data_flags.input_config(FLAGS.seed)
    model_config = model_flags.model_config(input_config.num_classes)
    source = sources.find_source(input_config.data, input_config.data_root, input_config.tfds_data_dir)
    config = run_dir.RunConfig(model=model_config, input=input_config,
                               optimisation=optim_config(input_config, source, strategy.num_replicas_in_sync))
    precision = config.optimisation.mixed_precision
    # Set either way: the policy is process-wide, and an earlier run in this process may have changed it.
    keras.mixed_precision.set_global_policy("float32" if precision == "none" else "mixed_" + precision)
    if FLAGS.mixed_precision == "auto":
      logging.info("Precision: %s (--mixed_precision=auto on this hardware).", precision)
    keras.utils.set_random_seed(FLAGS.seed)
    # Every worker restores the chief's latest checkpoint.
    latest = job.latest
    if latest:
      if FLAGS.init_from:
        logging.info("--init_from=%s is not used: --model_dir=%s holds a checkpoint (%s), which the run resumes "
                     "from.", FLAGS.init_from, model_dir, os.path.basename(latest))
      run_dir.check_resume(model_dir, config.model, config.optimisation)
      step = run_dir.checkpoint_step(latest)
      if FLAGS.train_steps and step >= FLAGS.train_steps:
        # Before anything is written: flags.txt and config.json keep saying how the checkpoints were made.
        logging.info("Step %d of %s already reaches --train_steps=%d: nothing to train.", step, latest,
                     FLAGS.train_steps)
        return 0

    sources.check_readable(source, geometry=input_config.patch_geometry)
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
                                activations_on_host=not tf.config.list_logical_devices("GPU"),
                                width_multiplier=config.model.width_multiplier)
    counters = {k: tf.Variable(0, dtype=tf.int64, trainable=False, name=k) for k in trainer_lib.COUNTERS}
    with strategy.scope():
      checkpoint = tf.train.Checkpoint(**trainer.checkpoint_items(), **counters)
      checkpoints = job.checkpoints(checkpoint, trainer)
      if latest:
        restore(latest, trainer, counters)
        logging.info("Resumed from %s at step %d.", latest, trainer.current_step())
        config = resumed(model_dir, config, trainer.current_step())
      else:
        logging.info("Starting a new run in %s.", model_dir)
        if FLAGS.init_from:
          config = dataclasses.replace(config, init_from=warm_start.initialise(trainer.networks, config.model,
                                                                               FLAGS.init_from))
        config, _ = run_dir.continued(None, config, 0)
      batches, stream_config = input_stream(strategy, config.input, source, trainer, latest)
      iterator = iter(batches)

    if job.is_chief:
      try:
        run_dir.write_flags(model_dir, [f.serialize() for f in program.defined_flags().values()
                                        if f.value is not None])
        run_dir.write_config(model_dir, config)
      except (OSError, tf.errors.OpError) as e:
        raise run_dir.write_failure("the flags and config", model_dir, e, latest) from e
    writer = job.summary_writer(latest)
    if job.is_chief:
      with writer.at(0):
        actions_lib.write_hparams({k: f.value for k, f in program.defined_flags().items()})
    control = job.control(trainer.request)

    write_dir = job.write_dir
    actions = [actions_lib.Profile(*profile, run_dir.train_dir(write_dir)),
               actions_lib.Counters(counters),
               actions_lib.Summaries(writer, FLAGS.log_every, trainer, counters, config.train_steps),
               actions_lib.PairImages(writer, FLAGS.image_summary_every),
               actions_lib.Histograms(writer, FLAGS.histogram_every, trainer.trainable_variables),
               checkpoints,
               actions_lib.SkippedImages(os.path.join(model_dir, run_dir.SKIPPED_FILE), skipped_names(
                   strategy, source, stream_config.seed), job.is_chief, lambda: checkpoints.latest),
               actions_lib.Exports(write_dir, FLAGS.export_every, trainer, config.model, config.input,
                                   lambda: checkpoints.latest, spans=config.spans)]
    outcome = job.loop(trainer, iterator, actions, config.train_steps, control, checkpoints,
                       guard=lambda output: diverged(output, checkpoints))
    if outcome.finished:
      logging.info("Training finished at step %d. Peak memory: %.0f MB.", trainer.current_step(),
                   resources.peak_rss_mb())
    if outcome.exit_code == 0:
      logging.info("Weights digest: %.10e", trainer_lib.weights_digest(trainer))
    return outcome.exit_code


def diverged(output, checkpoints):
  """Exit code 1 when a call stopped on a NaN/Inf or exploding gradient (trainer.py), saying where to resume."""
  if output.status not in (trainer_lib.STATUS_NOT_FINITE, trainer_lib.STATUS_EXPLODED):
    return None
  what = "loss or gradient is NaN/Inf" if output.status == trainer_lib.STATUS_NOT_FINITE else (
      f"gradient norm exceeded {FLAGS.divergence_factor}x its running average")
  logging.error("Diverged at step %d: %s. Nothing was checkpointed after step %d; lower --learning_rate or "
                "examine the run, then re-run to resume from %s.", output.step, what, checkpoints.last_step,
                checkpoints.latest or "scratch")
  return 1


def restore(latest, trainer, counters):
  """Restores the trainer and counters from checkpoint `latest` (a checkpoint written before the input listing was
  recorded has none, which is then left at zero)."""
  items = dict(trainer.checkpoint_items(), **counters)
  if not run_dir.checkpoint_reader(latest).has_tensor(f"{trainer_lib.LISTING_KEY}/.ATTRIBUTES/VARIABLE_VALUE"):
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


def resumed(model_dir, config, step):
  """The config of a run resumed at `step`: what it started from (its config.json's init_from) and the spans of its
  steps (run_dir.continued). A resume with other training flags than its last span's (the shortcut fixes switched
  off, another learning rate) says so in one line, and starts a span of its own."""
  try:
    recorded = run_dir.read_config(model_dir) if run_dir.recorded_in(model_dir) else None
  except errors.UsageError:  # an unreadable config.json: the run goes on, recording afresh
    recorded = None
  config = dataclasses.replace(config, init_from=recorded.init_from if recorded else None)
  config, differences = run_dir.continued(recorded, config, step)
  if differences:
    logging.warning("Resuming at step %d with other training flags than the run's steps %d-%d: %s. %s keeps what "
                    "each span of steps was trained with.", step, config.spans[-2]["from_step"], step,
                    ", ".join(f"--{name}={now} (then {then})" for name, then, now in differences),
                    os.path.join(model_dir, run_dir.CONFIG_FILE))
  return config


def skipped_names(strategy, source, seed):
  """index -> what the image at that position of this worker's input stream is (sources.stream_image)."""
  pipeline, pipelines = distribute.input_pipeline(strategy)
  return lambda index: sources.stream_image(source, seed, pipeline, pipelines, index)


def input_stream(strategy, input_config, source, trainer, latest):
  """The distributed batches, resuming where the checkpoint's batches ended: the positions are in the checkpoint,
  the buffers of a tf.data iterator (hundreds of MB of patches) are not. A fresh stream must not repeat the first.
  The positions index the listing of --data, so a listing that changed since the checkpoint (its fingerprint is
  in the checkpoint too) cannot resume them either. Returns the batches and the input config they were made with
  (its seed moved on for a fresh stream)."""
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
              f"{'images' if source.kind == 'files' else 'files'} then, {len(source.paths)} now, or other names")
  if reason:
    logging.warning("The input cannot resume at its exact position (%s): reading a fresh stream.", reason)
    input_config = dataclasses.replace(input_config, seed=input_config.seed + trainer.current_step())
  return distribute.distributed_batches(strategy, input_config, source, positions), input_config


if __name__ == "__main__":
  program.run(run, define_flags)
