"""The large-scale linear evaluation (method.md §10.3), the library of python -m context_keras.linear_eval: frozen
features streamed through tf.data from the backbone, one linear head per layer, all trained jointly with SGD under a
tf.distribute strategy in a compiled multi-step loop; top-1 and top-5 per layer on the validation set.

Input: a labelled set (labelled.py) read as an endless, seeded stream of examples: files in a new permutation every
epoch, shards in a new order every epoch (interleaved, then a seeded shuffle buffer); each example's augmentation is
a stateless function of (seed, its position in the stream). The stream is therefore a pure function of the seed, and
a resumed job reads on from position step * batch_size exactly (shards re-read the current epoch's records up to
there, without decoding them). Every position yields one example: an image that cannot be read or decoded becomes a
blank one of weight 0, so batches keep their size, positions stay exact and the bad image is counted, not learned.
Features are computed per batch and never kept, so memory does not grow with the data set.
"""
import dataclasses
import math
import time

import keras
import numpy as np
import tensorflow as tf

from context_keras.evaluation import features as features_lib
from context_keras.evaluation import images as images_lib
from context_keras.input import decoding
from context_keras.input import labelled
from context_keras.input import sources
from context_keras.training import control

PROTOCOLS = ("image", "patches")
AUGMENTATIONS = ("random_resized_crop", "random_crop", "none")
# The per-256-images learning rate is scaled linearly with the batch size, as Goyal et al. 2019 and Kolesnikov et
# al. 2019 do (their learning rates are quoted per 256 images).
LR_REFERENCE_BATCH = 256


@dataclasses.dataclass(frozen=True)
class JobConfig:
  """The protocol; defaults: Goyal et al. 2019 as VISSL reproduces it for ImageNet (method.md §10.3)."""
  protocol: str = "image"
  layers: tuple = ()                 # () = every named layer of the backbone
  probe_dims: int = features_lib.PROBE_DIMS
  probe_pool: str = "avg"
  head_batchnorm: bool = True
  resize_size: int = 256
  crop_size: int = 224
  train_augmentation: str = "random_resized_crop"
  flip: bool = True
  batch_size: int = 256
  epochs: float = 28
  learning_rate: float = 0.01        # per 256 images
  momentum: float = 0.9
  nesterov: bool = True
  weight_decay: float = 5e-4
  decay_epochs: tuple = (8, 16, 24)
  decay_factor: float = 0.1
  warmup_epochs: float = 0
  shuffle_buffer: int = 10_000
  seed: int = 0

  @property
  def patch_grid(self):
    return features_lib.PATCH_GRID if self.protocol == "patches" else 0


def steps_per_epoch(train_size, batch_size):
  return max(1, math.ceil(train_size / batch_size))


def total_steps(config, train_size):
  return max(1, math.ceil(config.epochs * train_size / config.batch_size))


class StepSchedule(keras.optimizers.schedules.LearningRateSchedule):
  """A learning rate multiplied by `factor` at each boundary step, after an optional linear warm-up."""

  def __init__(self, base, boundaries, factor, warmup_steps=0):
    self.base, self.boundaries, self.factor, self.warmup_steps = base, list(boundaries), factor, warmup_steps

  def __call__(self, step):
    step = tf.cast(step, tf.float32)
    passed = tf.add_n([tf.cast(step >= b, tf.float32) for b in self.boundaries]) if self.boundaries else 0.0
    rate = self.base * tf.pow(self.factor, passed)
    if self.warmup_steps:
      rate *= tf.minimum(1.0, (step + 1.0) / self.warmup_steps)
    return rate

  def get_config(self):
    return {"base": self.base, "boundaries": self.boundaries, "factor": self.factor,
            "warmup_steps": self.warmup_steps}


# --------------------------------------------------------------------------------------------------------------
# Input


def _placeholder(size):
  return {"image": tf.zeros([size, size, 3], tf.uint8), "label": tf.constant(0, tf.int64),
          "weight": tf.constant(0.0), "index": tf.constant(-1, tf.int64)}


def _never_failing(transform, size):
  """Maps one example through `transform`, or, when that raises (an unreadable or undecodable image), to a blank
  example of weight 0 carrying the same index: one output per input, whatever happens."""
  def one(index, contents, label):
    example = tf.data.Dataset.from_tensors((index, contents, label)).map(transform).ignore_errors()
    blank = tf.data.Dataset.from_tensors(dict(_placeholder(size), index=index))
    return example.concatenate(blank).take(1)
  return one


def _examples(records, transform, size):
  """(index, bytes or path, label) -> example dicts, in order, in parallel."""
  return records.interleave(_never_failing(transform, size), cycle_length=16, block_length=1,
                            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _read(lset, path_or_bytes):
  return tf.io.read_file(path_or_bytes) if lset.kind == "files" else path_or_bytes


def training_records(lset, seed, start, shuffle_buffer):
  """The endless stream (position, path or record bytes, label) of a labelled set from position `start` on."""
  size = lset.size
  if lset.kind == "files":
    paths, labels = tf.constant(lset.paths), tf.constant(lset.labels)

    def epoch(e):
      order = sources.epoch_order(size, tf.constant(seed, tf.int64), e)
      return tf.data.Dataset.from_tensor_slices((tf.gather(paths, order), tf.gather(labels, order)))
    stream = tf.data.Dataset.range(start // size, 2**62).flat_map(epoch).skip(start % size)
    return tf.data.Dataset.zip((tf.data.Dataset.range(start, 2**62), stream)).map(
        lambda i, pair: (i, pair[0], pair[1]))
  shards = sources.shard_table(lset)
  table = labelled.class_table(lset.classes)

  def epoch(e):
    order = sources.epoch_order(len(lset.paths), tf.constant(seed, tf.int64), e)
    raw = tf.data.Dataset.from_tensor_slices({k: tf.gather(v, order) for k, v in shards.items()}).interleave(
        lambda shard: sources.shard_records(**shard, first_visit=tf.equal(e, 0)), cycle_length=min(8, len(lset.paths)),
        block_length=1, num_parallel_calls=min(8, len(lset.paths)), deterministic=True)
    # A Python seed (a tensor seed breaks under a global seed): each epoch's buffer shuffles the same way, but
    # its input, the shards' order, is new every epoch.
    return raw.shuffle(shuffle_buffer, seed=seed * 1_000_003 + 1, reshuffle_each_iteration=False)
  # The epoch length is prepare's record count; the current epoch is re-read up to `start`, records not parsed.
  raw = tf.data.Dataset.range(start // max(size, 1), 2**62).flat_map(epoch).skip(start % max(size, 1))

  def parse(index, record):
    contents, _, name = sources.parse_record(record, labelled=True)
    return index, contents, table.lookup(name)
  return tf.data.Dataset.zip((tf.data.Dataset.range(start, 2**62), raw)).map(parse,
                                                                             num_parallel_calls=tf.data.AUTOTUNE)


def train_transform(lset, config):
  """(position, path or bytes, label) -> the augmented training example (its randomness keyed by the position)."""
  size = config.crop_size

  def transform(index, contents, label):
    image = decoding.decode(_read(lset, contents))
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(
        images_lib.image_seed(config.seed, index), 2))
    if config.train_augmentation == "random_resized_crop":
      image = images_lib.random_resized_crop(image, size, crop_seed)
    elif config.train_augmentation == "random_crop":
      image = images_lib.random_crop(image, config.resize_size, size, crop_seed)
    else:
      image = images_lib.centre_crop(image, config.resize_size, size)
    if config.flip:
      image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    check = tf.debugging.assert_non_negative(label, message="a record's class is not one of the training classes")
    with tf.control_dependencies([check]):
      return {"image": image, "label": tf.identity(label), "weight": tf.constant(1.0), "index": index}
  return transform


def val_transform(lset, config):
  def transform(index, contents, label):
    image = images_lib.centre_crop(decoding.decode(_read(lset, contents)), config.resize_size, config.crop_size)
    check = tf.debugging.assert_non_negative(label, message="a record's class is not one of the training classes")
    with tf.control_dependencies([check]):
      return {"image": image, "label": tf.identity(label), "weight": tf.constant(1.0), "index": index}
  return transform


def val_records(lset):
  if lset.kind == "files":
    return tf.data.Dataset.from_tensor_slices((list(lset.paths), lset.labels)).enumerate().map(
        lambda i, pair: (i, pair[0], pair[1]))
  table = labelled.class_table(lset.classes)

  def parse(index, record):
    contents, _, name = sources.parse_record(record, labelled=True)
    return index, contents, table.lookup(name)
  return sources.all_records(lset).enumerate().map(parse)


def train_dataset(lset, config, start, pipeline):
  """This input pipeline's batches (of one replica's share of config.batch_size) of the training stream from
  `start`; the pipeline takes every pipeline.count-th example, its replicas consecutive batches."""
  records = training_records(lset, config.seed, start, config.shuffle_buffer).shard(pipeline.count, pipeline.id)
  return (_examples(records, train_transform(lset, config), config.crop_size)
          .batch(pipeline.replica_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE))


def val_steps(val_size, batch_size):
  return max(1, math.ceil(val_size / batch_size))


def val_dataset(lset, config, steps, pipeline):
  """This pipeline's share of the validation set for `steps` steps, padded with blank examples of weight 0."""
  records = val_records(lset).shard(pipeline.count, pipeline.id)
  padding = tf.data.Dataset.from_tensors(_placeholder(config.crop_size)).repeat()
  return (_examples(records, val_transform(lset, config), config.crop_size).concatenate(padding)
          .batch(pipeline.replica_batch, drop_remainder=True).take(steps * pipeline.replicas)
          .prefetch(tf.data.AUTOTUNE))


@dataclasses.dataclass(frozen=True)
class Pipeline:
  id: int
  count: int
  replicas: int        # replicas this pipeline feeds, each with consecutive batches
  replica_batch: int


def distributed(strategy, batch_size, make):
  """make(Pipeline) for each input pipeline of `strategy`, distributed over its replicas (global batch_size)."""
  def dataset_fn(context):
    replicas = strategy.num_replicas_in_sync // context.num_input_pipelines
    return make(Pipeline(context.input_pipeline_id, context.num_input_pipelines, replicas,
                         context.get_per_replica_batch_size(batch_size)))
  return strategy.distribute_datasets_from_function(dataset_fn)


# --------------------------------------------------------------------------------------------------------------
# Heads and their training


def build_heads(dims, classes, batchnorm):
  """{layer: pooled features [N, dims]} -> {layer: logits [N, classes]}: per layer an optional batch norm (Goyal et
  al. 2019, as VISSL: momentum 0.9 in Keras' convention, epsilon 1e-5) and a linear layer."""
  inputs = {name: keras.Input((d,), name=name) for name, d in dims.items()}
  outputs = {}
  for name, x in inputs.items():
    if batchnorm:
      x = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=f"{name}_bn")(x)
    outputs[name] = keras.layers.Dense(classes, name=f"{name}_linear", dtype="float32")(x)
  return keras.Model(inputs, outputs, name="heads")


class HeadTrainer:
  """The heads, their optimizer and the compiled loops (training: many steps per call, stopping early on a pause or
  quit request as trainer.Trainer does; evaluation: per-head top-1/top-5 and per-class counts), all built in
  `strategy`'s scope. `extractor` (features.Extractor) gives the frozen features."""

  def __init__(self, strategy, extractor, classes, config, steps_per_epoch_):
    self.strategy, self.extractor, self.classes, self.config = strategy, extractor, classes, config
    self.layers = extractor.layers
    boundaries = [round(e * steps_per_epoch_) for e in config.decay_epochs]
    schedule = StepSchedule(config.learning_rate * config.batch_size / LR_REFERENCE_BATCH, boundaries,
                            config.decay_factor, round(config.warmup_epochs * steps_per_epoch_))
    with strategy.scope():
      self.heads = build_heads(extractor.dims, classes, config.head_batchnorm)
      self.optimizer = keras.optimizers.SGD(schedule, momentum=config.momentum, nesterov=config.nesterov)
      self.optimizer.build(self.heads.trainable_variables)
    self.kernels = [v for v in self.heads.trainable_variables if v.path.endswith("kernel")]
    self.request = tf.Variable(control.REQUEST_NONE, trainable=False, name="request")
    # AutoGraph turns the loops' Python `while` and `for` into graph ops; the per-replica steps are graph code, marked
    # do_not_convert (as the trainer's): converting their source would only add seconds to every start.
    self.train_loop = tf.function(self._train_loop_impl)
    self.eval_loop = tf.function(self._eval_loop_impl)

  def current_step(self):
    return int(self.optimizer.iterations.numpy())

  def learning_rate(self):
    return float(self.optimizer.learning_rate)  # Keras evaluates the schedule at the current step

  def checkpoint_items(self):
    return {"heads": self.heads, "optimizer": self.optimizer}

  def _features(self, images):
    return {k: tf.stop_gradient(v) for k, v in self.extractor(images).items()}

  @tf.autograph.experimental.do_not_convert
  def replica_step(self, batch):
    context = tf.distribute.get_replica_context()
    weight = batch["weight"]
    features = self._features(batch["image"])
    with tf.GradientTape() as tape:
      logits = self.heads(features, training=True)
      losses = {name: tf.reduce_sum(weight * tf.nn.sparse_softmax_cross_entropy_with_logits(
          labels=batch["label"], logits=logits[name])) for name in self.layers}
      # The objective of the global batch: the sum over heads of their mean loss, plus L2 on the kernels (as in
      # the loss, so that SGD adds weight_decay * w to the gradient, as PyTorch's weight_decay does).
      loss = tf.add_n(list(losses.values())) / self.config.batch_size
      if self.config.weight_decay:
        loss += 0.5 * self.config.weight_decay * tf.add_n([tf.reduce_sum(tf.square(k)) for k in self.kernels]) / (
            context.num_replicas_in_sync)
    gradients = tape.gradient(loss, self.heads.trainable_variables)
    self.optimizer.apply_gradients(zip(gradients, self.heads.trainable_variables))
    stats = {"loss_" + name: value for name, value in losses.items()}
    for name in self.layers:
      correct = tf.cast(tf.equal(tf.argmax(logits[name], -1), batch["label"]), tf.float32)
      stats["correct_" + name] = tf.reduce_sum(correct * weight)
    stats["examples"] = tf.reduce_sum(weight)
    stats["unreadable"] = _unreadable(batch)
    stats.update(control.votes(self.request))
    return stats

  def _train_loop_impl(self, iterator, num_steps):
    """Up to num_steps steps; stops early, on every worker at the same step, when one asks for a pause or quit."""
    totals = {k: tf.constant(0.0, tf.float64) for k in
              ["examples", "unreadable"] + [p + n for n in self.layers for p in ("loss_", "correct_")]}
    status, request, steps = tf.constant(control.STATUS_OK), tf.constant(control.REQUEST_NONE), tf.constant(0)
    while steps < num_steps and status == control.STATUS_OK:
      stats = self.strategy.run(self.replica_step, args=(next(iterator),))
      stats = {k: self.strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for k, v in stats.items()}
      totals = {k: totals[k] + tf.cast(stats[k], tf.float64) for k in totals}
      steps += 1
      request = control.agreed_request(stats)
      if request != control.REQUEST_NONE:
        status = tf.constant(control.STATUS_STOP_REQUESTED)
    return {"steps": steps, "status": status, "request": request, **totals}

  @tf.autograph.experimental.do_not_convert
  def replica_eval(self, batch):
    weight, labels = batch["weight"], batch["label"]
    logits = self.heads(self._features(batch["image"]), training=False)
    stats = {"examples": tf.reduce_sum(weight), "unreadable": _unreadable(batch)}
    for name in self.layers:
      top5 = tf.math.top_k(logits[name], k=min(5, self.classes)).indices
      hit5 = tf.cast(tf.reduce_any(tf.equal(tf.cast(top5, tf.int64), labels[:, None]), -1), tf.float32) * weight
      hit1 = tf.cast(tf.equal(tf.argmax(logits[name], -1), labels), tf.float32) * weight
      stats["top1_" + name] = tf.reduce_sum(hit1)
      stats["top5_" + name] = tf.reduce_sum(hit5)
      stats["class_correct_" + name] = tf.math.unsorted_segment_sum(hit1, labels, self.classes)
    stats["class_count"] = tf.math.unsorted_segment_sum(weight, labels, self.classes)
    return stats

  def _eval_loop_impl(self, iterator, steps):
    vector = tf.zeros([self.classes], tf.float64)
    totals = {"examples": tf.constant(0.0, tf.float64), "unreadable": tf.constant(0.0, tf.float64),
              "class_count": vector}
    for name in self.layers:
      totals.update({"top1_" + name: totals["examples"], "top5_" + name: totals["examples"],
                     "class_correct_" + name: vector})
    for _ in tf.range(steps):
      stats = self.strategy.run(self.replica_eval, args=(next(iterator),))
      totals = {k: totals[k] + tf.cast(self.strategy.reduce(tf.distribute.ReduceOp.SUM, stats[k], axis=None),
                                       tf.float64) for k in totals}
    return totals

  def evaluate(self, dataset, steps, class_names):
    """Per-layer top-1 and top-5 on a validation dataset of `steps` batches, per-class top-1 of every layer."""
    totals = {k: np.asarray(v) for k, v in self.eval_loop(iter(dataset), tf.constant(steps)).items()}
    examples = max(float(totals["examples"]), 1.0)
    count = totals["class_count"]
    per_layer = {}
    for name in self.layers:
      per_layer[name] = {"top1": float(totals["top1_" + name]) / examples,
                         "top5": float(totals["top5_" + name]) / examples,
                         "dims": self.extractor.dims[name],
                         "per_class_top1": {class_names[c]: float(totals["class_correct_" + name][c] / count[c])
                                            for c in range(self.classes) if count[c] > 0}}
    return per_layer, int(totals["examples"]), int(totals["unreadable"])


def _unreadable(batch):
  """Blank examples standing for unreadable images (padding blanks carry the index -1)."""
  return tf.reduce_sum(tf.cast(batch["index"] >= 0, tf.float32) * (1.0 - batch["weight"]))


def weights_digest(heads):
  return float(sum(tf.reduce_sum(tf.square(tf.cast(v, tf.float64))) for v in heads.trainable_variables))


def measure(features_fn, layers, config, classes=1000, batch_size=64, steps=3, repeats=3):
  """Images/s of the job's feature pass (backbone forward and pooling of every layer) and of its whole training step
  (with the heads' forward and backward pass), on one preloaded batch of random uint8 images; medians of `repeats`
  timed runs of `steps` steps. For the benchmark program."""
  plans = features_lib.plan(features_fn, layers, config.crop_size, config.probe_dims, config.probe_pool,
                            config.patch_grid)
  extractor = features_lib.Extractor(features_fn, plans, config.patch_grid)
  images = tf.constant(np.random.default_rng(0).integers(0, 256, (batch_size, config.crop_size, config.crop_size, 3),
                                                         dtype=np.uint8))
  config = dataclasses.replace(config, batch_size=batch_size)
  trainer = HeadTrainer(tf.distribute.get_strategy(), extractor, classes, config, steps_per_epoch_=1000)
  batch = {"image": images, "label": tf.zeros([batch_size], tf.int64), "weight": tf.ones([batch_size]),
           "index": tf.range(batch_size, dtype=tf.int64)}
  iterator = iter(tf.data.Dataset.from_tensors(batch).repeat())

  @tf.function
  def feature_loop(num_steps):
    # Timed as the training loop is (a compiled loop over the iterator), each batch's features reduced to a scalar.
    total = tf.constant(0.0)
    for _ in tf.range(num_steps):
      total += tf.add_n([tf.reduce_sum(v) for v in extractor(next(iterator)["image"]).values()])
    return total

  def feature_pass():
    return feature_loop(tf.constant(steps)).numpy()

  def train_step():
    return trainer.train_loop(iterator, tf.constant(steps))["steps"].numpy()

  rates = {}
  for name, work in (("feature_pass", feature_pass), ("train_step", train_step)):
    work()  # trace and warm up
    times = []
    for _ in range(repeats):
      began = time.perf_counter()
      work()
      times.append(time.perf_counter() - began)
    rates[name + "_images_per_s"] = round(batch_size * steps / float(np.median(times)), 1)
  rates.update({"batch_size": batch_size, "crop_size": config.crop_size, "classes": classes,
                "dims": extractor.dims})
  return rates
