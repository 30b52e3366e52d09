"""What each program answers to a wrong command line: a mistyped flag, a bad value, a path that is nothing, a run or
an export it cannot use, a file it may not read; and --help, and every flag's help, and the flagfiles of flags/.
Each refusal exits 2 with a one-line message naming the flag and the path, without a traceback, and leaves the runs
it was pointed at as they were, byte for byte.

One process per program runs all of that program's command lines (helpers.run_cases): a fresh interpreter costs
6-8 s of importing TensorFlow, which is all that most of these checks would otherwise spend. One command line of
each program also runs in a true `python -m` process of its own, so that the program's own start-up is exercised.
"""
import glob
import json
import os
import re
import shutil
import warnings

import numpy as np
import pytest

from helpers import REPO
from helpers import demo_args
from helpers import log_of
from helpers import peak_mb
from helpers import run_cases
from helpers import run_state
from helpers import write_png
from test_bad_inputs import PEAK_RSS_LIMIT_MB
from test_bad_inputs import _write_shard
from test_bad_inputs import write_bad_folder

pytestmark = pytest.mark.slow

DEMO = [f"--data={REPO}/flags/demo_photos.txt", "--data_root=package:skimage.data"]


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
  """test_bad_inputs' folder of broken, odd and hostile image files."""
  folder = tmp_path_factory.mktemp("bad") / "images"
  write_bad_folder(folder)
  return folder


def train_args(model_dir, *extra):
  """The arguments of helpers.demo_args after the program's name."""
  return demo_args(model_dir, *extra)[1:]


def flagfile_program(name):
  """The program a flagfile in flags/ is written for: linear_*.cfg linear_eval's, ablation_*.cfg ablation's,
  *_detection.cfg detect's, the others train's."""
  if name.endswith("_detection.cfg"):
    return "detect"
  return {"linear": "linear_eval", "ablation": "ablation"}.get(name.split("_")[0], "train")


def flagfiles_of(program):
  return sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, "flags", "*.cfg"))
                if flagfile_program(os.path.basename(p)) == program)


def test_every_flagfile_is_checked_by_its_program():
  names = {os.path.basename(p) for p in glob.glob(os.path.join(REPO, "flags", "*.cfg"))}
  assert {"demo.cfg", "deepcontext.cfg", "paper.cfg", "revisiting_resnet50.cfg", "demo_revisiting.cfg",
          "linear_imagenet.cfg", "ablation_demo.cfg", "mundhenk.cfg", "voc07_detection.cfg"} <= names
  assert sorted(names) == sorted(sum((flagfiles_of(p) for p in ("train", "linear_eval", "ablation", "detect")), []))


def assert_flags_and_flagfiles(help_of, problems, program):
  """Every flag has help; every flagfile of the program uses its flags only, with values that parse, keep their
  bounds and make its configuration."""
  assert help_of, program
  for flag, text in help_of.items():
    assert text and len(text) > 15, (program, flag)
  assert sorted(problems) == flagfiles_of(program)
  for flagfile, problem in problems.items():
    assert problem is None, (flagfile, problem)


def assert_help(result, present, absent):
  """--help lists a program's flags under their groups, and nothing it does not use."""
  assert result.returncode == 0, log_of(result)[-2000:]
  for word in present:
    assert word in result.stdout, word
  for flag in absent:
    assert not re.search(rf"^  {flag}$", result.stdout, re.M), flag


def assert_refused(result, message):
  assert result.returncode == 2, (message, log_of(result)[-3000:])
  assert message in log_of(result) and "Traceback" not in log_of(result), (message, log_of(result)[-3000:])


def permission_cases(file_permissions, cases):
  """`cases` where file permissions can be made to hold for the programs' processes, else none (with a warning)."""
  enforced, why = file_permissions
  if not enforced:
    warnings.warn(f"left out, {why}: {', '.join(cases)}")
    return {}
  return cases


# ------------------------------------------------------------------------------------------------------------
# train


def test_train(small_run, bad_folder, file_permissions, tmp_path):
  """Bad values and bounds (all violations reported at once), bad data of every kind, a run of another architecture,
  warm starts that do not fit, run directories that are a file or may not be used: each a refusal at start that
  keeps the run (its checkpoints, state file, flags.txt and exports) byte for byte; and a finished run resumed with
  other flags, which trains nothing and keeps the run too."""
  typo = tmp_path / "typo.cfg"
  typo.write_text(f"--flagfile={REPO}/flags/demo.cfg\n--lerning_rate=0.1\n")
  (tmp_path / "empty").mkdir()
  (tmp_path / "missing.txt").write_text("gone.jpg\nalso_gone.png\n")
  all_bad = tmp_path / "all_bad"
  all_bad.mkdir()
  for name in ("corrupt.jpg", "empty.jpg", "bomb.webp", "thin.png"):
    shutil.copy(bad_folder / name, all_bad / name)
  shards = tmp_path / "broken_shards"
  shards.mkdir()
  (shards / "0.tfrecord").write_text("not a shard\n")
  _write_shard(shards / "1.tfrecord")
  whole = (shards / "1.tfrecord").read_bytes()
  (shards / "1.tfrecord").write_bytes(whole[:12 + int.from_bytes(whole[:8], "little") // 2])  # in its 1st record
  # Each pointed at a copy of the small run, which it must leave as it was.
  on_a_run = {
      "--train_steps=-5": "Invalid flags: --train_steps=-5 must be >= 0",
      ("--momentum=1.5", "--seed=-1", "--bn_momentum=2", "--weight_decay=-1", "--divergence_factor=-1",
       "--learning_rate=inf", "--steps_per_loop=3000000000"):
          ("Invalid flags: --bn_momentum=2.0 must be < 1; --learning_rate=inf must be a finite number; --momentum=1.5 "
           "must be < 1; --weight_decay=-1.0 must be >= 0; --divergence_factor=-1.0 must be >= 0; --steps_per_loop="
           "3000000000 must be <= 2147483647; --seed=-1 must be >= 0"),
      ("--lr_schedule=cosine", "--warmup_steps=10", "--train_steps=10"):
          "Invalid flags: --warmup_steps=10 is not less than --train_steps=10",
      "--checkpoint_every=0": "Invalid flags: --checkpoint_every=0 must be >= 1",
      "--batch_patches=8": "--batch_patches=8 cannot hold the largest grid",
      "--backbone=resnet51": "flag --backbone=resnet51: value should be one of <alexnet_bn|resnet18|resnet34|resnet50|",
      f"--flagfile={typo}": "Unknown command line flag 'lerning_rate'. Did you mean: learning_rate ?",
      f"--data={tmp_path / 'empty'}": f"folder {tmp_path / 'empty'} holds no jpg/jpeg/png",
      f"--data={tmp_path / 'missing.txt'}": f"none of the 2 images tried can be used (first problem: "
                                            f"{tmp_path / 'gone.jpg'}; No such file or directory",
      f"--data={all_bad}": f"--data=folder {all_bad} (4 images): none of the 4 images tried can be used",
      f"--data={shards}/*.tfrecord": f"(first problem: {shards}/1.tfrecord record 0: {shards}/1.tfrecord is corrupt "
                                     "or cut short after 0 readable records)",
      "--width_multiplier=0.125": "Invalid flags: --width_multiplier=0.125 (the run: 0.0625): --model_dir={run} holds "
                                  "a run of another architecture ({run}/config.json)",
      "--batch_patches=100000000": "Invalid flags: --batch_patches=100000000 and --batch_pairs=320 need about",
      "--rotation_classes": "Invalid flags: --rotation_classes=True (the run: False): --model_dir={run} holds a run "
                            "of another architecture ({run}/config.json)",
      # Flags that change what the checkpoint's variables mean, compared with config.json before anything is built
      # (they were a warning per checkpoint value, then a tensor shape, or accepted with config.json rewritten).
      "--geometry=revisiting": "Invalid flags: --geometry=revisiting (the run: doersch): --model_dir={run} holds a "
                               "run of another architecture ({run}/config.json)",
      "--head=revisiting": "Invalid flags: --head=revisiting (the run: doersch): --model_dir={run} holds a run of "
                           "another architecture ({run}/config.json)",
      # The run's momentum slots would be left unrestored (or missing): the optimizer's state is compared too.
      "--momentum=0": "Invalid flags: --momentum=0.0 (the run: 0.9): --model_dir={run} holds a run of another "
                      "optimizer state ({run}/config.json)",
  }
  runs, cases, messages = [], [], []
  for flags, message in on_a_run.items():
    flags = [flags] if isinstance(flags, str) else list(flags)
    runs.append(tmp_path / f"run_{len(runs)}")
    shutil.copytree(small_run, runs[-1])
    cases.append(train_args(runs[-1], *flags, *(["--data_root="] if flags[0].startswith("--data=") else [])))
    messages.append(message.format(run=runs[-1]))
  real = list(on_a_run).index(f"--flagfile={typo}")  # an absl parsing error, in a `python -m` process
  state = run_state(small_run)
  # A fresh run directory each; a warm start from a run of another width names the layer that does not fit.
  for flags, message in {("--data=/no/such/folder",): "/no/such/folder does not exist",
                         ("--train_steps=-3",): "--train_steps=-3 must be >= 0",
                         ("--lr_schedule=cosine", "--train_steps=0"): "needs --train_steps",
                         ("--batch_patches=4",): "--batch_patches=4 cannot hold",
                         ("--train_steps=2", f"--init_from={small_run}", "--width_multiplier=0.125"):
                             "layer conv1's kernel has shape (11, 11, 3, 6) there but (11, 11, 3, 12)"}.items():
    cases.append(train_args(tmp_path / f"fresh_{len(cases)}", *flags))
    messages.append(message)
  (tmp_path / "a_file").write_text("not a folder")
  cases.append(train_args(tmp_path / "a_file"))
  messages.append("is a file")
  # Run directories that are a file, or that may not be used (each of the first two holding a run) or made: refused
  # by name before any TensorFlow work.
  unusable = permission_cases(file_permissions, {
      "a_file": (0o644, "is a file, not a directory"),
      "unreadable": (0o000, "is not usable (it must be readable and writable): Permission denied"),
      "read_only": (0o555, "is not usable (it must be readable and writable): Permission denied"),
      "read_only_parent/run": (0o555, "is not usable (it must be readable and writable): Permission denied")})
  states = {}
  for name in ("unreadable", "read_only"):
    if name in unusable:
      shutil.copytree(small_run, tmp_path / name)
      states[name] = run_state(tmp_path / name)
  (tmp_path / "read_only_parent").mkdir()
  first_unusable = len(cases)
  for name, (_, message) in unusable.items():
    cases.append(train_args(tmp_path / name, "--train_steps=8"))
    messages.append(f"--model_dir={tmp_path / name} {message}")
  # Resuming a finished run (its --train_steps reached) with other flags does nothing, and rewrites nothing:
  # flags.txt and config.json keep saying how the checkpoints were made.
  finished = tmp_path / "finished"
  shutil.copytree(small_run, finished)
  cases.append(train_args(finished, "--train_steps=10", "--learning_rate=0.5", f"--init_from={small_run}"))
  cases.append(["--help"])
  try:
    for name, (mode, _) in unusable.items():
      (tmp_path / name.split("/")[0]).chmod(mode)
    help_of, problems, results = run_cases("train", cases, preexec=file_permissions[1] if unusable else None,
                                           flagfiles=flagfiles_of("train"), real=real)
  finally:
    for name in unusable:
      (tmp_path / name.split("/")[0]).chmod(0o755)
  assert_flags_and_flagfiles(help_of, problems, "train")
  assert_help(results.pop(), ["data:", "model:", "optimisation:", "run:", "--data", "--width_multiplier",
                              "--learning_rate", "--model_dir"], [])
  resumed = results.pop()
  assert resumed.returncode == 0 and "Traceback" not in log_of(resumed), log_of(resumed)[-3000:]
  assert f"Step 10 of {finished}/ckpt-10 already reaches --train_steps=10: nothing to train." in log_of(resumed)
  assert (f"--init_from={small_run} is not used: --model_dir={finished} holds a checkpoint (ckpt-10), which the run "
          "resumes from.") in log_of(resumed)
  assert run_state(finished) == state  # flags.txt and config.json included
  for i, (message, result) in enumerate(zip(messages, results)):
    assert_refused(result, message)
    assert "Value in checkpoint could not be found" not in log_of(result), log_of(result)[-3000:]
    if i >= first_unusable:
      assert "Strategy:" not in log_of(result) and "Data:" not in log_of(result), log_of(result)[-3000:]
  for run in runs:
    assert run_state(run) == state, run
  assert run_state(small_run) == state
  for name, run_files in states.items():
    assert run_state(tmp_path / name) == run_files, name
  assert not (tmp_path / "read_only_parent" / "run").exists()


# ------------------------------------------------------------------------------------------------------------
# evaluate


@pytest.fixture(scope="module")
def labelled_folders(tmp_path_factory, bad_folder):
  """Labelled folders (one subfolder of images per class): a good one with one class, and two classes with one bad
  file each: corrupt, a bomb, unreadable (mode 000)."""
  root = tmp_path_factory.mktemp("labelled")
  for case, bad in (("one_class", None), ("corrupt", "corrupt.jpg"), ("bomb", "bomb20k.png"),
                    ("unreadable", "rocket.jpg")):
    for label, source in (("grey", "grey.png"), ("rgba", "rgba.png"))[:1 if case == "one_class" else 2]:
      (root / case / label).mkdir(parents=True)
      for i in range(5):
        shutil.copy(bad_folder / source, root / case / label / f"{i}.png")
    if bad:
      shutil.copy(bad_folder / bad, root / case / "rgba" / f"bad{os.path.splitext(bad)[1]}")
  (root / "unreadable" / "rgba" / "bad.jpg").chmod(0)
  return root


def test_evaluate(small_run, labelled_folders, file_permissions, tmp_path):
  """Sources given twice or not fitting the run, too few folds or classes, unknown layers, labelled folders with a
  single class or a bad image (which must not be decoded: peak memory), a run directory the user may not write."""
  # A single class, or a corrupt, bomb or unreadable image in a class: a message naming the folder or the file.
  # First in the process, so that its peak memory so far is theirs.
  labelled = permission_cases(file_permissions, {
      "one_class": "needs at least 2 subfolders of images (classes) in {root}; found 1",
      "corrupt": "{root}/rgba/bad.jpg cannot be used: jpeg::Uncompress failed",
      "bomb": "{root}/rgba/bad.png cannot be used: image header claims more pixels than MAX_DECODE_PIXELS",
      "unreadable": "{root}/rgba/bad.jpg cannot be used: {root}/rgba/bad.jpg; Permission denied"})
  cases = [["--mode=linear", f"--model_dir={small_run}", f"--data={labelled_folders / case}",
            f"--eval_dir={tmp_path / case}", "--folds=2", "--inner_folds=2", "--probe_epochs=5"] for case in labelled]
  messages = [message.format(root=labelled_folders / case) for case, message in labelled.items()]
  # A run directory of another width given as --checkpoint, and flags that do not fit together.
  other_width = tmp_path / "other_width"
  shutil.copytree(small_run, other_width)
  config = json.loads((other_width / "config.json").read_text())
  config["model"]["width_multiplier"] = 0.125
  (other_width / "config.json").write_text(json.dumps(config))
  tool_typo = tmp_path / "tool_typo.cfg"
  tool_typo.write_text(f"--data={REPO}/flags/demo_photos.txt\n--sead=3\n")
  (tmp_path / "no_classes").mkdir()
  refusals = {
      ("--mode=pretext", "--model_dir=a", "--saved_model=b", "--data=c"): "exactly one of --model_dir",
      ("--mode=linear", f"--model_dir={small_run}", f"--data={tmp_path}", "--folds=1"):
          "Invalid flags: --folds=1 must be >= 2",
      ("--mode=linear", f"--model_dir={small_run}", f"--data={tmp_path / 'no_classes'}"): "needs at least 2 subfolders",
      ("--mode=neighbors", f"--model_dir={small_run}", "--data=x", "--layer=fc7"): "--layer=fc7 is not one of",
      ("--mode=pretext", f"--model_dir={small_run}", f"--checkpoint={other_width}/ckpt-10", *DEMO,
       f"--eval_dir={tmp_path / 'e'}"):
          f"--checkpoint={other_width}/ckpt-10 belongs to the run in {other_width}, trained with "
          "--width_multiplier=0.125 (--model_dir's run: 0.0625)",
      (f"--flagfile={tool_typo}",): "Unknown command line flag 'sead'",
  }
  real = len(cases)  # the two sources
  cases += [list(args) for args in refusals]
  messages += list(refusals.values())
  state = run_state(small_run)
  # A run directory the user may not write (a colleague's, a read-only mount): evaluate stops at once, before
  # evaluating, saying that --eval_dir picks another folder; given one, it evaluates.
  read_only = tmp_path / "read_only_run"
  pretext = ["--mode=pretext", f"--model_dir={read_only}", *DEMO, "--images=2", "--pairs_per_image=4"]
  on_read_only = bool(permission_cases(file_permissions, {"read_only_run": None}))
  if on_read_only:
    shutil.copytree(small_run, read_only, ignore=shutil.ignore_patterns("eval"))
    read_only_state = run_state(read_only)
    cases += [pretext, pretext + [f"--eval_dir={tmp_path / 'eval'}"]]
  cases.append(["--help"])
  if on_read_only:
    read_only.chmod(0o555)
  try:
    help_of, problems, results = run_cases("evaluate", cases, cwd=tmp_path, real=real,
                                           preexec=file_permissions[1] if file_permissions[0] else None)
  finally:
    if on_read_only:
      read_only.chmod(0o755)
  assert_flags_and_flagfiles(help_of, problems, "evaluate")
  assert_help(results.pop(), ["evaluation:", "data:", "--mode", "--data", "--color_mode"],
              ["--batch_pairs", "--train_steps"])
  for i, (message, result) in enumerate(zip(messages, results)):
    assert_refused(result, message)
    assert "Value in checkpoint could not be found" not in log_of(result), log_of(result)[-3000:]
    if i < len(labelled):
      assert peak_mb(result.stderr) < PEAK_RSS_LIMIT_MB, (i, peak_mb(result.stderr))
  assert run_state(small_run) == state
  if on_read_only:
    refused, evaluated = results[len(messages):]
    assert_refused(refused, f"The results go to {read_only}/eval unless --eval_dir names another folder, and that "
                            "one cannot be written (Permission denied): give --eval_dir=A_WRITABLE_FOLDER")
    assert '"mode": "pretext"' not in log_of(refused)  # refused before evaluating
    assert evaluated.returncode == 0, log_of(evaluated)[-3000:]
    assert json.loads(evaluated.stdout.strip().splitlines()[-1])["pairs"] == 8
    assert (tmp_path / "eval" / "pretext.json").exists() and run_state(read_only) == read_only_state


# ------------------------------------------------------------------------------------------------------------
# export


def test_export(small_run, tmp_path):
  """Paths that are nothing, a checkpoint that is not there or whose files vanished, a run whose config.json says
  another architecture than its checkpoints, an --output folder that holds something else: refused, nothing
  written."""
  misrecorded = tmp_path / "misrecorded"
  shutil.copytree(small_run, misrecorded)
  config = json.loads((misrecorded / "config.json").read_text())
  config["model"]["width_multiplier"] = 0.125
  (misrecorded / "config.json").write_text(json.dumps(config))
  vanished = tmp_path / "vanished"
  shutil.copytree(small_run, vanished)
  for data in glob.glob(str(vanished / "ckpt-5.data-*")):
    os.remove(data)
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "thesis.tex").write_text("precious")
  refusals = {
      (f"--model_dir={tmp_path / 'nowhere'}", f"--output={tmp_path / 'o1'}"): "does not exist",
      (f"--model_dir={small_run}", f"--output={tmp_path / 'o2'}", "--checkpoint=7"): "--checkpoint=7: no checkpoint",
      (f"--model_dir={small_run}", f"--output={tmp_path / 'o3'}", f"--rescale_data={tmp_path / 'none'}"):
          "does not exist",
      (f"--model_dir={misrecorded}", f"--output={tmp_path / 'o4'}"):
          f"checkpoint {misrecorded}/ckpt-10 does not match the run's architecture",
      (f"--model_dir={vanished}", f"--output={tmp_path / 'o5'}", "--checkpoint=5"): "--checkpoint=5:",
      (f"--model_dir={small_run}", f"--output={tmp_path / 'mine'}"): "holds no export",
  }
  state = run_state(small_run)
  help_of, problems, results = run_cases("export", [*map(list, refusals), ["--help"]], cwd=tmp_path, real=0)
  assert_flags_and_flagfiles(help_of, problems, "export")
  assert_help(results.pop(), ["export:", "rescaling:", "--model_dir", "--rescale_data", "--data_root"],
              ["--batch_pairs", "--learning_rate", "--data"])
  for message, result in zip(refusals.values(), results):
    assert_refused(result, message)
  assert "ckpt-10" in log_of(results[4])  # the checkpoint that is there
  assert not [i for i in range(1, 6) if (tmp_path / f"o{i}").exists()]
  assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
  assert run_state(small_run) == state


# ------------------------------------------------------------------------------------------------------------
# prepare


def test_prepare(bad_folder, tmp_path):
  photos = tmp_path / "photos"
  photos.mkdir()
  write_png(str(photos / "a.png"), np.zeros((200, 300, 3), np.uint8))
  (tmp_path / "empty").mkdir()
  (tmp_path / "file").write_text("not a folder")
  tool_typo = tmp_path / "tool_typo.cfg"
  tool_typo.write_text(f"--data={REPO}/flags/demo_photos.txt\n--sead=3\n")
  all_bad = tmp_path / "all_bad"
  all_bad.mkdir()
  for name in ("corrupt.jpg", "empty.jpg", "bomb.webp", "thin.png"):
    shutil.copy(bad_folder / name, all_bad / name)
  refusals = {
      (f"--data={photos}", f"--output={tmp_path / 'out'}", "--num_shards=0"): "--num_shards=0 must be >= 1",
      (f"--data={photos}", f"--output={tmp_path / 'out'}"): "--num_shards is required",
      (f"--data={photos}", f"--output={tmp_path / 'file'}", "--num_shards=1"): "is a file",
      (f"--data={photos}", f"--output={tmp_path / 'file' / 'out'}", "--num_shards=1"): "is not usable",
      (f"--data={tmp_path / 'missing'}", f"--output={tmp_path / 'out'}", "--num_shards=1"): "does not exist",
      (f"--data={tmp_path / 'empty'}", f"--output={tmp_path / 'out'}", "--num_shards=1"): "holds no",
      (f"--output={tmp_path / 'out'}", "--num_shards=1"): "--data is required",
      (f"--flagfile={tool_typo}",): "Unknown command line flag 'sead'",
      (f"--data={all_bad}", f"--output={tmp_path / 'shards'}", "--num_shards=1"):
          f"--data={all_bad}: none of the 4 images is usable (reasons in {tmp_path / 'shards'}/rejected.txt)",
  }
  help_of, problems, results = run_cases("prepare", [*map(list, refusals), ["--help"]], cwd=tmp_path, real=0)
  assert_flags_and_flagfiles(help_of, problems, "prepare")
  assert_help(results.pop(), ["data:", "prepare:", "--data", "--num_shards"], ["--batch_pairs", "--learning_rate"])
  for message, result in zip(refusals.values(), results):
    assert_refused(result, message)
    assert message in result.stderr


# ------------------------------------------------------------------------------------------------------------
# linear_eval, ablation, detect, benchmark, service


def test_linear_eval():
  """(Its refusal of a labels file naming missing images runs in test_linear_eval, in a process of its own.)"""
  help_of, problems, _ = run_cases("linear_eval", [], flagfiles=flagfiles_of("linear_eval"))
  assert_flags_and_flagfiles(help_of, problems, "linear_eval")


def test_ablation():
  """flags/ablation_demo.cfg and flags/mundhenk.cfg parse (every flag known, every value valid) before the check of
  --variants stops the program; the fixes with the revisiting geometry, and a fix given to the ablation itself, are
  refused before the baseline trains (method.md §9.7, §9.9)."""
  refusals = {("--flagfile=flags/ablation_demo.cfg", "--flagfile=flags/mundhenk.cfg", "--variants=baseline,nonsense"):
              "--variants=baseline,nonsense: unknown nonsense",
              ("--flagfile=flags/ablation_demo.cfg", "--geometry=revisiting", "--variants=baseline,flip"):
              "--variants=flip do not work with --geometry=revisiting",
              # A fix given to the ablation itself would be in every variant, the baseline included.
              **{("--flagfile=flags/ablation_demo.cfg", fix): "is one of the fixes the variants compare"
                 for fix in ("--rotation_classes", "--color_mode=chroma_blur", "--flagfile=flags/mundhenk.cfg")}}
  help_of, problems, results = run_cases("ablation", list(map(list, refusals)), cwd=REPO,
                                         flagfiles=flagfiles_of("ablation"), real=0)
  assert_flags_and_flagfiles(help_of, problems, "ablation")
  for message, result in zip(refusals.values(), results):
    assert_refused(result, message)


def test_detect(tmp_path):
  """flags/voc07_detection.cfg parses and makes a detector configuration; --help lists the groups; a subject given
  twice, no --data, and a --data folder that is not a VOCdevkit are refused in one line before any backbone is
  loaded (RUN does not exist). Its data's other refusals: test_detection and test_detection_tfds."""
  (tmp_path / "photos").mkdir()
  refusals = {
      ("--model_dir=RUN", f"--eval_dir={tmp_path / 'e1'}"):
          "--data is required: a VOCdevkit folder (VOCdevkit/VOC2007) or tfds:voc/2007",
      ("--model_dir=RUN", "--saved_model=OUT/backbone", "--data=VOCdevkit/VOC2007", f"--eval_dir={tmp_path / 'e2'}"):
          "give exactly one of --model_dir (a training run) and --saved_model (OUT/backbone)",
      ("--model_dir=RUN", f"--data={tmp_path / 'photos'}", f"--eval_dir={tmp_path / 'e3'}"):
          f"--data={tmp_path / 'photos'}: not a VOCdevkit folder (no Annotations, JPEGImages, ImageSets/Main); give "
          "the folder that holds Annotations/, JPEGImages/ and ImageSets/Main/, e.g. VOCdevkit/VOC2007",
  }
  help_of, problems, results = run_cases("detect", [*map(list, refusals), ["--help"]], cwd=tmp_path,
                                         flagfiles=flagfiles_of("detect"), real=0)
  assert_flags_and_flagfiles(help_of, problems, "detect")
  assert_help(results.pop(), ["subject:", "data:", "detector:", "optimisation:", "run:", "--model_dir", "--data",
                              "--tfds_data_dir", "--image_size", "--eval_dir"],
              ["--batch_pairs", "--geometry", "--data_root"])
  for message, result in zip(refusals.values(), results):
    assert_refused(result, message)


@pytest.mark.parametrize("program, present, absent", [
    ("benchmark", ["benchmark:", "--parts"], ["--learning_rate"]),
    ("service", ["service:", "--role"], ["--data"]),
])
def test_help_of_the_tools(program, present, absent):
  help_of, problems, (result,) = run_cases(program, [["--help"]])
  assert_flags_and_flagfiles(help_of, problems, program)
  assert_help(result, present, absent)
