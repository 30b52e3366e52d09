"""Fault injection against real training runs of a small model, each trainer in a subprocess: kill -9 at random
moments (also while a checkpoint is being written), SIGTERM, a full disk, a folder made read-only, a NaN loss, two
trainers on one run directory, unusable run directories. Nothing that was reported written may be lost, and every
restart must resume from a complete checkpoint.

Root ignores file permissions, so where a test needs them honoured (unreadable or read-only folders) its subprocess
runs with CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH dropped from its capability bounding set (`ordinary_user`): it
stays uid 0 but the kernel checks its file accesses as an ordinary owner's. (Switching to 'nobody' is not possible
here: the virtualenv's interpreter lives under /root, mode 0700.) As a non-root user the tests need no such step.
"""
import glob
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from context_keras.cli.program import HELD_BACK_NOTE
from context_keras.input import decoding as DEC
from helpers import REPO
from helpers import assert_complete_checkpoint
from helpers import checkpoint_steps
from helpers import demo_args
from helpers import log_of
from helpers import module_env
from helpers import python_module
from helpers import run_all
from helpers import run_cases
from helpers import run_module
from helpers import run_state
from helpers import skimage_photo_dir
from helpers import start_module
from helpers import wait_for

pytestmark = pytest.mark.slow

# Promptly, in steps (a test asserts no time): SIGTERM lets the compiled call in flight finish, so the run stops
# within one --steps_per_loop (5 in demo_args) of the step it was at, which is at most one --log_every (5) past the
# last progress line seen before the signal.
SIGTERM_STEPS_BOUND = 5 + 5


def latest_step(model_dir):
  """The step of the checkpoint that the state file names (what a restart resumes from), or None."""
  state = tf.train.get_checkpoint_state(str(model_dir))
  return int(re.search(r"ckpt-(\d+)$", state.model_checkpoint_path).group(1)) if state else None


# ------------------------------------------------------------------------------------------------------------
# kill -9


def _temp_checkpoints(model_dir):
  return {n for n in os.listdir(model_dir) if n.endswith("_temp")} if model_dir.exists() else set()


def _partial_checkpoints(model_dir, latest):
  """What a checkpoint write cut short leaves: its temporary folder (with the files in it), or the files of a step
  that the state file does not name (yet). A write cut short before it made anything new leaves nothing new."""
  found = set()
  for name in _temp_checkpoints(model_dir):
    found |= {f"{name}/{f}" for f in os.listdir(model_dir / name)} or {name}
  for path in glob.glob(str(model_dir / "ckpt-*.index")):
    if int(re.search(r"ckpt-(\d+)", os.path.basename(path)).group(1)) > (latest or 0):
      found.add(os.path.basename(path))
  return found


def _kill_in_a_write(model_dir, process, skip):
  """Waits until `skip` more checkpoint writes have begun, then for the next one, and kills the process as soon as
  its temporary folder appears: in the middle of writing the checkpoint."""
  seen = _temp_checkpoints(model_dir)
  deadline = time.time() + 120
  while time.time() < deadline and process.poll() is None:
    new = _temp_checkpoints(model_dir) - seen
    if new:
      if skip == 0:
        process.send_signal(signal.SIGKILL)
        return
      skip -= 1
      seen |= new
    time.sleep(0.0005)
  raise AssertionError("no checkpoint write began")


def test_kill_9_at_random_moments_never_loses_a_checkpoint(tmp_path):
  """kill -9 at seeded random moments: while restoring, while training, and while a checkpoint is being written
  (checkpoints every step). Each restart resumes from the newest complete checkpoint, never from a partial one;
  no checkpoint reported written is lost; the step never goes backwards; the run then completes."""
  rng = random.Random(20151207)
  run = tmp_path / "run"
  extra = ["--train_steps=0", "--checkpoint_every=1", "--keep_checkpoints=3", "--steps_per_loop=1", "--log_every=1"]
  phases = ["write", "restore", "random"]  # each moment once (five kills, two more writes and a random, took 40 s more)
  resumed_from, kills_mid_write, partial_seen = None, 0, []
  for i, phase in enumerate(phases):
    log = tmp_path / f"log_{i}.txt"
    partial_before = _partial_checkpoints(run, resumed_from)
    process = start_module(demo_args(run, *extra), tmp_path, log)
    try:
      if resumed_from is not None:
        match = wait_for(log, r"Resumed from (\S+) at step (\d+)\.", process)
        assert match.group(1) == str(run / f"ckpt-{resumed_from}") and int(match.group(2)) == resumed_from
      if phase == "restore":
        process.send_signal(signal.SIGKILL)
      else:
        wait_for(log, r"Checkpoint \S+ written", process)
        if phase == "write":
          _kill_in_a_write(run, process, skip=rng.randint(0, 3))
        else:
          time.sleep(rng.uniform(0.0, 1.5))
          process.send_signal(signal.SIGKILL)
      assert process.wait(timeout=60) == -signal.SIGKILL, log.read_text()[-3000:]
    finally:
      if process.poll() is None:
        process.kill()
    text = log.read_text()
    assert "Traceback" not in text and "is in use" not in text, text[-3000:]  # kill -9 leaves no stuck lock
    written = [int(s) for s in re.findall(r"Checkpoint \S+/ckpt-(\d+) written", text)]
    latest = latest_step(run)
    assert latest is not None and latest >= max(written, default=0), (phase, latest, written)
    assert resumed_from is None or latest >= resumed_from, (phase, latest, resumed_from)
    assert_complete_checkpoint(run, latest)
    assert "--model_dir=" in (run / "flags.txt").read_text()
    partial = _partial_checkpoints(run, latest) - partial_before
    if partial:  # this kill cut a checkpoint write short, and the restart must not pick it
      kills_mid_write += 1
      partial_seen.append((phase, sorted(partial)))
    resumed_from = latest
  assert kills_mid_write >= 1, "no kill landed in a checkpoint write"

  final = run_module(demo_args(run, f"--train_steps={resumed_from + 3}", "--checkpoint_every=1"), cwd=tmp_path)
  assert final.returncode == 0, log_of(final)
  assert f"Resumed from {run / f'ckpt-{resumed_from}'} at step {resumed_from}." in log_of(final)
  assert f"Training finished at step {resumed_from + 3}." in log_of(final)
  assert_complete_checkpoint(run, resumed_from + 3)
  print(f"{len(phases)} kills, {kills_mid_write} during a checkpoint write (partial files left: {partial_seen}); "
        f"final step {resumed_from + 3}")


# ------------------------------------------------------------------------------------------------------------
# Two trainers, SIGTERM


def test_second_trainer_is_refused_pause_waits_idle_and_sigterm_checkpoints_promptly(tmp_path):
  """A second trainer on the run is refused, the first goes on; paused, the first waits without burning CPU and then
  continues; SIGTERM stops it promptly with a checkpoint."""
  run = tmp_path / "run"
  log = tmp_path / "first.txt"
  first = start_module(demo_args(run, "--train_steps=0", "--checkpoint_every=100000"), tmp_path, log)
  try:
    wait_for(log, r"step 5 ", first)
    second = run_module(demo_args(run, "--train_steps=0"), cwd=tmp_path, timeout=120)
    assert second.returncode == 2, log_of(second)
    assert re.search(rf"--model_dir={re.escape(str(run))} is in use by training process {first.pid} on \S+ "
                     rf"\(lock {re.escape(str(run / '.lock'))}\)", log_of(second)), log_of(second)
    assert "Traceback" not in log_of(second)
    assert first.poll() is None  # the first run goes on untouched
    last = max(int(s) for s in re.findall(r"step (\d+) ", log.read_text()))
    wait_for(log, rf"step {last + 5} ", first)
    (tmp_path / "train_pause").write_text("")
    wait_for(log, r"Paused: remove", first)
    paused_at = checkpoint_steps(run)
    assert len(paused_at) == 1
    before = cpu_seconds(first)
    time.sleep(3)
    assert cpu_seconds(first) - before < 0.5  # waiting does not burn CPU
    size = len(log.read_text())
    os.remove(tmp_path / "train_pause")
    wait_for(log, r"continuing", first, after=size)
    wait_for(log, rf"step {paused_at[0] + 5 - paused_at[0] % 5} ", first, after=size)
    signalled = time.time()
    logged = max(int(s) for s in re.findall(r"step (\d+) ", log.read_text()))
    first.send_signal(signal.SIGTERM)
    code = first.wait(timeout=120)
    seconds = time.time() - signalled
  finally:
    if first.poll() is None:
      first.kill()
  assert code == 0, log.read_text()[-3000:]
  stopped = int(re.search(r"Stopped at step (\d+) \(SIGTERM\)", log.read_text()).group(1))
  assert logged <= stopped <= logged + SIGTERM_STEPS_BOUND, (logged, stopped)
  assert checkpoint_steps(run) == [paused_at[0], stopped] and latest_step(run) == stopped
  assert_complete_checkpoint(run, stopped)
  print(f"SIGTERM to exit: {seconds:.2f} s, checkpoint of step {stopped} written")


def cpu_seconds(process):
  """The CPU time a child process has used (from /proc, Linux)."""
  fields = open(f"/proc/{process.pid}/stat").read().rsplit(")", 1)[1].split()
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------------------------------------
# A checkpoint write fails


def _fill(disk, leave_bytes):
  free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
  fd = os.open(disk / "filler", os.O_CREAT | os.O_WRONLY)
  try:
    os.posix_fallocate(fd, 0, max(free - leave_bytes, 1))
  finally:
    os.close(fd)


@pytest.fixture
def small_disk(tmp_path):
  """A 48 MB tmpfs (a real disk that can fill up: ENOSPC); needs root, skips otherwise."""
  disk = tmp_path / "disk"
  disk.mkdir()
  if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(disk)],
                                         capture_output=True).returncode != 0:
    pytest.skip("cannot mount a small tmpfs here; test_unwritable_folder_mid_run covers a failing write")
  try:
    yield disk
  finally:
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_disk_full_stops_with_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path, small_disk):
  """The disk fills up while the run is paused: first with 1 MB left (the 2 MB checkpoint cannot be written), then
  with nothing left (not even the TensorBoard summaries). Each time: exit 1, a message naming the folder and the
  intact previous checkpoint, no traceback; that checkpoint unchanged and loadable; with space again, the run resumes
  from it and completes. (The second time checkpoints are rare, so that the summaries, flushed every 5 steps, are
  the write that fails.)"""
  run = small_disk / "run"
  previous = None
  for i, (leave, every, what) in enumerate(((1 << 20, 10, "the checkpoint of step"),
                                            (0, 100000, "the TensorBoard summaries of step"))):
    log = tmp_path / f"log_{i}.txt"
    process = start_module(demo_args(run, "--train_steps=0", f"--checkpoint_every={every}"), tmp_path, log)
    try:
      if previous is not None:
        wait_for(log, rf"Resumed from {re.escape(str(run / f'ckpt-{previous}'))} at step {previous}\.", process)
      wait_for(log, r"step \d+ ", process)
      (tmp_path / "train_pause").write_text("")
      wait_for(log, r"Paused: remove", process)
      paused = latest_step(run)
      before = run_state(run)
      _fill(small_disk, leave)
      os.remove(tmp_path / "train_pause")
      code = process.wait(timeout=120)
    finally:
      if process.poll() is None:
        process.kill()
    text = log.read_text()
    assert code == 1, text[-3000:]
    assert re.search(rf"Could not write {what} \d+ to {re.escape(str(run))}\S*: .*No space left on device.* The "
                     rf"previous checkpoint {re.escape(str(run / f'ckpt-{paused}'))} is intact", text), text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert latest_step(run) == paused
    assert {k: v for k, v in run_state(run).items() if k in before} == before
    assert_complete_checkpoint(run, paused)
    os.remove(small_disk / "filler")
    previous = paused
  final = run_module(demo_args(run, f"--train_steps={previous + 2}"), cwd=tmp_path)
  assert final.returncode == 0, log_of(final)
  assert f"Resumed from {run}/ckpt-{previous} at step {previous}." in log_of(final)
  assert f"Training finished at step {previous + 2}." in log_of(final)


def test_unwritable_folder_mid_run(tmp_path, ordinary_user):
  """The run directory becomes read-only while the run is paused: the next checkpoint fails with a clear message
  and exit 1; the previous checkpoint is intact and loadable."""
  run = tmp_path / "run"
  log = tmp_path / "log.txt"
  process = start_module(demo_args(run, "--train_steps=0", "--checkpoint_every=10"), tmp_path, log, ordinary_user)
  try:
    wait_for(log, r"step \d+ ", process)
    (tmp_path / "train_pause").write_text("")
    wait_for(log, r"Paused: remove", process)
    paused = latest_step(run)
    before = run_state(run)
    run.chmod(0o555)
    os.remove(tmp_path / "train_pause")
    code = process.wait(timeout=120)
  finally:
    run.chmod(0o755)
    if process.poll() is None:
      process.kill()
  text = log.read_text()
  assert code == 1, text[-3000:]
  assert re.search(rf"Could not write the checkpoint of step \d+ to {re.escape(str(run))}: .*Permission denied.* "
                   rf"The previous checkpoint {re.escape(str(run / f'ckpt-{paused}'))} is intact", text), text[-3000:]
  assert "Traceback" not in text
  assert latest_step(run) == paused and run_state(run) == before
  assert_complete_checkpoint(run, paused)


# ------------------------------------------------------------------------------------------------------------
# NaN


def test_nan_loss_stops_naming_the_step_and_no_checkpoint_holds_it(tmp_path):
  """A NaN loss at step 7 stops the run (exit 1) naming the step; the rerun resumes from ckpt-6 and goes on to 8
  (both in one process: helpers.run_cases). So the stopped run left checkpoints 2, 4 and 6 alone, all finite, and no
  export: the only export is the rerun's."""
  run = tmp_path / "run"
  _, _, (result, resumed) = run_cases("train", [
      demo_args(run, "--train_steps=20", "--checkpoint_every=2", "--inject_nan_at_step=7")[1:],
      demo_args(run, "--train_steps=8", "--checkpoint_every=2")[1:]], cwd=tmp_path)
  assert result.returncode == 1, log_of(result)
  assert "Diverged at step 7: loss or gradient is NaN/Inf. Nothing was checkpointed after step 6" in log_of(result)
  assert "Traceback" not in log_of(result)
  assert resumed.returncode == 0, log_of(resumed)
  assert f"Resumed from {run}/ckpt-6 at step 6." in log_of(resumed)  # the newest checkpoint the NaN run left
  assert checkpoint_steps(run) == [2, 4, 6, 8] and latest_step(run) == 8
  for step in (2, 4, 6, 8):
    assert_complete_checkpoint(run, step)  # all finite
  assert os.listdir(run / "export") == ["backbone_8"]


# ------------------------------------------------------------------------------------------------------------
# Two runs in one working directory: control files


def test_a_second_run_leaves_the_first_runs_pause_file_alone(tmp_path):
  """Run A is paused by ./train_pause; run B starts in the same folder: B says the file exists already and does not
  obey it, and neither removes it, so A stays paused. RUN/train_quit stops one run alone; removing ./train_pause
  lets A go on; SIGINT stops it cleanly."""
  logs = {name: tmp_path / f"{name}.txt" for name in "ab"}
  first = start_module(demo_args(tmp_path / "a", "--train_steps=0", "--checkpoint_every=100000"), tmp_path,
                       logs["a"])
  second = None
  try:
    wait_for(logs["a"], r"step 5 ", first)
    (tmp_path / "train_pause").write_text("")
    wait_for(logs["a"], r"Paused: remove", first)
    second = start_module(demo_args(tmp_path / "b", "--train_steps=0", "--checkpoint_every=100000"), tmp_path,
                          logs["b"])
    wait_for(logs["b"], r"Control file \S*train_pause exists already \(another run's, or left from an earlier "
             r"one\): not obeyed unless created again", second)
    wait_for(logs["b"], r"step 10 ", second)
    assert (tmp_path / "train_pause").exists() and "continuing" not in logs["a"].read_text()
    (tmp_path / "b" / "train_quit").write_text("")
    assert second.wait(timeout=120) == 0, logs["b"].read_text()[-3000:]
    assert re.search(r"Stopped at step \d+ \(quit file \S*b/train_quit\)", logs["b"].read_text())
    assert first.poll() is None and "continuing" not in logs["a"].read_text()  # B's quit file was B's alone
    size = len(logs["a"].read_text())
    os.remove(tmp_path / "train_pause")
    wait_for(logs["a"], r"Pause file removed: continuing", first, after=size)
    wait_for(logs["a"], r"step \d+ ", first, after=size)
    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=120) == 0, logs["a"].read_text()[-3000:]
    assert re.search(r"Stopped at step \d+ \(SIGINT\)", logs["a"].read_text())
  finally:
    for process in (first, second):
      if process is not None and process.poll() is None:
        process.kill()
  for name in "ab":
    assert "Traceback" not in logs[name].read_text()


# ------------------------------------------------------------------------------------------------------------
# The tf.data service: unreachable, and gone mid-run


def test_unreachable_data_service_times_out_and_signals_stop_at_any_time(tmp_path):
  """An address where no tf.data service answers: exit 2 after --data_service_timeout, naming it. SIGINT while it
  waits: exit 130 at once. A service that goes away mid-run leaves the run waiting inside TensorFlow: the first
  SIGINT asks for a graceful stop that cannot come, the second ends the run at once; the last checkpoint is whole."""
  from context_keras import service  # pylint: disable=import-outside-toplevel
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    nobody = f"grpc://127.0.0.1:{s.getsockname()[1]}"  # closed again: nothing listens there
  start = time.time()
  timed_out = run_module(demo_args(tmp_path / "a", f"--data_service={nobody}", "--data_service_timeout=3"),
                         cwd=tmp_path, timeout=120)
  assert timed_out.returncode == 2, log_of(timed_out)
  assert (f"--data_service={nobody}: no tf.data service answered within --data_service_timeout=3 s: is a "
          "dispatcher running there") in log_of(timed_out) and "Traceback" not in log_of(timed_out)
  print(f"unreachable service: exit 2 after {time.time() - start:.1f} s (TensorFlow import included)")

  log = tmp_path / "b.txt"
  waiting = start_module(demo_args(tmp_path / "b", f"--data_service={nobody}", "--data_service_timeout=600"),
                         tmp_path, log)
  try:
    wait_for(log, r"processed by the tf.data service at", waiting)
    time.sleep(1)
    waiting.send_signal(signal.SIGINT)
    assert waiting.wait(timeout=20) == 130, log.read_text()[-3000:]
  finally:
    if waiting.poll() is None:
      waiting.kill()
  assert "SIGINT while no checkpoint can be written: exiting now" in log.read_text()

  dispatcher = service.start_dispatcher()
  worker = service.start_worker(dispatcher.target.split("://")[1], worker_address="localhost:%port%")
  log = tmp_path / "c.txt"
  run = tmp_path / "c"
  process = start_module(demo_args(run, f"--data_service={dispatcher.target}", "--train_steps=0",
                                   "--checkpoint_every=5"), tmp_path, log)
  try:
    wait_for(log, r"Checkpoint \S+ written", process)
    worker._stop()  # pylint: disable=protected-access
    dispatcher._stop()  # pylint: disable=protected-access
    deadline = time.time() + 60  # until the batches it had in hand are used up and it waits
    size = -1
    while time.time() < deadline and size != len(log.read_text()):
      size = len(log.read_text())
      time.sleep(5)
    process.send_signal(signal.SIGINT)
    wait_for(log, r"SIGINT received: finishing the current step", process)
    time.sleep(2)
    assert process.poll() is None, log.read_text()[-3000:]  # the step cannot finish without its input
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=20) == 130, log.read_text()[-3000:]
  finally:
    if process.poll() is None:
      process.kill()
  assert "SIGINT again while stopping (SIGINT): exiting now" in log.read_text()
  assert_complete_checkpoint(run, latest_step(run))


# ------------------------------------------------------------------------------------------------------------
# Two prepare runs on one output folder


def test_second_prepare_on_the_same_output_is_refused(tmp_path):
  """The first prepare holds --output (stopped with SIGSTOP in the middle, to be sure): the second exits 2 naming
  it; the first then completes all its shards."""
  output = tmp_path / "shards"
  args = ["context_keras.prepare", f"--data={REPO}/flags/demo_photos.txt", "--data_root=package:skimage.data",
          f"--output={output}", "--num_shards=3", "--workers=1"]
  log = tmp_path / "first.txt"
  first = start_module(args, tmp_path, log)
  try:
    wait_for(log, r"3 shard\(s\) to write", first)
    first.send_signal(signal.SIGSTOP)
    second = run_module(args, cwd=tmp_path, timeout=120)
    first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0, log.read_text()[-3000:]
  finally:
    if first.poll() is None:
      first.kill()
  assert second.returncode == 2, log_of(second)
  assert re.search(rf"--output={re.escape(str(output))} is in use by prepare process {first.pid} on \S+ \(lock "
                   rf"{re.escape(str(output / '.lock'))}\); wait for it to finish, or choose another --output",
                   log_of(second)), log_of(second)
  assert "Traceback" not in log_of(second)
  assert json.loads((output / "index.json").read_text())["records"] == 18


# ------------------------------------------------------------------------------------------------------------
# A worker of a multi-worker run dies


def test_a_lost_worker_is_named_with_the_step_and_the_checkpoint_to_resume_from(tmp_path):
  """kill -9 of one of two workers on loopback: the other stops within seconds with exit code 75 (restart the job),
  naming the lost worker, the step and the checkpoint every worker resumes from; the restarted job resumes there."""
  with socket.socket() as a, socket.socket() as b:
    a.bind(("127.0.0.1", 0))
    b.bind(("127.0.0.1", 0))
    cluster = {"worker": [f"127.0.0.1:{s.getsockname()[1]}" for s in (a, b)]}
  run = tmp_path / "run"

  def start(index, *extra):
    env = dict(module_env(), TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}))
    (tmp_path / f"w{index}").mkdir(exist_ok=True)
    return python_module(demo_args(run, *extra), tmp_path / f"w{index}", tmp_path / f"w{index}" / "log.txt", env=env)

  workers = [start(i, "--train_steps=0", "--checkpoint_every=10") for i in range(2)]
  logs = [tmp_path / f"w{i}" / "log.txt" for i in range(2)]
  try:
    wait_for(logs[0], r"Checkpoint \S+/ckpt-10 written", workers[0])
    wait_for(logs[0], r"step 15 ", workers[0])
    workers[1].send_signal(signal.SIGKILL)
    killed = time.time()
    code = workers[0].wait(timeout=120)
    seconds = time.time() - killed
  finally:
    for process in workers:
      if process.poll() is None:
        process.kill()
  text = logs[0].read_text()
  assert code == 75, text[-3000:]
  match = re.search(r"Lost worker_1 at step (\d+) \(.*\)\. Restart the whole job, every worker with the same "
                    r"command and TF_CONFIG: all resume from (\S+)\. Exit code 75 means: restart the job\.", text)
  assert match, text[-3000:]
  resume = match.group(2)
  assert int(match.group(1)) > 15 and resume == str(run / f"ckpt-{latest_step(run)}"), (match.groups(), text[-2000:])
  assert "Traceback" not in text
  print(f"the surviving worker stopped {seconds:.1f} s after the kill")
  workers = [start(i, f"--train_steps={latest_step(run) + 2}") for i in range(2)]
  try:
    codes = [p.wait(timeout=300) for p in workers]
  finally:
    for process in workers:
      if process.poll() is None:
        process.kill()
  assert codes == [0, 0], [log.read_text()[-2000:] for log in logs]
  assert f"Resumed from {resume} at step" in logs[0].read_text()


# ------------------------------------------------------------------------------------------------------------
# What a run says: our own lines, progress with an ETA, float16's skipped updates


BANNER = re.compile(r"absl::InitializeLog|cudart_stub|cuInit|cpu_feature_guard|oneDNN custom operations|"
                    r"^[IWEF]\d{4} [\d:. ]+\d+ \w+\.cc:\d+\]", re.M)
CHATTER = ("Sharding callback duration", "Writing fingerprint", "unsupported characters", "Assets written to",
           "Collective all_reduce")


def corrupt_jpeg_folder(folder):
  """Photos that a corrupt JPEG (noise in its scan: libjpeg warns, then fails) and a truncated one sit among, with a
  JPEG stored sideways (EXIF orientation 6, turned upright in decoding)."""
  photos = skimage_photo_dir()
  folder.mkdir()
  for name in ("astronaut.png", "coffee.png", "rocket.jpg"):
    shutil.copy(os.path.join(photos, name), folder / name)
  rocket = (folder / "rocket.jpg").read_bytes()
  noise = np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()
  (folder / "corrupt.jpg").write_bytes(rocket[:len(rocket) // 2] + noise + rocket[len(rocket) // 2 + len(noise):])
  (folder / "truncated.jpg").write_bytes(rocket[:len(rocket) // 2])
  exif = Image.Exif()
  exif[0x0112] = 6
  Image.open(os.path.join(photos, "chelsea.png")).convert("RGB").save(folder / "sideways.jpg", exif=exif.tobytes())
  return folder


def test_logs_hold_our_own_lines_and_progress_lines_say_when_it_ends(tmp_path, small_run, small_run_log):
  """At the default verbosity no TensorFlow start-up banner and no library chatter (checkpoint sharding, SavedModel
  naming) reach the output or RUN/train.log; -v 1 brings them back. Progress lines come at every --log_every step
  and at the last one, with the elapsed time and an ETA (the session's small run: 10 steps, --log_every=4); float16's
  skipped updates never repeat a step's line. With oneDNN on (TF_ENABLE_ONEDNN_OPTS=1; TensorFlow's default on CPUs
  with AVX-512 VNNI/BF16 or AMX) training and evaluation print no error-level line, and corrupt JPEGs no raw libjpeg
  line: one line of ours says they were skipped, and the progress line counts them (docs/method.md §4.2)."""
  bad = corrupt_jpeg_folder(tmp_path / "bad")
  onednn = {"TF_ENABLE_ONEDNN_OPTS": "1"}
  results = run_all([
      (["context_keras.service"], None),
      (["context_keras.service", "-v", "1"], None),
      (demo_args(tmp_path / "fp16", "-v", "1", "--mixed_precision=float16", "--train_steps=4", "--log_every=1",
                 "--steps_per_loop=1"), None),
      (demo_args(tmp_path / "onednn", f"--data={bad}", "--data_root=", "--rotation_classes", "--flip_relabel",
                 "--train_steps=5"), None, onednn),
      (["context_keras.evaluate", "--mode=pretext", f"--model_dir={small_run}", f"--eval_dir={tmp_path / 'eval'}",
        f"--data={bad}", "--images=6", "--pairs_per_image=16"], None, onednn),
  ], tmp_path, timeout=600, real=True)  # what a program prints while it imports TensorFlow, too
  (quiet_code, quiet), (verbose_code, verbose), (fp16_code, fp16) = results[:3]
  (onednn_code, onednn_run), (evaluated, evaluation) = results[3:]
  assert onednn_code == evaluated == 0, [text[-3000:] for _, text in results[3:]]
  for text in (onednn_run, evaluation):
    assert not BANNER.search(text) and "oneDNN supports" not in text, text[-3000:]  # no C++ log line at all
    assert not [line for line in text.splitlines() if DEC.DECODER_MESSAGES.search(line)], text[-3000:]
    assert text.count(HELD_BACK_NOTE) == 1, text[-3000:]
  assert re.search(r"step 5/5 .*unreadable [1-9]", onednn_run), onednn_run[-3000:]
  assert json.loads(re.findall(r"^\{.*", evaluation, re.M)[-1])["unreadable"] == 2, evaluation[-3000:]
  assert quiet_code == verbose_code == 2 and "--role is required" in quiet, quiet
  assert not BANNER.search(quiet), quiet
  assert BANNER.search(verbose), verbose
  assert fp16_code == 0, fp16[-2000:]
  train_log = (small_run / "train.log").read_text()
  for chatter in CHATTER:
    assert chatter not in train_log, chatter
  eta = small_run_log
  assert not BANNER.search(eta) and not any(chatter in eta for chatter in CHATTER), eta[-3000:]
  assert "Sharding callback duration" in (tmp_path / "fp16" / "train.log").read_text()  # -v 1

  lines = re.findall(r"step (\d+)/10 .*\(too small \d+, unreadable \d+\)  elapsed (\d+:\d\d:\d\d)  ETA (\S+)", eta)
  assert [int(step) for step, _, _ in lines] == [4, 8, 10], eta[-3000:]
  assert re.fullmatch(r"\d+:\d\d:\d\d", lines[1][2]) and lines[-1][2] == "0:00:00", lines
  steps = [int(step) for step in re.findall(r"step (\d+)/4 ", fp16)]
  assert steps == sorted(set(steps)) and steps[-1] == 4 and 0 not in steps, fp16[-3000:]
  skipped = re.findall(r"float16 overflows skipped (\d+) updates", fp16)
  assert skipped and int(skipped[-1]) > 0, fp16[-3000:]  # the loss scale starts at 2^15 and comes down
  print(f"float16: {skipped[-1]} updates skipped at the start; progress lines at steps {steps}")
