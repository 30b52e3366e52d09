"""PASCAL VOC's detection metric (docs/detection.md §3): average precision per class at IoU 0.5 and its mean, as the
VOC2007 development kit computes it (VOCevaldet.m, VOCap.m), in numpy only.

Boxes are in the devkit's pixel convention: (xmin, ymin, xmax, ymax), 1-based and inclusive, so a box's width is
xmax - xmin + 1 (the annotations' own numbers; input/voc.py converts detections back to it). Per class:
  - detections are ranked by descending score (a stable sort: ties keep their input order, as MATLAB's sort does);
  - each detection is matched to the ground-truth box of its image and class that it overlaps most (the first such
    box in annotation order), difficult boxes included; overlap = intersection / union of the +1-pixel areas;
  - overlap >= 0.5 with a difficult box: ignored (neither true nor false positive); with a box not yet matched: a
    true positive, which claims it; with a box already claimed: a false positive (a duplicate); below 0.5: a false
    positive. Difficult boxes do not count among the positives;
  - AP from the precision/recall curve: VOC2007's 11-point interpolation (the mean over recall thresholds
    0, 0.1, ..., 1 of the best precision at a recall >= the threshold; thresholds as MATLAB's 0:0.1:1 makes them)
    or VOC2010's area under the curve made monotone (`area`).
A class without positives has no AP (None) and is left out of the mean.
"""
import dataclasses

import numpy as np

IOU_THRESHOLD = 0.5
METHODS = ("11point", "area")
# MATLAB's 0:0.1:1 computes its first half as k * 0.1 and its second as 1 - (10 - k) * 0.1; the two differ from
# k * 0.1 in the last bit at 0.6 and 0.7, which decides whether a recall of exactly 3/5 or 7/10 reaches them.
RECALL_THRESHOLDS = np.array([k * 0.1 if k <= 5 else 1.0 - (10 - k) * 0.1 for k in range(11)])


@dataclasses.dataclass(frozen=True)
class Boxes:
  """Boxes of many images, flat: image index [n], class index [n], box [n, 4] (devkit convention), and per box a
  score (detections) or a difficult flag (ground truth)."""
  image: np.ndarray
  label: np.ndarray
  box: np.ndarray
  score: np.ndarray = None
  difficult: np.ndarray = None

  @classmethod
  def of(cls, image, label, box, score=None, difficult=None):
    image = np.asarray(image, np.int64).reshape(-1)
    return cls(image, np.asarray(label, np.int64).reshape(-1), np.asarray(box, np.float64).reshape(-1, 4),
               None if score is None else np.asarray(score, np.float64).reshape(-1),
               None if difficult is None else np.asarray(difficult, bool).reshape(-1))

  def select(self, mask):
    pick = lambda a: None if a is None else a[mask]  # noqa: E731
    return Boxes(self.image[mask], self.label[mask], self.box[mask], pick(self.score), pick(self.difficult))


def overlaps(a, b):
  """IoU of boxes a [n, 4] and b [n, 4] pairwise (row i with row i), with the devkit's +1-pixel areas; 0 where they
  do not intersect."""
  iw = np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]) + 1
  ih = np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]) + 1
  inter = iw * ih
  union = ((a[:, 2] - a[:, 0] + 1) * (a[:, 3] - a[:, 1] + 1) + (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
           - inter)
  hit = (iw > 0) & (ih > 0)
  return np.where(hit, inter / np.where(hit, union, 1.0), 0.0)


def match(detections, truth, iou_threshold=IOU_THRESHOLD):
  """(true positive [n], false positive [n]) of one class's detections in ranked order, and its positive count.

  `detections` and `truth` hold one class. Every detection's best box is found at once (all detection/box pairs of
  the same image); only the claiming of boxes, which depends on rank, is a loop."""
  order = np.argsort(-detections.score, kind="stable")
  dets = detections.select(order)
  positives = int(np.sum(~truth.difficult))
  n = len(dets.image)
  # Ground truth sorted by image (stably: annotation order within an image), and each image's slice of it.
  by_image = np.argsort(truth.image, kind="stable")
  gt_image, gt_box, gt_difficult = truth.image[by_image], truth.box[by_image], truth.difficult[by_image]
  start = np.searchsorted(gt_image, dets.image, side="left")
  count = np.searchsorted(gt_image, dets.image, side="right") - start
  # All (detection, box of its image) pairs, detections in rank order, boxes in annotation order.
  pair_det = np.repeat(np.arange(n), count)
  pair_gt = np.repeat(start, count) + (np.arange(len(pair_det)) - np.repeat(np.cumsum(count) - count, count))
  iou = overlaps(dets.box[pair_det], gt_box[pair_gt])
  best = np.full(n, -np.inf)
  np.maximum.at(best, pair_det, iou)
  # The first box (in annotation order) whose overlap is the detection's best, as `if ov > ovmax` keeps it.
  first = np.full(n, len(gt_box))
  is_best = iou == best[pair_det]
  np.minimum.at(first, pair_det[is_best], pair_gt[is_best])
  tp, fp = np.zeros(n), np.zeros(n)
  claimed = np.zeros(len(gt_box), bool)
  for d in range(n):
    if best[d] >= iou_threshold:
      j = first[d]
      if gt_difficult[j]:
        continue
      if claimed[j]:
        fp[d] = 1
      else:
        tp[d] = 1
        claimed[j] = True
    else:
      fp[d] = 1
  return tp, fp, positives


def precision_recall(tp, fp, positives):
  """The cumulative curve; precision is 0 (not 0/0) before the first counted detection."""
  tp, fp = np.cumsum(tp), np.cumsum(fp)
  recall = tp / positives
  precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
  return recall, precision


def average_precision(recall, precision, method="11point"):
  """AP of a precision/recall curve: VOC2007's 11-point interpolation or VOC2010's area (VOCap.m)."""
  if method == "11point":
    return float(sum(np.max(precision[recall >= t], initial=0.0) for t in RECALL_THRESHOLDS) / len(RECALL_THRESHOLDS))
  if method != "area":
    raise ValueError(f"AP method {method!r} is not one of {METHODS}")
  mrec = np.concatenate([[0.0], recall, [1.0]])
  mpre = np.concatenate([[0.0], precision, [0.0]])
  mpre = np.maximum.accumulate(mpre[::-1])[::-1]
  steps = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1
  return float(np.sum((mrec[steps] - mrec[steps - 1]) * mpre[steps]))


def evaluate(detections, truth, class_names, iou_threshold=IOU_THRESHOLD):
  """Per-class AP (both methods) and mAP over the classes with positives.

  Returns {"mAP": 11-point mean, "mAP_area": area mean, "per_class": {name: {"ap": 11-point, "ap_area": ...,
  "positives": non-difficult boxes, "detections": n, "true_positives": n}}, "classes_with_positives": n}."""
  per_class, eleven, area = {}, [], []
  for c, name in enumerate(class_names):
    dets, gts = detections.select(detections.label == c), truth.select(truth.label == c)
    tp, fp, positives = match(dets, gts, iou_threshold)
    entry = {"ap": None, "ap_area": None, "positives": positives, "detections": len(tp),
             "true_positives": int(tp.sum())}
    if positives:
      recall, precision = precision_recall(tp, fp, positives)
      entry["ap"] = average_precision(recall, precision, "11point")
      entry["ap_area"] = average_precision(recall, precision, "area")
      eleven.append(entry["ap"])
      area.append(entry["ap_area"])
    per_class[name] = entry
  return {"mAP": float(np.mean(eleven)) if eleven else None, "mAP_area": float(np.mean(area)) if area else None,
          "per_class": per_class, "classes_with_positives": len(eleven)}
