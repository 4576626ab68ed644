"""Adaptive discriminator augmentation (ADA) for GAN training, as in "Training Generative
Adversarial Networks with Limited Data" (Karras et al. 2020) and ``training/augment.py`` of
NVlabs/stylegan2-ada-pytorch, in plain PyTorch on batches of images in [-1, 1].

``AugmentPipe`` applies the ``bgc`` transforms (pixel blitting, general geometry, colour) to each
image with probability ``p`` times the transform's multiplier; ``AdaController`` moves ``p`` so
that the discriminator's mean sign on reals, r_t = E[sign(D(x))], stays near a target (0.6).

Differences from the reference:

- geometry is resampled with ``F.affine_grid`` + ``F.grid_sample`` (bilinear, reflection
  padding) on the image itself. The reference pads by reflection, upsamples 2x with a ``sym6``
  wavelet filter (``upfirdn2d``), samples bilinearly and downsamples with the same filter, which
  suppresses aliasing under rotation and scaling; bilinear sampling at the original resolution is
  slightly blurrier and aliases more, and ``grid_sample`` reflects about the image edge while
  the reference's padding reflects about the edge pixels.
- images whose drawn transform is the identity (geometric or colour) are passed through
  unchanged, so ``p = 0`` returns the input exactly; the reference resamples every image once
  any geometric transform is enabled.
- the image-space filtering, additive noise and cutout transforms (``bgcf``, ``bgcfn``,
  ``bgcfnc``) are not implemented.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------- homogeneous matrices [N, k, k]


def _matrix(rows: list[list[Any]], like: torch.Tensor) -> torch.Tensor:
    """Per-sample matrices from rows of entries, each a tensor [N] or a number."""
    entries = [e if isinstance(e, torch.Tensor) else torch.full_like(like, float(e))
               for row in rows for e in row]
    return torch.stack(entries, dim=-1).reshape(like.shape[0], len(rows), len(rows[0]))


def _translate2d(tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    return _matrix([[1, 0, tx], [0, 1, ty], [0, 0, 1]], tx)


def _scale2d(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    return _matrix([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], sx)


def _rotate2d(theta: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(theta), torch.sin(theta)
    return _matrix([[c, -s, 0], [s, c, 0], [0, 0, 1]], theta)


def _translate3d(t: torch.Tensor) -> torch.Tensor:
    return _matrix([[1, 0, 0, t], [0, 1, 0, t], [0, 0, 1, t], [0, 0, 0, 1]], t)


def _scale3d(s: torch.Tensor) -> torch.Tensor:
    return _matrix([[s, 0, 0, 0], [0, s, 0, 0], [0, 0, s, 0], [0, 0, 0, 1]], s)


def _rotate3d(v: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Rotation by ``theta`` [N] about the unit axis ``v`` (3 entries), Rodrigues' formula."""
    vx, vy, vz = (float(e) for e in v[:3])
    s, c = torch.sin(theta), torch.cos(theta)
    cc = 1 - c
    return _matrix([[vx * vx * cc + c, vx * vy * cc - vz * s, vx * vz * cc + vy * s, 0],
                    [vy * vx * cc + vz * s, vy * vy * cc + c, vy * vz * cc - vx * s, 0],
                    [vz * vx * cc - vy * s, vz * vy * cc + vx * s, vz * vz * cc + c, 0],
                    [0, 0, 0, 1]], theta)


# ------------------------------------------------------------------------------- the pipeline

class AugmentPipe(nn.Module):
    """Per-image random augmentation of a batch [N, C, H, W] (C = 1 or 3), the reference's
    pixel-blitting, geometric and colour transforms. Each transform is applied to an image with
    probability ``multiplier * p`` (the buffer ``p``; rotation is split into a pre- and a
    post-rotation each of probability 1 - sqrt(1 - p), as the reference). Parameter defaults are
    the reference's. Randomness comes from torch's global generator (seed it to reproduce).

    Geometric transforms compose one 3x3 matrix per image, mapping output pixel coordinates
    (relative to the image centre) to input ones; colour transforms compose one 4x4 matrix on
    (r, g, b, 1) with luma axis (1, 1, 1) / sqrt(3)."""

    def __init__(self, xflip: float = 0, rotate90: float = 0, xint: float = 0,
                 xint_max: float = 0.125, scale: float = 0, rotate: float = 0,
                 aniso: float = 0, xfrac: float = 0, scale_std: float = 0.2,
                 rotate_max: float = 1, aniso_std: float = 0.2, xfrac_std: float = 0.125,
                 brightness: float = 0, contrast: float = 0, lumaflip: float = 0,
                 hue: float = 0, saturation: float = 0, brightness_std: float = 0.2,
                 contrast_std: float = 0.5, hue_max: float = 1, saturation_std: float = 1,
                 p: float = 1.0):
        super().__init__()
        self.register_buffer("p", torch.tensor(float(p)))  # overall multiplier (ADA's p)
        # Pixel blitting.
        self.xflip = float(xflip)            # probability multiplier of x-flip
        self.rotate90 = float(rotate90)      # ... of a rotation by a multiple of 90 degrees
        self.xint = float(xint)              # ... of an integer translation
        self.xint_max = float(xint_max)      # its range, relative to the image size
        # General geometric transforms.
        self.scale = float(scale)            # ... of isotropic scaling
        self.rotate = float(rotate)          # ... of arbitrary rotation
        self.aniso = float(aniso)            # ... of anisotropic scaling
        self.xfrac = float(xfrac)            # ... of a fractional translation
        self.scale_std = float(scale_std)    # log2 std of isotropic scaling
        self.rotate_max = float(rotate_max)  # rotation range, 1 = full circle
        self.aniso_std = float(aniso_std)    # log2 std of anisotropic scaling
        self.xfrac_std = float(xfrac_std)    # std of fractional translation, relative to size
        # Colour transforms.
        self.brightness = float(brightness)  # ... of a brightness offset
        self.contrast = float(contrast)      # ... of a contrast change
        self.lumaflip = float(lumaflip)      # ... of a luma flip
        self.hue = float(hue)                # ... of a hue rotation
        self.saturation = float(saturation)  # ... of a saturation change
        self.brightness_std = float(brightness_std)  # std of the brightness offset
        self.contrast_std = float(contrast_std)      # log2 std of contrast
        self.hue_max = float(hue_max)                # hue rotation range, 1 = full circle
        self.saturation_std = float(saturation_std)  # log2 std of saturation

    def extra_repr(self) -> str:
        names = ["xflip", "rotate90", "xint", "scale", "rotate", "aniso", "xfrac", "brightness",
                 "contrast", "lumaflip", "hue", "saturation"]
        return ", ".join(f"{name}={getattr(self, name):g}" for name in names
                         if getattr(self, name) > 0)

    def _chosen(self, multiplier: float | torch.Tensor, n: int, device: torch.device,
                *shape: int) -> torch.Tensor:
        """Which images get a transform of probability ``multiplier * p``: bool [n, *shape]."""
        return torch.rand([n, *shape], device=device) < multiplier

    # ------------------------------------------------------------------------------ geometry
    def geometric_matrix(self, n: int, width: int, height: int,
                         device: torch.device) -> torch.Tensor:
        """Draw the inverse geometric transform of each image: [n, 3, 3], output pixel
        coordinates (centred) -> input pixel coordinates."""
        p = self.p.to(device)
        zeros = torch.zeros([n], device=device)
        ones = torch.ones([n], device=device)
        g_inv = torch.eye(3, device=device).expand(n, 3, 3)
        if self.xflip > 0:
            i = torch.floor(torch.rand([n], device=device) * 2)
            i = torch.where(self._chosen(self.xflip * p, n, device), i, zeros)
            g_inv = g_inv @ _scale2d(1 - 2 * i, ones)
        if self.rotate90 > 0:
            i = torch.floor(torch.rand([n], device=device) * 4)
            i = torch.where(self._chosen(self.rotate90 * p, n, device), i, zeros)
            g_inv = g_inv @ _rotate2d(math.pi / 2 * i)
        if self.xint > 0:
            t = (torch.rand([n, 2], device=device) * 2 - 1) * self.xint_max
            t = torch.where(self._chosen(self.xint * p, n, device, 1), t, torch.zeros_like(t))
            g_inv = g_inv @ _translate2d(-torch.round(t[:, 0] * width),
                                         -torch.round(t[:, 1] * height))
        if self.scale > 0:
            s = torch.exp2(torch.randn([n], device=device) * self.scale_std)
            s = torch.where(self._chosen(self.scale * p, n, device), s, ones)
            g_inv = g_inv @ _scale2d(1 / s, 1 / s)
        p_rot = 1 - torch.sqrt((1 - self.rotate * p).clamp(0, 1))  # P(pre or post) = rotate * p
        if self.rotate > 0:
            theta = (torch.rand([n], device=device) * 2 - 1) * math.pi * self.rotate_max
            theta = torch.where(self._chosen(p_rot, n, device), theta, zeros)
            g_inv = g_inv @ _rotate2d(theta)  # before the anisotropic scaling
        if self.aniso > 0:
            s = torch.exp2(torch.randn([n], device=device) * self.aniso_std)
            s = torch.where(self._chosen(self.aniso * p, n, device), s, ones)
            g_inv = g_inv @ _scale2d(1 / s, s)
        if self.rotate > 0:
            theta = (torch.rand([n], device=device) * 2 - 1) * math.pi * self.rotate_max
            theta = torch.where(self._chosen(p_rot, n, device), theta, zeros)
            g_inv = g_inv @ _rotate2d(theta)  # after the anisotropic scaling
        if self.xfrac > 0:
            t = torch.randn([n, 2], device=device) * self.xfrac_std
            t = torch.where(self._chosen(self.xfrac * p, n, device, 1), t, torch.zeros_like(t))
            g_inv = g_inv @ _translate2d(-t[:, 0] * width, -t[:, 1] * height)
        return g_inv

    # -------------------------------------------------------------------------------- colour
    def color_matrix(self, n: int, num_channels: int, device: torch.device) -> torch.Tensor:
        """Draw the colour transform of each image: [n, 4, 4] on homogeneous (r, g, b, 1)."""
        p = self.p.to(device)
        zeros = torch.zeros([n], device=device)
        ones = torch.ones([n], device=device)
        eye = torch.eye(4, device=device)
        c = eye.expand(n, 4, 4)
        v = torch.tensor([1, 1, 1, 0], dtype=torch.float32, device=device) / math.sqrt(3)
        vv = torch.outer(v, v)
        if self.brightness > 0:
            b = torch.randn([n], device=device) * self.brightness_std
            b = torch.where(self._chosen(self.brightness * p, n, device), b, zeros)
            c = _translate3d(b) @ c
        if self.contrast > 0:
            k = torch.exp2(torch.randn([n], device=device) * self.contrast_std)
            k = torch.where(self._chosen(self.contrast * p, n, device), k, ones)
            c = _scale3d(k) @ c
        if self.lumaflip > 0:
            i = torch.floor(torch.rand([n], device=device) * 2)
            i = torch.where(self._chosen(self.lumaflip * p, n, device), i, zeros)
            c = (eye - 2 * vv * i[:, None, None]) @ c  # Householder reflection about luma
        if self.hue > 0 and num_channels > 1:
            theta = (torch.rand([n], device=device) * 2 - 1) * math.pi * self.hue_max
            theta = torch.where(self._chosen(self.hue * p, n, device), theta, zeros)
            c = _rotate3d(v, theta) @ c
        if self.saturation > 0 and num_channels > 1:
            s = torch.exp2(torch.randn([n], device=device) * self.saturation_std)
            s = torch.where(self._chosen(self.saturation * p, n, device), s, ones)
            c = (vv + (eye - vv) * s[:, None, None]) @ c
        return c

    # ------------------------------------------------------------------------------- forward
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4:
            raise ValueError(f"AugmentPipe expects [N, C, H, W] images, got {list(images.shape)}")
        n, channels, height, width = images.shape
        device = images.device
        geometric = any(m > 0 for m in (self.xflip, self.rotate90, self.xint, self.scale,
                                        self.rotate, self.aniso, self.xfrac))
        color = any(m > 0 for m in (self.brightness, self.contrast, self.lumaflip, self.hue,
                                    self.saturation))
        if color and channels not in (1, 3, 4):
            raise ValueError(f"colour augmentation needs 1 or 3 channels (or RGB + a mask "
                             f"channel), got {channels}")

        if geometric:
            g_inv = self.geometric_matrix(n, width, height, device)
            identity = (g_inv == torch.eye(3, device=device)).flatten(1).all(dim=1)
            # Centred pixel coordinates -> grid_sample's [-1, 1] (align_corners=False).
            to_norm = torch.diag(torch.tensor([2 / width, 2 / height, 1.0], device=device))
            from_norm = torch.diag(torch.tensor([width / 2, height / 2, 1.0], device=device))
            theta = (to_norm @ g_inv @ from_norm)[:, :2, :].to(images.dtype)
            grid = F.affine_grid(theta, [n, channels, height, width], align_corners=False)
            warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection",
                                   align_corners=False)
            images = torch.where(identity[:, None, None, None], images, warped)

        if color and channels == 4:  # RGB + mask: colour acts on RGB, geometry moved both
            rgb = self._color(images[:, :3])
            return torch.cat([rgb, images[:, 3:]], dim=1)
        if color:
            images = self._color(images)
        return images

    def _color(self, images: torch.Tensor) -> torch.Tensor:
        """The colour transforms on RGB (3) or grey (1) channels."""
        n, channels, height, width = images.shape
        c = self.color_matrix(n, channels, images.device)
        identity = (c == torch.eye(4, device=images.device)).flatten(1).all(dim=1)
        flat = images.reshape(n, channels, height * width)
        if channels == 3:
            out = c[:, :3, :3].to(flat.dtype) @ flat + c[:, :3, 3:].to(flat.dtype)
        else:  # grey: the mean of the RGB rows acting on (l, l, l, 1)
            rows = c[:, :3, :].mean(dim=1, keepdim=True).to(flat.dtype)  # [n, 1, 4]
            out = flat * rows[:, :, :3].sum(dim=2, keepdim=True) + rows[:, :, 3:]
        return torch.where(identity[:, None, None, None], images,
                           out.reshape(n, channels, height, width))


AUGPIPE_SPECS: dict[str, dict[str, float]] = {
    "blit": dict(xflip=1, rotate90=1, xint=1),
    "geom": dict(scale=1, rotate=1, aniso=1, xfrac=1),
    "color": dict(brightness=1, contrast=1, lumaflip=1, hue=1, saturation=1),
}
AUGPIPE_SPECS.update({
    "b": AUGPIPE_SPECS["blit"],
    "g": AUGPIPE_SPECS["geom"],
    "c": AUGPIPE_SPECS["color"],
    "bg": {**AUGPIPE_SPECS["blit"], **AUGPIPE_SPECS["geom"]},
    "gc": {**AUGPIPE_SPECS["geom"], **AUGPIPE_SPECS["color"]},
    "bgc": {**AUGPIPE_SPECS["blit"], **AUGPIPE_SPECS["geom"], **AUGPIPE_SPECS["color"]},
})
"""The reference's ``augpipe_specs`` (train.py) that use the implemented transforms, plus the
short names b, g, c, gc."""


def augment_pipe(spec: str, p: float = 0.0, **overrides: float) -> AugmentPipe | None:
    """An ``AugmentPipe`` for a named spec (``bgc`` is the reference's default; ``noaug`` ->
    None), starting at probability ``p`` (0, where ADA starts); ``overrides`` set other
    options (e.g. ``rotate_max=0.5``)."""
    if spec == "noaug":
        return None
    if spec not in AUGPIPE_SPECS:
        missing = " (its filter/noise/cutout transforms are not implemented)" \
            if spec.startswith("bgcf") else ""
        raise ValueError(f"unknown augment pipe {spec!r}{missing}; choose noaug, "
                         f"{', '.join(AUGPIPE_SPECS)}")
    return AugmentPipe(**{**AUGPIPE_SPECS[spec], **overrides}, p=p)


# ------------------------------------------------------------------------------ the controller

class AdaController:
    """Adjusts ``pipe.p`` from the discriminator's overfitting heuristic r_t = E[sign(D(real))]:
    every ``interval`` D steps, ``p += sign(r_t - target) * batch_size * interval /
    (kimg * 1000)``, clamped at 0, so p can move by 1 in ``kimg`` thousand real images.

    Call ``accumulate`` with the signs of D's logits on reals (or their batch mean, counted as one
    value) after each D step and ``step`` every ``interval`` D steps."""

    def __init__(self, pipe: AugmentPipe, target: float = 0.6, interval: int = 4,
                 kimg: float = 500, *, batch_size: int):
        if interval < 1 or kimg <= 0 or batch_size < 1:
            raise ValueError("AdaController needs interval >= 1, kimg > 0 and batch_size >= 1")
        self.pipe = pipe
        self.target = float(target)
        self.interval = int(interval)
        self.kimg = float(kimg)
        self.batch_size = int(batch_size)
        self.rt: float | None = None
        """r_t of the last adjustment (None before the first)."""
        self._sum: torch.Tensor | float = 0.0
        self._count = 0

    @property
    def p(self) -> float:
        return float(self.pipe.p)

    @property
    def adjustment(self) -> float:
        """How far one ``step`` moves p."""
        return self.batch_size * self.interval / (self.kimg * 1000)

    def accumulate(self, signs_of_real_logits: torch.Tensor) -> None:
        signs = torch.as_tensor(signs_of_real_logits).detach()
        self._sum = self._sum + signs.float().sum()
        self._count += signs.numel()

    def step(self) -> float:
        """Adjust p from the signs accumulated since the last step (none: p is kept);
        returns p."""
        if self._count == 0:
            return self.p
        self.rt = float(self._sum) / self._count
        self._sum, self._count = 0.0, 0
        adjust = float(np.sign(self.rt - self.target)) * self.adjustment
        with torch.no_grad():
            self.pipe.p.copy_(torch.as_tensor(max(self.p + adjust, 0.0)))
        return self.p

    def state_dict(self) -> dict[str, Any]:
        return {"p": self.p, "rt": self.rt, "sum": float(self._sum), "count": self._count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.pipe.p.copy_(torch.as_tensor(float(state["p"])))
        self.rt = state.get("rt")
        self._sum = float(state.get("sum", 0.0))
        self._count = int(state.get("count", 0))
