"""Lesion classification: timm backbones, CE / weighted CE / label smoothing / focal, MixUp,
class oversampling; accuracy, balanced accuracy, per-class P/R/F1/specificity, ROC-AUC."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import torch
from torch import nn

from dermml.data.augment import build_augment
from dermml.data.datasets import ClassificationDataset, image_to_tensor, resize_image
from dermml.data.manifest import Manifest
from dermml.data.sampling import mixup_pairs
from dermml.losses.catalog import LossTerm, build_loss, inverse_frequency_weights
from dermml.metrics.classification import classification_metrics, confusion_matrix
from dermml.models.classifier import ClassifierConfig, build_classifier
from dermml.tasks.base import Task, TaskConfig, register_task
from dermml.visualization import image_grid


class ClassificationConfig(TaskConfig):
    task: str = "classification"
    model: ClassifierConfig = ClassifierConfig()
    classes: list[str] = []
    """Class names in output order; empty: the sorted labels of the training split."""
    class_weights: list[float] = []
    """Per-class loss weights; empty: inverse class frequency of the training split."""
    loss: list[LossTerm] = [LossTerm(name="ce")]
    """Weighted sum of loss terms: ce, weighted_ce, label_smoothing, focal (see registry)."""
    mixup_alpha: float = 0.0
    """MixUp Beta(alpha, alpha) mixing of training batches (0 = off)."""


class ClassificationTask(Task):
    name = "classification"
    config_cls = ClassificationConfig
    gate_metric = "balanced_accuracy"
    gate_mode = "max"

    def prepare(self, cfg: ClassificationConfig, manifest: Manifest) -> ClassificationConfig:
        train = manifest.split(*cfg.data.train_split.split(","))
        labels = train["label"].dropna().astype(str)
        if labels.empty:
            raise ValueError(f"{manifest.uri}: split {cfg.data.train_split} has no labels")
        classes = cfg.classes or sorted(labels.unique().tolist())
        unknown = sorted(set(labels) - set(classes))
        if unknown:
            raise ValueError(f"{manifest.uri}: labels {unknown} are not in classes {classes}")
        weights = cfg.class_weights or inverse_frequency_weights(
            [int((labels == c).sum()) for c in classes]).tolist()
        return cfg.model_copy(update={"classes": classes, "class_weights": weights})

    def build_model(self, cfg: ClassificationConfig) -> nn.Module:
        if not cfg.classes:
            raise ValueError("classes are unknown: call prepare() with the training manifest")
        return build_classifier(cfg.model, len(cfg.classes))

    def dataset(self, cfg: ClassificationConfig, manifest: Manifest, rows, train: bool):
        augment = build_augment(cfg.augment, seed=cfg.train.seed) if train else None
        return ClassificationDataset(manifest, rows, cfg.data.image_size, cfg.classes, augment)

    def loss_step(self, cfg: ClassificationConfig):
        weights = torch.tensor(cfg.class_weights, dtype=torch.float32) if cfg.class_weights \
            else None
        loss_fn = build_loss(cfg.loss, class_weights=weights)
        generator = torch.Generator().manual_seed(cfg.train.seed)

        def step(model: nn.Module, batch) -> torch.Tensor:
            images, labels = batch
            if cfg.mixup_alpha > 0:  # the configured loss on both partners, weighted by lam
                mixed, labels_a, labels_b, lam, _ = mixup_pairs(images, labels, cfg.mixup_alpha,
                                                                generator)
                logits = model(mixed)
                return lam * loss_fn(logits, labels_a) + (1 - lam) * loss_fn(logits, labels_b)
            return loss_fn(model(images), labels)

        return step

    def validate(self, model, loader, device, cfg=None) -> dict[str, float]:
        probs, labels = [], []
        for images, y in loader:
            probs.append(torch.softmax(model(images.to(device)).float(), 1))
            labels.append(y.to(device))
        p, y = torch.cat(probs).cpu().numpy(), torch.cat(labels).cpu().numpy()
        m = classification_metrics(y, p, [str(i) for i in range(p.shape[1])])
        return {k: m[k] for k in ("accuracy", "balanced_accuracy", "macro_f1")}

    @torch.no_grad()
    def predict(self, model, images, cfg: ClassificationConfig) -> list[dict[str, float]]:
        """Class -> probability per image, in output order (the label is the argmax)."""
        model.eval()
        device = next(model.parameters()).device
        batch = torch.stack([image_to_tensor(resize_image(img, cfg.data.image_size))
                             for img in images]).to(device)
        probs = torch.softmax(model(batch).float(), 1).cpu().numpy()
        return [dict(zip(cfg.classes, map(float, p), strict=True)) for p in probs]

    def score(self, predictions, rows: pd.DataFrame, manifest: Manifest) -> pd.DataFrame:
        classes = list(predictions[0])
        probs = np.array([list(p.values()) for p in predictions])
        index = {c: i for i, c in enumerate(classes)}
        truth = [index.get(str(label), -1) for label in rows["label"]]
        if -1 in truth:
            bad = rows["label"][np.array(truth) == -1].unique().tolist()
            raise ValueError(f"test labels {bad} are unknown to the model (classes {classes})")
        per_sample = pd.DataFrame({"sample_id": rows["sample_id"].to_numpy(), "y_true": truth,
                                   "y_pred": probs.argmax(1)})
        for i, c in enumerate(classes):
            per_sample[f"prob/{c}"] = probs[:, i]
        return per_sample

    def aggregate(self, per_sample: pd.DataFrame) -> dict[str, float]:
        prob_cols = [c for c in per_sample if c.startswith("prob/")]
        classes = [c.split("/", 1)[1] for c in prob_cols]
        return classification_metrics(per_sample["y_true"].to_numpy(),
                                      per_sample[prob_cols].to_numpy(), classes)

    def figures(self, per_sample, images, predictions, rows, manifest) -> dict:
        return classification_figures(per_sample)

    def relabel(self, predictions, rows: pd.DataFrame, out_dir: str) -> pd.DataFrame:
        out = rows.copy()
        out["label"] = [max(p, key=p.get) for p in predictions]
        return out

    def encode_predictions(self, predictions) -> pd.DataFrame:
        return pd.DataFrame({
            "label": [max(p, key=p.get) for p in predictions],
            "confidence": [max(p.values()) for p in predictions],
            "probabilities": [json.dumps(p) for p in predictions]})

    def response_schema(self):
        return [("label", "string"), ("confidence", "double"), ("probabilities", "string")]

    def preview(self, model, dataset: ClassificationDataset, cfg, n: int = 16) -> np.ndarray:
        """Validation images framed green (correct) or red (wrong)."""
        pairs = [dataset.load(i) for i in range(min(n, len(dataset)))]
        probs = self.predict(model, [img for img, _ in pairs], cfg)
        tiles = []
        for (img, label), p in zip(pairs, probs, strict=True):
            tile = resize_image(img, max(96, img.shape[0])).copy()
            correct = int(np.argmax(list(p.values()))) == label
            tile[:3], tile[-3:], tile[:, :3], tile[:, -3:] = (
                [(0, 200, 0) if correct else (220, 0, 0)] * 4)
            tiles.append(tile)
        return image_grid(tiles, columns=8)


def classification_figures(per_sample: pd.DataFrame) -> dict:
    """ROC and precision-recall curves per class, and the confusion matrix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    prob_cols = [c for c in per_sample if c.startswith("prob/")]
    classes = [c.split("/", 1)[1] for c in prob_cols]
    y = per_sample["y_true"].to_numpy()
    roc, ax_roc = plt.subplots(figsize=(5, 5))
    pr, ax_pr = plt.subplots(figsize=(5, 5))
    for i, (col, name) in enumerate(zip(prob_cols, classes, strict=True)):
        positive = y == i
        if positive.all() or not positive.any():
            continue
        fpr, tpr, _ = roc_curve(positive, per_sample[col])
        precision, recall, _ = precision_recall_curve(positive, per_sample[col])
        ax_roc.plot(fpr, tpr, label=name)
        ax_pr.plot(recall, precision, label=name)
    ax_roc.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax_roc.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    ax_pr.set(xlabel="recall", ylabel="precision", title="Precision-recall")
    for ax in (ax_roc, ax_pr):
        ax.legend(loc="lower right", fontsize=8)
    cm = confusion_matrix(y, per_sample["y_pred"].to_numpy(), len(classes))
    fig_cm, ax_cm = plt.subplots(figsize=(5, 5))
    ax_cm.imshow(cm, cmap="Blues")
    ax_cm.set(xticks=range(len(classes)), yticks=range(len(classes)), xlabel="predicted",
              ylabel="true", title="Confusion matrix")
    ax_cm.set_xticklabels(classes, rotation=45, ha="right")
    ax_cm.set_yticklabels(classes)
    for (r, c), v in np.ndenumerate(cm):
        ax_cm.text(c, r, int(v), ha="center", va="center",
                   color="white" if v > cm.max() / 2 else "black")
    for fig in (roc, pr, fig_cm):
        fig.tight_layout()
    return {"roc.png": roc, "pr.png": pr, "confusion_matrix.png": fig_cm}


register_task(ClassificationTask())
