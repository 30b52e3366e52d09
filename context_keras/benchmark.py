"""Measures speed: python -m context_keras.benchmark [--backbone=resnet50 --geometry=revisiting] [--parts=...]

(a) the input pipeline alone on real photos (patches/s, pairs/s), with the augmentation on the host and without it
(--augment_on=device: the host only decodes, resizes and cuts uint8 patches), and the cost per image of each of its
stages on one thread (input_stages; doersch geometry); (b) a training step on a preloaded batch of the PyTorch
baseline's shape (doersch geometry: 56 3x3 grids, 504 patches, 2240 pairs; revisiting: 16 images, 144 patches, 128
pairs), without augmentation and with the device augmentation in the step; (c) end to end (pipeline + step) in both
modes, for fp32 and bf16; (d) the same step of our PyTorch baseline (benchmarks/torch_baseline.py, the same network)
in the same session, and the ratios. Each figure is the median of --repeats timed runs. The last line printed is one
JSON object.
"""
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

from absl import flags
from absl import logging
import keras
import numpy as np
import tensorflow as tf

from context_keras import errors
from context_keras.cli import data as data_flags
from context_keras.cli import model as model_flags
from context_keras.cli import program
from context_keras.deploy import serving
from context_keras.evaluation import linear_job
from context_keras.input import decoding
from context_keras.input import geometry as geometry_lib
from context_keras.input import patches as patches_lib
from context_keras.input import pipeline as data_lib
from context_keras.input import sources
from context_keras.model import fold
from context_keras.model import networks as model_lib
from context_keras.storage import paths as paths_lib
from context_keras.training import resources
from context_keras.training import restore
from context_keras.training import trainer as trainer_lib

FLAGS = flags.FLAGS
# Our PyTorch baseline: benchmarks/ of the repository, shipped inside the package (setup.py).
OUR_BASELINE = paths_lib.shipped("benchmarks/torch_baseline.py") or "benchmarks/torch_baseline.py"


def define_flags():
  data_flags.define_source()
  data_flags.define_geometry()
  model_flags.define()
  with program.flag_group("benchmark"):
    flags.DEFINE_list("parts", ["input", "input_stages", "original_loader", "step", "end_to_end", "training_rss",
                                "flops", "linear_eval"], "What to measure (docs/flags.md#benchmark).")
    flags.DEFINE_list("precisions", ["fp32", "bf16"], "Compute precisions of the step and end-to-end figures.")
    program.define_integer("grids", 0, "3x3 grids per preloaded batch (revisiting: images); 0 = the PyTorch "
                           "baseline's default for --geometry (docs/flags.md#benchmark).", lower=0)
    program.define_integer("timed_steps", 3, "Training steps per timed run.", lower=1)
    program.define_integer("input_batches", 10, "Batches per timed run of the input pipeline.", lower=1)
    program.define_integer("repeats", 3, "Timed runs per figure; the median is reported.", lower=1)
    flags.DEFINE_bool("baseline", True, "Run the PyTorch baseline of the same network in the same session (first, "
                      "while no pipeline of ours takes CPU from it) and report our step's ratio to it.")
    flags.DEFINE_string("baseline_python", sys.executable, "Python with PyTorch for the baseline (pip install "
                        "'.[bench]').")
    flags.DEFINE_list("baseline_script", [OUR_BASELINE], "PyTorch baseline scripts, each with torch_baseline.py's "
                      "command line; ratios are to the first. Default: ours, benchmarks/torch_baseline.py.")

PRECISION_POLICY = {"fp32": "float32", "bf16": "mixed_bfloat16"}
# The input pipeline's two modes: the result key and --augment_on.
MODES = {"host_augment": "host", "device_augment": "device"}
# Assumed sustained training throughput (TFLOP/s, 16-bit) of a GPU on these networks: a third to a sixth of the
# dense tensor-core peak, as convolutional networks of this size reach (no GPU could run here to measure it).
GPU_SUSTAINED_TFLOPS = {"T4": 15, "V100": 40, "A100": 80, "H100": 150}


def grid_batch(num_grids, side=3, seed=0, geometry=geometry_lib.DOERSCH, device_augment=False):
  """A batch of num_grids side x side grids of random patches, every pair of the geometry valid (the baseline's
  shape): every 8-neighbour pair (doersch) or the 8 (neighbour, centre) pairs (revisiting); the patches as the tower
  takes them, or as the pipeline gives them for the device augmentation (uint8 patches and their keys)."""
  first, second, label = (t.numpy() for t in geometry.pairs(tf.constant([side]), tf.constant([side]))[:3])
  size = geometry.patch_size
  cells = side * side
  offsets = np.repeat(np.arange(num_grids) * cells, len(first))
  rng = np.random.default_rng(seed)
  n, m = num_grids * cells, num_grids * len(first)
  patches = (rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8) if device_augment
             else rng.normal(size=(n, size, size, 3)).astype(np.float32))
  keys = {"patch_keys": rng.integers(0, 2**32, (n, 3), dtype=np.uint32)} if device_augment else {}
  return {"patches": patches, **keys, "patch_mask": np.ones(n, bool),
          "first": (np.tile(first, num_grids) + offsets).astype(np.int32),
          "second": (np.tile(second, num_grids) + offsets).astype(np.int32),
          "label": np.tile(label, num_grids).astype(np.int32), "pair_mask": np.ones(m, bool),
          "images": np.int64(0), "too_small": np.int64(0), "unreadable": np.int64(0),
          "skipped": np.full(data_lib.SKIPPED_PER_BATCH, -1, np.int64),
          "skipped_reason": np.zeros(data_lib.SKIPPED_PER_BATCH, np.int32), "resume": np.zeros(2, np.int64)}


def make_trainer(precision, model_config, optim_config, input_config):
  keras.mixed_precision.set_global_policy(PRECISION_POLICY[precision])
  try:
    return trainer_lib.Trainer(tf.distribute.get_strategy(), model_config, optim_config,
                               augment=data_lib.step_augmentation(input_config, optim_config.jit_compile))
  finally:
    keras.mixed_precision.set_global_policy("float32")


def time_steps(trainer, iterator, steps, repeats):
  trainer.train_loop(iterator, tf.constant(1))  # trace and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = trainer.train_loop(iterator, tf.constant(steps))
    times.append((time.perf_counter() - start) / int(out["steps"]))
    pairs_per_step = float(out["pairs"]) / int(out["steps"])
  return statistics.median(times), pairs_per_step


def measure_input(config):
  dataset = data_lib.make_dataset(config)
  iterator = iter(dataset)
  next(iterator)
  rates = []
  for _ in range(FLAGS.repeats):
    patches = pairs = 0
    start = time.perf_counter()
    for _ in range(FLAGS.input_batches):
      batch = next(iterator)
      patches += int(tf.reduce_sum(tf.cast(batch["patch_mask"], tf.int32)))
      pairs += int(tf.reduce_sum(tf.cast(batch["pair_mask"], tf.int32)))
    seconds = time.perf_counter() - start
    rates.append((patches / seconds, pairs / seconds))
  del iterator, dataset  # a live pipeline keeps prefetching and would slow what is measured next
  return {"patches_per_s": round(statistics.median(r[0] for r in rates), 1),
          "pairs_per_s": round(statistics.median(r[1] for r in rates), 1), "cores": os.cpu_count()}


def measure_input_stages(config, images=72):
  """Where the host pipeline's time goes: milliseconds per image (and patches/s) of its stages on one thread, each
  timed as a tf.data pipeline of its own on the same encoded photos (read into memory first), cumulatively: decoding
  (at the reduced JPEG size the resize needs), + the random resize, + placing the grids and cutting their uint8
  patches with their keys (data.image_grids), + packing them into padded batches (the whole host pipeline of
  --augment_on=device), + the augmentation (the whole pipeline of --augment_on=host). The last two are timed over
  whole batches and divided by the images they took. Median of --repeats runs of `images` images."""
  paths = sources.find_source(config.data, config.data_root).paths
  contents = tf.data.Dataset.from_tensor_slices([tf.io.read_file(p) for p in paths]).repeat()
  base_seed = tf.constant([config.seed, 0], tf.int64)

  def seeds(index):
    seed = tf.random.experimental.stateless_fold_in(base_seed, index)
    resize_seed, _, _ = tf.unstack(patches_lib.split_seed(seed, 3))
    return seed, resize_seed

  def decoded(index, image):
    _, resize_seed = seeds(index)
    return decoding.decode(image, target_pixels=patches_lib.resize_target(resize_seed))

  def count_patches(index, image):
    return tf.shape(data_lib.image_grids(image, seeds(index)[0])["patches"])[0]

  per_image = {
      # One pixel of the result, which needs all of it.
      "decode": lambda i, c: decoded(i, c)[0, 0, 0],
      "decode_resize": lambda i, c: patches_lib.resize_for_grids(decoded(i, c), seeds(i)[1])[0][0, 0, 0],
      "decode_resize_cut": count_patches,
  }
  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  options.threading.max_intra_op_parallelism = 1
  options.autotune.enabled = False

  def timed(dataset, count):
    iterator = iter(dataset.with_options(options))
    next(iterator)
    runs = []
    for _ in range(FLAGS.repeats):
      done_images = done_patches = 0
      start = time.perf_counter()
      while done_images < images:
        got_images, got_patches = count(next(iterator))
        done_images += got_images
        done_patches += got_patches
      seconds = time.perf_counter() - start
      runs.append((seconds / done_images, done_patches / seconds))
    return {"ms_per_image": round(1e3 * statistics.median(r[0] for r in runs), 2),
            "patches_per_s_per_core": round(statistics.median(r[1] for r in runs), 1)}

  # The patches of the images each per-image stage takes, for its patches/s: the cut stage's count.
  patch_counts = [int(count_patches(tf.constant(i, tf.int64), c)) for i, c in enumerate(contents.take(len(paths)))]
  mean_patches = sum(patch_counts) / len(patch_counts)
  result = {}
  for name, stage in per_image.items():
    dataset = contents.enumerate().map(stage)
    result[name] = timed(dataset, lambda patches: (1, mean_patches))
  for name, where in (("packed_device_mode", "device"), ("packed_host_mode", "host")):
    batches = data_lib.batches_from_images(contents, dataclasses.replace(config, augment_on=where), seed=0)
    result[name] = timed(batches, lambda batch: (int(batch["images"]) + int(batch["too_small"]),
                                                 int(tf.reduce_sum(tf.cast(batch["patch_mask"], tf.int32)))))
  result["mean_patches_per_image"] = round(mean_patches, 1)
  return result


def training_flops_per_patch(num_grids, model_config, geometry):
  """Floating-point operations of a training step per patch, on the baseline's batch shape: the forward pass as
  TensorFlow's profiler counts it (the tower once per patch, the pair head once per pair), times 3 for the backward
  pass (two products per forward one)."""
  networks = model_lib.build(model_config)
  batch = grid_batch(num_grids, geometry=geometry)
  spec = {k: tf.TensorSpec(v.shape, tf.as_dtype(v.dtype)) for k, v in batch.items()}
  graph = tf.function(lambda b: model_lib.grid_logits(networks, b, training=True)).get_concrete_function(spec).graph
  options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
  options["output"] = "none"
  forward = tf.compat.v1.profiler.profile(graph, options=options).total_float_ops
  return 3 * forward / len(batch["patches"])


def cores_per_gpu(flops_per_patch, input_result):
  """Host cores each GPU needs in each mode: the patches/s it consumes (its assumed sustained FLOP/s over the
  training FLOPs per patch) over the host pipeline's patches/s per core."""
  return {gpu: {mode: round(tflops * 1e12 / flops_per_patch / (input_result[mode]["patches_per_s"] /
                                                              input_result[mode]["cores"]), 1)
                for mode in MODES} for gpu, tflops in GPU_SUSTAINED_TFLOPS.items()}


def original_loader(paths, seconds, seed=0):
  """Patches/s of the original's loader (method.md §2.2-2.5, train.py:88-234) in one process: per image imread,
  skimage resize to 150K-450K pixels, 4 grids, and per patch pixelation with two skimage resizes, colour dropping
  and RMS normalisation. Runs for about `seconds`."""
  from skimage import io as skio  # pylint: disable=import-outside-toplevel
  from skimage import transform  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  size, gap, noise, pitch = patches_lib.PATCH_SIZE, patches_lib.GAP, patches_lib.JITTER, patches_lib.PITCH

  def prep(patch):
    if rng.random() < 0.33:
      side = int(np.sqrt(rng.random() * (95 ** 2 - 10 ** 2) + 10 ** 2))
      small = transform.resize(patch.astype(np.uint8), (side, side), order=1, mode="constant")
      patch = transform.resize(small, (size, size), order=1, mode="constant") * 255
    keep = rng.integers(3)
    for c in range(3):
      patch[:, :, c] = patch[:, :, c] - patch[:, :, c].mean() if c == keep else rng.uniform(0, 1, (size, size)) - .5
    return patch / np.sqrt(np.mean(patch ** 2)) * 50

  count, start, i = 0, time.perf_counter(), 0
  while time.perf_counter() - start < seconds:
    im = skio.imread(paths[i % len(paths)])
    i += 1
    im = np.dstack([im] * 3) if im.ndim == 2 else im[:, :, :3]
    im = im.astype(np.float32) / 255
    target = rng.integers(patches_lib.MIN_TARGET_PIXELS, patches_lib.MAX_TARGET_PIXELS + 1)
    h, w = patches_lib._resized_shape_py(im.shape[0], im.shape[1], target)  # pylint: disable=protected-access
    im = transform.resize(im, (h, w), order=1, mode="constant")
    if h <= patches_lib.MIN_SIDE or w <= patches_lib.MIN_SIDE:
      continue
    for _ in range(patches_lib.GRIDS_PER_IMAGE):
      sx, sy = rng.integers(0, pitch, 2)
      for gy in range((h + gap - sy) // pitch):
        for gx in range((w + gap - sx) // pitch):
          x = int(np.clip(sx + gx * pitch + rng.integers(-noise, noise + 1), 0, w - size))
          y = int(np.clip(sy + gy * pitch + rng.integers(-noise, noise + 1), 0, h - size))
          prep(im[y:y + size, x:x + size, :] * 255)
          count += 1
  return {"patches_per_s": round(count / (time.perf_counter() - start), 1), "cores": 1}


def training_peak_rss(input_config):
  """Peak RSS of the training program in its default configuration (flags/deepcontext.cfg), a few steps."""
  with tempfile.TemporaryDirectory() as model_dir:
    out = subprocess.run(
        [sys.executable, "-m", "context_keras.train", "--flagfile=flags/deepcontext.cfg", f"--data={input_config.data}",
         *([f"--data_root={input_config.data_root}"] if input_config.data_root else []), f"--model_dir={model_dir}",
         "--train_steps=4", "--log_every=2"],
        capture_output=True, text=True, check=True)
  return float(re.search(r"Peak memory: ([\d.]+) MB", out.stderr).group(1))


# torch_baseline.py's towers: (our backbone, its geometry, with that geometry's head) -> its --tower.
BASELINE_TOWERS = {("alexnet_bn", geometry_lib.DOERSCH): "alexnet_bn",
                   ("resnet50", geometry_lib.REVISITING): "resnet50_rpl"}


def baseline_tower(model_config, geometry):
  """The baseline network that is ours (torch_baseline.py --tower), or None when the configuration has none: the
  original's network, or Kolesnikov et al.'s ResNet-50 v1 with their strides."""
  if model_config.head != geometry.head:
    return None
  tower = BASELINE_TOWERS.get((model_config.backbone, geometry))
  resnet_as_theirs = (model_config.resnet_version == 1 and model_config.resnet_stem_stride == 1 and
                      model_config.resnet_strides == (1, 2, 2, 1))
  return tower if tower != "resnet50_rpl" or resnet_as_theirs else None


def run_baseline(script, tower, width, precision, grids):
  """The median pairs/s of --repeats runs of a baseline script, or {"error": one line} when it cannot run."""
  command = [FLAGS.baseline_python, script, "--tower", tower, "--mode", "grid", "--precision", precision,
             "--grids", str(grids), "--steps", str(FLAGS.timed_steps)]
  if tower == "resnet50_rpl":
    command += ["--width", str(width)]
  runs = []
  for _ in range(FLAGS.repeats):
    try:
      out = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as e:
      return {"error": f"cannot run --baseline_python={FLAGS.baseline_python}: {e}"}
    if out.returncode != 0:
      lines = (out.stderr or out.stdout).strip().splitlines() or [f"exit code {out.returncode}"]
      hint = " (pip install '.[bench]' adds PyTorch)" if "No module named 'torch'" in lines[-1] else ""
      return {"error": f"{script}: {lines[-1][:300]}{hint}"}
    try:
      runs.append(json.loads(out.stdout.strip().splitlines()[-1])["pairs_per_s"])
    except (ValueError, KeyError, IndexError):
      return {"error": f"{script}: no JSON result line in its output"}
  return {"pairs_per_s": statistics.median(runs), "runs": runs}


def baselines(model_config, geometry, grids):
  """{script: {precision: result}} of every --baseline_script, or {} (logged) when there is none to run."""
  tower = baseline_tower(model_config, geometry)
  if tower is None:
    logging.warning("No PyTorch baseline of --backbone=%s --head=%s --geometry=%s: the baselines are alexnet_bn "
                    "(doersch) and resnet50 v1 (revisiting geometry and head, default strides).",
                    model_config.backbone, model_config.head, geometry.name)
    return {}
  # The baseline's width is Kolesnikov et al.'s filters factor: 4 is the standard ResNet-50.
  width = int(round(4 * model_config.width_multiplier))
  results = {}
  for script in FLAGS.baseline_script:
    results[script] = {}
    for precision in FLAGS.precisions:
      results[script][precision] = run_baseline(script, tower, width, precision, grids)
      if "error" in results[script][precision]:
        logging.warning("PyTorch baseline skipped: %s", results[script][precision]["error"])
        break
      logging.info("PyTorch %s %s: %s", os.path.basename(script), precision, results[script][precision])
  return results


def jpeg_copies(list_file, data_root, folder, quality=90):
  """JPEG re-encodings of the images of a list, so that the input is measured on JPEG photos as ImageNet's."""
  for path in sources.find_source(list_file, data_root).paths:
    image = decoding.decode(tf.io.read_file(path))
    name = os.path.splitext(os.path.basename(path))[0] + ".jpg"
    tf.io.write_file(os.path.join(folder, name), tf.io.encode_jpeg(image, quality=quality))
  return folder


def main():
  result = {}
  scratch = tempfile.TemporaryDirectory()
  geometry = geometry_lib.get(FLAGS.geometry)
  model_config = model_flags.model_config()
  if not FLAGS["head"].present:
    model_config = dataclasses.replace(model_config, head=geometry.head)  # the geometry's own head, as the baseline
  grids = FLAGS.grids or geometry.benchmark_grids
  result["network"] = {"backbone": model_config.backbone, "head": model_config.head, "geometry": geometry.name,
                       "width_multiplier": model_config.width_multiplier, "grids": grids}
  # Which CPU kernels the figures come from: "1" oneDNN, "0" Eigen; unset leaves TensorFlow's own choice (oneDNN
  # only on AVX-512 VNNI/BF16 or AMX CPUs). docs/speed.md, CPU kernels.
  result["tf_enable_onednn_opts"] = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "unset")
  # By default the demo's sample photos, re-encoded as JPEG.
  data = FLAGS.data or jpeg_copies("flags/demo_photos.txt", "package:skimage.data", scratch.name)
  if sources.find_source(data, FLAGS.data_root, FLAGS.tfds_data_dir).kind != "files":
    # Its stages are timed on image files read into memory first (measure_input_stages, the original's loader).
    raise errors.UsageError(f"--data={data}: the benchmark reads image files: give a folder or a list file")
  largest = geometry.largest_grid
  pairs_per_grid = len(grid_batch(1, geometry=geometry)["first"])  # of a 3x3 grid
  configs = {mode: data_lib.InputConfig(data=data, data_root=FLAGS.data_root, geometry=geometry.name,
                                        batch_patches=max(9 * grids, largest[0]),
                                        batch_pairs=max(pairs_per_grid * grids, largest[1]), augment_on=where)
             for mode, where in MODES.items()}
  input_config = configs["host_augment"]
  optim_config = trainer_lib.OptimConfig(divergence_factor=0)
  if FLAGS.baseline:
    # First, while no pipeline of ours is alive to take CPU from it.
    result["torch"] = baselines(model_config, geometry, grids)
  if "input" in FLAGS.parts:
    modes = {mode: measure_input(config) for mode, config in configs.items()}
    # The old keys are the host mode's (the pipeline as it was before --augment_on).
    result["input"] = dict(modes["host_augment"], **{mode: {k: v[k] for k in ("patches_per_s", "cores")}
                                                      for mode, v in modes.items()})
    result["input"]["device_vs_host_per_core"] = round(
        modes["device_augment"]["patches_per_s"] / modes["host_augment"]["patches_per_s"], 2)
    logging.info("input: %s", result["input"])
  if "input_stages" in FLAGS.parts and geometry.original:
    result["input_stages"] = measure_input_stages(input_config)
    logging.info("input stages: %s", result["input_stages"])
  if "original_loader" in FLAGS.parts and geometry.original:
    paths = sources.find_source(input_config.data, input_config.data_root).paths
    result["original_loader"] = original_loader(paths, seconds=30)
    logging.info("original loader: %s", result["original_loader"])
    if "input" in result:
      result["input_per_core_ratio_vs_original"] = round(
          result["input"]["patches_per_s"] / os.cpu_count() / result["original_loader"]["patches_per_s"], 2)
  # (result key, input mode, whether the batches come from the pipeline)
  runs = {"step": ("host_augment", False), "step_device_augment": ("device_augment", False),
          "end_to_end": ("host_augment", True), "end_to_end_device_augment": ("device_augment", True)}
  for key, (mode, pipeline) in runs.items():
    if ("end_to_end" if pipeline else "step") not in FLAGS.parts:
      continue
    result[key] = {}
    for precision in FLAGS.precisions:
      trainer = make_trainer(precision, model_config, optim_config, configs[mode])
      if pipeline:
        iterator = iter(data_lib.make_dataset(configs[mode]))
      else:
        preloaded = grid_batch(grids, geometry=geometry, device_augment=mode == "device_augment")
        iterator = iter(tf.data.Dataset.from_tensors(preloaded).repeat())
      seconds, pairs = time_steps(trainer, iterator, FLAGS.timed_steps, FLAGS.repeats)
      del trainer, iterator  # a live pipeline keeps prefetching and would slow what is measured next
      result[key][precision] = {"pairs_per_s": round(pairs / seconds, 1), "step_s": round(seconds, 3),
                                "pairs_per_step": pairs}
      logging.info("%s %s: %s", key, precision, result[key][precision])
  if "step" in result:
    # What moving the augmentation into the step costs the device, per step.
    result["device_augment_step_cost_s"] = {p: round(result["step_device_augment"][p]["step_s"] -
                                                     result["step"][p]["step_s"], 3) for p in FLAGS.precisions}
  torch_results = result.get("torch") or {}
  if "step" in result and torch_results:
    first = torch_results[FLAGS.baseline_script[0]]
    result["step_ratio_vs_torch"] = {p: round(result["step"][p]["pairs_per_s"] / first[p]["pairs_per_s"], 2)
                                     for p in FLAGS.precisions if "pairs_per_s" in first.get(p, {})}
  if "step" in result and "end_to_end" in result:
    result["end_to_end_ratio_vs_step"] = {p: round(result["end_to_end"][p]["pairs_per_s"] /
                                                   result["step"][p]["pairs_per_s"], 2) for p in FLAGS.precisions}
    result["end_to_end_device_vs_host"] = {p: round(result["end_to_end_device_augment"][p]["pairs_per_s"] /
                                                    result["end_to_end"][p]["pairs_per_s"], 2)
                                           for p in FLAGS.precisions}
  if "flops" in FLAGS.parts:
    flops = training_flops_per_patch(grids, model_config, geometry)
    result["training_gflop_per_patch"] = round(flops / 1e9, 3)
    if "input" in result:
      result["cores_per_gpu"] = {"assumed_sustained_tflops": GPU_SUSTAINED_TFLOPS,
                                 **cores_per_gpu(flops, result["input"])}
  if "linear_eval" in FLAGS.parts:
    backbone = serving.BackboneModule(fold.fold_tower(restore.build_networks(model_lib.ModelConfig()).tower,
                                                      model_lib.ModelConfig()), "drop")
    result["linear_eval"] = linear_job.measure(backbone.features, model_lib.BACKBONES["alexnet_bn"].features,
                                               linear_job.JobConfig(), repeats=FLAGS.repeats)
    logging.info("linear_eval: %s", result["linear_eval"])
  result["peak_rss_mb"] = round(resources.peak_rss_mb(), 1)
  if "training_rss" in FLAGS.parts and geometry.original:
    result["training_peak_rss_mb"] = training_peak_rss(input_config)
  print(json.dumps(result))


if __name__ == "__main__":
  program.run(main, define_flags)
