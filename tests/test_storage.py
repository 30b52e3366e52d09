"""Files on any store (docs/storage.md): user paths normalised without mangling URLs, the lock object and its stale
rule, atomic files and folders and their recovery, the log on a store, the shipped flagfiles, the `context-keras`
command; a static check that no module reaches a user path except through the storage room; and, in one
subprocess each, a whole run on ram:// and the installed wheel.

ram://, TensorFlow's in-memory file system, stands in for an object store here: it lives in one process, and like
one it renames a folder without its files and has no flock. Each test uses its own ram:// folder."""
import ast
import glob
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid

import pytest
import tensorflow as tf

from context_keras import ablation as AB
from context_keras import errors as E
from context_keras import export as EX
from context_keras.cli import commands as CM
from context_keras.cli import program as PG
from context_keras.input import sources as S
from context_keras.storage import locks as L
from context_keras.storage import logs as LG
from context_keras.storage import paths as P
from context_keras.storage import writes as W
from helpers import REPO
from helpers import SMALL_MODEL
from helpers import run_module

G = tf.io.gfile


@pytest.fixture
def ram(monkeypatch):
  """A fresh ram:// folder, removed afterwards. A lock taken there is read back at once: ram:// is one process's,
  and a write is seen at once, so the wait that lets a real store's concurrent writes land is not needed."""
  monkeypatch.setattr(L, "SETTLE_SECONDS", 0)
  folder = f"ram://test_{uuid.uuid4().hex[:8]}"
  G.makedirs(folder)
  yield folder
  W.remove_tree(folder)


def write(path, text):
  G.makedirs(P.parent(path))
  with G.GFile(path, "w") as f:
    f.write(text)


def read(path):
  with G.GFile(path) as f:
    return f.read()


def tree(folder):
  """{relative path: text} of every file under `folder`, on any file system."""
  found = {}
  for where, _, files in P.walk(folder):
    for name in files:
      path = os.path.join(where, name)
      found[P.relative(path, folder)] = read(path)
  return found


# ----------------------------------------------------------------------------------------------------------------
# Paths


def test_normalise_keeps_urls_and_resolves_dots(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert P.normalise("gs://bucket/a/../run/") == "gs://bucket/run"
  assert P.normalise("ram://ck//run/./x") == "ram://ck/run/x"
  assert P.normalise("runs/missing/../demo") == str(tmp_path / "runs" / "demo")
  assert P.normalise("file:///tmp/x/../y") == "/tmp/y"
  assert P.normalise("hdfs://namenode:8020/user/a") == "hdfs://namenode:8020/user/a"
  assert P.is_url("s3://b/k") and P.is_local("/a/b") and P.is_local("file:///a") and P.is_local("c:/x")
  assert P.split("ram://out") == ("ram://", "out") and P.split("gs://b/run/x") == ("gs://b/run", "x")
  assert P.parent("gs://b/run/export/backbone") == "gs://b/run/export" and P.same("gs://b/x/", "gs://b/y/../x")


def test_relative_names_of_urls_and_of_local_files():
  assert P.common_folder(["gs://b/d/x/1.jpg", "gs://b/d/y/2.jpg"]) == "gs://b/d"
  assert S.relative_names(["gs://b/d/x/1.jpg", "gs://b/d/y/2.jpg"]) == ["x/1.jpg", "y/2.jpg"]
  assert S.relative_names(["ram://d/1.jpg"]) == ["1.jpg"]
  assert S.relative_names(["/data/a/1.jpg", "/data/b/2.jpg"]) == ["a/1.jpg", "b/2.jpg"]
  assert S.relative_names(["/data/a", "/data/a/1.jpg"]) == ["a", "a/1.jpg"]  # a file that is a prefix of another


def test_files_under_a_store_folder_skip_hidden_names_and_other_names(ram):
  for name in ("a/1.jpg", "a/b/2.PNG", "a/.3.jpg.writing-x", "a/notes.txt", "a.extra/4.jpg"):
    write(f"{ram}/{name}", "x")
  assert P.files_under(f"{ram}/a", S.IMAGE_EXTENSIONS) == [f"{ram}/a/1.jpg", f"{ram}/a/b/2.PNG"]
  assert S.find_source(f"{ram}/a").kind == "files"


def test_shipped_flagfiles_are_found_from_any_folder(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert P.resolve("flags/demo.cfg") == os.path.join(REPO, "flags", "demo.cfg")
  assert P.resolve("flags/no_such.cfg") == "flags/no_such.cfg" and P.shipped("../setup.py") is None
  (tmp_path / "flags").mkdir()
  (tmp_path / "flags" / "demo.cfg").write_text("--train_steps=3\n")
  assert P.resolve("flags/demo.cfg") == "flags/demo.cfg"  # the working directory's own comes first
  assert "demo.cfg" in P.shipped_names()
  assert P.shipped("benchmarks/torch_baseline.py") == os.path.join(REPO, "benchmarks", "torch_baseline.py")


def test_flagfiles_nest_resolve_and_read_from_a_store(tmp_path, monkeypatch, ram):
  monkeypatch.chdir(tmp_path)
  write(f"{ram}/base.cfg", "# a comment\n--flagfile=flags/demo.cfg\n// another\n\n  --train_steps=7  \n")
  args = PG.expand_flagfiles([f"--flagfile={ram}/base.cfg", "--seed=1"])
  assert args[0] == "--data=flags/demo_photos.txt" and args[-2:] == ["--train_steps=7", "--seed=1"]
  assert S.find_source(args[0].split("=", 1)[1], "package:skimage.data").description.startswith(
      f"list {os.path.join(REPO, 'flags', 'demo_photos.txt')}")
  write(f"{ram}/loop.cfg", f"--flagfile={ram}/loop.cfg\n--seed=2\n")
  assert PG.expand_flagfiles(["--flagfile", f"{ram}/loop.cfg"]) == ["--seed=2"]
  with pytest.raises(PG.flags.CantOpenFlagFileError, match=r"--flagfile=flags/dmeo.cfg: cannot read it .*flags/demo"):
    PG.expand_flagfiles(["--flagfile=flags/dmeo.cfg"])


def test_context_keras_command_lists_the_programs_and_refuses_others(capsys):
  assert CM.main(["context-keras", "--help"]) == 0
  listed = capsys.readouterr().out
  assert all(f"  {name} " in listed for name in CM.PROGRAMS) and "Trains context prediction" in listed
  assert CM.main(["context-keras", "trian"]) == 2 and "no program 'trian'" in capsys.readouterr().err
  assert set(CM.PROGRAMS) == {os.path.basename(p)[:-3] for p in glob.glob(f"{REPO}/context_keras/*.py")} - {
      "__init__", "errors"}


def test_a_store_this_tensorflow_lacks_stops_with_one_line(monkeypatch, caplog):
  def main():
    tf.io.gfile.exists("s3://bucket/run")  # no S3 file system in this TensorFlow
  monkeypatch.setattr(PG, "quiet_library_logs", lambda: None)
  monkeypatch.setattr(PG, "hold_back_native_lines", lambda: None)
  with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as stopped:
    PG._guarded(main)(["train"])  # pylint: disable=protected-access
  assert stopped.value.code == E.EXIT_USAGE
  assert "File system scheme 's3' not implemented (file: 's3://bucket/run'): TensorFlow has no file system" in (
      caplog.text)


# ----------------------------------------------------------------------------------------------------------------
# Export's guard (issue 23 item 9): a path through a missing folder and `..` names the folder it writes


def test_export_output_with_dots_is_checked_where_it_is_written(tmp_path):
  victim = tmp_path / "victim"
  victim.mkdir()
  (victim / "thesis.tex").write_text("years of work")
  with pytest.raises(E.UsageError, match="holds no export"):
    EX.check_output(str(tmp_path / "missing" / ".." / "victim"))
  assert EX.check_output(str(tmp_path / "missing" / ".." / "new")) == str(tmp_path / "new")


# ----------------------------------------------------------------------------------------------------------------
# Locks


def busy(other):
  return E.UsageError(f"in use by {other}")


def test_store_lock_keeps_a_second_process_off_until_released(ram):
  path = f"{ram}/.lock"
  first = L.lock(path, "training", busy)
  assert isinstance(first, L.StoreLock) and json.loads(read(path))["holder"] == "training"
  with pytest.raises(E.UsageError, match=rf"in use by training process {os.getpid()} on {socket.gethostname()}, "
                                         r"refreshed \d+ s ago"):
    L.lock(path, "training", busy)
  first.release()
  assert not G.exists(path)
  L.lock(path, "training", busy).release()


@pytest.mark.parametrize("record, taken", [
    ({"pid": 1, "host": "elsewhere", "refreshed": "OLD"}, True),     # not refreshed for STALE_SECONDS
    ({"pid": 1, "host": "elsewhere", "refreshed": "NOW"}, False),    # fresh, on another host: held
    ({"pid": "DEAD", "host": "HERE", "refreshed": "NOW"}, True),     # its process on this host is gone
    ("not json", True),                                              # unreadable
])
def test_stale_store_locks_are_taken_over_with_a_warning(ram, record, taken, caplog):
  if isinstance(record, dict):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout
    record = dict(record, pid=int(dead) if record["pid"] == "DEAD" else record["pid"],
                  host=socket.gethostname() if record["host"] == "HERE" else record["host"],
                  refreshed=time.time() - (L.STALE_SECONDS + 60 if record["refreshed"] == "OLD" else 5))
    record = json.dumps(dict(record, holder="training", token="theirs"))
  write(f"{ram}/.lock", record)
  if not taken:
    with pytest.raises(E.UsageError, match=r"in use by training process 1 on elsewhere, refreshed \d+ s ago"):
      L.lock(f"{ram}/.lock", "training", busy)
    return
  with caplog.at_level(logging.WARNING):
    lock = L.lock(f"{ram}/.lock", "training", busy)
  assert "Taking over the stale lock" in caplog.text and json.loads(read(f"{ram}/.lock"))["pid"] == os.getpid()
  lock.release()


def test_a_holder_that_lost_its_lock_stops_itself(ram, monkeypatch):
  stopped = []
  monkeypatch.setattr(L, "REFRESH_SECONDS", 0.05)
  monkeypatch.setattr(L.os, "kill", lambda pid, signum: stopped.append((pid, signum)))
  lock = L.lock(f"{ram}/.lock", "training", busy)
  write(f"{ram}/.lock.new", json.dumps({"token": "another", "pid": 2, "host": "h", "refreshed": time.time()}))
  G.rename(f"{ram}/.lock.new", f"{ram}/.lock", overwrite=True)  # taken over while this process was frozen
  lock._thread.join(timeout=30)  # pylint: disable=protected-access
  assert stopped and stopped[0][0] == os.getpid()
  lock.release()
  assert json.loads(read(f"{ram}/.lock"))["token"] == "another"  # not removed: it is not ours


def test_the_run_lock_names_the_flag_and_the_stale_rule(ram):
  with L.folder_lock(ram, "model_dir", "training"):
    with pytest.raises(E.UsageError, match=rf"--model_dir={ram} is in use by training process .*\(lock {ram}/.lock; "
                                           r"a lock not refreshed for 300 s is taken over\)"):
      L.folder_lock(ram, "model_dir", "training")
  assert not G.exists(f"{ram}/.lock")


# ----------------------------------------------------------------------------------------------------------------
# Atomic files and folders on a store


def test_atomic_write_replaces_a_file_whole_on_a_store(ram):
  W.atomic_write(f"{ram}/a/flags.txt", "--seed=1\n--train_steps=100\n")
  W.atomic_write(f"{ram}/a/flags.txt", "--seed=2\n")  # ram:// would append if it were opened again
  assert read(f"{ram}/a/flags.txt") == "--seed=2\n" and P.listdir(f"{ram}/a") == ["flags.txt"]


def test_check_folder_on_a_store(ram):
  assert W.check_folder(f"{ram}/new/../run", "model_dir") == f"{ram}/run" and G.isdir(f"{ram}/run")
  write(f"{ram}/file", "x")
  with pytest.raises(E.UsageError, match=f"--model_dir={ram}/file is a file"):
    W.check_folder(f"{ram}/file", "model_dir")
  assert P.listdir(f"{ram}/run") == []  # the probe is gone


def test_atomic_folder_on_a_store_replaces_and_keeps_foreign_entries(ram):
  out = f"{ram}/out"
  for name, text in {"backbone/a": "old", "stale.tflite": "old", "eval/pretext.json": "mine"}.items():
    write(f"{out}/{name}", text)
  with W.atomic_folder(out, owned=("backbone", "stale.tflite", "new.txt")) as staging:
    assert P.parent(staging) == ram and tree(out)["backbone/a"] == "old"  # readable all along
    write(f"{staging}/backbone/variables/b", "new")
    write(f"{staging}/new.txt", "new")
  assert tree(out) == {"backbone/variables/b": "new", "new.txt": "new", "eval/pretext.json": "mine"}
  assert P.listdir(ram) == ["out"]  # no staging, no commit record, no lock left


def test_atomic_folder_on_a_store_leaves_the_old_folder_on_error(ram):
  write(f"{ram}/out/a", "old")
  with pytest.raises(RuntimeError):
    with W.atomic_folder(f"{ram}/out") as staging:
      write(f"{staging}/a", "half")
      raise RuntimeError("killed midway")
  assert tree(f"{ram}/out") == {"a": "old"} and P.listdir(ram) == ["out"]


@pytest.mark.parametrize("state", ["partial", "clearing", "moving"])
def test_store_recovery_after_a_kill_at_each_step(ram, state):
  """What a kill leaves on a store: a partial folder (removed), or a commit record at its step, which readers refuse
  and the next writer completes: one complete folder, the new one, foreign entries kept, nothing left beside."""
  out = f"{ram}/out"
  write(f"{out}/a", "old")
  write(f"{out}/eval/x", "mine")
  write(f"{ram}/.out.partial-1/a", "new" if state != "partial" else "half")
  write(f"{ram}/.out.partial-1/sub/b", "new")
  expected = {"a": "new", "sub/b": "new", "eval/x": "mine"}
  if state == "partial":
    expected = {"a": "old", "eval/x": "mine"}
  else:
    if state == "moving":  # the old entry cleared, one new file moved in
      G.remove(f"{out}/a")
      G.makedirs(f"{out}/sub")
      G.rename(f"{ram}/.out.partial-1/sub/b", f"{out}/sub/b")
    W.atomic_write_json(f"{ram}/.out.commit-1", {"phase": "clear" if state == "clearing" else "move",
                                                 "owned": ["a", "sub"]})
    with pytest.raises(E.UsageError, match=rf"--saved_model={out}/backbone: {out} is being replaced"):
      W.check_complete(f"{out}/backbone", "saved_model")
  W.recover_folders(ram)  # as training does for RUN/export; the record says what the export owns
  assert tree(out) == expected and P.listdir(ram) == ["out"]
  W.check_complete(f"{out}/backbone", "saved_model")


def test_copy_tree_between_file_systems(ram, tmp_path):
  (tmp_path / "extra" / "deep").mkdir(parents=True)
  (tmp_path / "extra" / "deep" / "x.json").write_text("{}")
  W.copy_tree(str(tmp_path / "extra"), f"{ram}/copy")
  assert tree(f"{ram}/copy") == {"deep/x.json": "{}"}


def test_the_ablation_keeps_each_training_log_in_its_run_on_a_store(ram, monkeypatch):
  def fake_training(command, stdout, stderr, check):
    del stderr, check
    stdout.write(f"training {command[-2]}\nFATAL the last line\n".encode())
    return subprocess.CompletedProcess(command, 1 if "fails" in command[-2] else 0)
  monkeypatch.setattr(AB.subprocess, "run", fake_training)
  # No ablation flags are parsed in this process.
  monkeypatch.setattr(AB, "run_flags", lambda variant, seed: {"seed": seed})
  monkeypatch.setattr(AB, "training_args", lambda variant, seed, run: [f"--model_dir={run}", f"--seed={seed}"])
  AB.train_run("baseline", 0, f"{ram}/runs/baseline_s0")
  assert read(f"{ram}/runs/baseline_s0/ablation_train.log").startswith(f"training --model_dir={ram}/runs/baseline_s0")
  assert json.loads(read(f"{ram}/runs/baseline_s0/{AB.RUN_FILE}"))["flags"] == {"seed": 0}  # the reuse key
  with pytest.raises(E.UsageError, match=rf"exit code 1: FATAL the last line \(log: {ram}/runs/fails/ablation"):
    AB.train_run("baseline", 0, f"{ram}/runs/fails")


# ----------------------------------------------------------------------------------------------------------------
# The log on a store


def test_log_on_a_store_appends_every_invocation(ram, monkeypatch):
  monkeypatch.setattr(LG, "UPLOAD_SECONDS", 0.05)
  logger = logging.getLogger(f"test_{uuid.uuid4().hex}")
  for invocation in ("first", "second"):
    handler = LG.handler(f"{ram}/train.log")
    logger.addHandler(handler)
    logger.warning("%s invocation starts", invocation)
    deadline = time.time() + 30
    while invocation not in (read(f"{ram}/train.log") if G.exists(f"{ram}/train.log") else ""):
      assert time.time() < deadline, "the log was not uploaded while the program ran"
      time.sleep(0.05)
    logger.warning("%s invocation ends", invocation)
    logger.removeHandler(handler)
    handler.close()
  lines = [line.split(" WARNING ", 1)[1] for line in read(f"{ram}/train.log").splitlines()]
  assert lines == ["first invocation starts", "first invocation ends", "second invocation starts",
                   "second invocation ends"]


# ----------------------------------------------------------------------------------------------------------------
# No module reaches a user path except through storage/


# Calls that work on local paths only (or turn gs://b/x into gs:/b/x): allowed only where named below, and on the
# package's own files (an argument that mentions __file__ or _PACKAGE) or on a constant path (/proc, /sys).
LOCAL_ONLY = {"open", "os.walk", "os.makedirs", "os.mkdir", "os.listdir", "os.scandir", "os.remove", "os.unlink",
              "os.rename", "os.replace", "os.rmdir", "os.stat", "os.path.exists", "os.path.lexists", "os.path.isdir",
              "os.path.isfile", "os.path.getsize", "os.path.getmtime", "os.path.abspath", "os.path.realpath",
              "os.path.normpath", "os.path.relpath", "os.path.commonpath", "glob.glob", "glob.iglob", "Path",
              "pathlib.Path", "fcntl.flock"}
LOCAL_MODULES = ("shutil.", "fcntl.")
ALLOWED = {
    # The local branches of the storage room, each doing what tf.io.gfile cannot: fsync before an atomic rename,
    # flock, renaming a whole folder at once, not following a symlink loop, normalising a local path.
    ("storage/writes.py", "atomic_write"): "fsync, then os.replace (atomic on POSIX)",
    ("storage/writes.py", "_commit"): "a local folder replaced by two renames",
    ("storage/writes.py", "recover_folder"): "the local branch of the same",
    ("storage/writes.py", "atomic_folder"): "realpath: a symlinked local folder is replaced where it lies",
    ("storage/locks.py", "FileLock.__init__"): "flock on the local lock file",
    ("storage/locks.py", "FileLock.release"): "removing the local lock file",
    ("storage/paths.py", "normalise"): "abspath of a local path (URLs are tidied without it)",
    ("storage/paths.py", "relative"): "relpath between local paths",
    ("storage/paths.py", "common_folder"): "commonpath of local paths",
    ("storage/paths.py", "_local_files_under"): "os.walk with a guard against symlink loops",
    ("storage/paths.py", "identity"): "a local file's inode and mtime in ns (tf.io.gfile's stat has seconds)",
    ("storage/paths.py", "shipped"): "the package's own files",
    ("storage/paths.py", "shipped_names"): "the package's own files",
}


def _dotted(node):
  if isinstance(node, ast.Name):
    return node.id
  if isinstance(node, ast.Attribute):
    inner = _dotted(node.value)
    return f"{inner}.{node.attr}" if inner else None
  return None


def local_only_calls(path):
  """(qualified function name, dotted call, line) of every local-only call in a module outside ALLOWED."""
  found = []

  def visit(node, scope):
    for child in ast.iter_child_nodes(node):
      inner = scope
      if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        inner = f"{scope}.{child.name}" if scope else child.name
      if isinstance(child, ast.Call):
        name = _dotted(child.func) or ""
        if name in LOCAL_ONLY or name.startswith(LOCAL_MODULES):
          source = ast.unparse(child.args[0]) if child.args else ""
          constant = child.args and isinstance(child.args[0], ast.Constant)
          if not (constant or "__file__" in source or "_PACKAGE" in source):
            found.append((inner, name, child.lineno))
      visit(child, inner)

  with open(path, encoding="utf-8") as f:
    visit(ast.parse(f.read()), "")
  return found


def test_no_module_reaches_a_user_path_but_through_the_storage_room():
  package = os.path.join(REPO, "context_keras")
  offending, used = [], set()
  for path in glob.glob(os.path.join(package, "**", "*.py"), recursive=True):
    module = os.path.relpath(path, package)
    for scope, name, line in local_only_calls(path):
      if (module, scope) in ALLOWED:
        used.add((module, scope))
      else:
        offending.append(f"{module}:{line} {scope}: {name}")
  assert not offending, "local-only file calls (use tf.io.gfile or context_keras.storage): " + "; ".join(offending)
  assert used == set(ALLOWED), f"allowed but unused (remove them): {set(ALLOWED) - used}"


def test_the_static_check_catches_what_it_should(tmp_path):
  sample = tmp_path / "sample.py"
  sample.write_text("import os, shutil, glob\n"
                    "def load(model_dir):\n  return open(os.path.join(model_dir, 'x'))\n"
                    "class Run:\n  def clean(self, d):\n    shutil.rmtree(d)\n    os.path.abspath(d)\n"
                    "def fine():\n  return open('/proc/meminfo'), os.path.abspath(__file__), glob.has_magic('x')\n")
  assert [(scope, name) for scope, name, _ in local_only_calls(sample)] == [
      ("load", "open"), ("Run.clean", "shutil.rmtree"), ("Run.clean", "os.path.abspath")]


# ----------------------------------------------------------------------------------------------------------------
# In a subprocess each: a whole run on ram://, and the installed wheel


@pytest.mark.slow
def test_a_run_lives_wholly_on_a_store(tmp_path):
  """prepare, train (stopped by its quit file, resumed), export and evaluate with every path on ram:// (one process:
  tests/ram_round_trip.py); nothing lands in a local folder named after the URL (ram:/...)."""
  result = run_module([os.path.join(REPO, "tests", "ram_round_trip.py"), str(tmp_path)], cwd=REPO, timeout=900)
  assert result.returncode == 0, result.stderr[-5000:]
  found = json.loads(result.stdout.strip().splitlines()[-1])
  assert found["prepare"] == 0 and [n for n in found["shards"] if n.endswith(".tfrecord")] == [
      "train-00000-of-00002.tfrecord", "train-00001-of-00002.tfrecord"] and "index.json" in found["shards"]
  assert found["train_stopped"] == 0 and found["train_resumed"] == 0
  stopped = max(found["stopped_at"])
  assert 2 <= stopped < 1000 and f"ckpt-{found['steps']}.index" in found["run"]
  assert {"flags.txt", "config.json", "train.log", "checkpoint"} <= set(found["run"]) and ".lock" not in found["run"]
  assert found["run_export"] == [f"backbone_{found['steps']}"]
  log = found["log"]
  assert "Starting a new run in ram://runs/demo." in log and f"Stopped at step {stopped} (quit file" in log
  assert f"Resumed from ram://runs/demo/ckpt-{stopped} at step {stopped}." in log
  assert f"Training finished at step {found['steps']}." in log
  assert "--model_dir=ram://runs/demo" in found["flags"]
  assert found["export"] == 0 and found["out"] == ["backbone", "backbone.keras", "context_model.keras",
                                                   "pair_classifier"]
  assert found["evaluate"] == 0 and "pretext.json" in found["evals"]
  assert found["pretext"]["saved_model"] == "ram://out/backbone" and found["pretext"]["pairs"] > 0
  assert found["local"] == []  # no local ram:/... folder


@pytest.mark.slow
def test_the_wheel_installs_and_its_programs_run_from_any_folder(tmp_path):
  """pip install of the built wheel (offline, no dependencies: the environment's own are reused through a .pth
  file) into a fresh venv; from a folder outside the clone, `context-keras train --help` and two steps of
  flags/demo.cfg, which names the shipped flags/demo_photos.txt."""
  source = tmp_path / "source"
  shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", "__pycache__", "build", "*.egg-info", "runs",
                                                              "tests"))
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                          "-w", str(tmp_path / "wheels"), str(source)], capture_output=True, text=True, env=env,
                         timeout=600)
  assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
  python = venv / "bin" / "python"
  site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        capture_output=True, text=True, check=True).stdout.strip()
  # This environment's packages (TensorFlow, scikit-image, pip), after the venv's own: the wheel's package wins.
  with open(os.path.join(site, "environment.pth"), "w", encoding="utf-8") as f:
    f.write("\n".join(p for p in sys.path if p.endswith("site-packages")) + "\n")
  installed = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index",
                              *glob.glob(str(tmp_path / "wheels" / "context_keras-*.whl"))], capture_output=True,
                             text=True, env=env, timeout=600)
  assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  command = str(venv / "bin" / "context-keras")  # its --help: test_context_keras_command_lists_the_programs...
  helped = subprocess.run([command, "train", "--help"], cwd=elsewhere, capture_output=True, text=True, env=env,
                          timeout=300)
  assert helped.returncode == 0 and "--model_dir" in helped.stdout, helped.stderr[-3000:]
  trained = subprocess.run([command, "train", "--flagfile=flags/demo.cfg", "--model_dir=run", "--train_steps=2",
                            *SMALL_MODEL, "--steps_per_loop=2", "--log_every=2"], cwd=elsewhere, capture_output=True,
                           text=True, env=dict(env, TF_CPP_MIN_LOG_LEVEL="2"), timeout=600)
  log = trained.stdout + trained.stderr
  assert trained.returncode == 0, log[-5000:]
  shipped = os.path.join(site, "context_keras", "flags", "demo_photos.txt")
  assert f"Data: list {shipped} (18 images)" in log and "Training finished at step 2." in log, log[-5000:]
  assert (elsewhere / "run" / "ckpt-2.index").exists() and (elsewhere / "run" / "export" / "backbone_2").is_dir()
  shipped = os.path.join(site, "context_keras")  # what else the benchmark and the other flagfiles open
  assert os.path.isfile(os.path.join(shipped, "benchmarks", "torch_baseline.py"))
  assert {os.path.basename(p) for p in glob.glob(os.path.join(REPO, "flags", "*"))} == set(
      os.listdir(os.path.join(shipped, "flags"))) - {"__pycache__"}
