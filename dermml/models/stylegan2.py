"""Class-conditional StyleGAN2 (the networks of StyleGAN2-ADA) in plain PyTorch.

A re-implementation of ``training/networks.py`` of NVlabs/stylegan2-ada-pytorch without its
custom CUDA ops: bias + activation, the FIR up/downsampling (``upfirdn2d``) and the resampling
convolutions are written with ``F.conv2d`` / ``F.conv_transpose2d`` and compute the same
functions. Module and parameter names follow the reference, so a state dict of a reference
``Generator``/``Discriminator`` built with the same settings loads into these and gives the same
outputs (float32; there is no FP16 path, no ``num_fp16_res``).

Pieces, as in the reference:

- equalised learning rate: weights are stored ~N(0, 1) / lr_mult and multiplied at run time by
  ``lr_mult / sqrt(fan_in)``; biases by ``lr_mult``;
- mapping network: normalised z, concatenated with the normalised class embedding of a one-hot
  label, through ``mapping_layers`` lrelu FC layers (lr multiplier 0.01); ``w_avg`` is the moving
  average of w used by truncation;
- synthesis network: a learned 4x4 constant, two modulated/demodulated 3x3 convolutions per
  resolution (the first upsamples 2x with a [1,3,3,1] filter), noise inputs, ToRGB layers and,
  in the ``skip`` architecture, an RGB image upsampled and summed across resolutions;
- discriminator: ``resnet`` blocks (skip 1x1 conv, both paths scaled by sqrt(0.5)), a minibatch
  standard-deviation layer, an FC epilogue and projection conditioning
  (``(out * cmap).sum(1) / sqrt(cmap_dim)``, cmap the mapped label).

Differences from the reference: the minibatch-std layer accepts a batch that is not a multiple of
its group size (the reference fails to reshape it; see ``MinibatchStdLayer``); the modulated
convolution is always the fused (grouped convolution) form, which the reference uses at inference
and which equals its non-fused training form; ``w_avg`` is updated when the caller passes
``update_emas=True`` (the reference updates it in every training-mode call).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from dermml.config import Section

NoiseMode = Literal["random", "const", "none"]


class StyleGAN2Config(Section):
    """StyleGAN2 network settings shared by the generator and the discriminator. Resolution, class
    count and image channels come from the data and are constructor arguments."""

    z_dim: int = Field(512, ge=1)
    """Size of the input latent z."""
    w_dim: int = Field(512, ge=1)
    """Size of the intermediate latent w (and of the styles' source)."""
    mapping_layers: int = Field(8, ge=1)
    """FC layers in the generator's mapping network (the reference's cifar/auto configs use 2)."""
    channel_base: int = Field(32768, ge=1)
    """Channels at resolution r are ``min(channel_base // r, channel_max)`` (16384 = half width)."""
    channel_max: int = Field(512, ge=1)
    """Upper bound on the channels of any layer."""
    embed_dim: int = Field(0, ge=0)
    """Size of the class embedding concatenated to z in the mapping network; 0 = w_dim."""
    mbstd_group: int = Field(4, ge=1)
    """Group size of the discriminator's minibatch standard-deviation layer (min with the batch)."""
    mbstd_channels: int = Field(1, ge=0)
    """Feature maps the minibatch-std layer appends; 0 disables the layer."""
    conv_clamp: float | None = Field(256.0, gt=0)
    """Clamp convolution outputs to +-this value (the reference uses 256); null = no clamping."""
    mapping_lr_mult: float = Field(0.01, gt=0)
    """Learning-rate multiplier of the mapping networks' FC layers (generator and the
    discriminator's label mapping), through the equalised-lr weight scaling."""
    architecture_g: Literal["skip", "orig"] = "skip"
    """Generator: ``skip`` sums upsampled RGB outputs of every resolution, ``orig`` has one
    ToRGB at the end."""
    architecture_d: Literal["resnet", "orig"] = "resnet"
    """Discriminator: ``resnet`` blocks with a 1x1 skip convolution, or plain ``orig`` blocks
    (the reference's cifar config)."""
    cmap_dim: int = Field(0, ge=0)
    """Size of the discriminator's mapped label for projection conditioning; 0 = the
    reference's default, the channel count at 4x4."""


# ------------------------------------------------------------------------------- functional ops

def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Integer labels [N] -> float one-hot [N, num_classes]; an [N, 0] tensor when
    num_classes == 0 (unconditional)."""
    labels = torch.as_tensor(labels)
    if num_classes == 0:
        return torch.zeros([labels.shape[0], 0], device=labels.device)
    return F.one_hot(labels.long(), num_classes).float()


def normalize_2nd_moment(x: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """Scale ``x`` to unit mean square along ``dim``."""
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


def bias_act(x: torch.Tensor, b: torch.Tensor | None = None, act: str = "linear",
             gain: float | None = None, clamp: float | None = None) -> torch.Tensor:
    """``clamp(act(x + b) * gain)`` with the bias along dim 1; the default gain is the
    activation's (sqrt(2) for lrelu with slope 0.2, 1 for linear), as the reference's op."""
    if b is not None:
        x = x + b.reshape([1, -1] + [1] * (x.ndim - 2))
    if act == "lrelu":
        x = F.leaky_relu(x, 0.2)
        default_gain = math.sqrt(2)
    elif act == "linear":
        default_gain = 1.0
    else:
        raise ValueError(f"unknown activation {act!r}; choose linear or lrelu")
    gain = default_gain if gain is None else gain
    if gain != 1:
        x = x * gain
    if clamp is not None:
        x = x.clamp(-clamp, clamp)
    return x


def setup_filter(taps: Sequence[float] = (1, 3, 3, 1)) -> torch.Tensor:
    """The 2-D FIR filter (outer product of ``taps``), normalised to unit DC gain."""
    f = torch.as_tensor(taps, dtype=torch.float32)
    f = torch.outer(f, f)
    return f / f.sum()


def _pads(padding: int | Sequence[int]) -> tuple[int, int, int, int]:
    if isinstance(padding, int):
        return padding, padding, padding, padding
    if len(padding) == 2:
        return padding[0], padding[0], padding[1], padding[1]
    px0, px1, py0, py1 = padding
    return px0, px1, py0, py1


def upfirdn2d(x: torch.Tensor, f: torch.Tensor, up: int = 1, down: int = 1,
              padding: int | Sequence[int] = 0, gain: float = 1.0) -> torch.Tensor:
    """Upsample by zero insertion, pad (negative = crop), convolve every channel with the 2-D FIR
    filter ``f`` (true convolution) and keep every ``down``-th pixel. ``padding`` is an int,
    ``[x, y]`` or ``[x0, x1, y0, y1]``, on the upsampled image."""
    n, c, h, w = x.shape
    if up > 1:
        x = x.reshape(n, c, h, 1, w, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(n, c, h * up, w * up)
    px0, px1, py0, py1 = _pads(padding)
    x = F.pad(x, [max(px0, 0), max(px1, 0), max(py0, 0), max(py1, 0)])
    x = x[:, :, max(-py0, 0): x.shape[2] - max(-py1, 0), max(-px0, 0): x.shape[3] - max(-px1, 0)]
    weight = (f * gain).flip([0, 1]).to(x.dtype)[None, None].repeat(c, 1, 1, 1)
    return F.conv2d(x, weight, stride=down, groups=c)


def upsample2d(x: torch.Tensor, f: torch.Tensor, up: int = 2) -> torch.Tensor:
    """2x (``up``) upsampling with the FIR filter; output size = input size * up."""
    fh, fw = f.shape
    return upfirdn2d(x, f, up=up, gain=up * up, padding=[(fw + up - 1) // 2, (fw - up) // 2,
                                                         (fh + up - 1) // 2, (fh - up) // 2])


def downsample2d(x: torch.Tensor, f: torch.Tensor, down: int = 2) -> torch.Tensor:
    """Low-pass with the FIR filter and keep every ``down``-th pixel; size = input / down."""
    fh, fw = f.shape
    return upfirdn2d(x, f, down=down, padding=[(fw - down + 1) // 2, (fw - down) // 2,
                                               (fh - down + 1) // 2, (fh - down) // 2])


def conv2d_resample(x: torch.Tensor, w: torch.Tensor, f: torch.Tensor | None = None,
                    up: int = 1, down: int = 1, padding: int = 0, groups: int = 1,
                    flip_weight: bool = True) -> torch.Tensor:
    """Convolution with optional 2x up- or downsampling through the FIR filter ``f``, as the
    reference's ``conv2d_resample``: up = upsample with ``f`` then convolve, down = low-pass with
    ``f`` then convolve with stride ``down``; ``padding`` refers to the upsampled image.
    ``flip_weight`` True = correlation (``F.conv2d``), False = true convolution.

    The upsampling path runs as a strided transposed convolution followed by the filter (the
    same linear map as zero insertion, filter and convolution, at a quarter of the cost)."""
    if up > 1 and down > 1:
        raise ValueError("conv2d_resample: up and down together are not supported")
    out_channels, in_per_group, kh, kw = w.shape
    fh, fw = f.shape if f is not None else (1, 1)
    px0 = px1 = py0 = py1 = padding
    if up > 1:
        px0, px1 = px0 + (fw + up - 1) // 2, px1 + (fw - up) // 2
        py0, py1 = py0 + (fh + up - 1) // 2, py1 + (fh - up) // 2
        # conv_transpose2d with weight w = zero insertion + correlation with flipped w, i.e.
        # true convolution with w; flip first when correlation is wanted.
        if flip_weight:
            w = w.flip([2, 3])
        w = w.reshape(groups, out_channels // groups, in_per_group, kh, kw).transpose(1, 2)
        w = w.reshape(groups * in_per_group, out_channels // groups, kh, kw)
        px0, px1 = px0 - (kw - 1), px1 - (kw - up)
        py0, py1 = py0 - (kh - 1), py1 - (kh - up)
        pxt, pyt = max(min(-px0, -px1), 0), max(min(-py0, -py1), 0)
        x = F.conv_transpose2d(x, w, stride=up, padding=[pyt, pxt], groups=groups)
        return upfirdn2d(x, f, padding=[px0 + pxt, px1 + pxt, py0 + pyt, py1 + pyt],
                         gain=up * up)
    if not flip_weight:
        w = w.flip([2, 3])
    if down > 1:
        px0, px1 = px0 + (fw - down + 1) // 2, px1 + (fw - down) // 2
        py0, py1 = py0 + (fh - down + 1) // 2, py1 + (fh - down) // 2
        x = upfirdn2d(x, f, padding=[px0, px1, py0, py1])
        return F.conv2d(x, w, stride=down, groups=groups)
    return F.conv2d(x, w, padding=padding, groups=groups)


def modulated_conv2d(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor,
                     demodulate: bool = True, padding: int = 0, up: int = 1,
                     resample_filter: torch.Tensor | None = None,
                     flip_weight: bool | None = None,
                     noise: torch.Tensor | None = None) -> torch.Tensor:
    """StyleGAN2's modulated convolution: sample n convolves with ``weight * styles[n]`` (input
    channels scaled), each output filter rescaled to unit norm when ``demodulate``, then
    ``noise`` is added. Run as one grouped convolution over the batch.

    x [N, I, H, W], weight [O, I, k, k], styles [N, I]; ``up=2`` upsamples with
    ``resample_filter`` first. ``flip_weight`` None = the reference layers' choice, correlation
    at up=1 and true convolution when upsampling."""
    n = x.shape[0]
    out_channels, in_channels, kh, kw = weight.shape
    if styles.shape != (n, in_channels):
        raise ValueError(f"styles must be [{n}, {in_channels}], got {list(styles.shape)}")
    if flip_weight is None:
        flip_weight = up == 1
    if up > 1 and resample_filter is None:
        resample_filter = setup_filter().to(x.device)
    w = weight.unsqueeze(0) * styles.reshape(n, 1, -1, 1, 1)  # [N, O, I, k, k]
    if demodulate:
        dcoefs = (w.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt()  # [N, O]
        w = w * dcoefs.reshape(n, -1, 1, 1, 1)
    x = x.reshape(1, -1, *x.shape[2:])
    w = w.reshape(-1, in_channels, kh, kw)
    x = conv2d_resample(x, w.to(x.dtype), f=resample_filter, up=up, padding=padding, groups=n,
                        flip_weight=flip_weight)
    x = x.reshape(n, -1, *x.shape[2:])
    if noise is not None:
        x = x + noise
    return x


# -------------------------------------------------------------------------------------- layers

class FullyConnectedLayer(nn.Module):
    """Equalised-lr FC layer: weight stored ~N(0,1)/lr_mult, used as weight * lr_mult /
    sqrt(in_features); bias used as bias * lr_mult; optional lrelu (gain sqrt(2))."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 activation: str = "linear", lr_multiplier: float = 1.0,
                 bias_init: float = 0.0):
        super().__init__()
        self.activation = activation
        self.weight = nn.Parameter(torch.randn([out_features, in_features]) / lr_multiplier)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init))) if bias else None
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) * self.weight_gain
        b = self.bias
        if b is not None:
            b = b.to(x.dtype)
            if self.bias_gain != 1:
                b = b * self.bias_gain
        if self.activation == "linear" and b is not None:
            return torch.addmm(b.unsqueeze(0), x, w.t())
        return bias_act(x.matmul(w.t()), b, act=self.activation)


class Conv2dLayer(nn.Module):
    """Equalised-lr convolution (weight * 1/sqrt(fan_in)) with optional 2x up/downsampling,
    activation gain, and clamping of the output."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True,
                 activation: str = "linear", up: int = 1, down: int = 1,
                 conv_clamp: float | None = None):
        super().__init__()
        self.activation = activation
        self.up = up
        self.down = down
        self.conv_clamp = conv_clamp
        self.register_buffer("resample_filter", setup_filter())
        self.padding = kernel_size // 2
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size ** 2)
        self.act_gain = math.sqrt(2) if activation == "lrelu" else 1.0
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size,
                                                kernel_size]))
        self.bias = nn.Parameter(torch.zeros([out_channels])) if bias else None

    def forward(self, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        w = (self.weight * self.weight_gain).to(x.dtype)
        x = conv2d_resample(x, w, f=self.resample_filter, up=self.up, down=self.down,
                            padding=self.padding, flip_weight=self.up == 1)
        clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return bias_act(x, b, act=self.activation, gain=self.act_gain * gain, clamp=clamp)


class MappingNetwork(nn.Module):
    """z (and/or a label) -> w. The label c, one-hot [N, c_dim] (integer labels [N] are
    one-hot encoded here), is embedded by an FC layer and normalised; z is normalised; both are
    concatenated and go through ``num_layers`` lrelu FC layers. With ``num_ws`` the output is
    broadcast to [N, num_ws, w_dim] and ``w_avg`` (buffer) serves truncation."""

    def __init__(self, z_dim: int, c_dim: int, w_dim: int, num_ws: int | None,
                 num_layers: int = 8, embed_features: int | None = None,
                 layer_features: int | None = None, lr_multiplier: float = 0.01,
                 w_avg_beta: float | None = 0.995):
        super().__init__()
        self.z_dim = z_dim
        self.c_dim = c_dim
        self.w_dim = w_dim
        self.num_ws = num_ws
        self.num_layers = num_layers
        self.w_avg_beta = w_avg_beta
        embed_features = (embed_features or w_dim) if c_dim > 0 else 0
        layer_features = layer_features or w_dim
        features = [z_dim + embed_features] + [layer_features] * (num_layers - 1) + [w_dim]
        if c_dim > 0:
            self.embed = FullyConnectedLayer(c_dim, embed_features)
        for idx in range(num_layers):
            setattr(self, f"fc{idx}", FullyConnectedLayer(
                features[idx], features[idx + 1], activation="lrelu",
                lr_multiplier=lr_multiplier))
        if num_ws is not None and w_avg_beta is not None:
            self.register_buffer("w_avg", torch.zeros([w_dim]))

    def forward(self, z: torch.Tensor | None, c: torch.Tensor | None,
                truncation_psi: float = 1.0, truncation_cutoff: int | None = None,
                update_emas: bool = False) -> torch.Tensor:
        x = None
        if self.z_dim > 0:
            if z is None or z.ndim != 2 or z.shape[1] != self.z_dim:
                raise ValueError(f"z must be [N, {self.z_dim}], got "
                                 f"{None if z is None else list(z.shape)}")
            x = normalize_2nd_moment(z.to(torch.float32))
        if self.c_dim > 0:
            if c is None:
                raise ValueError(f"this network is conditional ({self.c_dim} classes): pass c")
            if not c.is_floating_point():
                c = one_hot(c, self.c_dim)
            if c.ndim != 2 or c.shape[1] != self.c_dim:
                raise ValueError(f"c must be [N, {self.c_dim}] one-hot (or [N] labels), got "
                                 f"{list(c.shape)}")
            y = normalize_2nd_moment(self.embed(c.to(torch.float32)))
            x = torch.cat([x, y], dim=1) if x is not None else y
        for idx in range(self.num_layers):
            x = getattr(self, f"fc{idx}")(x)
        if update_emas and self.num_ws is not None and self.w_avg_beta is not None:
            self.w_avg.copy_(x.detach().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))
        if self.num_ws is not None:
            x = x.unsqueeze(1).repeat([1, self.num_ws, 1])
        if truncation_psi != 1:
            if self.num_ws is None or self.w_avg_beta is None:
                raise ValueError("truncation needs a mapping network that tracks w_avg")
            truncated = self.w_avg.lerp(x, truncation_psi)
            if truncation_cutoff is None:
                x = truncated
            else:
                keep = torch.arange(self.num_ws, device=x.device) < truncation_cutoff
                x = torch.where(keep[None, :, None], truncated, x)
        return x


class SynthesisLayer(nn.Module):
    """Modulated 3x3 convolution (optionally upsampling 2x) + noise + bias + lrelu + clamp."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int,
                 kernel_size: int = 3, up: int = 1, use_noise: bool = True,
                 conv_clamp: float | None = None):
        super().__init__()
        self.resolution = resolution
        self.up = up
        self.use_noise = use_noise
        self.conv_clamp = conv_clamp
        self.register_buffer("resample_filter", setup_filter())
        self.padding = kernel_size // 2
        self.act_gain = math.sqrt(2)
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size,
                                                kernel_size]))
        if use_noise:
            self.register_buffer("noise_const", torch.randn([resolution, resolution]))
            self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: NoiseMode = "random",
                gain: float = 1.0) -> torch.Tensor:
        if noise_mode not in ("random", "const", "none"):
            raise ValueError(f"noise_mode must be random, const or none, got {noise_mode!r}")
        styles = self.affine(w)
        noise = None
        if self.use_noise and noise_mode == "random":
            noise = torch.randn([x.shape[0], 1, self.resolution, self.resolution],
                                device=x.device) * self.noise_strength
        elif self.use_noise and noise_mode == "const":
            noise = self.noise_const * self.noise_strength
        x = modulated_conv2d(x, self.weight, styles, noise=noise, up=self.up,
                             padding=self.padding, resample_filter=self.resample_filter,
                             flip_weight=self.up == 1)
        clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_act(x, self.bias.to(x.dtype), act="lrelu", gain=self.act_gain * gain,
                        clamp=clamp)


class ToRGBLayer(nn.Module):
    """Modulated 1x1 convolution to image channels, without demodulation; bias, clamp."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, kernel_size: int = 1,
                 conv_clamp: float | None = None):
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size,
                                                kernel_size]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size ** 2)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        styles = self.affine(w) * self.weight_gain
        x = modulated_conv2d(x, self.weight, styles, demodulate=False)
        return bias_act(x, self.bias.to(x.dtype), clamp=self.conv_clamp)


class SynthesisBlock(nn.Module):
    """One resolution of the synthesis network: the 4x4 constant (first block) or an upsampling
    layer, a second layer, and a ToRGB (``skip``: every block, summed onto the upsampled image;
    ``orig``: the last block only)."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int,
                 img_channels: int, is_last: bool, architecture: str = "skip",
                 conv_clamp: float | None = None):
        super().__init__()
        self.in_channels = in_channels
        self.w_dim = w_dim
        self.resolution = resolution
        self.img_channels = img_channels
        self.is_last = is_last
        self.architecture = architecture
        self.register_buffer("resample_filter", setup_filter())
        self.num_conv = 0
        self.num_torgb = 0
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn([out_channels, resolution, resolution]))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim=w_dim,
                                        resolution=resolution, up=2, conv_clamp=conv_clamp)
            self.num_conv += 1
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim=w_dim,
                                    resolution=resolution, conv_clamp=conv_clamp)
        self.num_conv += 1
        if is_last or architecture == "skip":
            self.torgb = ToRGBLayer(out_channels, img_channels, w_dim=w_dim,
                                    conv_clamp=conv_clamp)
            self.num_torgb += 1

    def forward(self, x: torch.Tensor | None, img: torch.Tensor | None, ws: torch.Tensor,
                noise_mode: NoiseMode = "random") -> tuple[torch.Tensor, torch.Tensor | None]:
        w_iter = iter(ws.unbind(dim=1))
        if self.in_channels == 0:
            x = self.const.unsqueeze(0).repeat([ws.shape[0], 1, 1, 1])
        else:
            x = self.conv0(x, next(w_iter), noise_mode=noise_mode)
        x = self.conv1(x, next(w_iter), noise_mode=noise_mode)
        if img is not None:
            img = upsample2d(img, self.resample_filter)
        if self.is_last or self.architecture == "skip":
            y = self.torgb(x, next(w_iter)).to(torch.float32)
            img = img + y if img is not None else y
        return x, img


class SynthesisNetwork(nn.Module):
    """ws [N, num_ws, w_dim] -> images [N, img_channels, R, R]; block ``b{res}`` per resolution
    4..R, consecutive blocks sharing one w between a ToRGB and the next block's first layer."""

    def __init__(self, w_dim: int, img_resolution: int, img_channels: int,
                 channel_base: int = 32768, channel_max: int = 512,
                 architecture: str = "skip", conv_clamp: float | None = None):
        super().__init__()
        self.w_dim = w_dim
        self.img_resolution = img_resolution
        self.img_resolution_log2 = int(np.log2(img_resolution))
        self.img_channels = img_channels
        self.block_resolutions = [2 ** i for i in range(2, self.img_resolution_log2 + 1)]
        channels = {res: min(channel_base // res, channel_max) for res in self.block_resolutions}
        self.num_ws = 0
        for res in self.block_resolutions:
            is_last = res == img_resolution
            block = SynthesisBlock(channels[res // 2] if res > 4 else 0, channels[res],
                                   w_dim=w_dim, resolution=res, img_channels=img_channels,
                                   is_last=is_last, architecture=architecture,
                                   conv_clamp=conv_clamp)
            self.num_ws += block.num_conv + (block.num_torgb if is_last else 0)
            setattr(self, f"b{res}", block)

    def forward(self, ws: torch.Tensor, noise_mode: NoiseMode = "random") -> torch.Tensor:
        if ws.ndim != 3 or ws.shape[1:] != (self.num_ws, self.w_dim):
            raise ValueError(f"ws must be [N, {self.num_ws}, {self.w_dim}], got {list(ws.shape)}")
        ws = ws.to(torch.float32)
        x = img = None
        w_idx = 0
        for res in self.block_resolutions:
            block = getattr(self, f"b{res}")
            block_ws = ws.narrow(1, w_idx, block.num_conv + block.num_torgb)
            w_idx += block.num_conv
            x, img = block(x, img, block_ws, noise_mode=noise_mode)
        return img


def _check_shape(resolution: int, num_classes: int, img_channels: int) -> None:
    if resolution < 8 or resolution > 1024 or resolution & (resolution - 1):
        raise ValueError(f"resolution must be a power of 2 in [8, 1024], got {resolution}")
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0 (0 = unconditional), got {num_classes}")
    if img_channels < 1:
        raise ValueError(f"img_channels must be >= 1, got {img_channels}")


class Generator(nn.Module):
    """Class-conditional StyleGAN2 generator: ``mapping`` (z, c -> ws) and ``synthesis``
    (ws -> images in about [-1, 1])."""

    def __init__(self, cfg: StyleGAN2Config, resolution: int, num_classes: int,
                 img_channels: int = 3):
        super().__init__()
        _check_shape(resolution, num_classes, img_channels)
        self.z_dim = cfg.z_dim
        self.c_dim = num_classes
        self.w_dim = cfg.w_dim
        self.img_resolution = resolution
        self.img_channels = img_channels
        self.synthesis = SynthesisNetwork(cfg.w_dim, resolution, img_channels,
                                          channel_base=cfg.channel_base,
                                          channel_max=cfg.channel_max,
                                          architecture=cfg.architecture_g,
                                          conv_clamp=cfg.conv_clamp)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(cfg.z_dim, num_classes, cfg.w_dim, num_ws=self.num_ws,
                                      num_layers=cfg.mapping_layers,
                                      embed_features=cfg.embed_dim or None,
                                      lr_multiplier=cfg.mapping_lr_mult)

    def forward(self, z: torch.Tensor, c: torch.Tensor | None, truncation_psi: float = 1.0,
                truncation_cutoff: int | None = None, noise_mode: NoiseMode = "random",
                update_emas: bool = False) -> torch.Tensor:
        """z [N, z_dim], c one-hot [N, c_dim] (or integer labels [N]; None when
        unconditional) -> images [N, C, R, R], float32."""
        ws = self.mapping(z, c, truncation_psi=truncation_psi,
                          truncation_cutoff=truncation_cutoff, update_emas=update_emas)
        return self.synthesis(ws, noise_mode=noise_mode)


# ------------------------------------------------------------------------------- discriminator

class DiscriminatorBlock(nn.Module):
    """FromRGB (first block), 3x3 conv, 3x3 conv downsampling 2x; ``resnet`` adds a 1x1
    downsampling skip, both paths scaled by sqrt(0.5)."""

    def __init__(self, in_channels: int, tmp_channels: int, out_channels: int, resolution: int,
                 img_channels: int, architecture: str = "resnet",
                 conv_clamp: float | None = None):
        super().__init__()
        self.in_channels = in_channels
        self.resolution = resolution
        self.img_channels = img_channels
        self.architecture = architecture
        self.register_buffer("resample_filter", setup_filter())
        if in_channels == 0:
            self.fromrgb = Conv2dLayer(img_channels, tmp_channels, kernel_size=1,
                                       activation="lrelu", conv_clamp=conv_clamp)
        self.conv0 = Conv2dLayer(tmp_channels, tmp_channels, kernel_size=3, activation="lrelu",
                                 conv_clamp=conv_clamp)
        self.conv1 = Conv2dLayer(tmp_channels, out_channels, kernel_size=3, activation="lrelu",
                                 down=2, conv_clamp=conv_clamp)
        if architecture == "resnet":
            self.skip = Conv2dLayer(tmp_channels, out_channels, kernel_size=1, bias=False,
                                    down=2)

    def forward(self, x: torch.Tensor | None, img: torch.Tensor) -> torch.Tensor:
        if self.in_channels == 0:
            x = self.fromrgb(img.to(torch.float32))
        if self.architecture == "resnet":
            y = self.skip(x, gain=math.sqrt(0.5))
            x = self.conv0(x)
            x = self.conv1(x, gain=math.sqrt(0.5))
            return y + x
        return self.conv1(self.conv0(x))


class MinibatchStdLayer(nn.Module):
    """Appends ``num_channels`` feature maps holding the standard deviation of the features over
    groups of samples (averaged over channels and pixels), as the reference.

    The group size is ``min(group_size, N)``; samples i and j share a group when
    i = j mod (N / G). When N is not a multiple of G (the reference cannot reshape such a batch)
    the batch is split the same way into ceil(N / G) groups, which then hold G or fewer samples;
    for N a multiple of G this is exactly the reference's grouping."""

    def __init__(self, group_size: int, num_channels: int = 1):
        super().__init__()
        self.group_size = group_size
        self.num_channels = num_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = min(self.group_size, n)
        f = self.num_channels
        if n % g == 0:
            y = x.reshape(g, -1, f, c // f, h, w)   # [G, n, F, c, H, W]
            y = y - y.mean(dim=0)
            y = (y.square().mean(dim=0) + 1e-8).sqrt()  # [n, F, c, H, W]
            y = y.mean(dim=[2, 3, 4]).reshape(-1, f, 1, 1).repeat(g, 1, h, w)
        else:
            groups = -(-n // g)
            member = torch.arange(n, device=x.device) % groups
            assign = F.one_hot(member, groups).to(x.dtype).t()  # [groups, N]
            assign = assign / assign.sum(dim=1, keepdim=True)   # rows average their members
            flat = x.reshape(n, -1)
            dev = flat - (assign @ flat)[member]
            var = (assign @ dev.square()).reshape(groups, f, c // f, h, w)
            y = (var + 1e-8).sqrt().mean(dim=[2, 3, 4])  # [groups, F]
            y = y[member].reshape(n, f, 1, 1).expand(n, f, h, w)
        return torch.cat([x, y], dim=1)


class DiscriminatorEpilogue(nn.Module):
    """4x4 head: minibatch std, 3x3 conv, FC, output FC (1 logit, or cmap_dim features
    projected onto the mapped label)."""

    def __init__(self, in_channels: int, cmap_dim: int, resolution: int, img_channels: int,
                 mbstd_group_size: int = 4, mbstd_num_channels: int = 1,
                 conv_clamp: float | None = None):
        super().__init__()
        self.in_channels = in_channels
        self.cmap_dim = cmap_dim
        self.resolution = resolution
        self.img_channels = img_channels
        self.mbstd = MinibatchStdLayer(mbstd_group_size, mbstd_num_channels) \
            if mbstd_num_channels > 0 else None
        self.conv = Conv2dLayer(in_channels + mbstd_num_channels, in_channels, kernel_size=3,
                                activation="lrelu", conv_clamp=conv_clamp)
        self.fc = FullyConnectedLayer(in_channels * resolution ** 2, in_channels,
                                      activation="lrelu")
        self.out = FullyConnectedLayer(in_channels, 1 if cmap_dim == 0 else cmap_dim)

    def forward(self, x: torch.Tensor, cmap: torch.Tensor | None) -> torch.Tensor:
        x = x.to(torch.float32)
        if self.mbstd is not None:
            x = self.mbstd(x)
        x = self.conv(x)
        x = self.fc(x.flatten(1))
        x = self.out(x)
        if self.cmap_dim > 0:
            x = (x * cmap).sum(dim=1, keepdim=True) * (1 / math.sqrt(self.cmap_dim))
        return x


class Discriminator(nn.Module):
    """StyleGAN2 discriminator with projection conditioning: images [N, C, R, R] and labels
    -> logits [N, 1]."""

    def __init__(self, cfg: StyleGAN2Config, resolution: int, num_classes: int,
                 img_channels: int = 3):
        super().__init__()
        _check_shape(resolution, num_classes, img_channels)
        self.c_dim = num_classes
        self.img_resolution = resolution
        self.img_resolution_log2 = int(np.log2(resolution))
        self.img_channels = img_channels
        self.block_resolutions = [2 ** i for i in range(self.img_resolution_log2, 2, -1)]
        channels = {res: min(cfg.channel_base // res, cfg.channel_max)
                    for res in self.block_resolutions + [4]}
        cmap_dim = (cfg.cmap_dim or channels[4]) if num_classes > 0 else 0
        self.cmap_dim = cmap_dim
        for res in self.block_resolutions:
            setattr(self, f"b{res}", DiscriminatorBlock(
                channels[res] if res < resolution else 0, channels[res], channels[res // 2],
                resolution=res, img_channels=img_channels, architecture=cfg.architecture_d,
                conv_clamp=cfg.conv_clamp))
        if num_classes > 0:
            self.mapping = MappingNetwork(0, num_classes, cmap_dim, num_ws=None,
                                          w_avg_beta=None, lr_multiplier=cfg.mapping_lr_mult)
        self.b4 = DiscriminatorEpilogue(channels[4], cmap_dim=cmap_dim, resolution=4,
                                        img_channels=img_channels,
                                        mbstd_group_size=cfg.mbstd_group,
                                        mbstd_num_channels=cfg.mbstd_channels,
                                        conv_clamp=cfg.conv_clamp)

    def forward(self, img: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        """img [N, C, R, R], c one-hot [N, c_dim] or integer labels [N] (ignored when
        unconditional) -> logits [N, 1]."""
        expected = (self.img_channels, self.img_resolution, self.img_resolution)
        if img.ndim != 4 or tuple(img.shape[1:]) != expected:
            raise ValueError(f"img must be [N, {', '.join(map(str, expected))}], got "
                             f"{list(img.shape)}")
        x = None
        for res in self.block_resolutions:
            x = getattr(self, f"b{res}")(x, img)
        cmap = self.mapping(None, c) if self.c_dim > 0 else None
        return self.b4(x, cmap)


# ----------------------------------------------------------------------------------- the model

class StyleGAN2(nn.Module):
    """The trained state of a StyleGAN2 run: generator ``G``, discriminator ``D`` and ``G_ema``,
    the moving average of G used for sampling and evaluation (eval mode, no gradients)."""

    def __init__(self, cfg: StyleGAN2Config, resolution: int, num_classes: int,
                 img_channels: int = 3):
        super().__init__()
        self.cfg = cfg
        self.G = Generator(cfg, resolution, num_classes, img_channels)
        self.D = Discriminator(cfg, resolution, num_classes, img_channels)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)

    def train(self, mode: bool = True) -> StyleGAN2:
        super().train(mode)
        self.G_ema.eval()
        return self

    @torch.no_grad()
    def update_ema(self, beta: float) -> None:
        """G_ema <- beta * G_ema + (1 - beta) * G for parameters; buffers (w_avg, noise
        constants) are copied from G. beta 0 copies G."""
        for p_ema, p in zip(self.G_ema.parameters(), self.G.parameters(), strict=True):
            p_ema.copy_(p.detach().lerp(p_ema, beta))
        for b_ema, b in zip(self.G_ema.buffers(), self.G.buffers(), strict=True):
            b_ema.copy_(b)
