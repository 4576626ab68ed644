"""Image classifiers from timm (resnet18/34/50, efficientnet_b0-b2, inception_v3, ...)."""

from __future__ import annotations

from torch import nn

from dermml.config import Section
from dermml.models.pretrained import load_backbone_weights


class ClassifierConfig(Section):
    """Classification network."""

    backbone: str = "resnet18"
    """timm model name: resnet18/34/50, efficientnet_b0/b1/b2, inception_v3, ... (a tag picks
    other published weights: resnet50.tv_in1k)."""
    pretrained: str = ""
    """imagenet: timm's ImageNet weights via the Hugging Face hub cache (HF_HOME; offline with
    HF_HUB_OFFLINE=1); or a local .pth/.safetensors file; empty trains from scratch."""
    drop_rate: float = 0.0
    """Dropout before the classifier head."""


def build_classifier(cfg: ClassifierConfig, num_classes: int) -> nn.Module:
    import timm

    try:
        model = timm.create_model(cfg.backbone, pretrained=False, num_classes=num_classes,
                                  drop_rate=cfg.drop_rate)
    except RuntimeError as exc:  # timm: "Unknown model (...)"
        raise ValueError(f"model.backbone {cfg.backbone!r}: {exc}") from None
    load_backbone_weights(model, cfg.pretrained, cfg.backbone, "timm")
    return model
