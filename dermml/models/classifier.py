"""Image classifiers from timm (resnet18/34/50, efficientnet_b0-b2, inception_v3, ...)."""

from __future__ import annotations

from torch import nn

from dermml.config import Section
from dermml.models.pretrained import load_pretrained


class ClassifierConfig(Section):
    """Classification network."""

    backbone: str = "resnet18"
    """timm model name: resnet18/34/50, efficientnet_b0/b1/b2, inception_v3, ..."""
    pretrained: str = ""
    """Local weights file (never downloaded); empty trains from scratch."""
    drop_rate: float = 0.0
    """Dropout before the classifier head."""


def build_classifier(cfg: ClassifierConfig, num_classes: int) -> nn.Module:
    import timm

    try:
        model = timm.create_model(cfg.backbone, pretrained=False, num_classes=num_classes,
                                  drop_rate=cfg.drop_rate)
    except RuntimeError as exc:  # timm: "Unknown model (...)"
        raise ValueError(f"model.backbone {cfg.backbone!r}: {exc}") from None
    if cfg.pretrained:
        load_pretrained(model, cfg.pretrained)
    return model
