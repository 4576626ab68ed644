"""Dermoscopic attribute segmentation (ISIC 2017/2018 task 2): background + 5 attributes,
U-Net with an Inception-v3 encoder and ASPP, weighted CE / focal loss, per-class morphological
post-processing, per-class Jaccard and AUC."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from dermml.data.augment import build_augment
from dermml.data.datasets import (
    AttributeDataset,
    class_pixel_counts,
    image_to_tensor,
    resize_image,
)
from dermml.data.images import encode_png, load_mask, to_base64
from dermml.data.manifest import ATTRIBUTES, Manifest
from dermml.losses.catalog import LossTerm, build_loss, inverse_frequency_weights
from dermml.metrics.attributes import jaccard_from_counts, mean_jaccard, per_class_auc
from dermml.models.segmentation import SegModelConfig, build_segmenter, input_multiple
from dermml.tasks.base import DataConfig, Task, TaskConfig, register_task
from dermml.tasks.postprocess import (
    ATTRIBUTE_POSTPROCESS,
    PostprocessConfig,
    postprocess_multiclass,
)
from dermml.visualization import image_grid

PALETTE = np.array([(0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200),
                    (245, 130, 48)], np.uint8)
PIXELS_PER_IMAGE_FOR_AUC = 2048


class AttributesConfig(TaskConfig):
    task: str = "attributes"
    data: DataConfig = DataConfig(image_size=256)
    """Inception-v3 needs at least 75 px; the reference trains at 256."""
    model: SegModelConfig = SegModelConfig(arch="unet", encoder="tu-inception_v3", aspp=True)
    """Reference: U-Net, Inception-v3 encoder, ASPP with dilations 2, 3, 4."""
    attributes: list[str] = list(ATTRIBUTES)
    """Attribute classes 1..K in order (0 is background)."""
    class_weights: list[float] = []
    """Per-class loss weights (background first); empty: inverse pixel frequency of train."""
    loss: list[LossTerm] = [LossTerm(name="focal", params={"gamma": 2.0})]
    """Reference: focal loss (gamma 2) with inverse-frequency class weights; or weighted_ce."""
    postprocess: dict[int, PostprocessConfig] = dict(ATTRIBUTE_POSTPROCESS)
    """Per-class morphology (class index -> settings), identical in evaluation and serving."""


class AttributesTask(Task):
    name = "attributes"
    config_cls = AttributesConfig
    gate_metric = "mean_jaccard"
    gate_mode = "max"

    def prepare(self, cfg: AttributesConfig, manifest: Manifest) -> AttributesConfig:
        if cfg.class_weights:
            return cfg
        train = self.dataset(cfg, manifest, manifest.split(*cfg.data.train_split.split(",")),
                             False)
        counts = class_pixel_counts(train, max_samples=500)
        return cfg.model_copy(update={"class_weights": inverse_frequency_weights(counts).tolist()})

    def build_model(self, cfg: AttributesConfig) -> nn.Module:
        return build_segmenter(cfg.model, classes=len(cfg.attributes) + 1)

    def dataset(self, cfg: AttributesConfig, manifest: Manifest, rows, train: bool):
        augment = build_augment(cfg.augment, seed=cfg.train.seed) if train else None
        return AttributeDataset(manifest, rows, cfg.data.image_size, tuple(cfg.attributes),
                                augment)

    def min_image_size(self, cfg: AttributesConfig) -> int:
        return input_multiple(cfg.model)

    def loss_step(self, cfg: AttributesConfig):
        weights = torch.tensor(cfg.class_weights, dtype=torch.float32) if cfg.class_weights \
            else None
        loss_fn = build_loss(cfg.loss, class_weights=weights)

        def step(model: nn.Module, batch) -> torch.Tensor:
            images, label_maps = batch
            return loss_fn(model(images), label_maps)

        return step

    def validate(self, model, loader, device, cfg=None) -> dict[str, float]:
        n_classes = None
        inter = union = None
        for images, target in loader:
            logits = model(images.to(device))
            n_classes = logits.shape[1]
            pred = logits.argmax(1)
            target = target.to(device)
            classes = torch.arange(n_classes, device=device).view(1, -1, 1, 1)
            p, t = pred.unsqueeze(1) == classes, target.unsqueeze(1) == classes
            i, u = (p & t).sum((0, 2, 3)), (p | t).sum((0, 2, 3))
            inter = i if inter is None else inter + i
            union = u if union is None else union + u
        per_class = jaccard_from_counts(inter.cpu().numpy(), union.cpu().numpy())
        scores = {f"jaccard_{c}": v for c, v in per_class.items() if np.isfinite(v)}
        scores["mean_jaccard"] = mean_jaccard(per_class)
        return scores

    @torch.no_grad()
    def probabilities(self, model, images, cfg: AttributesConfig) -> list[np.ndarray]:
        """(K+1, H, W) class probabilities at each input's own size."""
        model.eval()
        device = next(model.parameters()).device
        out = []
        for image in images:
            x = image_to_tensor(resize_image(image, cfg.data.image_size))[None].to(device)
            prob = torch.softmax(model(x).float(), 1)
            prob = F.interpolate(prob, size=image.shape[:2], mode="bilinear", align_corners=False)
            out.append(prob[0].cpu().numpy())
        return out

    def predict(self, model, images, cfg: AttributesConfig) -> list[dict]:
        """Per image: the post-processed label map and the class probabilities."""
        return [{"label_map": postprocess_multiclass(p, cfg.postprocess), "probs": p,
                 "attributes": list(cfg.attributes)}
                for p in self.probabilities(model, images, cfg)]

    def score(self, predictions, rows: pd.DataFrame, manifest: Manifest) -> pd.DataFrame:
        attributes = predictions[0]["attributes"]
        rng = np.random.default_rng(0)
        records = []
        for pred, (_, row) in zip(predictions, rows.iterrows(), strict=True):
            truth = attribute_label_map(manifest, row, attributes, pred["label_map"].shape)
            label_map, probs = pred["label_map"], pred["probs"]
            record = {"sample_id": row["sample_id"]}
            for k in range(len(attributes) + 1):
                p, t = label_map == k, truth == k
                record[f"inter/{k}"] = int((p & t).sum())
                record[f"union/{k}"] = int((p | t).sum())
            # A bounded pixel sample per image keeps AUC cheap enough to bootstrap.
            flat = rng.choice(truth.size, min(truth.size, PIXELS_PER_IMAGE_FOR_AUC),
                              replace=False)
            record["auc_truth"] = truth.reshape(-1)[flat]
            record["auc_probs"] = probs.reshape(probs.shape[0], -1)[:, flat]
            records.append(record)
        per_sample = pd.DataFrame(records)
        per_sample.attrs["attributes"] = attributes
        return per_sample

    def aggregate(self, per_sample: pd.DataFrame) -> dict[str, float]:
        attributes = per_sample.attrs.get("attributes", list(ATTRIBUTES))
        classes = range(len(attributes) + 1)
        per_class = jaccard_from_counts([per_sample[f"inter/{k}"].sum() for k in classes],
                                        [per_sample[f"union/{k}"].sum() for k in classes])
        summary: dict[str, float] = {f"jaccard/{name}": per_class[k]
                                     for k, name in enumerate(attributes, start=1)
                                     if np.isfinite(per_class[k])}
        summary["mean_jaccard"] = mean_jaccard(per_class)
        probs = [p[:, None] if p.ndim == 1 else p for p in per_sample["auc_probs"]]
        aucs = per_class_auc([p for p in probs], list(per_sample["auc_truth"]),
                             len(attributes) + 1)
        for k, name in enumerate(attributes, start=1):
            if np.isfinite(aucs.get(k, np.nan)):
                summary[f"auc/{name}"] = float(aucs[k])
        finite = [summary[f"auc/{n}"] for n in attributes if f"auc/{n}" in summary]
        summary["mean_auc"] = float(np.mean(finite)) if finite else float("nan")
        return summary

    def figures(self, per_sample, images, predictions, rows, manifest) -> dict:
        attributes = predictions[0]["attributes"]
        tiles = []
        for image, pred, (_, row) in list(zip(images, predictions, rows.iterrows(),
                                              strict=True))[:6]:
            truth = attribute_label_map(manifest, row, attributes, image.shape[:2])
            tiles += [image, colorize(truth, image), colorize(pred["label_map"], image)]
        return {"attribute_overlays.png": image_grid(tiles, columns=3)}

    def encode_predictions(self, predictions) -> pd.DataFrame:
        rows = []
        for pred in predictions:
            label_map = pred["label_map"]
            fractions = {name: float((label_map == k).mean())
                         for k, name in enumerate(pred["attributes"], start=1)}
            rows.append({"label_map": to_base64(encode_png(label_map.astype(np.uint8))),
                         "attribute_fractions": json.dumps(fractions)})
        return pd.DataFrame(rows)

    def response_schema(self):
        return [("label_map", "string"), ("attribute_fractions", "string")]

    def preview(self, model, dataset: AttributeDataset, cfg, n: int = 4) -> np.ndarray:
        pairs = [dataset.load(i) for i in range(min(n, len(dataset)))]
        preds = self.predict(model, [img for img, _ in pairs], cfg)
        tiles = []
        for (img, truth), pred in zip(pairs, preds, strict=True):
            big = resize_image(img, max(128, img.shape[0]))
            scale = big.shape[0] // img.shape[0]
            tiles += [big, colorize(np.kron(truth, np.ones((scale, scale), int)), big),
                      colorize(np.kron(pred["label_map"], np.ones((scale, scale), int)), big)]
        return image_grid(tiles, columns=3)


def attribute_label_map(manifest: Manifest, row, attributes: list[str],
                        shape: tuple[int, int]) -> np.ndarray:
    """Ground-truth label map at ``shape`` (later attributes win where masks overlap)."""
    from dermml.data.datasets import resize_mask

    label_map = np.zeros(shape, np.int64)
    uris = row["attribute_mask_uris"] or {}
    for k, name in enumerate(attributes, start=1):
        if uris.get(name):
            mask = load_mask(manifest.resolve(uris[name]))
            if mask.shape != shape:
                mask = resize_mask(mask, shape[0]) if shape[0] == shape[1] else mask
            label_map[mask] = k
    return label_map


def colorize(label_map: np.ndarray, image: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """Attribute classes painted over the image (background left as is)."""
    out = image.astype(np.float32).copy()
    fg = label_map > 0
    out[fg] = (1 - alpha) * out[fg] + alpha * PALETTE[label_map[fg] % len(PALETTE)]
    return out.astype(np.uint8)


register_task(AttributesTask())
