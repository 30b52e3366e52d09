"""Reading and resuming a run (in-process, on checkpoints written here): the one reading of a run's step whatever
the precision, refusals that name the flag when a resume would change what the checkpoint's variables mean, and no
checkpoint value left unrestored in silence."""
import dataclasses
import gc
import json
import re

import pytest
import tensorflow as tf

from context_keras import errors
from context_keras import evaluate
from context_keras import export
from context_keras import train
from context_keras.deploy import serving
from context_keras.input import pipeline as D
from context_keras.model import networks as M
from context_keras.training import controller
from context_keras.training import restore
from context_keras.training import run_dir
from context_keras.training import trainer as T
from context_keras.training import warm_start

SMALL = M.ModelConfig(width_multiplier=0.0625)


def write_run(folder, steps=3, model=SMALL, **optimisation):
  """RUN with config.json and one checkpoint ckpt-<steps> of a Trainer whose optimizer took `steps` (zero) updates,
  as train.py writes them; the Trainer."""
  folder.mkdir(parents=True, exist_ok=True)
  config = run_dir.RunConfig(model, D.InputConfig(data="unused", geometry="revisiting" if model.patch_size == 64
                                                  else "doersch"), T.OptimConfig(**optimisation))
  trainer = T.Trainer(tf.distribute.get_strategy(), config.model, config.optimisation)
  variables = trainer.trainable_variables
  for _ in range(steps):
    trainer.optimizer.apply_gradients(zip([tf.zeros_like(v) for v in variables], variables))
  counters = {k: tf.Variable(0, dtype=tf.int64, name=k) for k in T.COUNTERS}
  checkpoint = tf.train.Checkpoint(**trainer.checkpoint_items(), **counters)
  tf.train.CheckpointManager(checkpoint, str(folder), 3, checkpoint_name=run_dir.CHECKPOINT_PREFIX).save(steps)
  run_dir.write_config(str(folder), config)
  return trainer


@pytest.mark.slow  # exports a network
def test_every_reader_of_a_run_gets_its_step_in_every_precision(tmp_path, monkeypatch):
  """float16's loss-scale optimizer keeps the step in its inner optimizer: the step of a checkpoint, of a restored
  run, of a warm start, of an export and of evaluate --watch (which stops at the run's --train_steps) must be the
  run's, as for float32 and bfloat16."""
  for precision in ("none", "bfloat16", "float16"):
    folder = tmp_path / precision
    trainer = write_run(folder, steps=3, mixed_precision=precision, train_steps=3)
    assert trainer.current_step() == 3
    assert run_dir.checkpoint_step(tf.train.latest_checkpoint(str(folder))) == 3, precision
    assert restore.load_run(str(folder)).step == 3, precision
    record = warm_start.initialise(restore.build_networks(SMALL), SMALL, str(folder))
    assert record["step"] == 3, precision
    if precision == "float16":
      summary = export.export_run(str(folder), str(tmp_path / "out"))
      assert summary["step"] == 3
      assert json.loads((tmp_path / "out" / serving.BACKBONE_DIR / serving.METADATA_FILE).read_text())["step"] == 3
      seen = []
      monkeypatch.setattr(evaluate, "evaluate_and_emit", lambda mode, subject, *args: seen.append(subject.step))
      evaluate.watch("pretext", None, str(tmp_path / "eval"), str(folder), interval=0, timeout=1)
      assert seen == [3]


def test_a_resume_that_changes_what_the_checkpoint_means_names_the_flag(tmp_path):
  """Architecture, geometry, head, ResNet units and strides, the pretext classes, and the optimizer's state (momentum
  slots, float16's loss scale) are compared with RUN/config.json before anything is built: exit 2 naming each flag
  with the run's value."""
  folder = tmp_path / "run"
  folder.mkdir()
  resnet = M.ModelConfig(backbone="resnet18", width_multiplier=0.0625)
  recorded = run_dir.RunConfig(resnet, D.InputConfig(data="unused"), T.OptimConfig(momentum=0.9))
  run_dir.write_config(str(folder), recorded)
  cases = {"--geometry=revisiting (the run: doersch)": dict(model=dict(patch_size=64)),
           "--head=revisiting (the run: doersch)": dict(model=dict(head="revisiting")),
           "--resnet_version=2 (the run: 1)": dict(model=dict(resnet_version=2)),
           "--resnet_strides=1,2,2,2 (the run: 1,2,2,1)": dict(model=dict(resnet_strides=(1, 2, 2, 2))),
           "--resnet_stem_stride=2 (the run: 1)": dict(model=dict(resnet_stem_stride=2)),
           "--rotation_classes=True (the run: False)": dict(model=dict(num_classes=32)),
           "--momentum=0.0 (the run: 0.9)": dict(optimisation=dict(momentum=0.0)),
           "--mixed_precision=float16 (the run: none)": dict(optimisation=dict(mixed_precision="float16"))}
  for named, change in cases.items():
    model = dataclasses.replace(resnet, **change.get("model", {}))
    optimisation = dataclasses.replace(recorded.optimisation, **change.get("optimisation", {}))
    with pytest.raises(errors.UsageError, match=re.escape(f"Invalid flags: {named}: --model_dir={folder} holds a run")):
      run_dir.check_resume(str(folder), model, optimisation)
  # What does not change the checkpoint's meaning resumes: another momentum above 0, precision among the others.
  run_dir.check_resume(str(folder), resnet, dataclasses.replace(recorded.optimisation, momentum=0.5,
                                                                mixed_precision="bfloat16", learning_rate=0.1))


def test_a_resume_that_leaves_a_checkpoint_value_unrestored_stops_in_one_line(tmp_path, capfd):
  """Whatever config.json cannot tell (a run written before it recorded these fields): a checkpoint value with no
  place in the networks or optimizer of these flags stops the resume, naming them, without TensorFlow's warning per
  value."""
  write_run(tmp_path / "run", steps=2, momentum=0.9)
  latest = tf.train.latest_checkpoint(str(tmp_path / "run"))
  for model, optimisation in ((SMALL, T.OptimConfig(momentum=0.0)),
                              (dataclasses.replace(SMALL, head="revisiting"), T.OptimConfig(momentum=0.9))):
    trainer = T.Trainer(tf.distribute.get_strategy(), model, optimisation)
    counters = {k: tf.Variable(0, dtype=tf.int64, name=k) for k in T.COUNTERS}
    with pytest.raises(errors.UsageError, match=f"--model_dir: checkpoint {re.escape(latest)} does not fit the "
                                                "networks and optimizer of these flags: .*(have no place|no value)"):
      train.restore(latest, trainer, counters)
    del trainer, counters
    gc.collect()
  assert "Value in checkpoint could not be found" not in capfd.readouterr().err
  trainer = T.Trainer(tf.distribute.get_strategy(), SMALL, T.OptimConfig(momentum=0.9))
  train.restore(latest, trainer, {k: tf.Variable(0, dtype=tf.int64, name=k) for k in T.COUNTERS})
  assert trainer.current_step() == 2


@pytest.mark.slow  # exports a network
def test_config_json_keeps_what_each_span_of_steps_was_trained_with(tmp_path):
  """A resume with other training flags (the shortcut fixes switched off, another learning rate) starts a span of
  its own in config.json, named flag by flag; exports of the run list every span up to their step."""
  with_fixes = D.InputConfig(data="unused", color_mode="chroma_blur", yoked_jitter=True, random_aperture=True)
  config = run_dir.RunConfig(SMALL, with_fixes, T.OptimConfig(learning_rate=0.01))
  first, differences = run_dir.continued(None, config, 0)
  assert differences == [] and [s["from_step"] for s in first.spans] == [0]
  same, differences = run_dir.continued(first, config, 10)
  assert differences == [] and same.spans == first.spans
  off = run_dir.RunConfig(SMALL, D.InputConfig(data="unused"), T.OptimConfig(learning_rate=0.001))
  second, differences = run_dir.continued(first, off, 10)
  assert differences == [("color_mode", "chroma_blur", "drop"), ("yoked_jitter", True, False),
                         ("random_aperture", True, False), ("learning_rate", 0.01, 0.001)]
  assert [(s["from_step"], s["input"]["yoked_jitter"]) for s in second.spans] == [(0, True), (10, False)]
  write_run(tmp_path / "run", steps=12)
  run_dir.write_config(str(tmp_path / "run"), second)
  assert run_dir.read_config(str(tmp_path / "run")).spans == second.spans
  export.export_run(str(tmp_path / "run"), str(tmp_path / "out"))
  info = json.loads((tmp_path / "out" / serving.BACKBONE_DIR / serving.METADATA_FILE).read_text())
  assert [(s["from_step"], s["input"]["color_mode"]) for s in info["spans"]] == [(0, "chroma_blur"), (10, "drop")]


def test_an_evaluation_job_resumes_only_with_the_settings_it_recorded(tmp_path):
  """linear_eval's and detect's folder keeps the job's settings (controller.keep_settings): rewritten freely until a
  checkpoint exists, then a resume with other settings is refused naming the folder's flag and what differs."""
  kind = controller.JobKind(holder="linear evaluation", folder_flag="eval_dir", log_file="x.log", quit_file="q",
                            pause_file="p")
  controller.keep_settings(kind, str(tmp_path), "job.json", {"layers": ["conv1"], "step": 10})
  controller.keep_settings(kind, str(tmp_path), "job.json", {"layers": ["conv2"], "step": 10})  # no checkpoint yet
  tf.train.Checkpoint(v=tf.Variable(1.0)).write(str(tmp_path / "ckpt-1"))
  (tmp_path / "checkpoint").write_text('model_checkpoint_path: "ckpt-1"\n')
  controller.keep_settings(kind, str(tmp_path), "job.json", {"layers": ["conv2"], "step": 10})  # the same: resumes
  with pytest.raises(errors.UsageError, match=rf"--eval_dir={tmp_path} holds a job with other settings \(layers: "
                                              r"\['conv2'\] then, \['conv3'\] now\): use another --eval_dir"):
    controller.keep_settings(kind, str(tmp_path), "job.json", {"layers": ["conv3"], "step": 10})
  assert json.loads((tmp_path / "job.json").read_text())["layers"] == ["conv2"]
