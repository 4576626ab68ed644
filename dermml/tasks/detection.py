"""Lesion detection: torchvision Faster R-CNN (DermSynth3D's anchors) or RetinaNet; boxes from
COCO manifests, synth3d views or segmentation masks; COCO AP and DermSynth3D's centroid match.

Gate: ``map50`` (COCO AP at IoU 0.5). Lesion borders are fuzzy and a box around them is
loosely defined, so the stricter IoUs of AP@[.5:.95] (``map``, also reported) mostly measure
annotation style; AP@0.5 is the usual detection gate and ranks models by finding lesions.
See docs/detection.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from pydantic import Field, model_validator
from torch import nn

from dermml.config import Section
from dermml.data.augment import box_augment_problems, build_box_augment
from dermml.data.boxes import BoxesConfig, split_classes, truth_boxes, xyxy_to_xywh
from dermml.data.datasets import DetectionDataset, image_to_tensor, resize_image
from dermml.data.manifest import Manifest
from dermml.metrics.detection import Boxes, image_records, summarize
from dermml.models.detection import DetectorConfig, build_detector, resolved
from dermml.tasks.base import DataConfig, Task, TaskConfig, register_task
from dermml.training.loop import LoopConfig
from dermml.visualization import draw_boxes, image_grid

__all__ = ["DetectionConfig", "DetectionServing", "DetectionTask", "Detections"]


class DetectionServing(Section):
    """What a request gets back (the same settings score evaluation)."""

    score_threshold: float = Field(0.5, ge=0.0, le=1.0)
    """Boxes scoring at least this are returned, and counted as found by the TP / FP / FN,
    precision, recall and F1 metrics (DermSynth3D: 0.5); AP ranks every detection."""
    max_detections: int = Field(100, ge=1)
    """Most boxes per image (highest scores first); at most model.detections_per_image."""


class DetectionConfig(TaskConfig):
    task: str = "detection"
    data: DataConfig = DataConfig(image_size=256, batch_size=8)
    model: DetectorConfig = DetectorConfig()
    boxes: BoxesConfig = BoxesConfig()
    classes: list[str] = []
    """Box classes in output order; empty: the sorted box labels of the training split."""
    train: LoopConfig = LoopConfig(epochs=20, optimizer="sgd", lr=1e-3, momentum=0.95,
                                   weight_decay=5e-4, scheduler="constant", warmup_epochs=1.0,
                                   compile=False)
    """DermSynth3D's SGD; torch.compile is off (detection graphs change shape per image)."""
    serving: DetectionServing = DetectionServing()

    @model_validator(mode="after")
    def _boxes_follow_augmentation(self):
        problems = box_augment_problems(self.augment)
        if problems:
            raise ValueError(f"{', '.join(problems)}: boxes follow only flips and 90-degree "
                             "rotations (augment.flips) and image-only transforms; set them "
                             "to 0 (policy: dermml)")
        return self


@dataclass
class Detections:
    """One image's detections, best first: [x, y, w, h] boxes in the input image's pixels,
    scores and class names, with the serving settings they were made under (what is
    returned) and where their image's ground truth comes from (for ``score``)."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: list[str]
    score_threshold: float
    truth: BoxesConfig

    def as_boxes(self) -> Boxes:
        return Boxes(self.boxes, self.labels, self.scores)

    def returned(self) -> Boxes:
        """The detections a request gets back (scores at least ``score_threshold``)."""
        return self.as_boxes().above(self.score_threshold)


def collate_detection(batch):
    """Samples -> (images, targets), tuples of per-image tensors and dicts (images and box
    counts differ, so nothing is stacked)."""
    return tuple(zip(*batch, strict=True))


def detection_loss(model: nn.Module, batch) -> torch.Tensor:
    """The sum of the detector's losses (torchvision computes them in train mode from images
    and targets: RPN objectness and box regression, box classification and regression)."""
    images, targets = batch
    losses = model(list(images), list(targets))
    return sum(losses.values())


def _json_boxes(boxes: np.ndarray) -> list[list[float]]:
    return [[round(float(v), 2) for v in box] for box in np.asarray(boxes).reshape(-1, 4)]


class DetectionTask(Task):
    name = "detection"
    config_cls = DetectionConfig
    gate_metric = "map50"
    gate_mode = "max"

    def prepare(self, cfg: DetectionConfig, manifest: Manifest) -> DetectionConfig:
        train = manifest.split(*cfg.data.train_split.split(","))
        classes = cfg.classes or split_classes(train, cfg.boxes)
        if not classes:
            raise ValueError(f"{manifest.uri}: split {cfg.data.train_split} has no boxes "
                             "(boxes column, or masks with boxes.source auto/mask)")
        return cfg.model_copy(update={"classes": classes, "model": resolved(cfg.model)})

    def build_model(self, cfg: DetectionConfig) -> nn.Module:
        if not cfg.classes:
            raise ValueError("classes are unknown: call prepare() with the training manifest")
        return build_detector(cfg.model, len(cfg.classes), cfg.data.image_size)

    def build_to_load(self, cfg: DetectionConfig) -> nn.Module:
        # Normalisation and frozen stages as trained (they depend on model.pretrained).
        model = resolved(cfg.model).model_copy(update={"pretrained": ""})
        return self.build_model(cfg.model_copy(update={"model": model}))

    def dataset(self, cfg: DetectionConfig, manifest: Manifest, rows, train: bool):
        augment = build_box_augment(cfg.augment, seed=cfg.train.seed) if train else None
        return DetectionDataset(manifest, rows, cfg.data.image_size, cfg.classes, cfg.boxes,
                                augment)

    def collate_fn(self, cfg: DetectionConfig):
        return collate_detection

    def loss_step(self, cfg: DetectionConfig):
        return detection_loss

    def min_image_size(self, cfg: DetectionConfig) -> int:
        """32 px: the ResNet / MobileNetV3 stride of the deepest backbone stage."""
        return 32

    def check_serving(self, cfg: DetectionConfig) -> None:
        if cfg.serving.max_detections > cfg.model.detections_per_image:
            raise ValueError(f"max_detections={cfg.serving.max_detections}: this model returns "
                             f"at most {cfg.model.detections_per_image} boxes per image")

    def validate(self, model, loader, device, cfg: DetectionConfig) -> dict[str, float]:
        truths, predicted = [], []
        for images, targets in loader:
            outputs = model([image.to(device) for image in images])
            for target, output in zip(targets, outputs, strict=True):
                truths.append(Boxes(xyxy_to_xywh(target["boxes"].cpu().numpy()),
                                    [cfg.classes[i - 1] for i in target["labels"].tolist()]))
                predicted.append(Boxes(xyxy_to_xywh(output["boxes"].float().cpu().numpy()),
                                       [cfg.classes[i - 1] for i in output["labels"].tolist()],
                                       output["scores"].float().cpu().numpy()))
        metrics = summarize(image_records(truths, predicted, cfg.serving.score_threshold))
        return {k: metrics[k] for k in ("map50", "map", "map75", "mar100", "centroid_precision",
                                        "centroid_recall", "centroid_f1", "centroid_ap")}

    @torch.no_grad()
    def predict(self, model, images, cfg: DetectionConfig) -> list[Detections]:
        """Detections per image, in its own pixels: images are resized to data.image_size
        (as in training) and the boxes scaled back."""
        model.eval()
        device = next(model.parameters()).device
        size = cfg.data.image_size
        out = []
        for start in range(0, len(images), cfg.data.batch_size):
            chunk = images[start:start + cfg.data.batch_size]
            batch = [image_to_tensor(resize_image(image, size)).to(device) for image in chunk]
            for image, result in zip(chunk, model(batch), strict=True):
                h, w = image.shape[:2]
                boxes = xyxy_to_xywh(result["boxes"].float().cpu().numpy())
                boxes[:, [0, 2]] *= w / size
                boxes[:, [1, 3]] *= h / size
                scores = result["scores"].float().cpu().numpy()
                order = np.argsort(-scores, kind="stable")[:cfg.serving.max_detections]
                labels = result["labels"].cpu().numpy()
                out.append(Detections(boxes[order], scores[order],
                                      [cfg.classes[int(i) - 1] for i in labels[order]],
                                      cfg.serving.score_threshold, cfg.boxes))
        return out

    def score(self, predictions: list[Detections], rows: pd.DataFrame,
              manifest: Manifest) -> pd.DataFrame:
        """Per image: counts at the serving threshold (centroid and IoU>0.5 matches), the
        centroid AP, the COCO match results, and the boxes (JSON) behind them."""
        settings = predictions[0].truth if predictions else BoxesConfig()
        truths = [Boxes(*truth_boxes(row, manifest, settings)) for _, row in rows.iterrows()]
        predicted = [p.as_boxes() for p in predictions]
        threshold = predictions[0].score_threshold if predictions else 0.5
        per_sample = pd.DataFrame(image_records(truths, predicted, threshold))
        per_sample.insert(0, "sample_id", rows["sample_id"].to_numpy())
        per_sample["truth"] = [json.dumps({"boxes": _json_boxes(t.boxes), "labels": t.labels})
                               for t in truths]
        per_sample["predictions"] = [json.dumps({"boxes": _json_boxes(p.boxes),
                                                 "scores": [round(float(s), 4)
                                                            for s in p.scores],
                                                 "labels": p.labels}) for p in predicted]
        return per_sample

    def aggregate(self, per_sample: pd.DataFrame) -> dict[str, float]:
        return summarize(per_sample)

    def figures(self, per_sample, images, predictions, rows, manifest) -> dict:
        """Worst images first (most centroid misses and false alarms): truth green,
        returned detections red with their scores."""
        errors = (per_sample["centroid_fp"] + per_sample["centroid_fn"]).to_numpy()
        order = np.argsort(-errors, kind="stable")[:16]
        multiclass = len({c for p in predictions for c in p.labels}) > 1
        tiles = []
        for i in order:
            truth = json.loads(per_sample["truth"].iloc[i])
            shown = predictions[i].returned()
            tiles.append(draw_boxes(images[i], truth["boxes"], shown.boxes, shown.scores,
                                    shown.labels if multiclass else ()))
        return {"detections.png": image_grid(tiles, columns=4)}

    def encode_predictions(self, predictions: list[Detections]) -> pd.DataFrame:
        returned = [p.returned() for p in predictions]
        return pd.DataFrame({
            "boxes": [json.dumps(_json_boxes(r.boxes)) for r in returned],
            "scores": [json.dumps([round(float(s), 4) for s in r.scores]) for r in returned],
            "labels": [json.dumps(r.labels) for r in returned],
            "count": [len(r.labels) for r in returned]})

    def response_schema(self):
        return [("boxes", "string"), ("scores", "string"), ("labels", "string"),
                ("count", "long")]

    def preview(self, model, dataset: DetectionDataset, cfg: DetectionConfig,
                n: int = 8) -> np.ndarray:
        """Validation images: truth green, detections at the serving threshold red."""
        samples = [dataset.load(i) for i in range(min(n, len(dataset)))]
        predictions = self.predict(model, [image for image, _, _ in samples], cfg)
        multiclass = len(cfg.classes) > 1
        tiles = []
        for (image, boxes, _), detections in zip(samples, predictions, strict=True):
            shown = detections.returned()
            tiles.append(draw_boxes(image, boxes, shown.boxes, shown.scores,
                                    shown.labels if multiclass else ()))
        return image_grid(tiles, columns=4)


register_task(DetectionTask())
