"""Segmentation networks: the compact U-Net, smp U-Net (ResNet / Inception-v3 encoders) with an
optional ASPP bottleneck (the dermoscopic-attribute reference: dilations 2, 3, 4), DeepLabV3."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from dermml.config import Section
from dermml.models.pretrained import PretrainedWeightsError, load_backbone_weights
from dermml.models.unet import UNet


class SegModelConfig(Section):
    """Segmentation network."""

    arch: Literal["small_unet", "unet", "deeplabv3"] = "small_unet"
    """small_unet: compact U-Net (CPU demos); unet: smp U-Net; deeplabv3: smp DeepLabV3."""
    base_channels: int = 16
    """small_unet: channels of the first stage (doubled per stage)."""
    depth: int = 3
    """small_unet: down-sampling stages (input must divide by 2**depth)."""
    encoder: str = "resnet34"
    """unet/deeplabv3 encoder: resnet18/34/50, efficientnet-b0..b2, or tu-inception_v3
    (any smp encoder, or tu-<timm name>)."""
    aspp: bool = False
    """unet: Atrous Spatial Pyramid Pooling on the deepest encoder features."""
    aspp_dilations: list[int] = [2, 3, 4]
    """ASPP dilation rates (the attribute-segmentation reference uses 2, 3, 4)."""
    decoder_channels: list[int] = [256, 128, 64, 32, 16]
    """unet decoder widths, deepest first."""
    pretrained: str = ""
    """Encoder weights. imagenet: the encoder's ImageNet weights via the Hugging Face hub cache
    (HF_HOME; offline with HF_HUB_OFFLINE=1): smp's for smp encoders, timm's for tu-<name>;
    or a local .pth/.safetensors file; empty trains from scratch."""


class ASPP(nn.Module):
    """Parallel dilated 3x3 convolutions + 1x1 + image pooling, fused back to ``channels``."""

    def __init__(self, channels: int, dilations: list[int], inner: int | None = None):
        super().__init__()
        inner = inner or max(32, channels // 4)

        def branch(kernel: int, dilation: int) -> nn.Sequential:
            pad = 0 if kernel == 1 else dilation
            return nn.Sequential(nn.Conv2d(channels, inner, kernel, padding=pad,
                                           dilation=dilation, bias=False),
                                 nn.BatchNorm2d(inner), nn.ReLU(inplace=True))

        self.branches = nn.ModuleList([branch(1, 1)] + [branch(3, d) for d in dilations])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, inner, 1),
                                  nn.ReLU(inplace=True))
        self.project = nn.Sequential(
            nn.Conv2d(inner * (len(self.branches) + 1), channels, 1, bias=False),
            nn.BatchNorm2d(channels), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(x).expand(-1, -1, x.shape[2], x.shape[3])
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))


class SmpUNet(nn.Module):
    """smp U-Net whose deepest encoder feature map optionally goes through ASPP."""

    def __init__(self, cfg: SegModelConfig, classes: int):
        super().__init__()
        import segmentation_models_pytorch as smp

        self.net = smp.Unet(cfg.encoder, encoder_weights=None, classes=classes,
                            decoder_channels=tuple(cfg.decoder_channels),
                            encoder_depth=len(cfg.decoder_channels))
        deepest = self.net.encoder.out_channels[-1]
        self.aspp = ASPP(deepest, cfg.aspp_dilations) if cfg.aspp else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.net.encoder(x)
        if self.aspp is not None:
            features = [*features[:-1], self.aspp(features[-1])]
        return self.net.segmentation_head(self.net.decoder(features))


def build_segmenter(cfg: SegModelConfig, classes: int) -> nn.Module:
    """The configured network with ``classes`` output channels (1 = binary lesion mask)."""
    if cfg.arch == "small_unet":
        if cfg.pretrained:
            raise PretrainedWeightsError(
                f"model.pretrained={cfg.pretrained!r}: arch small_unet has no pretrained "
                "encoder; use model.arch=unet or deeplabv3 (with model.encoder) or leave "
                "model.pretrained empty")
        return UNet(3, classes, cfg.base_channels, cfg.depth)
    if cfg.arch == "unet":
        model = SmpUNet(cfg, classes)
        encoder = model.net.encoder
    else:
        import segmentation_models_pytorch as smp

        model = smp.DeepLabV3(cfg.encoder, encoder_weights=None, classes=classes)
        encoder = model.encoder
    # timm-universal encoders keep the timm model under .model
    load_backbone_weights(getattr(encoder, "model", encoder), cfg.pretrained, cfg.encoder, "smp")
    return model


def input_multiple(cfg: SegModelConfig) -> int:
    """Input height/width must be a multiple of this."""
    if cfg.arch == "small_unet":
        return 2**cfg.depth
    return 2 ** len(cfg.decoder_channels) if cfg.arch == "unet" else 8
