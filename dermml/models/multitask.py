"""DermSynth3D's multi-task DeepLabV3 (``SkinDeepLabV3``): one dilated encoder, DeepLabV3 heads
for lesion / skin / non-skin (3 classes), anatomy (8 classes) and depth (1 channel, log-depth).

Built from the parts of the repository's DeepLabV3 (segmentation-models-pytorch, as
``models/segmentation.py``'s ``deeplabv3``): an smp encoder with output stride 8 (ResNet-50:
torchvision's ``deeplabv3_resnet50`` backbone, dilated layers 3-4) and smp's DeepLabV3 decoder
(ASPP with rates 12/24/36 + 3x3 conv, torchvision's ``DeepLabHead`` less its last 1x1 conv),
then a 1x1 conv per head and a bilinear upsampling to the input size. ``shared_decoder``:
one decoder feeds every head's 1x1 conv (DermSynth3D's ``multi_head=False``, the setting of its
published models: one ``DeepLabHead`` whose channels are split); otherwise a decoder per head
(``multi_head=True``). Inputs in [0, 1] are normalised with the ImageNet mean and std inside the
network (as DermSynth3D normalises its inputs), so ImageNet-initialised encoders see what they
were trained on and serving needs no preprocessing of its own.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from dermml.config import Section
from dermml.models.pretrained import load_backbone_weights
from dermml.synth3d.features import IMAGENET_MEAN, IMAGENET_STD

HEADS = ("lesion", "anatomy", "depth")
HEAD_CHANNELS = {"lesion": 3, "anatomy": 8, "depth": 1}
"""Output channels per head: lesion head = non-skin / skin / lesion logits, anatomy = the 8
simplified classes, depth = log-depth in metres."""


class MultitaskModelConfig(Section):
    """The multi-task network (defaults: DermSynth3D's DeepLabV3-ResNet50)."""

    encoder: str = "resnet50"
    """smp encoder: resnet50 (DermSynth3D), resnet18/34 or mobilenet_v2 for CPU demos,
    efficientnet-b0..b2, or tu-<timm name>."""
    output_stride: Literal[8, 16] = 8
    """Encoder output stride: 8 as torchvision's deeplabv3_resnet50 (dilated layers 3-4)."""
    decoder_channels: int = 256
    """Channels of each DeepLabV3 decoder (ASPP and the 3x3 conv after it); 256 as
    DeepLabHead."""
    atrous_rates: tuple[int, int, int] = (12, 24, 36)
    """ASPP dilation rates (DeepLabHead: 12, 24, 36; smaller suit small inputs)."""
    shared_decoder: bool = True
    """One decoder for all heads (DermSynth3D multi_head=False, its published models);
    false: a decoder per head (multi_head=True)."""
    freeze_backbone: bool = False
    """Keep the encoder's weights (and its batch-norm statistics) fixed; only the decoders and
    heads train (DermSynth3D's freeze_backbone)."""
    pretrained: str = ""
    """Encoder weights: imagenet (smp's, through the Hugging Face cache), a local file (a
    torchvision ResNet or deeplabv3_resnet50 state dict, or a DermSynth3D SkinDeepLabV3
    checkpoint: its backbone is loaded), or empty (random initialisation)."""


class MultitaskDeepLab(nn.Module):
    """``forward(x) -> {head: logits at the input's size}`` for the configured heads."""

    def __init__(self, cfg: MultitaskModelConfig, heads: tuple[str, ...]):
        super().__init__()
        from segmentation_models_pytorch.base import initialization
        from segmentation_models_pytorch.decoders.deeplabv3.decoder import DeepLabV3Decoder
        from segmentation_models_pytorch.encoders import get_encoder

        unknown = [h for h in heads if h not in HEADS]
        if unknown or not heads:
            raise ValueError(f"heads {list(heads)}: choose among {list(HEADS)}")
        self.heads = tuple(heads)
        self.freeze_backbone = cfg.freeze_backbone
        self.encoder = get_encoder(cfg.encoder, in_channels=3, depth=5, weights=None,
                                   output_stride=cfg.output_stride)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1),
                             persistent=False)
        names = ("shared",) if cfg.shared_decoder else self.heads

        def decoder() -> nn.Module:
            return DeepLabV3Decoder(self.encoder.out_channels[-1], cfg.decoder_channels,
                                    cfg.atrous_rates, aspp_separable=False, aspp_dropout=0.5)

        self.decoders = nn.ModuleDict({n: decoder() for n in names})
        self.outputs = nn.ModuleDict({h: nn.Conv2d(cfg.decoder_channels, HEAD_CHANNELS[h], 1)
                                      for h in self.heads})
        for module in self.decoders.values():
            initialization.initialize_decoder(module)
        for module in self.outputs.values():
            initialization.initialize_head(module)
        load_backbone_weights(getattr(self.encoder, "model", self.encoder), cfg.pretrained,
                              cfg.encoder, "smp")
        if self.freeze_backbone:
            for p in self.encoder.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> MultitaskDeepLab:
        super().train(mode)
        if self.freeze_backbone:
            self.encoder.eval()  # frozen batch-norm statistics too
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        size = x.shape[-2:]
        features = self.encoder((x - self.mean) / self.std)
        decoded = {name: dec(features) for name, dec in self.decoders.items()}
        out = {}
        for head, conv in self.outputs.items():
            y = conv(decoded["shared" if "shared" in decoded else head])
            out[head] = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        return out


def build_multitask(cfg: MultitaskModelConfig, heads: tuple[str, ...]) -> MultitaskDeepLab:
    return MultitaskDeepLab(cfg, tuple(heads))
