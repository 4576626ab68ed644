"""Binary lesion segmentation: U-Net, BCE + Dice loss, Dice/IoU/sensitivity/specificity/accuracy."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from dermml.config import Section
from dermml.data.datasets import (
    SegmentationDataset,
    image_to_tensor,
    resize_image,
    resize_mask,
)
from dermml.data.images import encode_png, load_mask, to_base64
from dermml.data.manifest import Manifest
from dermml.losses.segmentation import bce_dice_loss
from dermml.metrics.segmentation import confusion, scores_from_confusion, segmentation_scores
from dermml.models.unet import UNet
from dermml.tasks.base import Task, TaskConfig, register_task
from dermml.visualization import image_grid, overlay_boundaries


class UNetConfig(Section):
    """Segmentation network."""

    arch: Literal["unet"] = "unet"
    """Architecture name."""
    base_channels: int = 16
    """Channels of the first encoder stage (doubled at each stage)."""
    depth: int = 3
    """Number of down-sampling stages (input size must divide by 2**depth)."""


class SegLossConfig(Section):
    """Weighted sum of losses."""

    bce: float = 1.0
    """Weight of binary cross-entropy."""
    dice: float = 1.0
    """Weight of soft Dice loss."""


class AugmentConfig(Section):
    """Training augmentation (albumentations)."""

    flips: bool = True
    """Random horizontal/vertical flips and 90-degree rotations (lesions have no orientation)."""
    color_jitter: float = 0.1
    """Brightness/contrast/saturation jitter strength (0 disables)."""


class SegmentationConfig(TaskConfig):
    task: str = "segmentation"
    model: UNetConfig = UNetConfig()
    loss: SegLossConfig = SegLossConfig()
    augment: AugmentConfig = AugmentConfig()


def build_augment(cfg: AugmentConfig):
    """albumentations pipeline over (image, mask) numpy pairs, or None when disabled."""
    import albumentations as A

    ops = []
    if cfg.flips:
        ops += [A.HorizontalFlip(), A.VerticalFlip(), A.RandomRotate90()]
    if cfg.color_jitter > 0:
        j = cfg.color_jitter
        ops.append(A.ColorJitter(brightness=j, contrast=j, saturation=j, hue=0.0, p=0.5))
    if not ops:
        return None
    pipeline = A.Compose(ops)

    def augment(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = pipeline(image=image, mask=mask.astype(np.uint8))
        return out["image"], out["mask"].astype(bool)

    return augment


class SegmentationTask(Task):
    name = "segmentation"
    config_cls = SegmentationConfig
    gate_metric = "dice"
    gate_mode = "max"

    def build_model(self, cfg: SegmentationConfig) -> nn.Module:
        return UNet(3, 1, cfg.model.base_channels, cfg.model.depth)

    def datasets(self, cfg: SegmentationConfig, manifest: Manifest):
        size = cfg.data.image_size
        train_rows = manifest.split(*cfg.data.train_split.split(","))
        val_rows = manifest.split(*cfg.data.val_split.split(","))
        return (SegmentationDataset(manifest, train_rows, size, build_augment(cfg.augment)),
                SegmentationDataset(manifest, val_rows, size))

    def loss_step(self, cfg: SegmentationConfig):
        weights = cfg.loss

        def step(model: nn.Module, batch) -> torch.Tensor:
            images, masks = batch
            return bce_dice_loss(model(images), masks, weights.bce, weights.dice)

        return step

    def validate(self, model, loader, device) -> dict[str, float]:
        # Pixel counts are summed on device; one host sync per validation pass.
        totals = torch.zeros(4, dtype=torch.float64, device=device)
        dice_sum = torch.zeros((), dtype=torch.float64, device=device)
        n = 0
        for images, masks in loader:
            pred = model(images.to(device)) > 0
            target = masks.to(device) > 0.5
            tp = (pred & target).flatten(1).sum(1)
            fp = (pred & ~target).flatten(1).sum(1)
            fn = (~pred & target).flatten(1).sum(1)
            tn = (~pred & ~target).flatten(1).sum(1)
            totals += torch.stack([tp.sum(), fp.sum(), fn.sum(), tn.sum()]).double()
            den = (2 * tp + fp + fn).double()
            dice_sum += torch.where(den > 0, 2 * tp / den.clamp(min=1), torch.ones_like(den)).sum()
            n += images.shape[0]
        tp, fp, fn, tn = totals.tolist()
        scores = scores_from_confusion(tp, fp, fn, tn)
        scores["dice"] = float(dice_sum) / max(1, n)  # per-image mean, as in evaluation
        return scores

    @torch.no_grad()
    def predict(self, model, images, cfg: SegmentationConfig) -> list[np.ndarray]:
        model.eval()
        device = next(model.parameters()).device
        masks = []
        for image in images:
            x = image_to_tensor(resize_image(image, cfg.data.image_size))[None].to(device)
            prob = torch.sigmoid(model(x).float())
            prob = F.interpolate(prob, size=image.shape[:2], mode="bilinear", align_corners=False)
            masks.append(prob[0, 0].cpu().numpy() > cfg.serving.threshold)
        return masks

    def score(self, predictions, rows: pd.DataFrame, manifest: Manifest):
        records = []
        for pred, (_, row) in zip(predictions, rows.iterrows(), strict=True):
            truth = load_mask(manifest.resolve(row["mask_uri"]))
            records.append({"sample_id": row["sample_id"], **segmentation_scores(pred, truth),
                            "_confusion": confusion(pred, truth)})
        per_sample = pd.DataFrame(records)
        summary = {k: float(per_sample[k].mean()) for k in
                   ("dice", "iou", "sensitivity", "specificity", "accuracy")}
        pooled = np.sum(np.array(per_sample.pop("_confusion").tolist()), axis=0)
        summary.update({f"pooled_{k}": v for k, v in scores_from_confusion(*pooled).items()
                        if k in ("dice", "iou")})
        return per_sample, summary

    def encode_predictions(self, predictions) -> pd.DataFrame:
        return pd.DataFrame({
            "mask": [to_base64(encode_png(m)) for m in predictions],
            "lesion_fraction": [float(m.mean()) for m in predictions],
            "height": [int(m.shape[0]) for m in predictions],
            "width": [int(m.shape[1]) for m in predictions],
        })

    def response_schema(self):
        return [("mask", "string"), ("lesion_fraction", "double"), ("height", "long"),
                ("width", "long")]

    def preview(self, model, dataset: SegmentationDataset, cfg, n: int = 8) -> np.ndarray:
        pairs = [dataset.load(i) for i in range(min(n, len(dataset)))]
        preds = self.predict(model, [img for img, _ in pairs], cfg)
        side = max(128, cfg.data.image_size)  # small inputs are unreadable at native size
        tiles = [overlay_boundaries(resize_image(img, side), resize_mask(gt, side),
                                    resize_mask(pred, side))
                 for (img, gt), pred in zip(pairs, preds, strict=True)]
        return image_grid(tiles, columns=4)


register_task(SegmentationTask())
