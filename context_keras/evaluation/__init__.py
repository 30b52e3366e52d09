"""Evaluation protocols: what a trained backbone learned, measured as the literature measures it.

Every protocol is one module with the same small interface:

  NAME          its --mode
  Config        a dataclass of its settings (the evaluate program builds it from flags)
  evaluate(subject, config) -> Result

where the subject (subject.py) is a trained run or an exported backbone behind the functions a protocol needs, and
the Result holds the metrics (one JSON object) and the images to write. output.py writes any Result the same way,
and `evaluate --watch` runs any protocol on every new checkpoint. A new protocol is a new module in PROTOCOLS.
"""
from context_keras.evaluation import finetune
from context_keras.evaluation import knn
from context_keras.evaluation import linear
from context_keras.evaluation import neighbors
from context_keras.evaluation import pretext
from context_keras.evaluation.result import Result  # noqa: F401  (the interface)

PROTOCOLS = {module.NAME: module for module in (pretext, linear, knn, finetune, neighbors)}
