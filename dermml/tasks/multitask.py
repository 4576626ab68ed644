"""Multi-task dense prediction (DermSynth3D's multi-task model): DeepLabV3 with a lesion head
(non-skin / skin / lesion), an anatomy head (8 classes) and an optional depth head, trained on
``dermml synth3d`` output (every head has targets there) and on real sets (lesion masks only),
each head on the samples that label it.

Metrics: lesion Dice / IoU (per-image means, the lesion class of the lesion head thresholded at
``serving.threshold`` and post-processed as served: the gate is ``lesion_dice``); non-skin /
skin / lesion pixel accuracy, mIoU and skin / non-skin IoU; anatomy pixel accuracy, mIoU (8
classes) and IoU per class; depth abs-rel, RMSE (metres) and delta < 1.25. A set that labels
only lesions (ISIC, PH2, the demo data) reports lesion metrics only.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import nn

from dermml.config import ConfigError, Section
from dermml.data.augment import build_augment
from dermml.data.datasets import image_to_tensor, resize_image
from dermml.data.images import encode_png, to_base64
from dermml.data.manifest import Manifest, read_manifest
from dermml.data.multitask import (
    ANATOMY_LABELS,
    LESION,
    NONSKIN,
    SEG_LABELS,
    SKIN,
    MultitaskDataset,
    row_targets,
    target_counts,
)
from dermml.losses.multitask import anatomy_loss, depth_from_log, depth_loss, lesion_head_loss
from dermml.metrics.multitask import class_counts, class_metrics, depth_metrics, depth_sums
from dermml.metrics.segmentation import confusion, scores_from_confusion
from dermml.models.multitask import HEADS, MultitaskModelConfig, build_multitask
from dermml.tasks.base import DataConfig, Task, TaskConfig, register_task
from dermml.tasks.postprocess import PostprocessConfig, postprocess_binary
from dermml.tasks.segmentation import postprocess_settings, resized_for_display
from dermml.visualization import image_grid, overlay_boundaries

Head = Literal["lesion", "anatomy", "depth"]
SEG_PALETTE = np.array([(40, 40, 40), (230, 190, 150), (200, 30, 60)], np.uint8)
ANATOMY_PALETTE = np.array([(0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25),
                            (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)],
                           np.uint8)


class MultitaskLossConfig(Section):
    """The training loss: a weighted sum of the heads' losses."""

    weights: dict[str, float] = {"lesion": 1.0, "anatomy": 1.0, "depth": 1.0}
    """Weight of each head's loss (heads the model lacks are ignored; a missing one is 1)."""
    lesion_dice: float = Field(0.0, ge=0)
    """Weight of the soft Dice of the lesion class, added to the lesion head's likelihood
    loss (0: the likelihood alone)."""
    depth: Literal["l1", "silog"] = "l1"
    """Depth loss over pixels of known depth: l1 (metres) or silog (Eigen et al.'s
    scale-invariant log loss)."""
    silog_lambda: float = Field(0.5, ge=0, le=1)
    """silog: weight of the squared mean log error (Eigen et al.: 0.5; 1 ignores scale)."""

    @field_validator("weights")
    @classmethod
    def _known_heads(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(HEADS))
        if unknown:
            raise ValueError(f"loss weights for unknown heads {unknown}; heads: {list(HEADS)}")
        if any(w < 0 for w in value.values()):
            raise ValueError("loss weights must be >= 0")
        return value


class MultitaskConfig(TaskConfig):
    task: str = "multitask"
    data: DataConfig = DataConfig(image_size=320, batch_size=8)
    """DermSynth3D's multi-task models take 320 x 320 inputs."""
    heads: list[Head] = ["lesion", "anatomy"]
    """Heads of the network: lesion (non-skin / skin / lesion map; required, it carries the
    gate metric), anatomy (8 classes), depth. DermSynth3D's published models: lesion and
    anatomy."""
    model: MultitaskModelConfig = MultitaskModelConfig()
    loss: MultitaskLossConfig = MultitaskLossConfig()
    postprocess: PostprocessConfig = PostprocessConfig()
    """Morphology of the lesion mask after thresholding (threshold: serving.threshold),
    identical in evaluation and serving."""

    @model_validator(mode="after")
    def _lesion_head(self) -> MultitaskConfig:
        if "lesion" not in self.heads:
            raise ValueError(f"heads {self.heads}: the lesion head is required (the gate "
                             "metric is lesion Dice); e.g. heads=[lesion] or "
                             "heads=[lesion,anatomy,depth]")
        if len(set(self.heads)) != len(self.heads):
            raise ValueError(f"heads {self.heads}: each head once")
        return self


def seg_labels(probs, lesion):
    """The non-skin / skin / lesion map of lesion-head probabilities (C first: (3, H, W) numpy
    or (N, 3, H, W) torch) and the (post-processed) lesion mask: lesion where ``lesion``,
    elsewhere the likelier of skin and non-skin."""
    if isinstance(probs, torch.Tensor):
        skin = probs[:, SKIN] >= probs[:, NONSKIN]
        return torch.where(lesion, LESION, torch.where(skin, SKIN, NONSKIN))
    skin = probs[SKIN] >= probs[NONSKIN]
    return np.where(lesion, LESION, np.where(skin, SKIN, NONSKIN)).astype(np.uint8)


def _summary(sums: dict) -> dict[str, float]:
    """Every metric the sums allow (a head whose targets no sample had reports nothing)."""
    out: dict[str, float] = {}
    if sums.get("lesion_n"):
        out["lesion_dice"] = float(sums["lesion_dice_sum"] / sums["lesion_n"])
        out["lesion_iou"] = float(sums["lesion_iou_sum"] / sums["lesion_n"])
    if sums.get("seg_pixels"):
        seg = class_metrics("seg", SEG_LABELS, sums["seg_inter"], sums["seg_union"],
                            sums["seg_pixels"])
        out["seg_pixel_accuracy"], out["seg_miou"] = seg["seg_pixel_accuracy"], seg["seg_miou"]
        for name in ("skin", "nonskin"):
            if f"seg_iou/{name}" in seg:
                out[f"{name}_iou"] = seg[f"seg_iou/{name}"]
    if sums.get("anatomy_pixels"):
        out.update(class_metrics("anatomy", ANATOMY_LABELS, sums["anatomy_inter"],
                                 sums["anatomy_union"], sums["anatomy_pixels"]))
    if sums.get("depth_n"):
        out.update(depth_metrics({k: sums[f"depth_{k}"] for k in ("abs_rel_sum", "sq_sum",
                                                                  "delta1", "n")}))
    return out


def _colorize(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    return palette[np.clip(labels.astype(np.int64), 0, len(palette) - 1)]


def _depth_image(depth: np.ndarray | None, shape: tuple[int, int],
                 span: tuple[float, float] | None = None) -> np.ndarray:
    """Depth as grey (near is bright; unknown black); ``span`` (near, far) metres."""
    if depth is None:
        return np.full((*shape, 3), 128, np.uint8)
    known = depth > 0
    if span is None:
        span = (float(depth[known].min()), float(depth[known].max())) if known.any() else (0, 1)
    near, far = span
    grey = 1 - (depth - near) / max(far - near, 1e-6)
    grey = np.where(known, 40 + 215 * np.clip(grey, 0, 1), 0).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


class MultitaskTask(Task):
    name = "multitask"
    config_cls = MultitaskConfig
    gate_metric = "lesion_dice"
    gate_mode = "max"

    def build_model(self, cfg: MultitaskConfig) -> nn.Module:
        return build_multitask(cfg.model, tuple(cfg.heads))

    def min_image_size(self, cfg: MultitaskConfig) -> int:
        return cfg.model.output_stride

    def prepare(self, cfg: MultitaskConfig, manifest: Manifest) -> MultitaskConfig:
        """Fail before training when a head has no target in the training data (its split,
        and the mixed-in manifest's): anatomy and depth come from synth3d output."""
        counts = target_counts(manifest, manifest.split(*cfg.data.train_split.split(",")))
        where = [manifest.uri]
        if cfg.mix.synthetic_manifest:
            extra = read_manifest(cfg.mix.synthetic_manifest)
            counts = {k: v + target_counts(extra, extra.split(cfg.mix.synthetic_split))[k]
                      for k, v in counts.items()}
            where.append(extra.uri)
        missing = [h for h in cfg.heads if not counts[h]]
        if missing:
            column = {"lesion": "mask_uri", "anatomy": "anatomy_uri", "depth": "depth_uri"}
            raise ConfigError(
                f"heads {missing}: no training sample of {' + '.join(where)} has "
                f"{', '.join(column[h] for h in missing)}; anatomy and depth come from "
                "`dermml synth3d` output: train on it (data.manifest) or mix it in "
                "(mix.synthetic_manifest), or leave the heads out (e.g. heads=[lesion])")
        return cfg

    def dataset(self, cfg: MultitaskConfig, manifest: Manifest, rows, train: bool):
        augment = build_augment(cfg.augment, seed=cfg.train.seed) if train else None
        return MultitaskDataset(manifest, rows, cfg.data.image_size, tuple(cfg.heads), augment)

    def loss_step(self, cfg: MultitaskConfig):
        weights = {h: cfg.loss.weights.get(h, 1.0) for h in cfg.heads}

        def step(model: nn.Module, batch: dict) -> torch.Tensor:
            out = model(batch["image"])
            total = lesion_head_loss(out["lesion"], batch["lesion"], batch["has_lesion"],
                                     batch["seg"], batch["has_seg"],
                                     cfg.loss.lesion_dice) * weights["lesion"]
            if "anatomy" in out:
                total = total + weights["anatomy"] * anatomy_loss(
                    out["anatomy"], batch["anatomy"], batch["has_anatomy"])
            if "depth" in out:
                total = total + weights["depth"] * depth_loss(
                    out["depth"], batch["depth"], batch["has_depth"], cfg.loss.depth,
                    cfg.loss.silog_lambda)
            return total

        return step

    def validate(self, model, loader, device, cfg: MultitaskConfig) -> dict[str, float]:
        # Sums stay on the device; one host sync per validation pass.
        zeros = lambda n: torch.zeros(n, dtype=torch.float64, device=device)  # noqa: E731
        sums = {"lesion_dice_sum": zeros(()), "lesion_iou_sum": zeros(()), "lesion_n": zeros(()),
                "seg_inter": zeros(3), "seg_union": zeros(3), "seg_pixels": zeros(()),
                "anatomy_inter": zeros(8), "anatomy_union": zeros(8),
                "anatomy_pixels": zeros(()), **{f"depth_{k}": zeros(()) for k in (
                    "abs_rel_sum", "sq_sum", "delta1", "n")}}
        threshold = cfg.serving.threshold
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model(batch["image"])
            probs = torch.softmax(out["lesion"].float(), 1)
            lesion = probs[:, LESION] > threshold
            # Samples without a target count with weight 0 (masks, not indexing: no sync).
            rows = batch["has_lesion"].double()
            truth = batch["lesion"] > 0.5
            tp = (lesion & truth).flatten(1).sum(1).double()
            fp = (lesion & ~truth).flatten(1).sum(1).double()
            fn = (~lesion & truth).flatten(1).sum(1).double()
            dice = torch.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn).clamp(min=1),
                               1.0)
            iou = torch.where(tp + fp + fn > 0, tp / (tp + fp + fn).clamp(min=1), 1.0)
            sums["lesion_dice_sum"] += (dice * rows).sum()
            sums["lesion_iou_sum"] += (iou * rows).sum()
            sums["lesion_n"] += rows.sum()
            self._count(sums, "seg", seg_labels(probs, lesion), batch["seg"], batch["has_seg"],
                        3)
            if "anatomy" in out:
                self._count(sums, "anatomy", out["anatomy"].argmax(1), batch["anatomy"],
                            batch["has_anatomy"], 8)
            if "depth" in out:
                known = ((batch["depth"] > 0) & batch["has_depth"].view(-1, 1, 1)).double()
                p = depth_from_log(out["depth"][:, 0]).double()
                t = batch["depth"].double().clamp(min=1e-6)
                sums["depth_abs_rel_sum"] += ((p - t).abs() / t * known).sum()
                sums["depth_sq_sum"] += ((p - t).pow(2) * known).sum()
                sums["depth_delta1"] += ((torch.maximum(p / t, t / p) < 1.25) * known).sum()
                sums["depth_n"] += known.sum()
        host = {k: v.cpu().numpy() for k, v in sums.items()}
        return _summary(host)

    @staticmethod
    def _count(sums: dict, prefix: str, pred: torch.Tensor, truth: torch.Tensor,
               rows: torch.Tensor, n: int) -> None:
        """Add the per-class intersections, unions and pixels of the samples in ``rows``."""
        weight = rows.view(-1, 1, 1).expand_as(pred).flatten().double()
        pred, truth = pred.flatten(), truth.flatten()
        inter = torch.bincount(pred, weights=weight * (pred == truth), minlength=n)[:n]
        union = torch.bincount(pred, weights=weight, minlength=n)[:n] + \
            torch.bincount(truth, weights=weight, minlength=n)[:n] - inter
        sums[f"{prefix}_inter"] += inter
        sums[f"{prefix}_union"] += union
        sums[f"{prefix}_pixels"] += weight.sum()

    @torch.no_grad()
    def outputs(self, model, images: list[np.ndarray], cfg: MultitaskConfig) -> list[dict]:
        """Per image at its own size: lesion-head probabilities (3, H, W), anatomy
        probabilities (8, H, W) and depth in metres (H, W), for the heads the model has."""
        model.eval()
        device = next(model.parameters()).device
        results = []
        for image in images:
            x = image_to_tensor(resize_image(image, cfg.data.image_size))[None].to(device)
            size = image.shape[:2]
            result = {}
            for head, y in model(x).items():
                y = y.float()
                if head == "depth":
                    y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
                    result["depth"] = depth_from_log(y)[0, 0].cpu().numpy()
                else:
                    prob = F.interpolate(torch.softmax(y, 1), size=size, mode="bilinear",
                                         align_corners=False)
                    result[f"{head}_probs"] = prob[0].cpu().numpy()
            results.append(result)
        return results

    def predict(self, model, images, cfg: MultitaskConfig) -> list[dict]:
        """Per image: ``lesion`` (bool, post-processed), ``seg`` (uint8 non-skin / skin /
        lesion map), ``anatomy`` (uint8 8-class map) and ``depth`` (float32 metres) for the
        heads the model has, and ``heads``."""
        settings = postprocess_settings(cfg)
        predictions = []
        for out in self.outputs(model, images, cfg):
            probs = out["lesion_probs"]
            lesion = postprocess_binary(probs[LESION], settings)
            pred = {"heads": list(cfg.heads), "lesion": lesion, "seg": seg_labels(probs, lesion)}
            if "anatomy_probs" in out:
                pred["anatomy"] = out["anatomy_probs"].argmax(0).astype(np.uint8)
            if "depth" in out:
                pred["depth"] = out["depth"].astype(np.float32)
            predictions.append(pred)
        return predictions

    def score(self, predictions, rows: pd.DataFrame, manifest: Manifest) -> pd.DataFrame:
        """Per sample: what it labels (``has_*``) and the counts behind every metric."""
        heads = tuple(predictions[0]["heads"]) if predictions else ("lesion",)
        records = []
        for pred, (_, row) in zip(predictions, rows.iterrows(), strict=True):
            truth = row_targets(manifest, row, heads)
            record: dict = {"sample_id": row["sample_id"], "has_lesion": "lesion" in truth,
                            "lesion_dice": np.nan, "lesion_iou": np.nan}
            if "lesion" in truth:
                scores = scores_from_confusion(*confusion(pred["lesion"], truth["lesion"]))
                record["lesion_dice"], record["lesion_iou"] = scores["dice"], scores["iou"]
            self._record_counts(record, "seg", pred["seg"], truth.get("seg"), 3)
            if "anatomy" in heads:
                self._record_counts(record, "anatomy", pred["anatomy"], truth.get("anatomy"), 8)
            if "depth" in heads:
                record["has_depth"] = "depth" in truth
                sums = depth_sums(pred["depth"], truth["depth"]) if "depth" in truth else \
                    dict.fromkeys(("abs_rel_sum", "sq_sum", "delta1", "n"), 0.0)
                record.update({f"depth_{k}": v for k, v in sums.items()})
            records.append(record)
        return pd.DataFrame(records)

    @staticmethod
    def _record_counts(record: dict, prefix: str, pred: np.ndarray, truth: np.ndarray | None,
                       n: int) -> None:
        record[f"has_{prefix}"] = truth is not None
        inter, union = class_counts(pred, truth, n) if truth is not None else \
            (np.zeros(n), np.zeros(n))
        record.update({f"{prefix}_inter/{k}": int(inter[k]) for k in range(n)})
        record.update({f"{prefix}_union/{k}": int(union[k]) for k in range(n)})
        record[f"{prefix}_pixels"] = int(truth.size) if truth is not None else 0

    def aggregate(self, per_sample: pd.DataFrame) -> dict[str, float]:
        sums: dict = {}
        if per_sample["has_lesion"].any():
            rows = per_sample[per_sample["has_lesion"].astype(bool)]
            sums.update(lesion_n=len(rows), lesion_dice_sum=rows["lesion_dice"].sum(),
                        lesion_iou_sum=rows["lesion_iou"].sum())
        for prefix, n in (("seg", 3), ("anatomy", 8)):
            if f"{prefix}_pixels" in per_sample:
                sums[f"{prefix}_inter"] = per_sample[[f"{prefix}_inter/{k}" for k in
                                                      range(n)]].to_numpy().sum(0)
                sums[f"{prefix}_union"] = per_sample[[f"{prefix}_union/{k}" for k in
                                                      range(n)]].to_numpy().sum(0)
                sums[f"{prefix}_pixels"] = per_sample[f"{prefix}_pixels"].sum()
        if "depth_n" in per_sample:
            sums.update({f"depth_{k}": per_sample[f"depth_{k}"].sum()
                         for k in ("abs_rel_sum", "sq_sum", "delta1", "n")})
        return _summary(sums)

    def figures(self, per_sample, images, predictions, rows, manifest) -> dict:
        """Worst-first lesion overlays (green: truth, magenta: prediction), and for samples
        with anatomy or depth targets: image, truth and prediction of each."""
        figures = {}
        scored = np.flatnonzero(per_sample["has_lesion"].to_numpy(bool))
        order = scored[np.argsort(per_sample["lesion_dice"].to_numpy()[scored])][:8]
        heads = tuple(predictions[0]["heads"])
        tiles = []
        for i in order:
            truth = row_targets(manifest, rows.iloc[i], ("lesion",))["lesion"]
            tiles.append(overlay_boundaries(*resized_for_display(images[i], truth,
                                                                 predictions[i]["lesion"])))
        if tiles:
            figures["worst_lesion_overlays.png"] = image_grid(tiles)
        dense = [h for h in ("anatomy", "depth") if h in heads
                 and per_sample.get(f"has_{h}", pd.Series(False)).any()]
        if dense:
            tiles = []
            labelled = np.flatnonzero(np.any([per_sample[f"has_{h}"].to_numpy(bool)
                                              for h in dense], axis=0))[:6]
            for i in labelled:
                truth = row_targets(manifest, rows.iloc[i], tuple(dense))
                tiles += [images[i], _colorize(predictions[i]["seg"], SEG_PALETTE)]
                tiles += self._dense_tiles(truth, predictions[i], dense, images[i].shape[:2])
            figures["dense_predictions.png"] = image_grid(tiles, columns=2 + 2 * len(dense))
        return figures

    @staticmethod
    def _dense_tiles(truth: dict, pred: dict, heads, shape) -> list[np.ndarray]:
        tiles = []
        if "anatomy" in heads:
            blank = np.full((*shape, 3), 128, np.uint8)
            tiles += [_colorize(truth["anatomy"], ANATOMY_PALETTE) if "anatomy" in truth
                      else blank, _colorize(pred["anatomy"], ANATOMY_PALETTE)]
        if "depth" in heads:
            known = truth.get("depth")
            span = None
            if known is not None and (known > 0).any():
                span = (float(known[known > 0].min()), float(known[known > 0].max()))
            tiles += [_depth_image(known, shape, span), _depth_image(pred["depth"], shape, span)]
        return tiles

    def encode_predictions(self, predictions) -> pd.DataFrame:
        from dermml.synth3d.outputs import depth_png

        rows = []
        for pred in predictions:
            lesion = pred["lesion"]
            row = {"lesion_mask": to_base64(encode_png(lesion)),
                   "skin_mask": to_base64(encode_png(pred["seg"] == SKIN)),
                   "lesion_fraction": float(lesion.mean()), "height": int(lesion.shape[0]),
                   "width": int(lesion.shape[1])}
            if "anatomy" in pred:
                row["anatomy"] = to_base64(encode_png(pred["anatomy"].astype(np.uint8)))
            if "depth" in pred:
                row["depth"] = to_base64(depth_png(pred["depth"]))
            rows.append(row)
        return pd.DataFrame(rows)

    def response_schema(self):
        return [("lesion_mask", "string"), ("skin_mask", "string"),
                ("lesion_fraction", "double"), ("height", "long"), ("width", "long"),
                ("anatomy", "string"), ("depth", "string")]

    def response_schema_for(self, cfg: MultitaskConfig):
        return [(c, t) for c, t in self.response_schema() if c not in HEADS or c in cfg.heads]

    def preview(self, model, dataset: MultitaskDataset, cfg, n: int = 6) -> np.ndarray:
        """Per sample: lesion contours (truth green, prediction magenta), the predicted
        non-skin / skin / lesion map, and truth and prediction of anatomy and depth."""
        samples = [dataset.load(i) for i in range(min(n, len(dataset)))]
        preds = self.predict(model, [img for img, _ in samples], cfg)
        dense = [h for h in ("anatomy", "depth") if h in cfg.heads]
        tiles = []
        for (img, truth), pred in zip(samples, preds, strict=True):
            shown, *masks = resized_for_display(img, truth.get("lesion", pred["lesion"]),
                                                pred["lesion"])
            tiles += [overlay_boundaries(shown, masks[0] if "lesion" in truth else None,
                                         masks[1]),
                      _colorize(pred["seg"], SEG_PALETTE)]
            tiles += self._dense_tiles(truth, pred, dense, img.shape[:2])
        return image_grid(tiles, columns=2 + 2 * len(dense))


register_task(MultitaskTask())
