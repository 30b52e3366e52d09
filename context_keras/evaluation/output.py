"""Where a Result goes: one JSON line on stdout, EVAL/<mode>.json, image files, and TensorBoard summaries in EVAL."""
import json
import os

import numpy as np
import tensorflow as tf

from context_keras.storage import writes


def emit(mode, metrics, result, eval_dir, step, write=True):
  """Prints `metrics` (the result's, with the run's description) as one JSON line, and writes EVAL/<mode>.json,
  the result's image files and its TensorBoard summaries (scalars <mode>/<key>, images <mode>/<name>) at `step`."""
  writes.check_folder(eval_dir, "eval_dir")
  metrics = dict(metrics)
  for key, (name, file_name) in result.files.items():
    path = os.path.join(eval_dir, file_name)
    writes.atomic_write(path, tf.io.encode_png(result.images[name]).numpy())
    metrics[key] = path
  if write:
    writes.atomic_write_json(os.path.join(eval_dir, f"{mode}.json"), metrics)
  writer = tf.summary.create_file_writer(eval_dir)
  with writer.as_default(step=step):
    for key, value in metrics.items():
      if isinstance(value, (int, float)) and not isinstance(value, bool):
        tf.summary.scalar(f"{mode}/{key}", value)
      elif key == "per_class_accuracy":
        for name, accuracy in value.items():
          tf.summary.scalar(f"{mode}/accuracy_{name}", accuracy)
      elif key == "per_layer":  # {layer: {metric: number}} -> <mode>/<layer>/<metric>
        for layer, entry in value.items():
          for name, number in entry.items():
            if isinstance(number, (int, float)) and not isinstance(number, bool):
              tf.summary.scalar(f"{mode}/{layer}/{name}", number)
    for name, image in result.images.items():
      tf.summary.image(f"{mode}/{name}", image[np.newaxis], max_outputs=1)
  writer.close()
  print(json.dumps(metrics), flush=True)
  return metrics
