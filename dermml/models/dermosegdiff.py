"""DermoSegDiff's denoising network (Bozorgpour et al., MICCAI 2023 PRIME workshop): a dual-path
U-Net that predicts the noise in a noisy lesion mask x_t, guided by the dermoscopy image g.

The network knows nothing of noise schedules or sampling; ``dermml.models.diffusion`` does.
Blocks follow the reference code (github.com/xmindflow/DermoSegDiff, ``src/models/segdiffs.py``
and ``src/blocks/``), composed bottom-up: conv block -> ResNet block -> encoder / bottleneck /
decoder level -> U-Net.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import TypeVar

import torch
import torch.nn.functional as F
from pydantic import model_validator
from torch import nn

from dermml.config import Section

# The reference builds its bottleneck ResNet blocks with 4 groups and the final block with one,
# whatever ``resnet_block_groups`` says; kept so that parameter counts match.
BOTTLENECK_GROUPS = 4
FINAL_GROUPS = 1


class DermoSegDiffConfig(Section):
    """Sizes of the DermoSegDiff U-Net; defaults are the reference ISIC 2018 / PH2 config
    (``configs/isic2018/dermosegdiff/dsd_01.yaml``)."""

    dim_x: int = 128
    """Base width of the mask (x) path; its time embedding is 4 * dim_x wide."""
    dim_g: int = 64
    """Base width of the image (guidance, g) path; its time embedding is 4 * dim_g wide."""
    dim_x_mults: list[int] = [1, 2, 3, 4, 5, 6]
    """Width of each x-path level as a multiple of dim_x (HAM10000 uses [2, 2, 2, 2, 2, 2])."""
    dim_g_mults: list[int] = [1, 2, 4, 8, 16, 32]
    """Width of each g-path level as a multiple of dim_g; as many levels as dim_x_mults."""
    channels: int = 1
    """Channels of the mask being denoised, and of the predicted noise."""
    image_channels: int = 3
    """Channels of the guidance image (RGB)."""
    resnet_block_groups: int = 8
    """GroupNorm groups in the encoder and decoder ResNet blocks."""
    attn_heads: int = 4
    """Heads of the linear and full attention layers (reference: 4)."""
    attn_dim_head: int = 32
    """Width of each attention head (reference: 32)."""
    pretrained: str = ""
    """Local weights file to start from: a checkpoint of the reference code (its ``model`` and
    ``ema`` weights and EMA step) or of DermML; see docs/segdiff.md."""

    @model_validator(mode="after")
    def _same_depth(self) -> DermoSegDiffConfig:
        if len(self.dim_x_mults) != len(self.dim_g_mults):
            raise ValueError(f"dim_x_mults {self.dim_x_mults} and dim_g_mults "
                             f"{self.dim_g_mults} must have as many levels")
        if not self.dim_x_mults:
            raise ValueError("dim_x_mults must name at least one level")
        return self

    @property
    def downsampling_factor(self) -> int:
        """Image height and width must be multiples of this."""
        return 2 ** (len(self.dim_x_mults) - 1)


# ------------------------------------------------------------------------------------- helpers

def exists(value) -> bool:
    return value is not None


def default(value, fallback):
    return value if exists(value) else fallback


# -------------------------------------------------------------------------------- small blocks

class Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) + x


class PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm = nn.GroupNorm(1, dim)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


def downsample(dim: int, dim_out: int) -> nn.Module:
    """Halve H and W without losing pixels: 2x2 space-to-depth, then a 1x1 conv."""
    return nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(dim * 4, dim_out, 1))


def same_resolution(dim: int, dim_out: int) -> nn.Module:
    """Change width only: the coarsest encoder and finest decoder level keep their size."""
    return nn.Conv2d(dim, dim_out, 3, padding=1)


def upsample(dim: int, dim_out: int) -> nn.Module:
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                         nn.Conv2d(dim, dim_out, 3, padding=1))


class SinusoidalPosEmb(nn.Module):
    """Transformer position encoding of the (integer) timestep: sin and cos halves."""

    def __init__(self, dim: int):
        super().__init__()
        if dim < 4:
            raise ValueError(f"time embedding width {dim} must be at least 4")
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device) * -(math.log(10000) / (half - 1)))
        angles = t.float()[:, None] * freqs[None, :]
        return torch.cat((angles.sin(), angles.cos()), dim=-1)


def time_mlp(dim: int) -> nn.Module:
    """Timestep -> (N, 4 * dim) embedding that every ResNet block of one path reads."""
    return nn.Sequential(SinusoidalPosEmb(dim), nn.Linear(dim, dim * 4), nn.GELU(),
                         nn.Linear(dim * 4, dim * 4))


WS_EPS = 1e-5
"""Variance epsilon of the weight standardisation, whatever the precision."""


class WeightStandardizedConv2d(nn.Conv2d):
    """Conv whose kernels are standardised to zero mean, unit variance per output channel
    (Qiao et al. 2019); pairs well with GroupNorm.

    The standardisation runs in float32 with eps ``WS_EPS`` under every precision, so a model
    computes the same kernels in fp32 and under bf16/fp16 autocast. (The reference picks eps
    from the input dtype, 1e-5 for float32 and 1e-3 otherwise; it trains in float32, where the
    two agree.)
    """

    def standardized_weight(self) -> torch.Tensor:
        """The kernels the convolution uses, in the weight's dtype."""
        weight = self.weight.float()
        mean = weight.mean(dim=(1, 2, 3), keepdim=True)
        var = weight.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
        return ((weight - mean) * (var + WS_EPS).rsqrt()).to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.standardized_weight(), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


class ConvBlock(nn.Module):
    """Weight-standardised 3x3 conv -> GroupNorm -> (time scale/shift) -> SiLU."""

    def __init__(self, dim: int, dim_out: int, groups: int):
        super().__init__()
        self.proj = WeightStandardizedConv2d(dim, dim_out, 3, padding=1)
        self.norm = nn.GroupNorm(groups, dim_out)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor,
                scale_shift: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = self.norm(self.proj(x))
        if exists(scale_shift):
            scale, shift = scale_shift
            x = x * (scale + 1) + shift
        return self.act(x)


class ResnetBlock(nn.Module):
    """Two conv blocks with a residual connection; the time embedding scales and shifts the
    first block's normalised features."""

    def __init__(self, dim: int, dim_out: int, time_dim: int, groups: int):
        super().__init__()
        self.time_proj = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, dim_out * 2))
        self.block1 = ConvBlock(dim, dim_out, groups)
        self.block2 = ConvBlock(dim_out, dim_out, groups)
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        scale_shift = self.time_proj(time_emb)[:, :, None, None].chunk(2, dim=1)
        h = self.block2(self.block1(x, scale_shift))
        return h + self.res_conv(x)


def _heads_first(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(N, heads * d, H, W) -> (N, heads, d, H * W)."""
    n, _, h, w = t.shape
    return t.reshape(n, heads, -1, h * w)


class LinearAttention(nn.Module):
    """Attention linear in the number of pixels (Shen et al. 2021): softmax over features for
    queries and over pixels for keys, so the (d x d) context replaces the (n x n) map."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads, self.scale = heads, dim_head**-0.5
        self.to_qkv = nn.Conv2d(dim, heads * dim_head * 3, 1, bias=False)
        self.to_out = nn.Sequential(nn.Conv2d(heads * dim_head, dim, 1), nn.GroupNorm(1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        q, k, v = (_heads_first(t, self.heads) for t in self.to_qkv(x).chunk(3, dim=1))
        q = q.softmax(dim=-2) * self.scale
        k = k.softmax(dim=-1)
        context = torch.einsum("bhdn,bhen->bhde", k, v)
        out = torch.einsum("bhde,bhdn->bhen", context, q)
        return self.to_out(out.reshape(n, -1, h, w))


class Attention(nn.Module):
    """Full multi-head self-attention over pixels (only used at the coarsest resolution)."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Conv2d(dim, heads * dim_head * 3, 1, bias=False)
        self.to_out = nn.Conv2d(heads * dim_head, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        q, k, v = (_heads_first(t, self.heads).transpose(-1, -2)
                   for t in self.to_qkv(x).chunk(3, dim=1))
        out = F.scaled_dot_product_attention(q, k, v)  # scale = dim_head ** -0.5
        return self.to_out(out.transpose(-1, -2).reshape(n, -1, h, w))


def linear_attention(dim: int, heads: int, dim_head: int) -> nn.Module:
    return Residual(PreNorm(dim, LinearAttention(dim, heads, dim_head)))


# ------------------------------------------------------------------------------ U-Net levels

class EncoderLevel(nn.Module):
    """One encoder level of both paths (the reference's ``EM``).

    The image features g see the mask features x (concatenation), and x is gated by a 1x1
    projection of the fused g before its second ResNet block: this is where the image guides
    the denoising. Returns the two outputs and the two skips the decoder reads.
    """

    def __init__(self, dim_x: int, dim_g: int, time_x: int, time_g: int, groups: int,
                 heads: int, dim_head: int):
        super().__init__()
        self.rb_x1 = ResnetBlock(dim_x, dim_x, time_x, groups)
        self.rb_g1 = ResnetBlock(dim_g, dim_g, time_g, groups)
        self.rb_g2 = ResnetBlock(dim_x + dim_g, dim_g, time_g, groups)
        self.g_to_x_gate = nn.Conv2d(dim_g, dim_x, 1)
        self.rb_x2 = ResnetBlock(dim_x, dim_x, time_x, groups)
        self.attn_x = linear_attention(dim_x, heads, dim_head)
        self.attn_g = linear_attention(dim_x + dim_g, heads, dim_head)

    def forward(self, x: torch.Tensor, g: torch.Tensor, t_x: torch.Tensor, t_g: torch.Tensor
                ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        x = self.rb_x1(x, t_x)
        g = self.rb_g1(g, t_g)
        skip_first = torch.cat((x, g), dim=1)
        g = self.rb_g2(skip_first, t_g)
        x = self.attn_x(self.rb_x2(self.g_to_x_gate(g) * x, t_x))
        skip_second = torch.cat((x, g), dim=1)
        return (x, self.attn_g(skip_second)), (skip_first, skip_second)


class Bottleneck(nn.Module):
    """ResNet block -> (self-attention + linear attention) -> concat -> ResNet block
    (the reference's ``BM``)."""

    def __init__(self, dim_in: int, dim_out: int, time_dim: int, heads: int, dim_head: int):
        super().__init__()
        self.rb_before = ResnetBlock(dim_in, dim_out, time_dim, BOTTLENECK_GROUPS)
        self.self_attn = Residual(PreNorm(dim_out, Attention(dim_out, heads, dim_head)))
        self.linear_attn = linear_attention(dim_out, heads, dim_head)
        self.rb_after = ResnetBlock(2 * dim_out, dim_out, time_dim, BOTTLENECK_GROUPS)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = self.rb_before(x, t)
        attended = self.self_attn(x) + self.linear_attn(x)
        return self.rb_after(torch.cat((x, attended), dim=1), t)


class DecoderLevel(nn.Module):
    """Reads the encoder's second skip, then its first, each through a ResNet block, then
    linear attention (the reference's ``DM``)."""

    def __init__(self, dim_in: int, dim_out: int, time_dim: int, groups: int, heads: int,
                 dim_head: int):
        super().__init__()
        self.rb_second_skip = ResnetBlock(dim_in, dim_out, time_dim, groups)
        # The reference sizes this block's input like the first one's; both skips have the
        # same width, so x (dim_out wide) plus either skip is dim_in.
        self.rb_first_skip = ResnetBlock(dim_in, dim_out, time_dim, groups)
        self.attn = linear_attention(dim_out, heads, dim_head)

    def forward(self, x: torch.Tensor, skip_first: torch.Tensor, skip_second: torch.Tensor,
                t: torch.Tensor) -> torch.Tensor:
        x = self.rb_second_skip(torch.cat((x, skip_second), dim=1), t)
        x = self.rb_first_skip(torch.cat((x, skip_first), dim=1), t)
        return self.attn(x)


# ------------------------------------------------------------------------------------- U-Net

class DermoSegDiffUNet(nn.Module):
    """ε-prediction network: ``forward(x_t (N, C, H, W), t (N,) long, g (N, 3, H, W))`` ->
    ε (N, C, H, W), with C = ``cfg.channels``; H and W multiples of
    ``cfg.downsampling_factor``."""

    def __init__(self, cfg: DermoSegDiffConfig | None = None):
        super().__init__()
        self.cfg = cfg = default(cfg, DermoSegDiffConfig())
        heads, dim_head = cfg.attn_heads, cfg.attn_dim_head
        dims_x = [cfg.dim_x, *(cfg.dim_x * m for m in cfg.dim_x_mults)]
        dims_g = [cfg.dim_g, *(cfg.dim_g * m for m in cfg.dim_g_mults)]
        in_out_x = list(zip(dims_x[:-1], dims_x[1:], strict=True))
        in_out_g = list(zip(dims_g[:-1], dims_g[1:], strict=True))
        time_x, time_g = cfg.dim_x * 4, cfg.dim_g * 4
        groups = cfg.resnet_block_groups

        self.time_mlp_x = time_mlp(cfg.dim_x)
        self.time_mlp_g = time_mlp(cfg.dim_g)
        self.init_conv_x = nn.Conv2d(cfg.channels, cfg.dim_x, 1)
        self.init_conv_g = nn.Conv2d(cfg.image_channels, cfg.dim_g, 1)

        self.encoder = nn.ModuleList()
        for level, ((x_in, x_out), (g_in, g_out)) in enumerate(zip(in_out_x, in_out_g,
                                                                   strict=True)):
            resize = same_resolution if level == len(in_out_x) - 1 else downsample
            self.encoder.append(nn.ModuleDict({
                "level": EncoderLevel(x_in, g_in, time_x, time_g, groups, heads, dim_head),
                "down_g": resize(x_in + g_in, g_out),
                "down_x": resize(x_in, x_out),
            }))

        self.bottleneck = Bottleneck(dims_x[-1] + dims_g[-1], dims_x[-1], time_x, heads,
                                     dim_head)

        self.decoder = nn.ModuleList()
        for level, ((x_in, x_out), (g_in, _)) in enumerate(zip(reversed(in_out_x),
                                                               reversed(in_out_g), strict=True)):
            skip_dim = x_in + g_in
            resize = same_resolution if level == len(in_out_x) - 1 else upsample
            self.decoder.append(nn.ModuleDict({
                "level": DecoderLevel(skip_dim + x_out, x_out, time_x, groups, heads, dim_head),
                "up": resize(x_out, x_in),
            }))

        self.final_block = ResnetBlock(2 * cfg.dim_x + cfg.dim_g, cfg.dim_x, time_x,
                                       FINAL_GROUPS)
        self.final_conv = nn.Conv2d(cfg.dim_x, cfg.channels, 1)

    def _check_inputs(self, x_t: torch.Tensor, t: torch.Tensor, g: torch.Tensor) -> None:
        cfg, factor = self.cfg, self.cfg.downsampling_factor
        if x_t.dim() != 4 or x_t.shape[1] != cfg.channels:
            raise ValueError(f"x_t of shape {tuple(x_t.shape)}: expected (N, {cfg.channels}, H, W)")
        if g.shape[0] != x_t.shape[0] or g.shape[1] != cfg.image_channels \
                or g.shape[2:] != x_t.shape[2:]:
            raise ValueError(f"image g of shape {tuple(g.shape)} does not fit x_t "
                             f"{tuple(x_t.shape)}: expected (N, {cfg.image_channels}, H, W)")
        if x_t.shape[2] % factor or x_t.shape[3] % factor:
            raise ValueError(f"input {x_t.shape[2]}x{x_t.shape[3]} must be a multiple of "
                             f"{factor} for {len(cfg.dim_x_mults)} levels; resize or pad it")
        if t.shape != (x_t.shape[0],):
            raise ValueError(f"timesteps of shape {tuple(t.shape)}: expected ({x_t.shape[0]},)")

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        self._check_inputs(x_t, t, g)
        x = self.init_conv_x(x_t)
        g = self.init_conv_g(g)
        x_init, g_init = x, g
        t_x, t_g = self.time_mlp_x(t), self.time_mlp_g(t)

        skips = []
        for enc in self.encoder:
            (x, g), level_skips = enc["level"](x, g, t_x, t_g)
            skips.append(level_skips)
            x, g = enc["down_x"](x), enc["down_g"](g)

        x = self.bottleneck(torch.cat((x, g), dim=1), t_x)

        for dec in self.decoder:
            skip_first, skip_second = skips.pop()
            x = dec["up"](dec["level"](x, skip_first, skip_second, t_x))

        x = self.final_block(torch.cat((x, x_init, g_init), dim=1), t_x)
        return self.final_conv(x)


# ------------------------------------------------------------------------ reference checkpoints

# The reference (src/models/segdiffs.py) keeps each level's parts in ModuleLists where we name
# them, wraps single modules in RB (.rb) and LAtt (.att), and names a few modules differently.
# The rules rewrite a reference key into ours, in order; tests check that they map every key of
# the reference presets one-to-one onto this U-Net's keys with the same shapes.
REFERENCE_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^encoder_blocks\.(\d+)\.0\.", r"encoder.\1.level."),  # [EM, g_down, x_down]
    (r"^encoder_blocks\.(\d+)\.1\.", r"encoder.\1.down_g."),
    (r"^encoder_blocks\.(\d+)\.2\.", r"encoder.\1.down_x."),
    (r"^decoder_blocks\.(\d+)\.0\.", r"decoder.\1.level."),  # [DM, d_up]
    (r"^decoder_blocks\.(\d+)\.1\.", r"decoder.\1.up."),
    (r"^final_rb\.", "final_block."),
    (r"\.rb\.", "."),  # RB(ResnetBlock)
    (r"\.att\.", "."),  # LAtt(Residual(PreNorm(LinearAttention)))
    (r"\.mlp\.", ".time_proj."),  # ResnetBlock's time embedding projection
    (r"^(encoder\.\d+\.level)\.g_feedback\.", r"\1.g_to_x_gate."),
    (r"^(encoder\.\d+\.level)\.att_x\.", r"\1.attn_x."),
    (r"^(encoder\.\d+\.level)\.att_g\.", r"\1.attn_g."),
    (r"^bottleneck\.ls_attn\.s_attn\.", "bottleneck.self_attn."),  # LSAtt(s_attn, l_attn)
    (r"^bottleneck\.ls_attn\.l_attn\.", "bottleneck.linear_attn."),
    (r"^(decoder\.\d+\.level)\.rb_d1\.", r"\1.rb_second_skip."),  # reads skip b first
    (r"^(decoder\.\d+\.level)\.rb_d2\.", r"\1.rb_first_skip."),  # then skip h
    (r"^(decoder\.\d+\.level)\.att_x\.", r"\1.attn."),
)
_REFERENCE_RULES = [(re.compile(pattern), repl) for pattern, repl in REFERENCE_RENAMES]
_REFERENCE_ONLY = re.compile(r"^(encoder_blocks|decoder_blocks|final_rb)\.")

V = TypeVar("V")


def is_reference_layout(keys: Iterable[str]) -> bool:
    """Whether state-dict keys are named as in the reference code (not as in this module)."""
    return any(_REFERENCE_ONLY.match(k) for k in keys)


def reference_key(key: str) -> str:
    """This U-Net's name of a reference state-dict key (keys named alike pass unchanged)."""
    for pattern, repl in _REFERENCE_RULES:
        key = pattern.sub(repl, key)
    return key


def from_reference(state: Mapping[str, V]) -> dict[str, V]:
    """A reference ``DermoSegDiff`` state dict with this U-Net's key names."""
    renamed: dict[str, V] = {}
    for key, value in state.items():
        name = reference_key(key)
        if name in renamed:
            raise ValueError(f"reference keys {key!r} and another both map to {name!r}")
        renamed[name] = value
    return renamed
