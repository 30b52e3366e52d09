"""tf.distribute: which strategy a run uses, which worker this process is, and one input pipeline per worker."""
import json
import os
import re
import threading

import tensorflow as tf

from context_keras import errors
from context_keras.input import pipeline as data_lib


def names_cluster():
  """Whether TF_CONFIG describes a cluster of more than one task."""
  try:
    cluster = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
  except json.JSONDecodeError as e:
    raise errors.UsageError(f"TF_CONFIG is not valid JSON: {e}") from e
  return sum(len(tasks) for tasks in cluster.values()) > 1


def make_strategy(name, cpu_replicas):
  """MultiWorkerMirroredStrategy for a TF_CONFIG cluster, MirroredStrategy over the GPUs or over logical CPU
  devices if asked, else the default strategy."""
  if name == "multi_worker" or (name == "auto" and names_cluster()):
    return tf.distribute.MultiWorkerMirroredStrategy()
  gpus = tf.config.list_physical_devices("GPU")
  if cpu_replicas > 1 and not gpus:
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
      tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_replicas)
    except RuntimeError:
      pass  # already configured in this process (tests); the devices are listed below
    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:cpu_replicas]
    return tf.distribute.MirroredStrategy(devices)
  if name == "one_device":
    return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
  if gpus or name == "mirrored":
    return tf.distribute.MirroredStrategy()
  return tf.distribute.get_strategy()


# What a collective op or the coordination service raises on the other workers when one dies or stops answering.
LOST_WORKER_ERRORS = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.AbortedError,
                      tf.errors.CancelledError)


def local_replicas(strategy):
  """Replicas of this host (of this worker, under MultiWorkerMirroredStrategy)."""
  try:
    return len(strategy.extended.worker_devices)
  except RuntimeError:  # the default strategy: one
    return 1


def is_multi_worker(strategy):
  return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def lost_tasks(error, this_task):
  """The tasks ("worker_1") that an error of LOST_WORKER_ERRORS names, other than this one."""
  named = {f"{job}_{index}" for job, index in re.findall(r"/job:(\w+)/replica:\d+/task:(\d+)", str(error))}
  return sorted(named - {this_task})


def worker_role(strategy):
  """(is_chief, task name) of this process: the chief writes the run; other workers write to temporary places."""
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not resolver.task_type:
    return True, "chief"
  cluster = resolver.cluster_spec().as_dict()
  chief = resolver.task_type == "chief" or (resolver.task_type == "worker" and resolver.task_id == 0 and
                                           "chief" not in cluster)
  return chief, f"{resolver.task_type}_{resolver.task_id}"


def input_pipeline(strategy):
  """(id, count) of this worker's input pipeline among the job's (distributed_batches: one per worker, numbered as
  tf.distribute numbers the workers of a cluster: the chief first)."""
  resolver = getattr(strategy, "cluster_resolver", None)
  count = max(1, strategy.num_replicas_in_sync // local_replicas(strategy))
  if resolver is None or not resolver.task_type or count == 1:
    return 0, count
  has_chief = "chief" in resolver.cluster_spec().as_dict()
  return (0 if resolver.task_type == "chief" else resolver.task_id + int(has_chief)), count


def distributed_batches(strategy, input_config, source, positions):
  """One input pipeline per worker; its replicas take consecutive batches of it, so it resumes where its last
  replica's last batch ended. Without a position for every replica (another topology), or through the tf.data
  service, a resumed run reads a fresh stream instead."""
  positions = positions.tolist()
  exact = len(positions) == strategy.num_replicas_in_sync and not input_config.data_service

  def dataset_fn(context):
    replicas_per_pipeline = strategy.num_replicas_in_sync // context.num_input_pipelines
    start = tuple(positions[(context.input_pipeline_id + 1) * replicas_per_pipeline - 1]) if exact else (0, 0)
    return data_lib.make_dataset(input_config, source, context.input_pipeline_id, context.num_input_pipelines,
                                 start=start)
  return strategy.distribute_datasets_from_function(dataset_fn)


def check_data_service(address, timeout):
  """Stops with a UsageError naming `address` unless a tf.data service there (a dispatcher and at least one worker)
  delivers an element of a one-element dataset within `timeout` seconds. Without this, an unreachable address makes
  training wait forever inside TensorFlow, which retries without a word. The probe runs in a thread, so that the
  wait can end: a probe that never returns is left behind in the daemon thread when the process exits."""
  outcome = {}

  def fetch():
    try:
      probe = tf.data.Dataset.range(1).apply(tf.data.experimental.service.distribute(
          processing_mode="parallel_epochs", service=address))  # registering it with the dispatcher can block too
      outcome["element"] = int(next(iter(probe)))
    except Exception as e:  # pylint: disable=broad-except  # reported below, in the main thread
      outcome["error"] = e

  thread = threading.Thread(target=fetch, daemon=True, name="data-service-probe")
  thread.start()
  thread.join(timeout)
  if "error" in outcome:
    raise errors.UsageError(f"--data_service={address}: {errors.tf_error_message(outcome['error'], 200)}")
  if "element" not in outcome:
    raise errors.UsageError(f"--data_service={address}: no tf.data service answered within --data_service_timeout="
                            f"{timeout} s: is a dispatcher running there (python -m context_keras.service "
                            "--role=dispatcher), with at least one worker registered?")
