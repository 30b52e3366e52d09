"""Runs a tf.data service server, so that CPU-only hosts do the decoding and patch building for training.

  python -m context_keras.service --role=dispatcher --port=5050
  python -m context_keras.service --role=worker --dispatcher=HOST:5050 --port=5051   # on each input host
  python -m context_keras.train ... --data_service=grpc://HOST:5050

Workers read the images themselves, so --data must name the same path on every worker host and on the trainers.
"""
import socket

from absl import flags
from absl import logging
import tensorflow as tf

from context_keras import errors
from context_keras.cli import program

FLAGS = flags.FLAGS


def define_flags():
  with program.flag_group("service"):
    flags.DEFINE_enum("role", None, ["dispatcher", "worker"], "Which server to run: the dispatcher, or a worker "
                      "that decodes and cuts for it (docs/flags.md#service).")
    program.define_integer("port", 0, "Port to listen on (0 = any free port; the log says which).", lower=0,
                           upper=65535)
    flags.DEFINE_string("dispatcher", None, "HOST:PORT of the dispatcher (workers only).")
    flags.DEFINE_string("worker_address", None, "HOST:%port% under which the dispatcher and trainers reach this "
                        "worker (default: this host's name).")
    flags.DEFINE_string("work_dir", None, "Dispatcher only: folder for its journal, so that it recovers from "
                        "restarts.")


def start_dispatcher(port=0, work_dir=None):
  config = tf.data.experimental.service.DispatcherConfig(port=port, work_dir=work_dir,
                                                         fault_tolerant_mode=bool(work_dir))
  return tf.data.experimental.service.DispatchServer(config)


def start_worker(dispatcher, port=0, worker_address=None):
  config = tf.data.experimental.service.WorkerConfig(
      dispatcher_address=dispatcher, port=port,
      worker_address=worker_address or f"{socket.gethostname()}:%port%")
  return tf.data.experimental.service.WorkerServer(config)


def main():
  if FLAGS.role == "dispatcher":
    server = start_dispatcher(FLAGS.port, FLAGS.work_dir)
    logging.info("tf.data service dispatcher at %s; train with --data_service=%s", server.target, server.target)
  elif FLAGS.role == "worker":
    if not FLAGS.dispatcher:
      raise errors.UsageError("--role=worker needs --dispatcher=HOST:PORT")
    server = start_worker(FLAGS.dispatcher, FLAGS.port, FLAGS.worker_address)
    logging.info("tf.data service worker serving dispatcher %s", FLAGS.dispatcher)
  else:
    raise errors.UsageError("--role is required: dispatcher or worker")
  server.join()


if __name__ == "__main__":
  program.run(main, define_flags)
