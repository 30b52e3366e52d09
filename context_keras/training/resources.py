"""What the machine offers and what a process uses: fast bfloat16 arithmetic, memory (available, peak, and what
one training step needs)."""
import resource

import numpy as np
import tensorflow as tf

from context_keras import errors

# CPU flags of units that compute in bfloat16 natively (Intel AMX, AVX-512 BF16). Without them oneDNN emulates
# bfloat16 through float32, about 3x slower than plain float32 (measured on an AMD EPYC: 680 vs 2,200 pairs/s).
CPU_BFLOAT16_FLAGS = ("amx_bf16", "avx512_bf16")


def fast_bfloat16():
  """Whether bfloat16 is faster than float32 here: a GPU of compute capability 8.0 or more (Ampere and later), or
  a CPU with native bfloat16 units."""
  gpus = tf.config.list_physical_devices("GPU")
  if gpus:
    capabilities = [tf.config.experimental.get_device_details(g).get("compute_capability", (0, 0)) for g in gpus]
    return all(tuple(c) >= (8, 0) for c in capabilities)
  try:
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
      flags_line = next((line for line in f if line.startswith("flags")), "")
  except OSError:
    return False
  return any(flag in flags_line.split() for flag in CPU_BFLOAT16_FLAGS)


def resolve_precision(name):
  """--mixed_precision as used: 'auto' becomes bfloat16 where it is fast (fast_bfloat16), else none."""
  if name != "auto":
    return name
  return "bfloat16" if fast_bfloat16() else "none"


def peak_rss_mb():
  """This process's peak resident memory. Linux's VmHWM, because ru_maxrss is inherited across fork and exec (a
  child started by a big process would report its parent's peak)."""
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------------------------------------------
# What one training step needs, against what the host has

INPUT_BATCHES_IN_FLIGHT = 4  # the batch in the step, prefetched ones, and the one the packer is filling
WEIGHT_COPIES = 3            # weights, their gradients, an optimizer slot
ACTIVATION_COPIES = 2        # every layer's output, kept for the backward pass, and its gradient
# The backbone exports of training (RUN/export/backbone_<step>) hold the folded tower's weights as constants of traced
# functions (method.md §11.1); folding, tracing and tf.saved_model.save then hold about 21-22 copies of the tower's
# weights at once (measured for resnet50 and vgg16_bn at widths 0.5 and 1 in a fresh process; method.md §4.5).
EXPORT_WEIGHT_COPIES = 22
RESIDENT_WEIGHT_COPIES = 2   # what stays of the run's own while it exports: weights and an optimizer slot
GB = 1e9


def _outputs_per_sample(model, inputs=True):
  """Numbers each layer of a Keras functional model outputs per sample, summed (its input layers' with `inputs`)."""
  total = 0
  for layer in model.layers:
    if not inputs and type(layer).__name__ == "InputLayer":
      continue
    for output in tf.nest.flatten(layer.output):
      total += int(np.prod(output.shape[1:]))
  return total


def step_memory(networks, batch_patches, batch_pairs, replicas, compute_bytes, activations_on_host=True):
  """Bytes one training step needs on the host, by part, estimated from the layer shapes of the networks in use (any
  tower): activations (every layer's output per patch of the tower, per pair of the head, and their gradients, in
  the compute precision), the input batches in flight (float32 patches), the weights (float32, with gradients and
  an optimizer slot). With the activations on accelerators, only the last two count."""
  patch_numbers = int(np.prod(networks.tower.inputs[0].shape[1:]))
  activations = replicas * ACTIVATION_COPIES * compute_bytes * (
      batch_patches * _outputs_per_sample(networks.tower) + batch_pairs * _outputs_per_sample(networks.head, False))
  parts = {"activations and their gradients": activations if activations_on_host else 0,
           "input batches in flight": replicas * INPUT_BATCHES_IN_FLIGHT * batch_patches * patch_numbers * 4,
           "weights": WEIGHT_COPIES * 4 * sum(int(np.prod(v.shape)) for v in networks.tower.weights +
                                              networks.head.weights)}
  return parts


def available_memory():
  """Bytes this process may still allocate: the kernel's MemAvailable, within a cgroup's memory limit if one is set;
  None where neither can be read."""
  candidates = []
  try:
    with open("/proc/meminfo", encoding="ascii") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          candidates.append(int(line.split()[1]) * 1024)
  except OSError:
    pass
  try:
    with open("/sys/fs/cgroup/memory.max", encoding="ascii") as f:
      limit = f.read().strip()
    with open("/sys/fs/cgroup/memory.current", encoding="ascii") as f:
      current = int(f.read().strip())
    if limit.isdigit():
      candidates.append(int(limit) - current)
  except (OSError, ValueError):
    pass
  return min(candidates) if candidates else None


def _weight_bytes(model):
  return 4 * sum(int(np.prod(v.shape)) for v in model.weights)


def export_memory(networks):
  """Bytes the backbone export of training needs on the host: the copies of the tower's weights that folding, tracing
  and saving hold at once (EXPORT_WEIGHT_COPIES, measured), besides the run's own weights and optimizer slot."""
  return (EXPORT_WEIGHT_COPIES * _weight_bytes(networks.tower) +
          RESIDENT_WEIGHT_COPIES * (_weight_bytes(networks.tower) + _weight_bytes(networks.head)))


def check_step_memory(networks, input_config, replicas, compute_dtype, backbone, activations_on_host=True,
                      width_multiplier=None):
  """Stops with a UsageError giving the estimate when one step's tensors, or the backbone export that ends training,
  cannot fit in the memory available: an out-of-memory error would otherwise come minutes (or days) later, as a
  traceback. Returns the bytes needed: the larger of the two."""
  parts = step_memory(networks, input_config.batch_patches, input_config.batch_pairs, replicas,
                      tf.as_dtype(compute_dtype).size, activations_on_host)
  step, export = sum(parts.values()), export_memory(networks)
  needed, available = max(step, export), available_memory()
  if available is None or needed <= available:
    return needed
  if export > step:
    width = f" at --width_multiplier={width_multiplier}" if width_multiplier is not None else ""
    raise errors.UsageError(
        f"Invalid flags: the {backbone} tower{width} needs about {_gb(export)} to export its backbone at the end of "
        f"training (RUN/export/backbone_<step>: its {_gb(_weight_bytes(networks.tower))} of weights held about "
        f"{EXPORT_WEIGHT_COPIES} times while they are folded and saved), more than the {_gb(available)} of memory "
        "available here: lower --width_multiplier (or --backbone)")
  detail = ", ".join(f"{name} {_gb(size)}" for name, size in parts.items() if size)
  raise errors.UsageError(
      f"Invalid flags: --batch_patches={input_config.batch_patches} and --batch_pairs={input_config.batch_pairs} need "
      f"about {_gb(step)} for one training step on {replicas} replica(s) ({detail}; estimated from the layer shapes "
      f"of the {backbone} tower), more than the {_gb(available)} of memory available here: lower both")


def _gb(size):
  gigabytes = size / GB
  return f"{gigabytes:,.{2 if gigabytes < 10 else 1 if gigabytes < 100 else 0}f} GB"
