"""Object detection on the learned backbone (docs/detection.md), the library of python -m context_keras.detect:
the backbone as a keras-hub FeaturePyramidBackbone, a RetinaNet head from keras-hub with the fixes it needs, its
loss, per-class decoding for the VOC metric, the compiled training and evaluation loops under a tf.distribute
strategy, and the fine-tuned detector as a SavedModel.

keras-hub (the optional extra `detection`) is imported only when a detector is built, so that the package imports
without it. What keras-hub 0.32 lacks or gets wrong for this use, and what is done here instead:
  - RetinaNetBackbone refuses a backbone whose deepest map is finer than stride 32 when P5-P7 are asked for (our
    ResNets stop at stride 8, AlexNet's conv5 alone at 16): its FeaturePyramid layer is composed here directly,
    which makes the missing coarse levels with its stride-2 convolutions;
  - the focal loss's prior bias (log(p / (1 - p)), Lin et al. 2017 §4.1) is put on the box head instead of the
    class head: it is moved after construction, and the heads' kernels get the paper's N(0, 0.01);
  - its default decoder keeps the best class of an anchor at score 0.5 with class-agnostic NMS, which loses most of
    the precision/recall curve that AP integrates: decode() applies per-class NMS at score 0.05, 100 detections
    per image (Detectron's RetinaNet test settings);
  - its anchors follow the image's static size: images are fitted to one size, a multiple of the coarsest stride,
    and standardised before padding (input/voc.fit).
Faster R-CNN, the protocol of MoCo and mmselfsup, has no Keras 3 implementation to build on; DETECTORS is where one
would be added.
"""
import dataclasses
import math

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from context_keras import errors
from context_keras.deploy import rescale as rescale_lib
from context_keras.deploy import serving
from context_keras.evaluation import linear_job
from context_keras.evaluation import voc_metric
from context_keras.input import voc
from context_keras.model import caffe_layers
from context_keras.model import fold
from context_keras.training import control
from context_keras.training import restore
from context_keras.training import trainer as trainer_lib

DETECTORS = ("retinanet",)
BATCHNORM = ("frozen", "trained")
INITS = ("trained", "random")
INSTALL_HINT = "pip install context_keras[detection]"
# The backbone layers whose maps feed the pyramid, per tower; at each stride the deepest of them is used
# (docs/detection.md §1). ResNets: with our stem (stride 1, then a 3x3/2 pool) and strides 1,2,2,1, block2 is at 4
# and block3 and block4 at 8; with ImageNet's (2; 1,2,2,2), block2-4 are at 8, 16, 32.
PYRAMID_LAYERS = {"alexnet_bn": ("conv2", "conv5", "pool5"), "vgg16_bn": ("conv4_3", "conv5_3", "pool5"),
                  "resnet18": ("block2", "block3", "block4"), "resnet34": ("block2", "block3", "block4"),
                  "resnet50": ("block2", "block3", "block4")}
# Lin et al. 2017 (RetinaNet): anchors of 3 scales x 3 aspect ratios, side 4 x stride; matching IoU 0.5 / 0.4.
ANCHOR_SCALES, ANCHOR_RATIOS, ANCHOR_SIZE = 3, (0.5, 1.0, 2.0), 4.0
HEAD_INIT_STDDEV = 0.01
# Detectron's RetinaNet inference: the 1000 best candidates per level above the score threshold, then NMS.
CANDIDATES_PER_LEVEL = 1000
# Trained batch norm: Keras momentum (PyTorch's 0.1) and epsilon of SyncBN in detectron2.
BN_MOMENTUM, BN_EPSILON = 0.9, 1e-5
CALIBRATION_PATCHES = rescale_lib.NUM_PATCHES
# Lin et al. 2017 and Detectron: learning rate 0.01 for 16 images per step; other batches scale it linearly (Goyal
# et al. 2017).
LR_REFERENCE_BATCH = 16


@dataclasses.dataclass(frozen=True)
class DetectorConfig:
  """The detector, its training and its decoding. Defaults: RetinaNet (Lin et al. 2017; Detectron's settings)."""
  detector: str = "retinanet"
  image_size: int = 512
  pyramid_layers: tuple = ()          # () = PYRAMID_LAYERS of the tower
  min_level: int = 3
  max_level: int = 7
  fpn_filters: int = 256
  head_convs: int = 4
  batchnorm: str = "frozen"
  rescale: bool = True
  prior_probability: float = 0.01
  focal_alpha: float = 0.25
  focal_gamma: float = 2.0
  smooth_l1_beta: float = 0.1
  score_threshold: float = 0.05
  nms_iou: float = 0.5
  max_detections: int = 100
  batch_size: int = 16
  train_steps: int = 12000
  learning_rate: float = 0.01        # per LR_REFERENCE_BATCH images, scaled linearly with batch_size
  momentum: float = 0.9
  weight_decay: float = 1e-4
  warmup: float = 0.04                # of train_steps, a linear warm-up from 0
  decay_at: tuple = (0.667, 0.889)    # of train_steps (Detectron's 60k and 80k of 90k)
  decay_factor: float = 0.1
  clip_norm: float = 35.0             # mmdetection's RetinaNet configs for stability (docs/detection.md §4)
  flip: bool = True
  seed: int = 0

  def __post_init__(self):
    object.__setattr__(self, "pyramid_layers", tuple(self.pyramid_layers))
    object.__setattr__(self, "decay_at", tuple(float(f) for f in self.decay_at))

  def check(self):
    """A UsageError naming the flag when the detector cannot be built as configured."""
    if self.detector not in DETECTORS:
      raise errors.UsageError(f"--detector={self.detector} is not one of {', '.join(DETECTORS)}")
    if self.batchnorm not in BATCHNORM:
      raise errors.UsageError(f"--batchnorm={self.batchnorm} is not one of {', '.join(BATCHNORM)}")
    if self.min_level > self.max_level:
      raise errors.UsageError(f"Invalid flags: --min_level={self.min_level} is above --max_level={self.max_level}")
    if self.image_size % 2 ** self.max_level:
      raise errors.UsageError(f"Invalid flags: --image_size={self.image_size} must be a multiple of 2^--max_level = "
                              f"{2 ** self.max_level} (the anchors of every level tile the image)")
    if any(not 0 < f < 1 for f in self.decay_at):
      raise errors.UsageError(f"Invalid flags: --decay_at={','.join(map(str, self.decay_at))} must be fractions in "
                              "(0, 1)")
    return self

  def schedule(self):
    """The learning rate per step: the recipe's warm-up and decays at their fractions of train_steps."""
    return linear_job.StepSchedule(self.learning_rate * self.batch_size / LR_REFERENCE_BATCH,
                                   [round(f * self.train_steps) for f in self.decay_at], self.decay_factor,
                                   round(self.warmup * self.train_steps))


def keras_hub():
  """The keras_hub module, or a UsageError saying how to install it."""
  try:
    import keras_hub as hub  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise errors.UsageError(f"detection needs keras-hub: {INSTALL_HINT}") from e
  return hub


def _feature_pyramid_class():
  # Not exported by keras-hub (0.32): RetinaNetBackbone builds it, with the check this module avoids (docstring).
  from keras_hub.src.models.retinanet.feature_pyramid import FeaturePyramid  # pylint: disable=import-outside-toplevel
  return FeaturePyramid


# --------------------------------------------------------------------------------------------------------------
# The backbone


def prepare_backbone(folded, model_config, geometry, preprocessing, train_split, config, rescaled, resuming=False):
  """The folded backbone, ready to fine-tune (in place): Krähenbühl et al.'s rescaling (method.md §5.2) on patches
  of the training images unless it was rescaled at export or is residual (defined for chains only), then, with
  trained batch norm, a batch-norm layer after every convolution the tower normalised. Returns (backbone, report).
  `resuming`: only the architecture is made (a checkpoint holds the weights)."""
  if resuming:
    if config.batchnorm == "trained":
      folded = insert_batchnorm(folded, normalised_layers(model_config), None)
    return folded, {"resumed": "the backbone was prepared when the job started"}
  report = {}
  patches = None
  if config.rescale or config.batchnorm == "trained":
    patches = serving.preprocess(rescale_lib.sample_patches(train_split.image_source(), CALIBRATION_PATCHES,
                                                            config.seed, geometry),
                                 preprocessing)
  if not config.rescale:
    report["rescale"] = {"skipped": "--norescale"}
  elif rescaled:
    report["rescale"] = {"skipped": "rescaled at export"}
  elif not fold.is_chain(folded):
    report["rescale"] = {"skipped": "a residual tower: rescaling is defined for chain towers only (method.md §5.2)"}
  else:
    logging.info("Rescaling the backbone on %d patches of the training images (method.md §5.2).", len(patches))
    result = rescale_lib.rescale(folded, patches, seed=config.seed)
    report["rescale"] = {"patches": int(len(patches)), "converged": result["between_layer"]["converged"],
                         "max_deviation_after": result["between_layer"]["after"]["max_deviation"]}
  if config.batchnorm == "trained":
    folded = insert_batchnorm(folded, normalised_layers(model_config), patches)
  return folded, report


def normalised_layers(model_config):
  """Names of the tower's conv and dense layers whose output a batch norm normalises (and fold.fold_tower merges
  into them)."""
  nodes = fold.call_nodes(restore.build_networks(model_config).tower)
  producer = {id(out): node.operation for node in nodes for out in node.outputs}
  return {producer[id(node.input_tensors[0])].name for node in nodes
          if isinstance(node.operation, caffe_layers.CaffeBatchNorm)
          and isinstance(producer.get(id(node.input_tensors[0])), (keras.layers.Conv2D, keras.layers.Dense))}


def insert_batchnorm(folded, names, patches):
  """A copy of the folded backbone with a trainable batch norm after each conv layer in `names` (before its ReLU),
  initialised to the identity on `patches`: its statistics are the pre-activations' mean and variance there, and
  its scale and shift undo them. Synchronised across replicas (SyncBN, as MoCo and detectron2 fine-tune). Without
  `patches` the layers keep Keras's initialisation (a checkpoint will overwrite them)."""
  convs = [layer for layer in folded.layers if layer.name in names and isinstance(layer, keras.layers.Conv2D)]
  stats = {}
  if patches is not None:
    values = keras.Model(folded.input, [layer.output for layer in convs])(patches, training=False)
    values = values if isinstance(values, (list, tuple)) else [values]
    stats = {layer.name: (np.mean(v.numpy(), axis=(0, 1, 2)), np.var(v.numpy(), axis=(0, 1, 2)))
             for layer, v in zip(convs, values)}
  wanted = {layer.name for layer in convs}
  created = {}

  def call(layer, *args, **kwargs):
    out = layer(*args, **kwargs)
    if layer.name in wanted:
      norm = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, synchronized=True,
                                             name=f"{layer.name}_bn")
      out = norm(out)
      created[layer.name] = norm
    return out
  copy = keras.models.clone_model(folded, call_function=call)
  for original in folded.layers:
    if original.weights:
      copy.get_layer(original.name).set_weights(original.get_weights())
  for name, (mean, variance) in stats.items():
    norm = created[name]
    norm.set_weights([np.sqrt(variance + BN_EPSILON), mean, mean, variance])  # gamma, beta, moving mean, variance
  return copy


def pyramid_levels(folded, candidates, config):
  """{level: layer name} of the pyramid: each candidate layer's stride measured at the static image size, the
  deepest layer at each level from config.min_level up to config.max_level. UsageErrors name the flag."""
  config.check()
  image = keras.Input((config.image_size, config.image_size, 3))
  maps = folded(image)
  unknown = [name for name in candidates if name not in maps]
  if unknown:
    raise errors.UsageError(f"--pyramid_layers: {', '.join(unknown)} not among the backbone's layers "
                            f"{', '.join(maps)}")
  levels = {}
  for name in [n for n in maps if n in candidates]:  # input to output: the deepest at a level wins
    side = maps[name].shape[1]
    stride = config.image_size / side if side else 0
    level = round(math.log2(stride)) if stride >= 1 else -1
    if level < 0 or side * 2 ** level != config.image_size:
      raise errors.UsageError(f"--image_size={config.image_size}: layer {name} gives a {side}x{side} map, not the "
                              "image size over a power of two; use a multiple of "
                              f"{2 ** config.max_level}")
    if config.min_level <= level <= config.max_level:
      levels[level] = name
  if not levels:
    raise errors.UsageError(f"--pyramid_layers={','.join(candidates)}: none is at a stride between "
                            f"2^{config.min_level} and 2^{config.max_level} (--min_level, --max_level)")
  found = sorted(levels)
  if found != list(range(found[0], found[-1] + 1)):
    raise errors.UsageError(f"--pyramid_layers={','.join(candidates)}: the pyramid's levels must be consecutive, "
                            f"got strides {', '.join(str(2 ** k) for k in found)}")
  return levels


# --------------------------------------------------------------------------------------------------------------
# RetinaNet


class RetinaNet:
  """keras-hub's RetinaNetObjectDetector on our backbone, with the loss and decoding of Lin et al. 2017.

  model: images [N, S, S, 3] (standardised, padded) -> {"bbox_regression": [N, A, 4] (center_xywh deltas),
  "cls_logits": [N, A, K]}."""

  def __init__(self, backbone, levels, num_classes, config):
    hub = keras_hub()
    self.config, self.num_classes = config, num_classes
    size = config.image_size
    min_level, max_level = min(levels), config.max_level
    # Our backbone's named maps as the levels of a pyramid (the encoder keras-hub's pyramid takes), the layers
    # past the deepest of them (fc6) left out ...
    images = keras.Input((size, size, 3), name="images")
    trunk = keras.Model(backbone.input, {f"P{k}": backbone.output[n] for k, n in levels.items()}, name="trunk")
    encoder = hub.models.FeaturePyramidBackbone(inputs=images, outputs=trunk(images), name="encoder")
    encoder.pyramid_outputs = dict(encoder.output)
    # ... and the feature pyramid network on it: P3-P7 (the coarse levels made from the deepest map).
    fpn = _feature_pyramid_class()(min_level=min_level, max_level=max_level, use_p5=True,
                                   num_filters=config.fpn_filters, name="fpn")
    inputs = keras.Input((size, size, 3), name="images")
    pyramid = hub.models.FeaturePyramidBackbone(inputs=inputs, outputs=fpn(encoder(inputs)), name="pyramid")
    pyramid.pyramid_outputs = dict(pyramid.output)
    pyramid.min_level, pyramid.max_level, pyramid.image_shape = min_level, max_level, (size, size, 3)
    self.anchor_generator = hub.layers.AnchorGenerator("yxyx", min_level=min_level, max_level=max_level,
                                                       num_scales=ANCHOR_SCALES, aspect_ratios=list(ANCHOR_RATIOS),
                                                       anchor_size=ANCHOR_SIZE)
    self.model = hub.models.RetinaNetObjectDetector(
        backbone=pyramid, num_classes=num_classes, bounding_box_format="yxyx", anchor_generator=self.anchor_generator,
        pre_logits_num_conv_layers=config.head_convs, classification_head_prior_probability=config.prior_probability)
    self.label_encoder = self.model.label_encoder
    self._initialise_heads()
    anchors = self.anchor_generator(tf.zeros([1, size, size, 3]))
    self.level_sizes = [int(a.shape[0]) for a in anchors.values()]
    self.anchors = tf.concat(list(anchors.values()), axis=0)

  def _initialise_heads(self):
    """Lin et al. 2017 §4.1: the heads' convolutions N(0, 0.01) with zero biases, except the class head's last,
    whose bias is -log((1 - p) / p) (keras-hub 0.32 puts it on the box head)."""
    rng = np.random.default_rng(self.config.seed)
    for head in (self.model.classification_head, self.model.box_head):
      for conv in list(head.conv_layers) + [head.prediction_layer]:
        conv.kernel.assign(rng.normal(0.0, HEAD_INIT_STDDEV, conv.kernel.shape).astype(np.float32))
        if conv.bias is not None:
          conv.bias.assign(np.zeros(conv.bias.shape, np.float32))
    p = self.config.prior_probability
    bias = self.model.classification_head.prediction_layer.bias
    bias.assign(np.full(bias.shape, -math.log((1 - p) / p), np.float32))

  def loss(self, outputs, batch):
    """Per-image sums (focal classification, smooth-L1 box) and positive anchors per image [N]: the caller divides
    by the positives of the whole global batch (Detectron's normaliser)."""
    box_targets, class_targets = self.label_encoder(batch["image"], batch["boxes"], batch["labels"])
    weight = batch["weight"][:, tf.newaxis]
    positive = tf.cast(class_targets >= 0, tf.float32) * weight
    counted = tf.cast(class_targets != self.label_encoder.ignore_class, tf.float32) * weight
    one_hot = tf.one_hot(tf.cast(tf.maximum(class_targets, 0), tf.int32), self.num_classes) * tf.cast(
        class_targets >= 0, tf.float32)[..., tf.newaxis]
    logits = tf.cast(outputs["cls_logits"], tf.float32)
    # keras.losses' focal loss averages over the classes; RetinaNet sums over them.
    focal = keras.losses.binary_focal_crossentropy(one_hot, logits, apply_class_balancing=True,
                                                   alpha=self.config.focal_alpha, gamma=self.config.focal_gamma,
                                                   from_logits=True) * self.num_classes
    beta = self.config.smooth_l1_beta
    # Smooth L1 with threshold beta is Huber with delta beta, divided by beta; Huber averages the 4 coordinates.
    box = keras.losses.huber(box_targets, tf.cast(outputs["bbox_regression"], tf.float32), delta=beta) * 4.0 / beta
    return (tf.reduce_sum(focal * counted, axis=1), tf.reduce_sum(box * positive, axis=1),
            tf.reduce_sum(positive, axis=1))

  def decode(self, outputs, scale, shape):
    """Detections per image in the continuous pixel coordinates of the original images (y0, x0, y1, x1): boxes
    [N, D, 4], scores [N, D], classes [N, D] int32, valid [N] (D = max_detections; entries past valid are
    padding). Per-class NMS (Detectron's RetinaNet inference): each level's best candidates above the score
    threshold, boxes clipped to the image, then NMS per class and the best max_detections of all classes."""
    config = self.config
    size = config.image_size
    boxes = keras.utils.bounding_boxes.decode_deltas_to_boxes(
        anchors=self.anchors, boxes_delta=tf.cast(outputs["bbox_regression"], tf.float32), anchor_format="yxyx",
        box_format="yxyx", encoded_format="center_xywh", image_shape=(size, size, 3))
    scores = tf.sigmoid(tf.cast(outputs["cls_logits"], tf.float32))
    # The image occupies [0, fitted height] x [0, fitted width] of the padded input.
    fitted = scale * shape
    limit = tf.concat([fitted, fitted], axis=-1)[:, tf.newaxis, :]
    boxes = tf.clip_by_value(boxes, 0.0, limit)
    candidate_boxes, candidate_scores = [], []
    n = tf.shape(scores)[0]
    for level_boxes, level_scores in zip(tf.split(boxes, self.level_sizes, axis=1),
                                         tf.split(scores, self.level_sizes, axis=1)):
      flat = tf.reshape(level_scores, [n, -1])
      k = min(CANDIDATES_PER_LEVEL, int(level_scores.shape[1]) * self.num_classes)
      best, index = tf.math.top_k(flat, k=k)
      anchor, label = index // self.num_classes, index % self.num_classes
      candidate_boxes.append(tf.gather(level_boxes, anchor, batch_dims=1))
      candidate_scores.append(tf.one_hot(label, self.num_classes) * best[..., tf.newaxis])
    result = tf.image.combined_non_max_suppression(
        tf.concat(candidate_boxes, axis=1)[:, :, tf.newaxis, :], tf.concat(candidate_scores, axis=1),
        max_output_size_per_class=config.max_detections, max_total_size=config.max_detections,
        iou_threshold=config.nms_iou, score_threshold=config.score_threshold, clip_boxes=False)
    original = result.nmsed_boxes / tf.concat([scale, scale], axis=-1)[:, tf.newaxis, :]
    return original, result.nmsed_scores, tf.cast(result.nmsed_classes, tf.int32), result.valid_detections


def build(backbone, levels, num_classes, config):
  """The detector of config.detector on the prepared backbone; its new layers seeded by config.seed."""
  config.check()
  keras.utils.set_random_seed(config.seed)
  return RetinaNet(backbone, levels, num_classes, config)


# --------------------------------------------------------------------------------------------------------------
# Training and evaluation


class DetectionTrainer:
  """A detector, its SGD optimizer and the compiled loops, built in `strategy`'s scope: training many steps per
  call (stopping early on a pause or quit request, as trainer.Trainer does) and detection on test batches."""

  def __init__(self, strategy, detector, config):
    self.strategy, self.detector, self.config = strategy, detector, config
    model = detector.model
    with strategy.scope():
      self.optimizer = keras.optimizers.SGD(config.schedule(), momentum=config.momentum)
      self.optimizer.build(model.trainable_variables)
      self.request = tf.Variable(control.REQUEST_NONE, trainable=False, name="request")
    self.variables = model.trainable_variables
    self.kernels = [v for v in self.variables if v.path.endswith("kernel")]
    # The loops' Python `while`/`for` need AutoGraph; the per-replica steps are graph code (do_not_convert).
    self.train_loop = tf.function(self._train_loop_impl)
    self.detect_step = tf.function(self._detect_step_impl)

  def current_step(self):
    return int(self.optimizer.iterations.numpy())

  def learning_rate(self):
    return float(self.optimizer.learning_rate)

  def checkpoint_items(self):
    return {"detector": self.detector.model, "optimizer": self.optimizer}

  @tf.autograph.experimental.do_not_convert
  def replica_step(self, batch):
    context = tf.distribute.get_replica_context()
    with tf.GradientTape() as tape:
      outputs = self.detector.model(batch["image"], training=True)
      classification, box, positives = self.detector.loss(outputs, batch)
      # Normalised by the positive anchors of the whole global batch: the same objective on any number of replicas.
      normaliser = tf.maximum(context.all_reduce(tf.distribute.ReduceOp.SUM, tf.reduce_sum(positives)), 1.0)
      loss = (tf.reduce_sum(classification) + tf.reduce_sum(box)) / normaliser
      if self.config.weight_decay:
        loss += 0.5 * self.config.weight_decay * tf.add_n([tf.reduce_sum(tf.square(k)) for k in self.kernels]) / (
            context.num_replicas_in_sync)
    gradients = tape.gradient(loss, self.variables)
    if self.config.clip_norm:
      # Clipped per replica (the all-reduce happens in apply_gradients): the sum's norm is at most the clip norm
      # times the replica count.
      gradients, _ = tf.clip_by_global_norm(gradients, self.config.clip_norm / context.num_replicas_in_sync)
    self.optimizer.apply_gradients(zip(gradients, self.variables))
    stats = {"loss_classification": tf.reduce_sum(classification) / normaliser,
             "loss_box": tf.reduce_sum(box) / normaliser, "positives": tf.reduce_sum(positives),
             "images": tf.reduce_sum(batch["weight"]),
             "unreadable": tf.reduce_sum(tf.cast(batch["index"] >= 0, tf.float32) * (1.0 - batch["weight"])),
             "nonfinite": tf.cast(tf.logical_not(tf.math.is_finite(loss)), tf.float32)}
    stats.update(control.votes(self.request))
    return stats

  def _train_loop_impl(self, iterator, num_steps):
    """Up to num_steps steps; stops early, on every worker at the same step, when one asks for a pause or quit."""
    keys = ("loss_classification", "loss_box", "positives", "images", "unreadable")
    totals = {k: tf.constant(0.0, tf.float64) for k in keys}
    status, request, steps = tf.constant(control.STATUS_OK), tf.constant(control.REQUEST_NONE), tf.constant(0)
    while steps < num_steps and status == control.STATUS_OK:
      stats = self.strategy.run(self.replica_step, args=(next(iterator),))
      stats = {k: self.strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for k, v in stats.items()}
      totals = {k: totals[k] + tf.cast(stats[k], tf.float64) for k in keys}
      steps += 1
      request = control.agreed_request(stats)
      if stats["nonfinite"] > 0:  # the job ends without a checkpoint of this state (detect.py)
        status = tf.constant(trainer_lib.STATUS_NOT_FINITE)
      elif request != control.REQUEST_NONE:
        status = tf.constant(control.STATUS_STOP_REQUESTED)
    return {"steps": steps, "status": status, "request": request, **totals}

  @tf.autograph.experimental.do_not_convert
  def replica_detect(self, batch):
    outputs = self.detector.model(batch["image"], training=False)
    boxes, scores, classes, valid = self.detector.decode(outputs, batch["scale"], batch["shape"])
    return {"boxes": boxes, "scores": scores, "classes": classes, "valid": valid, "index": batch["index"],
            "weight": batch["weight"]}

  def _detect_step_impl(self, iterator):
    results = self.strategy.run(self.replica_detect, args=(next(iterator),))
    return {k: self.strategy.gather(v, axis=0) for k, v in results.items()}

  def detect(self, dataset, steps):
    """Every test image's detections, in the devkit's convention: voc_metric.Boxes, and the count of images that
    could not be read (their objects then count as missed)."""
    iterator = iter(dataset)
    parts = {k: [] for k in ("image", "label", "box", "score")}
    unreadable = 0
    for _ in range(steps):
      out = {k: v.numpy() for k, v in self.detect_step(iterator).items()}
      real = out["index"] >= 0
      unreadable += int(np.sum(real & (out["weight"] == 0)))
      for i in np.flatnonzero(real & (out["weight"] > 0)):
        n = int(out["valid"][i])
        parts["image"].append(np.full(n, out["index"][i]))
        parts["label"].append(out["classes"][i, :n])
        parts["box"].append(voc.to_devkit(out["boxes"][i, :n]).reshape(-1, 4))
        parts["score"].append(out["scores"][i, :n])
    if not parts["image"]:
      return voc_metric.Boxes.of([], [], np.zeros((0, 4)), score=[]), unreadable
    return voc_metric.Boxes.of(*(np.concatenate(parts[k]) for k in ("image", "label", "box")),
                               score=np.concatenate(parts["score"])), unreadable


def ground_truth(split):
  """The test split's objects as voc_metric.Boxes (difficult ones included and flagged)."""
  real = split.labels >= 0
  image = np.broadcast_to(np.arange(split.size)[:, np.newaxis], real.shape)[real]
  return voc_metric.Boxes.of(image, split.labels[real], split.boxes[real], difficult=split.difficult[real])


def weights_digest(model):
  return float(sum(tf.reduce_sum(tf.square(tf.cast(v, tf.float64))) for v in model.trainable_variables))


# --------------------------------------------------------------------------------------------------------------
# Serving


class DetectorModule(tf.Module):
  """The fine-tuned detector as a SavedModel that needs only TensorFlow (its weights constants, as the backbone's
  exports, serving.constant_function).

  detect(image): uint8 [H, W, 3] as stored (no EXIF orientation applied) -> {"boxes": [D, 4] continuous pixel
  coordinates (y0, x0, y1, x1) of the image, "scores": [D], "classes": [D] int32, "class_names": [D] string};
  D <= max_detections, best first."""

  def __init__(self, detector, classes, preprocessing):
    super().__init__()
    self._model = serving.constant_function(detector.model)
    self._detector = detector
    self.preprocessing = preprocessing
    self.class_list = tf.constant(list(classes))
    self.detect = tf.function(self._detect, autograph=False, input_signature=[
        tf.TensorSpec([None, None, 3], tf.uint8, name="image")])

  def _detect(self, image):
    fitted, scale = voc.fit(image, self._detector.config.image_size, self.preprocessing)
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    boxes, scores, classes, valid = self._detector.decode(self._model(fitted[tf.newaxis]), scale[tf.newaxis],
                                                          shape[tf.newaxis])
    n = valid[0]
    return {"boxes": boxes[0, :n], "scores": scores[0, :n], "classes": classes[0, :n],
            "class_names": tf.gather(self.class_list, classes[0, :n])}


def export(detector, classes, preprocessing, path):
  module = DetectorModule(detector, classes, preprocessing)
  tf.saved_model.save(module, path, signatures={"serving_default": module.detect})
