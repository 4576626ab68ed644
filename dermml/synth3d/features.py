"""Feature networks for deep blending's content and style losses.

With a local VGG16 weights file (torchvision's ``vgg16`` state dict) the features are VGG16's
relu1_2, relu2_2, relu3_3 and relu4_3, as in DermSynth3D. Without one (nothing is downloaded)
the fallback is ``random-vgg-lite``: the same four VGG blocks (3x3 convolutions + ReLU, max-pool
between blocks) with 16/32/64/64 channels and fixed random weights (He-normal from seed 0).
Random convolutional features capture local texture statistics well enough for Gram-matrix
style losses (Ustyuzhaninov et al., "What does it take to generate natural textures?", ICLR
2017); they are weaker at semantics, which blending does not need. The network used is
recorded in the run (tag ``synth3d.blend_features``).
"""

from __future__ import annotations

import hashlib
import os

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FALLBACK_NAME = "random-vgg-lite-v1"
CONTENT_LAYER = 1
"""Index of relu2_2 among the four outputs: the reference's content layer."""


class FeatureNet(nn.Module):
    """Four consecutive blocks; ``forward`` returns each block's output (normalised input)."""

    def __init__(self, blocks: list[nn.Sequential], name: str):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.name = name
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = (x - self.mean) / self.std
        out = []
        for block in self.blocks:
            h = block(h)
            out.append(h)
        return out


def _vgg_blocks(widths: tuple[int, ...], depths: tuple[int, ...]) -> list[nn.Sequential]:
    blocks, channels = [], 3
    for i, (width, depth) in enumerate(zip(widths, depths, strict=True)):
        layers: list[nn.Module] = [nn.MaxPool2d(2)] if i else []
        for _ in range(depth):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=False)]
            channels = width
        blocks.append(nn.Sequential(*layers))
    return blocks


def fallback_features() -> FeatureNet:
    blocks = _vgg_blocks((16, 32, 64, 64), (2, 2, 3, 3))
    generator = torch.Generator().manual_seed(0)
    for module in nn.Sequential(*blocks).modules():
        if isinstance(module, nn.Conv2d):
            fan_in = module.in_channels * 9
            with torch.no_grad():
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator)
                                    * (2.0 / fan_in) ** 0.5)
                module.bias.zero_()
    return FeatureNet(blocks, FALLBACK_NAME)


def vgg16_features(path: str) -> FeatureNet:
    """VGG16's first four blocks from a local torchvision state dict."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"VGG16 weights {path} not found (blend.vgg16_weights)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    blocks = _vgg_blocks((64, 128, 256, 512), (2, 2, 3, 3))
    convs = [m for b in blocks for m in b if isinstance(m, nn.Conv2d)]
    keys = sorted({k.rsplit(".", 1)[0] for k in state if k.startswith("features.")},
                  key=lambda k: int(k.split(".")[1]))
    if len(keys) < len(convs):
        raise ValueError(f"{path}: not a torchvision VGG16 state dict (found {len(keys)} "
                         "feature convolutions, need 10)")
    for conv, key in zip(convs, keys, strict=False):
        conv.weight.data.copy_(state[f"{key}.weight"])
        conv.bias.data.copy_(state[f"{key}.bias"])
    with open(path, "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()[:12]
    return FeatureNet(blocks, f"vgg16:{digest}")


def feature_network(vgg16_weights: str = "") -> FeatureNet:
    """VGG16 from a local file when given, else the fallback network."""
    return vgg16_features(vgg16_weights) if vgg16_weights else fallback_features()
