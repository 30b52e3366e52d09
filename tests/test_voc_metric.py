"""PASCAL VOC's detection AP (evaluation/voc_metric.py): hand-computed cases (a difficult object ignored, a
duplicate, a missed object, 11-point against area, the +1-pixel areas, greedy matching, MATLAB's thresholds), and a
second, literal implementation of VOCevaldet.m / VOCap.m against which random detections are fuzzed."""
import numpy as np
import pytest

from context_keras.evaluation import voc_metric as V

A = (1, 1, 10, 10)          # 10 x 10 pixels in the devkit's inclusive convention: area 100
B = (101, 101, 110, 110)
FAR = (201, 201, 210, 210)


def score(truth, detections, method="11point"):
  """AP of one class (label 0) in one image: truth [(box, difficult)], detections [(box, score)]."""
  gts = V.Boxes.of([0] * len(truth), [0] * len(truth), [box for box, _ in truth] or np.zeros((0, 4)),
                   difficult=[hard for _, hard in truth])
  dets = V.Boxes.of([0] * len(detections), [0] * len(detections),
                    [box for box, _ in detections] or np.zeros((0, 4)), score=[s for _, s in detections])
  entry = V.evaluate(dets, gts, ["only"])["per_class"]["only"]
  return entry["ap" if method == "11point" else "ap_area"]


def test_a_perfect_detection_scores_one():
  assert score([(A, False)], [(A, 0.9)]) == score([(A, False)], [(A, 0.9)], "area") == 1.0


def test_a_duplicate_is_a_false_positive():
  # Ranked: A (tp), A again (fp, the box is claimed), B (tp): precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1.
  truth = [(A, False), (B, False)]
  detections = [(A, 0.9), (A, 0.8), (B, 0.7)]
  assert score(truth, detections) == pytest.approx((6 * 1 + 5 * 2 / 3) / 11)
  assert score(truth, detections, "area") == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
  assert score(truth, [(A, 0.9), (B, 0.7)]) == 1.0  # without the duplicate


def test_a_difficult_object_is_neither_counted_nor_penalised():
  # D is difficult: its detection is ignored, so the ranking is FP, A: precision 1/2 at recall 1.
  D = B
  truth = [(A, False), (D, True)]
  detections = [(D, 0.9), (FAR, 0.8), (A, 0.7)]
  assert score(truth, detections) == pytest.approx(0.5)
  assert score(truth, detections, "area") == pytest.approx(0.5)
  # Were D an ordinary object it would count (28/33); were its detection a false positive, 1/3.
  assert score([(A, False), (D, False)], detections) == pytest.approx(28 / 33)
  # A difficult object alone: no positives, no AP, and the class is left out of the mean.
  result = V.evaluate(V.Boxes.of([0], [0], [A], score=[0.9]), V.Boxes.of([0], [0], [A], difficult=[True]), ["c"])
  assert result["per_class"]["c"]["ap"] is None and result["mAP"] is None


def test_a_missed_object_caps_recall_and_11_points_differ_from_the_area():
  truth = [(A, False), (B, False)]
  assert score(truth, [(A, 0.9)]) == pytest.approx(6 / 11)      # recall 1/2 reaches thresholds 0 ... 0.5
  assert score(truth, [(A, 0.9)], "area") == pytest.approx(0.5)
  assert score(truth, []) == 0.0


def test_overlap_uses_the_devkits_one_pixel_areas_and_half_is_enough():
  # (1,1,10,5) covers 50 of A's 100 pixels: IoU 0.5 exactly with +1 areas (36/81 without them).
  assert score([(A, False)], [((1, 1, 10, 5), 0.9)]) == 1.0
  assert score([(A, False)], [((1, 1, 10, 4), 0.9)]) == 0.0      # 40/100
  # Touching boxes (shared edge pixel) overlap by one row in the devkit's convention.
  assert V.overlaps(np.array([[1.0, 1, 10, 10]]), np.array([[10.0, 1, 19, 10]]))[0] == pytest.approx(10 / 190)


def test_matching_is_greedy_and_never_moves_to_the_second_best_box():
  # Both detections overlap A best; the second is a false positive although it overlaps B enough.
  a, b = (1, 1, 20, 10), (1, 4, 20, 13)
  second = (1, 2, 20, 11)  # IoU with a: 180/220, with b: 160/240 (>= 0.5)
  assert V.overlaps(np.array([second], float), np.array([a], float))[0] > V.overlaps(
      np.array([second], float), np.array([b], float))[0] >= 0.5
  assert score([(a, False), (b, False)], [(a, 0.9), (second, 0.8)]) == pytest.approx(6 / 11)


def test_11_point_thresholds_are_matlabs():
  # Recall 3/5 = 0.6 reaches MATLAB's 0.6 (1 - 0.4), not numpy's 6 * 0.1 = 0.6000000000000001.
  boxes = [(1 + 20 * k, 1, 10 + 20 * k, 10) for k in range(5)]
  assert score([(box, False) for box in boxes], [(box, 0.9) for box in boxes[:3]]) == pytest.approx(7 / 11)
  assert V.RECALL_THRESHOLDS[6] == 1 - 0.4 and V.RECALL_THRESHOLDS[3] == 3 * 0.1


def test_ties_keep_their_input_order():
  # Equal scores: the devkit's stable sort ranks the false positive first here, then the hit.
  assert score([(A, False)], [(FAR, 0.5), (A, 0.5)]) == pytest.approx(0.5)
  assert score([(A, False)], [(A, 0.5), (FAR, 0.5)]) == 1.0


def test_mean_over_classes_with_positives():
  gts = V.Boxes.of([0, 0], [0, 1], [A, B], difficult=[False, False])
  dets = V.Boxes.of([0, 0], [0, 1], [A, FAR], score=[0.9, 0.9])
  result = V.evaluate(dets, gts, ["a", "b", "c"])
  assert [result["per_class"][c]["ap"] for c in "abc"] == [1.0, 0.0, None]
  assert result["mAP"] == 0.5 and result["classes_with_positives"] == 2


# --------------------------------------------------------------------------------------------------------------
# A second implementation: VOCevaldet.m and VOCap.m transcribed line by line, one detection at a time.


def reference_ap(gt_by_image, detections, method):
  """gt_by_image: {image: [(box, difficult)]} of one class; detections: [(image, box, score)]."""
  gt = {i: {"boxes": [b for b, _ in v], "diff": [d for _, d in v], "det": [False] * len(v)}
        for i, v in gt_by_image.items()}
  npos = sum(not d for v in gt_by_image.values() for _, d in v)
  order = sorted(range(len(detections)), key=lambda k: -detections[k][2])  # sorted() is stable
  tp, fp = [0] * len(order), [0] * len(order)
  for d, k in enumerate(order):
    image, bb, _ = detections[k]
    ovmax, jmax = -np.inf, None
    record = gt.get(image, {"boxes": [], "diff": [], "det": []})
    for j, bbgt in enumerate(record["boxes"]):
      bi = [max(bb[0], bbgt[0]), max(bb[1], bbgt[1]), min(bb[2], bbgt[2]), min(bb[3], bbgt[3])]
      iw, ih = bi[2] - bi[0] + 1, bi[3] - bi[1] + 1
      if iw > 0 and ih > 0:
        ua = ((bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1) + (bbgt[2] - bbgt[0] + 1) * (bbgt[3] - bbgt[1] + 1)
              - iw * ih)
        ov = iw * ih / ua
        if ov > ovmax:
          ovmax, jmax = ov, j
    if ovmax >= 0.5:
      if not record["diff"][jmax]:
        if not record["det"][jmax]:
          tp[d] = 1
          record["det"][jmax] = True
        else:
          fp[d] = 1
    else:
      fp[d] = 1
  ctp = np.cumsum(tp, dtype=float)
  cfp = np.cumsum(fp, dtype=float)
  rec = ctp / npos
  prec = ctp / np.maximum(ctp + cfp, np.finfo(float).eps)
  if method == "11point":
    ap = 0.0
    for t in [0, .1, .2, .1 * 3, .4, .5, 1 - .4, 1 - .1 * 3, 1 - .2, 1 - .1, 1]:  # MATLAB's 0:0.1:1
      p = [prec[i] for i in range(len(rec)) if rec[i] >= t]
      ap += (max(p) if p else 0.0) / 11
    return ap
  mrec = [0.0] + list(rec) + [1.0]
  mpre = [0.0] + list(prec) + [0.0]
  for i in range(len(mpre) - 2, -1, -1):
    mpre[i] = max(mpre[i], mpre[i + 1])
  return sum((mrec[i] - mrec[i - 1]) * mpre[i] for i in range(1, len(mrec)) if mrec[i] != mrec[i - 1])


def random_case(rng, images=12, classes=3):
  """Integer ground-truth boxes (some difficult) and detections: jittered copies of them (some duplicated), random
  boxes, scores on a coarse grid so that ties happen."""
  gts, dets = [], []
  for image in range(images):
    for _ in range(int(rng.integers(0, 5))):
      x0, y0 = rng.integers(1, 80, 2)
      w, h = rng.integers(5, 40, 2)
      gts.append((image, int(rng.integers(classes)), (x0, y0, x0 + w, y0 + h), bool(rng.random() < 0.2)))
  for image, label, box, _ in gts:
    for _ in range(int(rng.integers(0, 3))):
      jitter = rng.normal(0, 3, 4)
      dets.append((image, label if rng.random() < 0.9 else int(rng.integers(classes)),
                   tuple(np.asarray(box) + jitter), float(np.round(rng.random(), 1))))
  for _ in range(int(rng.integers(0, 15))):
    x0, y0 = rng.uniform(1, 80, 2)
    dets.append((int(rng.integers(images)), int(rng.integers(classes)),
                 (x0, y0, x0 + rng.uniform(3, 40), y0 + rng.uniform(3, 40)), float(np.round(rng.random(), 1))))
  return gts, dets


@pytest.mark.parametrize("seed", range(40))
def test_agrees_with_a_literal_transcription_of_the_devkit(seed):
  rng = np.random.default_rng(seed)
  classes = 3
  gts, dets = random_case(rng, classes=classes)
  truth = V.Boxes.of([g[0] for g in gts], [g[1] for g in gts], [g[2] for g in gts] or np.zeros((0, 4)),
                     difficult=[g[3] for g in gts])
  detections = V.Boxes.of([d[0] for d in dets], [d[1] for d in dets], [d[2] for d in dets] or np.zeros((0, 4)),
                          score=[d[3] for d in dets])
  result = V.evaluate(detections, truth, [f"c{k}" for k in range(classes)])
  for c in range(classes):
    gt_by_image = {}
    for image, label, box, hard in gts:
      if label == c:
        gt_by_image.setdefault(image, []).append((box, hard))
    mine = [(image, box, s) for image, label, box, s in dets if label == c]
    entry = result["per_class"][f"c{c}"]
    if not sum(not hard for boxes in gt_by_image.values() for _, hard in boxes):
      assert entry["ap"] is None
      continue
    assert entry["ap"] == pytest.approx(reference_ap(gt_by_image, mine, "11point"), abs=1e-12)
    assert entry["ap_area"] == pytest.approx(reference_ap(gt_by_image, mine, "area"), abs=1e-12)
