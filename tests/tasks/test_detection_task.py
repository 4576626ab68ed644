"""Lesion detection: boxes from masks, the metrics against pycocotools and DermSynth3D's rule,
training to a useful AP on demo data, evaluation with CIs, and serving boxes as JSON."""

import json

import numpy as np
import pytest

from dermml.data.boxes import BoxesConfig, mask_boxes, truth_boxes
from dermml.data.manifest import read_manifest
from dermml.metrics.detection import (
    Boxes,
    coco_matches,
    coco_summary,
    image_records,
    match_counts,
    summarize,
)

# Small and CPU-friendly: a ResNet-18 FPN at 64 px with few proposals and a narrow box head.
TINY = ["data.image_size=64", "data.batch_size=4", "ray.enabled=false",
        "model.backbone=resnet18", "model.anchor_sizes=[[12],[20],[28],[40],[56]]",
        "model.rpn_proposals_train=200", "model.rpn_proposals_test=100",
        "model.roi_batch_size=32", "model.box_head_size=256",
        "boxes.source=mask", "boxes.labels=lesion",
        "train.epochs=4", "train.optimizer=adamw", "train.lr=0.001", "train.scheduler=cosine",
        "train.warmup_epochs=1"]


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    """Small convolutions gain nothing from threads, and on a busy 2-core machine OpenMP
    workers waiting on each other made training several times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def demo64(tmp_path_factory) -> str:
    """90 procedural samples at 64 px (one lesion each): the detector's demo resolution."""
    from dermml.data.demo import generate_demo

    return generate_demo(str(tmp_path_factory.mktemp("demo64") / "data"), n=90, size=64,
                         seed=0)


# --------------------------------------------------------------------------------- boxes


def test_boxes_come_from_mask_components_above_the_minimum_area():
    mask = np.zeros((40, 50), bool)
    mask[5:15, 10:30] = True         # 10 x 20 lesion
    mask[20:23, 40:42] = True        # 6 px speck
    mask[30, 5] = mask[31, 6] = True  # diagonal pair: one 8-connected component of 2 px
    assert mask_boxes(mask) == [[10.0, 5.0, 20.0, 10.0], [40.0, 20.0, 2.0, 3.0],
                                [5.0, 30.0, 2.0, 2.0]]
    assert mask_boxes(mask, min_area=6) == [[10.0, 5.0, 20.0, 10.0], [40.0, 20.0, 2.0, 3.0]]
    assert mask_boxes(mask, min_area=7) == [[10.0, 5.0, 20.0, 10.0]]
    assert mask_boxes(np.zeros((8, 8), bool)) == []


def test_box_sources_and_labels_of_manifest_rows(demo64):
    """auto: the boxes column where a row has boxes, else the mask; labels: box_labels, the
    row's label, or lesion."""
    import pandas as pd

    from dermml.data.images import load_mask

    manifest = read_manifest(demo64)
    row = manifest.df.iloc[0].copy()
    from_mask = mask_boxes(load_mask(manifest.resolve(row["mask_uri"])), 16)
    assert truth_boxes(row, manifest, BoxesConfig(source="mask")) == (
        from_mask, [row["label"]] * len(from_mask))
    assert truth_boxes(row, manifest, BoxesConfig(source="mask", labels="lesion"))[1] == \
        ["lesion"] * len(from_mask)
    column = [[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 0.0, 3.0]]  # the second has no width: dropped
    row["boxes"], row["box_labels"] = column, ["melanoma", "nevus"]
    assert truth_boxes(row, manifest, BoxesConfig()) == ([column[0]], ["melanoma"])
    row["boxes"] = []
    assert truth_boxes(row, manifest, BoxesConfig())[0] == from_mask   # auto: falls back
    assert truth_boxes(row, manifest, BoxesConfig(source="column")) == ([], [])
    unlabelled = pd.Series({"sample_id": "x", "boxes": [[0, 0, 4, 4]], "box_labels": None,
                            "label": None, "mask_uri": None})
    assert truth_boxes(unlabelled, manifest, BoxesConfig()) == ([[0.0, 0.0, 4.0, 4.0]],
                                                               ["lesion"])
    with pytest.raises(ValueError, match="no mask_uri"):
        truth_boxes(unlabelled, manifest, BoxesConfig(source="mask"))


def test_boxes_are_scaled_with_the_image_and_follow_flips(demo64):
    from dermml.data.augment import AugmentConfig, build_box_augment
    from dermml.data.datasets import DetectionDataset

    manifest = read_manifest(demo64)
    rows = manifest.split("train").iloc[:3]
    settings = BoxesConfig(source="mask", labels="lesion")
    dataset = DetectionDataset(manifest, rows, 96, ["lesion"], settings)
    _, boxes, labels = dataset.load(0)
    full, _ = dataset.full_size_boxes(0)
    assert np.allclose(boxes, np.asarray(full) * 96 / 64) and labels.tolist() == [0]
    image, target = dataset[0]
    assert image.shape == (3, 96, 96) and target["labels"].tolist() == [1]
    x0, y0, w, h = boxes[0]
    assert target["boxes"].tolist()[0] == pytest.approx([x0, y0, x0 + w, y0 + h])

    # A bright box on black: wherever flips and 90-degree turns take it, the box follows.
    augment = build_box_augment(AugmentConfig(flips=True, color_jitter=0.0), seed=0)
    canvas = np.zeros((64, 64, 3), np.uint8)
    canvas[10:20, 30:50] = 255
    seen = set()
    for _ in range(24):
        out, moved, kept = augment(canvas, np.array([[30.0, 10.0, 20.0, 10.0]]), np.array([0]))
        (x, y, bw, bh), = moved.round().astype(int)
        assert kept.tolist() == [0]
        assert (out[y:y + bh, x:x + bw] == 255).all() and out.sum() == canvas.sum()
        seen.add((x, y, bw, bh))
    assert len(seen) > 3
    with pytest.raises(ValueError, match="augment.rotate_degrees"):
        build_box_augment(AugmentConfig(rotate_degrees=15))


# ------------------------------------------------------------------------------- metrics


def hand_built_case() -> tuple[list[Boxes], list[Boxes]]:
    """Three images, three lesions. Detections by score: .95 on an image without lesions
    (false positive), .9 exact, .8 on nothing, .7 exact, .6 shifted by 2 px (IoU 2/3)."""
    truths = [Boxes([[0, 0, 10, 10]], ["lesion"]),
              Boxes([[20, 20, 10, 10], [50, 50, 10, 10]], ["lesion", "lesion"]),
              Boxes(np.zeros((0, 4)), [])]
    predictions = [Boxes([[0, 0, 10, 10], [30, 30, 10, 10]], ["lesion"] * 2, [0.9, 0.8]),
                   Boxes([[20, 20, 10, 10], [52, 50, 10, 10]], ["lesion"] * 2, [0.7, 0.6]),
                   Boxes([[0, 0, 5, 5]], ["lesion"], [0.95])]
    return truths, predictions


def pycocotools_stats(truths: list[Boxes], predictions: list[Boxes]) -> np.ndarray:
    """COCOeval's 12 summary numbers, the plain way (files-free COCO objects)."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    classes = sorted({c for b in [*truths, *predictions] for c in b.labels})
    gt = {"images": [{"id": i + 1} for i in range(len(truths))],
          "categories": [{"id": k + 1, "name": c} for k, c in enumerate(classes)],
          "annotations": []}
    for i, t in enumerate(truths):
        for box, label in zip(t.boxes.tolist(), t.labels, strict=True):
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i + 1,
                                      "category_id": classes.index(label) + 1, "bbox": box,
                                      "area": box[2] * box[3], "iscrowd": 0})
    dets = [{"image_id": i + 1, "category_id": classes.index(label) + 1, "bbox": box,
             "score": score}
            for i, p in enumerate(predictions)
            for box, label, score in zip(p.boxes.tolist(), p.labels, p.scores.tolist(),
                                         strict=True)]
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        evaluator = COCOeval(coco, coco.loadRes(dets), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


def test_coco_ap_of_a_hand_built_case_is_pycocotools_and_the_hand_computed_value():
    truths, predictions = hand_built_case()
    ours = coco_summary(coco_matches(truths, predictions))
    # By hand: IoU <= 0.65 (4 thresholds) finds all 3 at precisions 1/2, 1/3, 1/2, 3/5, whose
    # envelope is 3/5 everywhere; above (6 thresholds) the shifted box is a miss: precision
    # 1/2 up to recall 2/3 (67 of the 101 recall points), then nothing.
    ap_low, ap_high = 0.6, 0.5 * 67 / 101
    assert ours["map50"] == pytest.approx(ap_low, abs=1e-12)
    assert ours["map75"] == pytest.approx(ap_high, abs=1e-12)
    assert ours["map"] == pytest.approx((4 * ap_low + 6 * ap_high) / 10, abs=1e-12)
    assert ours["mar100"] == pytest.approx((4 * 1 + 6 * 2 / 3) / 10, abs=1e-12)
    stats = pycocotools_stats(truths, predictions)
    assert [ours["map"], ours["map50"], ours["map75"], ours["mar100"]] == \
        pytest.approx([stats[0], stats[1], stats[2], stats[8]], abs=1e-12)


def test_coco_ap_equals_pycocotools_on_random_sets_and_resamples():
    """Matches are per image, so any subset or resample (a repeated image counts twice)
    accumulates to what pycocotools computes on that set rebuilt from its boxes."""
    rng = np.random.default_rng(0)
    classes = ["melanoma", "nevus"]
    truths, predictions = [], []
    for _ in range(12):
        n = int(rng.integers(0, 4))
        boxes = np.c_[rng.uniform(0, 80, (n, 2)), rng.uniform(5, 30, (n, 2))]
        labels = [classes[k] for k in rng.integers(0, 2, n)]
        truths.append(Boxes(boxes, labels))
        jitter = boxes + rng.normal(0, 3, boxes.shape)
        jitter[:, 2:] = np.abs(jitter[:, 2:]) + 1
        extra = int(rng.integers(0, 3))
        noise = np.c_[rng.uniform(0, 80, (extra, 2)), rng.uniform(5, 30, (extra, 2))]
        scores = np.round(rng.uniform(0, 1, n + extra), 2)  # ties across images too
        predictions.append(Boxes(np.r_[jitter, noise], labels + list(
            rng.choice(classes, extra)), scores))
    records = [json.dumps(m) for m in coco_matches(truths, predictions)]
    for index in (np.arange(12), rng.integers(0, 12, 12), rng.integers(0, 12, 12)):
        ours = coco_summary([records[i] for i in index])
        stats = pycocotools_stats([truths[i] for i in index], [predictions[i] for i in index])
        assert [ours["map"], ours["map50"], ours["map75"], ours["mar100"]] == \
            pytest.approx([stats[0], stats[1], stats[2], stats[8]], abs=1e-12)
        assert {"ap50/melanoma", "ap50/nevus"} <= set(ours)


def test_centroid_match_follows_dermsynth3d():
    """Each box must hold the other's centroid, judged against the ground truth of highest
    IoU only; duplicates and low-scoring boxes do not count."""
    truth = Boxes([[10, 10, 20, 20], [100, 100, 10, 10]], ["lesion"] * 2)
    predicted = Boxes([[15, 15, 20, 20],    # .9: centroids inside each other, IoU .39
                       [60, 60, 10, 10],    # .7: on nothing
                       [28, 10, 30, 20]],   # .3: below the threshold; its centroid is outside
                      ["lesion"] * 3, [0.9, 0.7, 0.3])
    centroid = match_counts(truth, predicted, 0.5)
    assert (centroid["tp"], centroid["fp"], centroid["fn"]) == (1, 1, 1)
    # AP over all three: recall 1/2 at precision 1, then only false positives.
    assert centroid["ap"] == pytest.approx(0.5)
    from dermml.metrics.detection import iou_above_half

    iou = match_counts(truth, predicted, 0.5, iou_above_half)  # IoU .39 is no match there
    assert (iou["tp"], iou["fp"], iou["fn"]) == (0, 2, 2)

    # A box that matches p's centroid, but whose highest IoU (.5 vs .25) is with q, whose
    # centroid (15, 25) lies on its border: a false positive under DermSynth3D's rule.
    p, q = [10, 10, 10, 10], [5, 5, 20, 40]
    counts = match_counts(Boxes([p, q], ["lesion"] * 2),
                          Boxes([[5, 5, 20, 20]], ["lesion"], [0.9]), 0.5)
    assert (counts["tp"], counts["fp"], counts["fn"]) == (0, 1, 2)
    # The same box against p alone is a match; a duplicate of it is a false positive.
    counts = match_counts(Boxes([p], ["lesion"]),
                          Boxes([[5, 5, 20, 20], [6, 6, 18, 18]], ["lesion"] * 2, [0.9, 0.8]),
                          0.5)
    assert (counts["tp"], counts["fp"], counts["fn"]) == (1, 1, 0)


def test_summary_pools_counts_and_averages_the_per_image_centroid_ap():
    truths, predictions = hand_built_case()
    records = image_records(truths, predictions, threshold=0.65)
    assert [r["n_predicted"] for r in records] == [2, 1, 1]
    assert [(r["centroid_tp"], r["centroid_fp"], r["centroid_fn"]) for r in records] == \
        [(1, 1, 0), (1, 0, 1), (0, 1, 0)]
    summary = summarize(records)
    assert summary["centroid_precision"] == pytest.approx(2 / 4)
    assert summary["centroid_recall"] == pytest.approx(2 / 3)
    assert summary["centroid_f1"] == pytest.approx(2 * 2 / (2 * 2 + 2 + 1))
    assert np.isnan(records[2]["centroid_ap"])  # no lesion: not in the mean
    assert summary["centroid_ap"] == pytest.approx((1.0 + 1.0) / 2)
    assert summary["map50"] == coco_summary([r["coco"] for r in records])["map50"]


# ------------------------------------------------------------------- training and serving


@pytest.fixture(scope="module")
def detector(demo64, tmp_path_factory):
    """A ResNet-18 Faster R-CNN trained on boxes from the demo masks (4 epochs, ~30 s)."""
    from dermml.training.run import resolve_config, train

    home = tmp_path_factory.mktemp("det-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DERMML_HOME", str(home))
        cfg = resolve_config("detection", None, [f"data.manifest={demo64}", *TINY])
        outcome = train("detection", cfg, progress=False)
    return home, outcome


def test_detector_learns_to_find_lesions(detector):
    _, outcome = detector
    assert outcome.metrics["best_val_gate"] > 0.3, outcome.metrics   # AP@0.5 on val


def test_served_boxes_are_the_evaluated_boxes_in_input_pixels(detector, demo64, monkeypatch):
    from dermml.data.datasets import resize_image
    from dermml.data.images import load_image
    from dermml.orchestration.tracking import load_python_model
    from dermml.serving.pyfunc import request_frame

    home, outcome = detector
    monkeypatch.setenv("DERMML_HOME", str(home))
    model = load_python_model(outcome.model_uri)
    manifest = read_manifest(demo64)
    image = load_image(manifest.resolve(manifest.split("test").iloc[0]["image_uri"]))
    wide = np.repeat(image, 2, axis=1)   # 128 x 64 px: the network sees it at 64 x 64
    seen = resize_image(wide, 64)
    response = model.predict(None, request_frame([image, wide, seen]),
                             params={"score_threshold": 0.0, "max_detections": 5})
    assert list(response.columns) == ["boxes", "scores", "labels", "count"]
    boxes = [np.asarray(json.loads(b)).reshape(-1, 4) for b in response["boxes"]]
    scores = json.loads(response.loc[0, "scores"])
    assert 0 < len(boxes[0]) <= 5 and response.loc[0, "count"] == len(boxes[0])
    assert scores == sorted(scores, reverse=True)
    assert set(json.loads(response.loc[0, "labels"])) == {"lesion"}
    assert (boxes[0][:, 2:] > 0).all() and (boxes[0][:, :2] + boxes[0][:, 2:] <= 64.01).all()
    assert np.allclose(boxes[1], boxes[2] * [2, 1, 2, 1], atol=0.02)  # in the input's pixels
    evaluated = model.predict_images([image], {"score_threshold": 0.0, "max_detections": 5})
    assert np.allclose(evaluated[0].boxes, boxes[0], atol=0.01)
    nothing = model.predict(None, request_frame([image]), params={"score_threshold": 1.0})
    assert json.loads(nothing.loc[0, "boxes"]) == [] and nothing.loc[0, "count"] == 0
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="max_detections=500"):
        model.predict(None, request_frame([image]), params={"max_detections": 500})


def test_evaluation_reports_ap_and_centroid_metrics_with_intervals(detector, demo64,
                                                                   monkeypatch):
    from mlflow.tracking import MlflowClient

    from dermml.evaluation.run import evaluate
    from dermml.orchestration import tracking

    home, outcome = detector
    monkeypatch.setenv("DERMML_HOME", str(home))
    result = evaluate(outcome.model_uri, demo64, ["test"], n_resamples=100)
    metrics, intervals = result.metrics["test"], result.intervals["test"]
    assert metrics["map50"] > 0.3, metrics
    for name in ("map", "map50", "map75", "mar100", "centroid_precision", "centroid_recall",
                 "centroid_f1", "centroid_ap", "iou50_f1"):
        low, high = intervals[name]
        assert low <= metrics[name] <= high, (name, low, metrics[name], high)
    artifacts = MlflowClient(tracking.tracking_uri()).list_artifacts(result.run_id,
                                                                     "evaluation")
    names = {a.path.split("/")[-1] for a in artifacts}
    assert {"test_detections.png", "test_per_sample.csv", "metrics.csv"} <= names
    train_artifacts = MlflowClient(tracking.tracking_uri()).list_artifacts(outcome.run_id,
                                                                           "previews")
    assert [a.path for a in train_artifacts] == ["previews/val_predictions.png"]


def test_shipped_presets_say_what_dermsynth3d_used():
    from pathlib import Path

    from dermml.config import load_config
    from dermml.tasks import get_task

    root = Path(__file__).resolve().parents[2] / "configs" / "detection"
    cfg = load_config(get_task("detection").config_cls, root / "dermsynth3d.yaml")
    assert cfg.model.anchor_sizes == [[32], [24], [22], [16], [8]]
    assert cfg.model.aspect_ratios == [0.75, 1.0, 1.25]
    assert (cfg.model.arch, cfg.model.backbone) == ("fasterrcnn", "resnet50")
    assert (cfg.train.optimizer, cfg.train.lr, cfg.train.momentum, cfg.train.weight_decay) == \
        ("sgd", 1e-3, 0.95, 5e-4)
    assert (cfg.data.image_size, cfg.data.batch_size, cfg.train.epochs) == (256, 8, 20)


def test_retinanet_and_mobilenet_build_and_train_a_step():
    import torch

    from dermml.models.detection import DetectorConfig, build_detector

    images = [torch.rand(3, 64, 64) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 30.0, 28.0]]),
                "labels": torch.tensor([1])}] * 2
    for arch, backbone in (("retinanet", "resnet18"), ("fasterrcnn", "mobilenet_v3")):
        cfg = DetectorConfig(arch=arch, backbone=backbone, box_head_size=64,
                             anchor_sizes=[16, 24, 32, 48, 64])
        model = build_detector(cfg, num_classes=2, image_size=64)
        losses = model(images, targets)
        sum(losses.values()).backward()
        model.eval()
        with torch.no_grad():
            (out,) = model(images[:1])
        assert set(out) == {"boxes", "scores", "labels"}


def test_sgd_momentum_is_a_loop_setting():
    import torch

    from dermml.training.loop import LoopConfig, build_optimizer, with_hyperparameters

    model = torch.nn.Linear(2, 1)
    cpu = torch.device("cpu")
    assert build_optimizer(model, LoopConfig(optimizer="sgd"), cpu).param_groups[0][
        "momentum"] == 0.9
    sgd = build_optimizer(model, LoopConfig(optimizer="sgd", momentum=0.95), cpu)
    assert sgd.param_groups[0]["momentum"] == 0.95
    state = {"optimizer": sgd.state_dict()}
    moved = with_hyperparameters(state, LoopConfig(optimizer="sgd", momentum=0.8))
    assert moved["optimizer"]["param_groups"][0]["momentum"] == 0.8
    rmsprop = build_optimizer(model, LoopConfig(optimizer="rmsprop"), cpu)
    kept = with_hyperparameters({"optimizer": rmsprop.state_dict()},
                                LoopConfig(optimizer="rmsprop", momentum=0.5))
    assert kept["optimizer"]["param_groups"][0]["momentum"] == 0.9  # not SGD's setting


def test_pretrained_weights_from_a_local_file(tmp_path):
    """A backbone's ImageNet-style weights or a whole detector checkpoint (another class
    count: its box predictor is skipped); over pretrained weights batch norm is frozen and
    three stages train, and the served network is rebuilt the same way without the file."""
    import torch
    from torchvision.models import resnet18

    from dermml.models.detection import DetectorConfig, build_detector
    from dermml.tasks import get_task

    backbone_file = tmp_path / "resnet18.pth"
    torch.save(resnet18(weights=None).state_dict(), backbone_file)
    cfg = DetectorConfig(backbone="resnet18", box_head_size=64, pretrained=str(backbone_file))
    model = build_detector(cfg, num_classes=1, image_size=64)
    weights = torch.load(backbone_file, weights_only=True)
    assert torch.equal(model.backbone.body.conv1.weight, weights["conv1.weight"])
    assert torch.equal(model.backbone.body.layer4[1].bn2.running_var,
                       weights["layer4.1.bn2.running_var"])
    assert type(model.backbone.body.bn1).__name__ == "FrozenBatchNorm2d"
    trainable = {n.split(".")[2] for n, p in model.named_parameters()
                 if n.startswith("backbone.body.") and p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}

    detector_file = tmp_path / "detector.pth"
    other = build_detector(cfg.model_copy(update={"pretrained": ""}), 4, 64)
    torch.save({"model": other.state_dict()}, detector_file)
    loaded = build_detector(cfg.model_copy(update={"pretrained": str(detector_file),
                                                   "norm": "batch"}), 1, 64)
    assert torch.equal(loaded.rpn.head.conv[0][0].weight, other.rpn.head.conv[0][0].weight)
    assert loaded.roi_heads.box_predictor.cls_score.out_features == 2  # lesion + background

    task = get_task("detection")
    task_cfg = task.config_cls(classes=["lesion"], model=cfg,
                               data={"image_size": 64, "batch_size": 2})
    served = task.build_to_load(task_cfg)   # no weights file needed, same layers
    served.load_state_dict(model.state_dict())
    assert type(served.backbone.body.bn1).__name__ == "FrozenBatchNorm2d"
