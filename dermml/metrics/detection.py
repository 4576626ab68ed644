"""Detection metrics: COCO average precision and DermSynth3D's centroid match, per image first.

Boxes are COCO [x, y, w, h] in pixels; a prediction has a score and every box a class name.

**COCO AP** (``map`` = AP@[.5:.95], ``map50``, ``map75``, ``mar100``; area ``all``, 100
detections per image and class): pycocotools matches the detections of each image and class
to its ground truth at the ten IoU thresholds (``coco_matches``, one ``COCOeval.evaluate``
over the set). Matching is per image, so a set's AP is a function of its images' match
results alone: ``coco_summary`` is pycocotools' ``accumulate`` + ``summarize`` over those
results, vectorised, and gives the very same numbers for any subset or resample of the images
(a bootstrap resample's repeated image is a second image with the same boxes, as it would be
in a rebuilt COCO set). ``tests/tasks/test_detection_task.py`` checks it against pycocotools.
The match results travel in the per-image records as JSON, next to the boxes themselves.

**Centroid match** (DermSynth3D, ``dermsynth3d/utils/evaluate_detection.py`` with Padilla's
``Evaluator.GetDetection``): per image and class, predictions in decreasing score order are
each compared with the ground-truth box of highest IoU with them; the prediction is a true
positive when each box contains the other's centroid (strictly inside) and that ground truth
was not matched before, else a false positive; unmatched ground truths are false negatives.
Counts are taken over the predictions scoring at least the threshold (DermSynth3D: 0.5); the
per-image AP (VOC every-point interpolation) over all predictions, averaged over the images
with ground truth, is DermSynth3D's validation ``ap``. The same evaluator with "IoU > 0.5" as
the rule gives the ``iou50_*`` counts.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
"""pycocotools' ``Params.iouThrs``."""
RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1,
                                endpoint=True)
"""pycocotools' ``Params.recThrs`` (101-point interpolation)."""
MAX_DETECTIONS = 100
"""Detections per image and class that COCO's AP counts (``maxDets[-1]``)."""
ALL_AREAS = [0**2, 1e5**2]
"""pycocotools' ``all`` area range."""


@dataclass
class Boxes:
    """The boxes of one image: [x, y, w, h] (N, 4), class names, and scores (predictions)."""

    boxes: np.ndarray
    labels: list[str]
    scores: np.ndarray | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.boxes = np.asarray(self.boxes, np.float64).reshape(-1, 4)
        self.labels = [str(label) for label in self.labels]
        if self.scores is not None:
            self.scores = np.asarray(self.scores, np.float64).reshape(-1)

    def above(self, threshold: float) -> Boxes:
        """The predictions scoring at least ``threshold``."""
        keep = self.scores >= threshold
        return Boxes(self.boxes[keep], [lb for lb, k in zip(self.labels, keep, strict=True)
                                        if k], self.scores[keep])


# ---------------------------------------------------------------------------- COCO (pycocotools)


def coco_matches(truths: Sequence[Boxes], predictions: Sequence[Boxes],
                 max_detections: int = MAX_DETECTIONS) -> list[dict]:
    """Per image: ``{"truth": {class: boxes}, "detections": [[score, class, matched], ...]}``
    where ``matched`` has bit t set when pycocotools matched the detection at IoU threshold
    ``IOU_THRESHOLDS[t]``; the detections of each class in pycocotools' order (score
    descending, stable), at most ``max_detections`` per image and class."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(truths) != len(predictions):
        raise ValueError(f"{len(truths)} images of ground truth, {len(predictions)} predicted")
    n = len(truths)
    classes = sorted({c for image in [*truths, *predictions] for c in image.labels})
    records = [{"truth": {}, "detections": []} for _ in range(n)]
    if not classes:
        return records
    cat = {c: k + 1 for k, c in enumerate(classes)}
    images = [{"id": i + 1} for i in range(n)]
    categories = [{"id": cat[c], "name": c} for c in classes]
    gt_anns, dt_anns = [], []
    for i, (truth, pred) in enumerate(zip(truths, predictions, strict=True)):
        for box, label in zip(truth.boxes.tolist(), truth.labels, strict=True):
            gt_anns.append({"id": len(gt_anns) + 1, "image_id": i + 1,
                            "category_id": cat[label], "bbox": box, "area": box[2] * box[3],
                            "iscrowd": 0})
        for box, label, score in zip(pred.boxes.tolist(), pred.labels, pred.scores.tolist(),
                                     strict=True):
            dt_anns.append({"image_id": i + 1, "category_id": cat[label], "bbox": box,
                            "score": score})
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO()
        gt.dataset = {"images": images, "annotations": gt_anns, "categories": categories}
        gt.createIndex()
        if dt_anns:
            dt = gt.loadRes(dt_anns)
        else:
            dt = COCO()
            dt.dataset = {"images": images, "annotations": [], "categories": categories}
            dt.createIndex()
        evaluator = COCOeval(gt, dt, "bbox")
        evaluator.params.imgIds = [image["id"] for image in images]
        evaluator.params.catIds = [cat[c] for c in classes]
        evaluator.params.areaRng, evaluator.params.areaRngLbl = [ALL_AREAS], ["all"]
        evaluator.params.maxDets = [max_detections]
        evaluator.evaluate()
    # evalImgs: for each category, for each (one) area range, for each image.
    for k, c in enumerate(classes):
        for i in range(n):
            result = evaluator.evalImgs[k * n + i]
            if result is None:
                continue
            if np.any(result["dtIgnore"]) or np.any(result["gtIgnore"]):
                raise AssertionError("no box is ignored without crowds and area ranges")
            if len(result["gtIgnore"]):
                records[i]["truth"][c] = len(result["gtIgnore"])
            matched = (np.asarray(result["dtMatches"]) > 0).astype(np.int64)
            bits = (matched << np.arange(len(IOU_THRESHOLDS))[:, None]).sum(0)
            records[i]["detections"] += [[float(s), c, int(b)] for s, b in
                                         zip(result["dtScores"], bits.tolist(), strict=True)]
    return records


@lru_cache(maxsize=65536)
def _parsed(text: str) -> tuple[dict[str, int], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """A record's JSON as (truth count per class, (scores, match bits) per class)."""
    record = json.loads(text)
    detections: dict[str, tuple[list, list]] = {}
    for score, c, bits in record["detections"]:
        scores, matched = detections.setdefault(c, ([], []))
        scores.append(score)
        matched.append(bits)
    return record["truth"], {c: (np.asarray(s, np.float64), np.asarray(b, np.int64))
                             for c, (s, b) in detections.items()}


def coco_summary(records: Sequence[dict | str]) -> dict[str, float]:
    """COCO ``map`` (AP@[.5:.95]), ``map50``, ``map75`` and ``mar100`` of the images whose
    ``coco_matches`` records (dicts or their JSON) are given, in image order; per class
    ``ap/<class>`` and ``ap50/<class>`` when several classes have ground truth. NaN without
    ground truth. pycocotools' ``accumulate`` and ``summarize`` (area all, 100 detections)."""
    parsed = [_parsed(r if isinstance(r, str) else json.dumps(r)) for r in records]
    totals: dict[str, int] = {}
    for truth, _ in parsed:
        for c, count in truth.items():
            totals[c] = totals.get(c, 0) + count
    classes = sorted(c for c, count in totals.items() if count > 0)
    nan = float("nan")
    if not classes:
        return {"map": nan, "map50": nan, "map75": nan, "mar100": nan}
    t_count = len(IOU_THRESHOLDS)
    precision = np.zeros((t_count, len(RECALL_THRESHOLDS), len(classes)))
    recall = np.zeros((t_count, len(classes)))
    shifts = np.arange(t_count)[:, None]
    for k, c in enumerate(classes):
        parts = [dets[c] for _, dets in parsed if c in dets]
        scores = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0)
        bits = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
        order = np.argsort(-scores, kind="mergesort")
        matched = ((bits[order][None, :] >> shifts) & 1).astype(bool)
        tp_sum = np.cumsum(matched, axis=1).astype(float)
        fp_sum = np.cumsum(~matched, axis=1).astype(float)
        for t in range(t_count):
            tp, fp = tp_sum[t], fp_sum[t]
            nd = len(tp)
            rc = tp / totals[c]
            pr = tp / (fp + tp + np.spacing(1))
            recall[t, k] = rc[-1] if nd else 0
            pr = np.maximum.accumulate(pr[::-1])[::-1] if nd else pr
            inds = np.searchsorted(rc, RECALL_THRESHOLDS, side="left")
            precision[t, :, k] = np.where(inds < nd, pr[np.minimum(inds, max(nd - 1, 0))]
                                          if nd else 0.0, 0.0)
    t50 = int(np.flatnonzero(np.isclose(IOU_THRESHOLDS, 0.5))[0])
    t75 = int(np.flatnonzero(np.isclose(IOU_THRESHOLDS, 0.75))[0])
    summary = {"map": float(precision.mean()), "map50": float(precision[t50].mean()),
               "map75": float(precision[t75].mean()), "mar100": float(recall.mean())}
    if len(classes) > 1:
        for k, c in enumerate(classes):
            summary[f"ap/{c}"] = float(precision[:, :, k].mean())
            summary[f"ap50/{c}"] = float(precision[t50, :, k].mean())
    return summary


# ------------------------------------------------------------------ DermSynth3D's centroid match


def xyxy(boxes: np.ndarray) -> np.ndarray:
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two [x0, y0, x1, y1] boxes (continuous pixel edges)."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _contains_centroid(source: np.ndarray, target: np.ndarray) -> bool:
    x, y = (target[0] + target[2]) / 2, (target[1] + target[3]) / 2
    return bool(source[0] < x < source[2] and source[1] < y < source[3])


def centroids_match(a: np.ndarray, b: np.ndarray) -> bool:
    """DermSynth3D's ``both_contain_centroids``: each box contains the other's centroid."""
    return _contains_centroid(a, b) and _contains_centroid(b, a)


def iou_above_half(a: np.ndarray, b: np.ndarray) -> bool:
    """The evaluator's default rule at DermSynth3D's threshold: IoU > 0.5."""
    return box_iou(a, b) > 0.5


Rule = Callable[[np.ndarray, np.ndarray], bool]


def greedy_match(truth: np.ndarray, predicted: np.ndarray, scores: np.ndarray,
                 rule: Rule) -> np.ndarray:
    """True-positive flags of the predictions (xyxy) of one image and class in decreasing
    score order (stable), by ``Evaluator.GetDetection``: each prediction is judged against the
    ground truth of highest IoU with it (the first of equals; none when every IoU is 0)."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    seen = np.zeros(len(truth), bool)
    tp = np.zeros(len(order), bool)
    for rank, d in enumerate(order):
        best, j_best = sys.float_info.min, None
        for j in range(len(truth)):
            iou = box_iou(predicted[d], truth[j])
            if iou > best:
                best, j_best = iou, j
        if j_best is not None and rule(predicted[d], truth[j_best]) and not seen[j_best]:
            tp[rank] = seen[j_best] = True
    return tp


def voc_ap(tp: np.ndarray, n_truth: int) -> float:
    """``Evaluator.CalculateAveragePrecision`` (every-point interpolation) of true-positive
    flags in score order against ``n_truth`` ground-truth boxes."""
    acc_tp = np.cumsum(tp).astype(float)
    acc_fp = np.cumsum(~np.asarray(tp, bool)).astype(float)
    rec = list(acc_tp / n_truth)
    prec = list(np.divide(acc_tp, acc_fp + acc_tp)) if len(tp) else []
    mrec = [0.0, *rec, 1.0]
    mpre = [0.0, *prec, 0.0]
    for i in range(len(mpre) - 1, 0, -1):
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    return float(sum((mrec[i] - mrec[i - 1]) * mpre[i] for i in range(1, len(mrec))
                     if mrec[i] != mrec[i - 1]))


def match_counts(truth: Boxes, predicted: Boxes, threshold: float,
                 rule: Rule = centroids_match) -> dict[str, float]:
    """TP / FP / FN of one image's predictions scoring at least ``threshold`` under ``rule``
    (per class, summed), and the image's AP over all its predictions (the mean over the
    classes with ground truth; NaN without ground truth)."""
    tp = fp = fn = 0
    aps = []
    for c in sorted(set(truth.labels) | set(predicted.labels)):
        gt = xyxy(truth.boxes[[lb == c for lb in truth.labels]])
        mask = np.array([lb == c for lb in predicted.labels], bool)
        boxes, scores = xyxy(predicted.boxes[mask]), predicted.scores[mask]
        kept = scores >= threshold
        flags = greedy_match(gt, boxes[kept], scores[kept], rule)
        tp, fp, fn = tp + int(flags.sum()), fp + int((~flags).sum()), \
            fn + len(gt) - int(flags.sum())
        if len(gt):
            aps.append(voc_ap(greedy_match(gt, boxes, scores, rule), len(gt)))
    return {"tp": tp, "fp": fp, "fn": fn, "ap": float(np.mean(aps)) if aps else float("nan")}


def precision_recall_f1(tp: float, fp: float, fn: float) -> dict[str, float]:
    nan = float("nan")
    precision = tp / (tp + fp) if tp + fp else nan
    recall = tp / (tp + fn) if tp + fn else nan
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else nan
    return {"precision": precision, "recall": recall, "f1": f1}


# ----------------------------------------------------------------------------------- records


def image_records(truths: Sequence[Boxes], predictions: Sequence[Boxes], threshold: float,
                  max_detections: int = MAX_DETECTIONS) -> list[dict]:
    """One record per image: truth and predicted counts, centroid and IoU>0.5 TP/FP/FN at
    ``threshold``, the image's centroid AP, and its COCO match results (``coco``, JSON)."""
    matches = coco_matches(truths, predictions, max_detections)
    records = []
    for truth, pred, match in zip(truths, predictions, matches, strict=True):
        centroid = match_counts(truth, pred, threshold, centroids_match)
        iou = match_counts(truth, pred, threshold, iou_above_half)
        records.append({
            "n_truth": len(truth.labels), "n_predicted": int((pred.scores >= threshold).sum()),
            "centroid_tp": centroid["tp"], "centroid_fp": centroid["fp"],
            "centroid_fn": centroid["fn"], "centroid_ap": centroid["ap"],
            "iou50_tp": iou["tp"], "iou50_fp": iou["fp"], "iou50_fn": iou["fn"],
            "coco": json.dumps(match, separators=(",", ":"))})
    return records


def summarize(records) -> dict[str, float]:
    """Set metrics from per-image records (a DataFrame or a list of ``image_records``): COCO
    AP (``coco_summary``), centroid and IoU>0.5 precision / recall / F1 pooled over the images
    at the records' threshold, and DermSynth3D's mean per-image centroid AP."""
    import pandas as pd

    frame = records if isinstance(records, pd.DataFrame) else pd.DataFrame(list(records))
    summary = coco_summary(frame["coco"].tolist())
    for rule in ("centroid", "iou50"):
        counts = [float(frame[f"{rule}_{k}"].sum()) for k in ("tp", "fp", "fn")]
        summary.update({f"{rule}_{k}": v for k, v in precision_recall_f1(*counts).items()})
    aps = frame["centroid_ap"].to_numpy(float)
    summary["centroid_ap"] = float(np.nanmean(aps)) if np.isfinite(aps).any() else float("nan")
    return summary
