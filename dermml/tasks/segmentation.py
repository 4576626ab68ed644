"""Binary lesion segmentation: compact U-Net / smp U-Net (+ASPP) / DeepLabV3, configurable loss
terms, morphological post-processing, Dice / IoU / HD95 / sensitivity / specificity / accuracy."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from dermml.data.augment import AugmentConfig, build_augment
from dermml.data.datasets import (
    SegmentationDataset,
    image_to_tensor,
    resize_image,
)
from dermml.data.images import encode_png, load_mask, to_base64
from dermml.data.manifest import Manifest
from dermml.losses.catalog import LossTerm, build_loss
from dermml.metrics.segmentation import (
    POOLED_REF_METRICS,
    confusion,
    hd95,
    reference_confusion,
    reference_pooled_scores,
    scores_from_confusion,
)
from dermml.models.segmentation import SegModelConfig, build_segmenter, input_multiple
from dermml.tasks.base import Task, TaskConfig, register_task
from dermml.tasks.postprocess import PostprocessConfig, postprocess_binary
from dermml.visualization import image_grid, overlay_boundaries

__all__ = ["AugmentConfig", "SegmentationConfig", "SegmentationTask"]

PER_IMAGE = ("dice", "iou", "sensitivity", "specificity", "precision", "accuracy")
REF_COUNTS = ("ref_tp", "ref_fp", "ref_fn", "ref_tn")
"""Per-image pixel counts at 128 x 128 behind the ``pooled_ref_*`` metrics: DermoSegDiff's test
metrics (torchmetrics over all test pixels at its input size), reported beside the per-image
means so results compare with the paper's tables."""


class SegmentationConfig(TaskConfig):
    task: str = "segmentation"
    model: SegModelConfig = SegModelConfig()
    loss: list[LossTerm] = [LossTerm(name="bce"), LossTerm(name="dice")]
    """Weighted sum of loss terms (names: see dermml/losses/catalog.py)."""
    postprocess: PostprocessConfig = PostprocessConfig()
    """Morphology after thresholding (threshold itself: serving.threshold), identical in
    evaluation and serving."""


def postprocess_settings(cfg: SegmentationConfig) -> PostprocessConfig:
    return cfg.postprocess.model_copy(update={"threshold": cfg.serving.threshold})


def resized_for_display(image: np.ndarray, *masks: np.ndarray, side: int = 128,
                        max_side: int = 512):
    """An image and its masks at a readable size for contour overlays, aspect ratio kept:
    small inputs scaled up to a shorter side of ``side`` px, large ones (original-size ISIC)
    down to a longer side of ``max_side`` px, so 1-px contours stay visible in a grid."""
    from PIL import Image

    h, w = image.shape[:2]
    scale = side / min(h, w) if min(h, w) < side else 1.0
    if max(h, w) * scale > max_side:
        scale = max_side / max(h, w)
    if scale == 1.0:
        return (image, *masks)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    shown = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    return (shown, *[np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize(
        size, Image.NEAREST)) > 127 for m in masks])


class SegmentationTask(Task):
    name = "segmentation"
    config_cls = SegmentationConfig
    gate_metric = "dice"
    gate_mode = "max"

    def build_model(self, cfg: SegmentationConfig) -> nn.Module:
        return build_segmenter(cfg.model, classes=1)

    def dataset(self, cfg: SegmentationConfig, manifest: Manifest, rows, train: bool):
        augment = build_augment(cfg.augment, seed=cfg.train.seed) if train else None
        return SegmentationDataset(manifest, rows, cfg.data.image_size, augment)

    def min_image_size(self, cfg: SegmentationConfig) -> int:
        return input_multiple(cfg.model)

    def loss_step(self, cfg: SegmentationConfig):
        loss_fn = build_loss(cfg.loss)

        def step(model: nn.Module, batch) -> torch.Tensor:
            images, masks = batch
            return loss_fn(model(images), masks)

        return step

    def validate(self, model, loader, device, cfg=None) -> dict[str, float]:
        # Pixel counts stay on device; one host sync per validation pass.
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
        scores = scores_from_confusion(*totals.tolist())
        scores["dice"] = float(dice_sum) / max(1, n)  # per-image mean, as in evaluation
        return scores

    @torch.no_grad()
    def probabilities(self, model, images, cfg: SegmentationConfig) -> list[np.ndarray]:
        """Lesion probability maps at each input's own size."""
        model.eval()
        device = next(model.parameters()).device
        out = []
        for image in images:
            x = image_to_tensor(resize_image(image, cfg.data.image_size))[None].to(device)
            prob = torch.sigmoid(model(x).float())
            prob = F.interpolate(prob, size=image.shape[:2], mode="bilinear", align_corners=False)
            out.append(prob[0, 0].cpu().numpy())
        return out

    def predict(self, model, images, cfg: SegmentationConfig) -> list[np.ndarray]:
        settings = postprocess_settings(cfg)
        return [postprocess_binary(p, settings) for p in self.probabilities(model, images, cfg)]

    def score(self, predictions, rows: pd.DataFrame, manifest: Manifest) -> pd.DataFrame:
        records = []
        for pred, (_, row) in zip(predictions, rows.iterrows(), strict=True):
            truth = load_mask(manifest.resolve(row["mask_uri"]))
            tp, fp, fn, tn = confusion(pred, truth)
            ref = dict(zip(REF_COUNTS, reference_confusion(pred, truth), strict=True))
            records.append({"sample_id": row["sample_id"], **scores_from_confusion(tp, fp, fn, tn),
                            "hd95": hd95(pred, truth), "tp": tp, "fp": fp, "fn": fn, "tn": tn,
                            **ref})
        return pd.DataFrame(records)

    def aggregate(self, per_sample: pd.DataFrame) -> dict[str, float]:
        summary = {k: float(per_sample[k].mean()) for k in PER_IMAGE}
        summary["hd95"] = float(np.nanmean(per_sample["hd95"])) if \
            per_sample["hd95"].notna().any() else float("nan")
        pooled = scores_from_confusion(*(int(per_sample[c].sum()) for c in ("tp", "fp", "fn",
                                                                              "tn")))
        summary["pooled_dice"], summary["pooled_iou"] = pooled["dice"], pooled["iou"]
        ref = reference_pooled_scores(*(int(per_sample[c].sum()) for c in REF_COUNTS))
        summary.update({f"pooled_ref_{k}": ref[k] for k in POOLED_REF_METRICS})
        return summary

    def figures(self, per_sample, images, predictions, rows, manifest) -> dict:
        """Worst-first overlays (green: ground truth, magenta: prediction)."""
        order = np.argsort(per_sample["dice"].to_numpy())[:8]
        tiles = []
        for i in order:
            truth = load_mask(manifest.resolve(rows.iloc[i]["mask_uri"]))
            tiles.append(overlay_boundaries(*resized_for_display(images[i], truth,
                                                                 predictions[i])))
        return {"worst_overlays.png": image_grid(tiles)}

    def relabel(self, predictions, rows: pd.DataFrame, out_dir: str) -> pd.DataFrame:
        from dermml import storage

        out = rows.copy()
        uris = []
        for mask, sample_id in zip(predictions, rows["sample_id"], strict=True):
            uri = storage.join(out_dir, "masks", f"{sample_id}.png")
            storage.write_bytes(uri, encode_png(mask))
            uris.append(uri)
        out["mask_uri"] = uris
        return out

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
        tiles = [overlay_boundaries(*resized_for_display(img, gt, pred))
                 for (img, gt), pred in zip(pairs, preds, strict=True)]
        return image_grid(tiles, columns=4)


register_task(SegmentationTask())
