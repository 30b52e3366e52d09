"""The compiled multi-step trainer: networks, optimizer and a tf.function that runs many training steps per call.

Every step sums, over all replicas and workers, the loss statistics, the input positions and the pause/quit requests
(control.py), so that every worker stops at the same step, which collective ops need. What to do between calls
(logs, checkpoints, exports) is train.py's.
"""
import dataclasses
import math

import keras
import tensorflow as tf

from context_keras import errors
from context_keras.model import caffe_layers
from context_keras.model import networks as model_lib
from context_keras.training import control

DIVERGENCE_WARMUP_STEPS = 100
PREVIEW_PAIRS = 8
# Why a compiled loop stopped early.
# Besides control.STATUS_OK and control.STATUS_STOP_REQUESTED, a training call can stop on divergence.
STATUS_NOT_FINITE, STATUS_EXPLODED = 2, 3
COUNTERS = ("images", "too_small", "unreadable")
LISTING_KEY = "input_listing"  # its name among the checkpoint's items


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  learning_rate: float = 1e-5
  momentum: float = 0.0
  weight_decay: float = 0.0
  lr_schedule: str = "constant"
  warmup_steps: int = 0
  lr_decay_steps: tuple = ()
  lr_decay_factor: float = 0.1
  train_steps: int = 0
  l2_tower: float = 0.0
  l2_head: float = 0.0
  loss_reduction: str = "sum"
  mixed_precision: str = "none"
  jit_compile: bool = False
  divergence_factor: float = 10.0
  inject_nan_at_step: int = 0

  def __post_init__(self):
    # config.json stores the boundaries as a list.
    object.__setattr__(self, "lr_decay_steps", tuple(int(s) for s in self.lr_decay_steps))


class LearningRate(keras.optimizers.schedules.LearningRateSchedule):
  """Constant, cosine-to-zero, or piecewise constant (times `factor` at each of `boundaries`), with optional linear
  warm-up."""

  def __init__(self, base, warmup_steps=0, decay_steps=0, boundaries=(), factor=0.1):
    self.base, self.warmup_steps, self.decay_steps = base, warmup_steps, decay_steps
    self.boundaries, self.factor = tuple(boundaries), factor

  def __call__(self, step):
    step = tf.cast(step, tf.float32)
    rate = tf.constant(self.base, tf.float32)
    if self.warmup_steps:
      rate *= tf.minimum(1.0, (step + 1.0) / self.warmup_steps)
    if self.decay_steps:
      progress = tf.minimum(step, self.decay_steps) / self.decay_steps
      rate *= 0.5 * (1.0 + tf.cos(math.pi * progress))
    if self.boundaries:
      passed = tf.reduce_sum(tf.cast(step >= tf.constant(self.boundaries, tf.float32), tf.float32))
      rate *= tf.pow(tf.constant(self.factor, tf.float32), passed)
    return rate

  def get_config(self):
    return {"base": self.base, "warmup_steps": self.warmup_steps, "decay_steps": self.decay_steps,
            "boundaries": self.boundaries, "factor": self.factor}


def make_optimizer(config):
  decay_steps = config.train_steps if config.lr_schedule == "cosine" else 0
  boundaries = config.lr_decay_steps if config.lr_schedule == "steps" else ()
  optimizer = keras.optimizers.SGD(
      LearningRate(config.learning_rate, config.warmup_steps, decay_steps, boundaries, config.lr_decay_factor),
      momentum=config.momentum, weight_decay=config.weight_decay or None)
  if config.mixed_precision == "float16":
    optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
  return optimizer


class Trainer:
  """Networks, optimizer and the compiled multi-step loop, all built in `strategy`'s scope."""

  def __init__(self, strategy, model_config, optim_config, time_input=True, augment=None, seed=0):
    """augment: with --augment_on=device, what turns a batch of uint8 patches into the tower's input
    (data.augment_batch), run in the step on each replica's device, inside XLA with --jit_compile; None when the
    input pipeline augmented the patches. seed: the run's, for the dropout masks of the revisiting head."""
    self.strategy = strategy
    self.config = optim_config
    self.augment = augment
    self.patch_size = model_config.patch_size
    self.seed = seed
    # tf.timestamp is refused under op determinism, so the input wait is then not measured.
    self.time_input = time_input
    with strategy.scope():
      self.networks = model_lib.build(model_config)
      self.optimizer = make_optimizer(optim_config)
      self.optimizer.build(self.trainable_variables)
      self.l2_kernels = model_lib.regularised_kernels(self.networks)
      # Running mean of the gradient norm, for the divergence guard; checkpointed with the run.
      self.grad_norm_average = tf.Variable(0.0, trainable=False, name="grad_norm_average")
    self.request = tf.Variable(control.REQUEST_NONE, trainable=False, name="request")
    # Per replica, the stream position (image, grid) after its last batch: where its pipeline resumes
    # (data.make_dataset). Its shape follows the replica count, so a run can resume on another topology.
    self.input_positions = tf.Variable(tf.zeros([strategy.num_replicas_in_sync, 2], tf.int64), trainable=False,
                                       shape=tf.TensorShape([None, 2]), name="input_positions")
    # (fingerprint, length) of the listing of --data that the positions index (sources.Source.fingerprint).
    self.input_listing = tf.Variable(tf.zeros([2], tf.int64), trainable=False, name=LISTING_KEY)
    self._batch_norms = []  # the CaffeBatchNorm layers of the step, found while it is traced (_gradients_impl)
    # XLA compiles the forward and backward pass only: the optimizer's cross-replica update stays outside it.
    self._gradients = (tf.function(self._gradients_impl, jit_compile=True) if optim_config.jit_compile
                       else self._gradients_impl)
    if optim_config.jit_compile and model_config.sync_batchnorm and strategy.num_replicas_in_sync > 1:
      raise errors.UsageError("--jit_compile and --sync_batchnorm cannot be combined with several replicas: the "
                              "batch statistics' all-reduce cannot run inside a compiled function")
    # AutoGraph turns the loop's Python `while` and `if` into graph ops; the step's own methods are written as graph
    # code and marked do_not_convert, since converting their source would only add seconds to every start.
    self.train_loop = tf.function(self._train_loop_impl)

  @property
  def trainable_variables(self):
    return self.networks.tower.trainable_variables + self.networks.head.trainable_variables

  @property
  def step(self):
    return self.optimizer.iterations

  def current_step(self):
    return int(self.optimizer.iterations.numpy())

  def checkpoint_items(self):
    return {"tower": self.networks.tower, "head": self.networks.head, "optimizer": self.optimizer,
            "grad_norm_average": self.grad_norm_average, "input_positions": self.input_positions,
            LISTING_KEY: self.input_listing}

  def _l2_penalty(self):
    """(l2_tower/2) |tower kernels|^2 + (l2_head/2) |head kernels|^2: TF1's l2_regularizer (and PyTorch's weight
    decay) convention, whose gradient is l2 * w, as Kolesnikov et al.'s code adds it (method.md §8.4)."""
    penalty = tf.constant(0.0)
    for scale, kernels in zip((self.config.l2_tower, self.config.l2_head), self.l2_kernels):
      if scale:
        penalty += 0.5 * scale * tf.add_n([tf.reduce_sum(tf.square(tf.cast(k, tf.float32))) for k in kernels])
    return penalty

  @tf.autograph.experimental.do_not_convert
  def _gradients_impl(self, batch, global_pairs, patches_padded=None):
    if self.augment is not None:
      batch = self.augment(batch)
    context = tf.distribute.get_replica_context()
    # The dropout masks of a step: a pure function of the run's seed, the step and the replica.
    seed = tf.random.experimental.stateless_fold_in(
        tf.stack([tf.constant(self.seed, tf.int64), tf.cast(self.step, tf.int64)]),
        tf.cast(context.replica_id_in_sync_group, tf.int64))
    with caffe_layers.held_statistics() as held, tf.GradientTape() as tape:
      logits = model_lib.grid_logits(self.networks, batch, training=True, seed=seed, patches_padded=patches_padded)
      valid = tf.cast(batch["pair_mask"], tf.float32)
      per_pair = keras.losses.sparse_categorical_crossentropy(batch["label"], logits, from_logits=True)
      loss_sum = tf.reduce_sum(per_pair * valid)
      if self.config.inject_nan_at_step:
        nan = tf.equal(self.step + 1, self.config.inject_nan_at_step)
        loss_sum += tf.where(nan, tf.constant(float("nan")), 0.0)
      # Gradients are summed over replicas, so each replica's share of the global objective is its own sum
      # (or its sum over the global pair count): correct for any number of replicas.
      loss = loss_sum if self.config.loss_reduction == "sum" else loss_sum / tf.maximum(global_pairs, 1.0)
      if self.config.l2_tower or self.config.l2_head:
        # Every replica adds its share, so that the summed gradients hold the penalty's once.
        loss += self._l2_penalty() / context.num_replicas_in_sync
      if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
        loss = self.optimizer.scale_loss(loss)
    gradients = tape.gradient(loss, self.trainable_variables)
    correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), batch["label"]),
                                    tf.float32) * valid)
    # The layers in the order they were called, the same in every trace of the step.
    self._batch_norms = [layer for layer, _ in held]
    return gradients, {"loss_sum": loss_sum, "pairs": tf.reduce_sum(valid), "correct": correct}, [
        statistics for _, statistics in held]

  @tf.autograph.experimental.do_not_convert
  def replica_step(self, batch):
    context = tf.distribute.get_replica_context()
    global_pairs = context.all_reduce(tf.distribute.ReduceOp.SUM, tf.reduce_sum(tf.cast(batch["pair_mask"],
                                                                                        tf.float32)))
    if caffe_layers.chooses_per_batch(self.networks.tower):
      # One test of the batch's padding for the whole tower, instead of one tf.cond per batch-norm layer, whose
      # gradients cost seconds to trace (caffe_layers.known_padding); each branch takes the kernels the layers chose.
      gradients, stats, statistics = tf.cond(tf.reduce_all(batch["patch_mask"]),
                                             lambda: self._gradients(batch, global_pairs, False),
                                             lambda: self._gradients(batch, global_pairs, True))
    else:
      gradients, stats, statistics = self._gradients(batch, global_pairs)
    # Outside the tf.cond and the compiled function: these updates may average over replicas (held_statistics).
    for layer, values in zip(self._batch_norms, statistics):
      layer.update_statistics(*values)
    # For the divergence guard: summed over replicas, this is the squared norm of the gradients they computed.
    norm = tf.linalg.global_norm(gradients)
    if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
      norm /= tf.cast(self.optimizer.dynamic_scale, norm.dtype)
    stats["grad_norm_squared"] = tf.square(norm)
    self.optimizer.apply_gradients(zip(gradients, self.trainable_variables))
    # Values whose sum over replicas the loop needs (strategy.reduce has no max or gather).
    replicas = context.num_replicas_in_sync
    stats["positions"] = tf.one_hot(context.replica_id_in_sync_group, replicas, dtype=tf.int64)[:, tf.newaxis] * (
        batch["resume"][tf.newaxis, :])
    stats.update(control.votes(self.request))
    for k in COUNTERS:
      stats[k] = batch[k]
    return stats

  @tf.autograph.experimental.do_not_convert
  def _preview(self, batch):
    """The first pairs of a batch (pair capacity >= 8 always): their patches as the batch holds them and, in device
    mode, their keys."""
    head = {k: tf.ensure_shape(batch[k][:PREVIEW_PAIRS], [PREVIEW_PAIRS])
            for k in ("first", "second", "label", "pair_mask")}
    preview = {"label": head["label"], "valid": head["pair_mask"]}
    for side in ("first", "second"):
      preview[side] = tf.gather(batch["patches"], head[side])
      if self.augment is not None:
        preview[side + "_keys"] = tf.gather(batch["patch_keys"], head[side])
    return preview

  @tf.autograph.experimental.do_not_convert
  def _as_seen(self, preview):
    """The preview pairs as the model saw them. In device mode their patches are augmented here with their own keys,
    which gives the pixels the step gave them."""
    if self.augment is None:
      return preview
    n = PREVIEW_PAIRS
    pairs = {"patches": tf.concat([preview["first"], preview["second"]], 0),
             "patch_keys": tf.concat([preview["first_keys"], preview["second_keys"]], 0),
             "patch_mask": tf.ones([2 * n], tf.bool), "first": tf.range(n), "second": tf.range(n, 2 * n),
             "label": preview["label"], "pair_mask": preview["valid"]}
    patches = self.augment(pairs)["patches"]
    return {"first": patches[:n], "second": patches[n:], "label": preview["label"], "valid": preview["valid"]}

  def _train_loop_impl(self, iterator, num_steps):
    """Runs up to num_steps steps. Stops early, on every worker at the same step, when a worker asks for a pause
    or quit, or on divergence (the host then writes no checkpoint)."""
    totals = {k: tf.constant(0.0, tf.float64) for k in ("loss_sum", "pairs", "correct", "input_seconds")}
    counts = {k: tf.constant(0, tf.int64) for k in COUNTERS}
    status = tf.constant(control.STATUS_OK)
    request = tf.constant(control.REQUEST_NONE)
    steps = tf.constant(0)
    preview = self._preview(self._empty_batch())
    # The images this worker's pipeline skipped, as (stream index, reason) rows (data._Packer; -1: none), for the
    # host to name them.
    skipped = tf.TensorArray(tf.int64, size=0, dynamic_size=True, element_shape=[None, 2], infer_shape=False)
    while steps < num_steps and status == control.STATUS_OK:
      start = tf.timestamp() if self.time_input else tf.constant(0.0, tf.float64)
      with tf.control_dependencies([start]):
        batch = next(iterator)
      local = self.strategy.experimental_local_results(batch)
      skipped = skipped.write(steps, tf.concat([tf.stack([b["skipped"], tf.cast(b["skipped_reason"], tf.int64)], -1)
                                                for b in local], 0))
      with tf.control_dependencies(tf.nest.flatten(local)):
        waited = tf.timestamp() - start if self.time_input else start
      stats = self.strategy.run(self.replica_step, args=(batch,))
      stats = {k: self.strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for k, v in stats.items()}
      stats["input_seconds"] = waited
      totals = {k: totals[k] + tf.cast(stats[k], tf.float64) for k in totals}
      counts = {k: counts[k] + stats[k] for k in counts}
      preview = self._preview(local[0])
      self.input_positions.assign(stats["positions"])
      steps += 1
      status = self._check_divergence(stats["loss_sum"], tf.sqrt(stats["grad_norm_squared"]))
      if status == control.STATUS_OK:
        request = control.agreed_request(stats)
        if request != control.REQUEST_NONE:
          status = tf.constant(control.STATUS_STOP_REQUESTED)
    skipped = skipped.concat() if skipped.size() > 0 else tf.zeros([0, 2], tf.int64)
    return {"steps": steps, "status": status, "request": request, "preview": self._as_seen(preview),
            "skipped": tf.boolean_mask(skipped, skipped[:, 0] >= 0), **totals, **counts}

  @tf.autograph.experimental.do_not_convert
  def _check_divergence(self, loss_sum, grad_norm):
    """The step's status: not finite (the loss, or the gradients' norm but where float16's loss-scale optimizer
    expects overflows: it skipped that update and lowers its scale), exploded (the norm above divergence_factor times
    its running mean, after the warm-up), else OK, and only then does the norm enter that mean."""
    finite_norm = tf.math.is_finite(grad_norm)
    not_finite = ~tf.math.is_finite(loss_sum)
    if self.config.mixed_precision != "float16":
      not_finite |= ~finite_norm
    average = self.grad_norm_average
    exploded = tf.constant(False)
    if self.config.divergence_factor > 0:
      exploded = (finite_norm & (self.step > DIVERGENCE_WARMUP_STEPS) &
                  (grad_norm > self.config.divergence_factor * average))
    status = tf.where(not_finite, STATUS_NOT_FINITE, tf.where(exploded, STATUS_EXPLODED, control.STATUS_OK))
    rate = tf.maximum(0.01, 1.0 / tf.cast(self.step, tf.float32))  # a plain mean at first, then an EMA
    counted = (status == control.STATUS_OK) & finite_norm
    average.assign(tf.where(counted, average + rate * (grad_norm - average), average))
    return status

  @tf.autograph.experimental.do_not_convert
  def _empty_batch(self):
    size = self.patch_size
    pairs = tf.zeros([PREVIEW_PAIRS], tf.int32)
    batch = {"first": pairs, "second": pairs, "label": pairs, "pair_mask": tf.zeros([PREVIEW_PAIRS], tf.bool)}
    if self.augment is None:
      return dict(batch, patches=tf.zeros([1, size, size, 3]))
    return dict(batch, patches=tf.zeros([1, size, size, 3], tf.uint8), patch_keys=tf.zeros([1, 3], tf.uint32))


def weights_digest(trainer):
  """One number that differs when any weight differs: lets workers and runs be compared from their logs."""
  return float(sum(tf.reduce_sum(tf.square(tf.cast(v, tf.float64))) for v in trainer.trainable_variables))
