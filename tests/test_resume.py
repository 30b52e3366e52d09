"""Reading and resuming a run (in-process, on checkpoints written here): the one reading of a run's step whatever
the precision, refusals that name the flag when a resume would change what the checkpoint's variables mean, and no
checkpoint value left unrestored in silence."""
import json

import keras
import pytest
import tensorflow as tf

from context_keras import errors
from context_keras import evaluate
from context_keras import export
from context_keras.deploy import serving
from context_keras.input import pipeline as D
from context_keras.model import networks as M
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
