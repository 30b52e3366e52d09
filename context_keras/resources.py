"""What the machine offers and what a process uses: fast bfloat16 arithmetic, peak memory."""
import resource

import tensorflow as tf

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
