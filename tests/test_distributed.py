"""Scale-out paths: two workers under MultiWorkerMirroredStrategy, the tf.data service, determinism."""
import glob
import json
import os
import re
import socket

import pytest

from helpers import DETERMINISTIC
from helpers import REPO
from helpers import checkpoint_steps
from helpers import demo_args
from helpers import log_of
from helpers import run_cases
from helpers import run_module
from helpers import start_module

pytestmark = pytest.mark.slow


def free_ports(count):
  sockets = [socket.socket() for _ in range(count)]
  for s in sockets:
    s.bind(("127.0.0.1", 0))
  ports = [s.getsockname()[1] for s in sockets]
  for s in sockets:
    s.close()
  return ports


def test_two_workers_train_in_lockstep_and_the_chief_writes(tmp_path):
  """With the augmentation in the step (--augment_on=device), then resumed with it in the pipeline."""
  ports = free_ports(2)
  cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
  processes, logs = [], []
  for index in range(2):
    workdir = tmp_path / f"worker{index}"
    workdir.mkdir()
    logs.append(workdir / "log.txt")
    processes.append(start_module(
        demo_args(tmp_path / "run", "--train_steps=6", "--checkpoint_every=3", "--augment_on=device"), workdir,
        logs[-1], env={"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})}))
  codes = [p.wait(timeout=600) for p in processes]
  texts = [path.read_text() for path in logs]
  assert codes == [0, 0], texts
  assert "MultiWorkerMirroredStrategy with 2 replica(s); this is worker_0 (chief)" in texts[0]
  digests = [re.search(r"Weights digest: (\S+)", t).group(1) for t in texts]
  assert digests[0] == digests[1], "both workers hold the same weights"
  # One run directory: the chief's checkpoints and export; the other worker's scratch folder is gone.
  assert checkpoint_steps(tmp_path / "run") == [3, 6]
  assert os.listdir(tmp_path / "run" / "export") == ["backbone_6"]
  assert not glob.glob(str(tmp_path / "run" / "workertemp_*"))
  # A restarted cluster resumes from the chief's checkpoint.
  processes = []
  for index in range(2):
    processes.append(start_module(
        demo_args(tmp_path / "run", "--train_steps=8", "--checkpoint_every=3"), tmp_path / f"worker{index}",
        tmp_path / f"worker{index}" / "resumed.txt",
        env={"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})}))
  for p in processes:
    p.wait(timeout=600)
  outputs = [(tmp_path / f"worker{index}" / "resumed.txt").read_text() for index in range(2)]
  assert [p.returncode for p in processes] == [0, 0], outputs
  assert all("Resumed from" in o and "at step 6" in o for o in outputs)
  assert checkpoint_steps(tmp_path / "run") == [3, 6, 8]


def test_training_through_the_data_service(tmp_path):
  from context_keras import service
  dispatcher = service.start_dispatcher()
  address = dispatcher.target.split("://")[1]
  worker = service.start_worker(address, worker_address="localhost:%port%")
  try:
    # The service workers augment (host), or cut uint8 patches that the trainer augments (device); the second run
    # resumes the first, in the same process (helpers.run_cases).
    runs = (("host", 4), ("device", 6))
    _, _, results = run_cases("train", [
        demo_args(tmp_path / "run", f"--train_steps={steps}", f"--augment_on={augment_on}",
                  f"--data_service={dispatcher.target}")[1:] for augment_on, steps in runs], cwd=tmp_path)
    for (_, steps), result in zip(runs, results):
      assert result.returncode == 0, log_of(result)
      assert "processed by the tf.data service" in log_of(result)
      assert f"Training finished at step {steps}" in log_of(result)
  finally:
    worker._stop()
    dispatcher._stop()


def test_deterministic_runs_repeat_their_losses(deterministic_run, tmp_path):
  """The first 6 steps of the session's deterministic run (12 steps), again in a run of 6."""
  losses = [re.findall(r"loss/pair (\S+)", deterministic_run[1])[:6]]
  result = run_module([*DETERMINISTIC, f"--model_dir={tmp_path / 'run'}", "--train_steps=6"], cwd=REPO)
  assert result.returncode == 0, log_of(result)
  losses.append(re.findall(r"loss/pair (\S+)", log_of(result)))
  assert len(losses[0]) == 6 and losses[0] == losses[1]


def test_profile_steps_write_a_trace(tmp_path):
  result = run_module(demo_args(tmp_path / "run", "--train_steps=5", "--profile_steps=2,4"), cwd=tmp_path)
  assert result.returncode == 0, log_of(result)
  assert "Profile of steps 2-4 written" in log_of(result)
  assert glob.glob(str(tmp_path / "run" / "train" / "plugins" / "profile" / "*" / "*.xplane.pb"))
