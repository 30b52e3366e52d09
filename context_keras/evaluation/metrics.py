"""Scores of the labelled protocols (method.md §10): top-k and balanced accuracy, and the average precision of
multi-label classification in its two VOC definitions.

Average precision of one class ranks the images by score (highest first) and walks down the list; precision and
recall after each image; images whose target is IGNORED (VOC's "difficult") are left out of the ranking.
  eleven_point  VOC 2007's devkit: the mean over recall thresholds t = 0, 0.1, ..., 1 of the highest precision at a
                recall >= t (0 where no recall reaches t).
  auc           VOC 2010 and later, and the SVM benchmark of Goyal et al. 2019 / mmselfsup: the area under the
                precision-recall curve after making precision non-increasing from the right.
"""
import numpy as np

from context_keras.input import labelled


def top_k_accuracy(scores, labels, k=1):
  """Share of rows whose label is among the k highest scores (ties: the lower class index first)."""
  k = min(k, scores.shape[1])
  top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return float(np.mean(np.any(top == np.asarray(labels)[:, None], axis=1))) if len(labels) else 0.0


def balanced_accuracy(labels, predicted):
  """Mean over the classes present of the share of their samples predicted right."""
  labels = np.asarray(labels)
  return float(np.mean([np.mean(predicted[labels == c] == c) for c in np.unique(labels)]))


def per_class_accuracy(labels, predicted, classes):
  """{class name: share of its samples predicted right} for the classes present."""
  labels = np.asarray(labels)
  return {classes[c]: float(np.mean(predicted[labels == c] == c)) for c in np.unique(labels)}


def precision_recall(scores, targets):
  """Precision and recall after each image of the ranking (IGNORED targets dropped), and the number of positives."""
  keep = targets != labelled.IGNORED
  scores, targets = np.asarray(scores, np.float64)[keep], targets[keep]
  order = np.argsort(-scores, kind="stable")
  hits = targets[order] == labelled.POSITIVE
  true_positives = np.cumsum(hits)
  positives = int(hits.sum())
  precision = true_positives / np.arange(1, len(hits) + 1)
  recall = true_positives / max(positives, 1)
  return precision, recall, positives


def average_precision(scores, targets, eleven_point=False):
  """AP of one class (module docstring); NaN when the class has no positive image."""
  precision, recall, positives = precision_recall(scores, np.asarray(targets))
  if not positives:
    return float("nan")
  if eleven_point:
    return float(np.mean([precision[recall >= t].max() if np.any(recall >= t) else 0.0
                          for t in np.linspace(0, 1, 11)]))
  recall = np.concatenate([[0.0], recall, [1.0]])
  precision = np.concatenate([[0.0], precision, [0.0]])
  precision = np.maximum.accumulate(precision[::-1])[::-1]
  changes = np.flatnonzero(recall[1:] != recall[:-1])
  return float(np.sum((recall[changes + 1] - recall[changes]) * precision[changes + 1]))


def mean_average_precision(scores, targets, classes):
  """{map_auc, map_11point, per_class_ap (auc, by class name), classes_without_positives} of scores [N, C] against
  targets [N, C] (labelled.POSITIVE / NEGATIVE / IGNORED); the means are over the classes with a positive."""
  auc = [average_precision(scores[:, c], targets[:, c]) for c in range(len(classes))]
  eleven = [average_precision(scores[:, c], targets[:, c], eleven_point=True) for c in range(len(classes))]
  present = [c for c in range(len(classes)) if not np.isnan(auc[c])]
  return {"map_auc": float(np.mean([auc[c] for c in present])) if present else float("nan"),
          "map_11point": float(np.mean([eleven[c] for c in present])) if present else float("nan"),
          "per_class_ap": {classes[c]: auc[c] for c in present},
          "classes_without_positives": [classes[c] for c in range(len(classes)) if c not in present]}
