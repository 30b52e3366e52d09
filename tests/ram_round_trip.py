"""The whole life of a run with every path on TensorFlow's ram:// file system, the stand-in for a bucket: photos and a
list file copied in, prepare writes shards, training is stopped by its quit file and resumed, export and evaluate
read it back. ram:// lives in one process, so the programs run one after the other in this one, each through its own
flag parsing and entry function (program.run). test_storage.py runs it; it prints one JSON line of what it found.

python tests/ram_round_trip.py WORKING_FOLDER
"""
import json
import os
import sys
import threading
import time

from absl import flags
import tensorflow as tf

from context_keras import evaluate
from context_keras import export
from context_keras import prepare
from context_keras import train
from context_keras.cli import program
import helpers

FLAGS = flags.FLAGS
ABSL_FLAGS = set(FLAGS)
DATA, SHARDS, RUN, OUT, EVALS = "ram://data", "ram://shards", "ram://runs/demo", "ram://out", "ram://evals"
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "motorcycle_left.png", "rocket.jpg", "hubble_deep_field.jpg")


def run_program(entry, define_flags, *args):
  """Runs a program as `python -m` would (its flags parsed from `args`); returns its exit code. The flags of the
  program before are forgotten first: each program defines its own."""
  for name in list(FLAGS):
    if name not in ABSL_FLAGS:
      delattr(FLAGS, name)
  for registry in (program._GROUPS, program._BOUNDS, program._CHECKS):  # pylint: disable=protected-access
    registry.clear()
  sys.argv = [entry.__module__, *args]
  try:
    program.run(entry, define_flags)
  except SystemExit as e:
    return e.code
  return None


def quit_after_first_checkpoint():
  """Creates RUN/train_quit, the run's own quit file, once the run's first checkpoint is there."""
  deadline = time.time() + 600
  while time.time() < deadline and not tf.io.gfile.glob(f"{RUN}/ckpt-*.index"):
    time.sleep(0.2)
  with tf.io.gfile.GFile(f"{RUN}/train_quit", "w") as f:
    f.write("")


def checkpoint_steps():
  return sorted(int(name[len("ckpt-"):-len(".index")]) for name in tf.io.gfile.listdir(RUN)
                if name.startswith("ckpt-") and name.endswith(".index"))


def read(path):
  with tf.io.gfile.GFile(path, "r") as f:
    return f.read()


def main(working):
  os.chdir(working)
  found = {}
  tf.io.gfile.makedirs(f"{DATA}/photos")
  for name in PHOTOS:
    tf.io.gfile.copy(os.path.join(helpers.skimage_photo_dir(), name), f"{DATA}/photos/{name}")
  with tf.io.gfile.GFile(f"{DATA}/list.txt", "w") as f:
    f.write("".join(f"photos/{name}\n" for name in PHOTOS))

  found["prepare"] = run_program(prepare.main, prepare.define_flags, f"--data={DATA}/list.txt", f"--output={SHARDS}",
                                 "--num_shards=2", "--workers=2")
  found["shards"] = sorted(tf.io.gfile.listdir(SHARDS))

  training = [f"--flagfile={helpers.REPO}/flags/demo.cfg", f"--data={DATA}/photos", f"--model_dir={RUN}",
              *helpers.SMALL_MODEL, "--steps_per_loop=1", "--log_every=1", "--checkpoint_every=2"]
  quitter = threading.Thread(target=quit_after_first_checkpoint, daemon=True)
  quitter.start()
  found["train_stopped"] = run_program(train.run, train.define_flags, *training, "--train_steps=1000")
  found["stopped_at"] = checkpoint_steps()
  steps = max(found["stopped_at"]) + 2
  found["train_resumed"] = run_program(train.run, train.define_flags, *training, f"--train_steps={steps}")
  found["run"] = sorted(tf.io.gfile.listdir(RUN))
  found["run_export"] = sorted(tf.io.gfile.listdir(f"{RUN}/export"))
  found["log"] = read(f"{RUN}/train.log")
  found["flags"] = read(f"{RUN}/flags.txt")
  found["steps"] = steps

  found["export"] = run_program(export.main, export.define_flags, f"--model_dir={RUN}", f"--output={OUT}")
  found["out"] = sorted(tf.io.gfile.listdir(OUT))
  found["evaluate"] = run_program(evaluate.main, evaluate.define_flags, "--mode=pretext",
                                  f"--saved_model={OUT}/backbone", f"--data={SHARDS}/*.tfrecord", f"--eval_dir={EVALS}",
                                  "--images=2", "--pairs_per_image=16")
  found["evals"] = sorted(tf.io.gfile.listdir(EVALS))
  found["pretext"] = json.loads(read(f"{EVALS}/pretext.json"))
  found["local"] = sorted(os.listdir(working))
  print(json.dumps(found), flush=True)


if __name__ == "__main__":
  main(sys.argv[1])
