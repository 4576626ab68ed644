"""Using a trained StyleGAN2 generator: images by seed, style mixing, and projection of a real
image into W (the reference's ``generate.py``, ``style_mixing.py`` and ``projector.py``).

Latents come from ``np.random.RandomState(seed)`` as in the reference, so a seed names the same
image on every machine. Projection optimises one W vector and the noise maps, as the
reference does, with the reference's schedule and noise regularisation; its image distance is
pixel MSE plus, when a feature function is given (e.g. the metrics' extractor), the distance
between the features (the reference uses LPIPS on VGG16, whose weights it downloads).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dermml.models.stylegan2 import one_hot


def seed_latents(seeds: list[int], z_dim: int) -> torch.Tensor:
    """The reference's latents: ``np.random.RandomState(seed).randn(1, z_dim)`` per seed."""
    return torch.from_numpy(np.stack([np.random.RandomState(int(s)).randn(z_dim)
                                      for s in seeds])).float()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Generator output (NCHW, about [-1, 1]) as RGB uint8 (NHWC)."""
    return (images.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8) \
        .permute(0, 2, 3, 1).cpu().numpy()


def from_uint8(image: np.ndarray) -> torch.Tensor:
    """RGB uint8 (HWC) as a generator-range tensor (1, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() \
        / 127.5 - 1


@torch.no_grad()
def generate(G: nn.Module, class_indices: list[int], seeds: list[int],
             truncation: float | list[float] = 1.0, noise_mode: str = "const",
             batch: int = 16) -> np.ndarray:
    """Images (NHWC uint8) for ``seeds`` of ``class_indices``; deterministic by seed with
    ``noise_mode`` const or none. ``truncation``: one psi, or one per image."""
    device = next(G.parameters()).device
    psis = list(truncation) if isinstance(truncation, list | tuple) \
        else [float(truncation)] * len(seeds)
    out = []
    for start in range(0, len(seeds), batch):
        stop = min(len(seeds), start + batch)
        z = seed_latents(seeds[start:stop], G.z_dim).to(device)
        c = one_hot(torch.tensor(class_indices[start:stop], device=device), G.c_dim)
        groups: dict[float, list[int]] = {}
        for i in range(stop - start):  # one mapping call per distinct psi
            groups.setdefault(psis[start + i], []).append(i)
        images = torch.empty(stop - start, G.img_channels, G.img_resolution, G.img_resolution,
                             device=device)
        for psi, rows in groups.items():
            ws = G.mapping(z[rows], c[rows], truncation_psi=psi)
            images[rows] = G.synthesis(ws, noise_mode=noise_mode).float()
        out.append(to_uint8(images))
    if not out:
        return np.zeros((0, G.img_resolution, G.img_resolution, 3), np.uint8)
    return np.concatenate(out)


@torch.no_grad()
def style_mix(G: nn.Module, row_seeds: list[int], col_seeds: list[int], class_index: int = 0,
              styles: list[int] | None = None, truncation: float = 1.0,
              noise_mode: str = "const") -> list[list[np.ndarray]]:
    """The reference's style-mixing figure as rows of tiles: the first row is the column
    sources, the first column the row sources (the top-left tile is blank), and tile (r, c)
    takes row r's W for every layer except ``styles`` (default: the coarse layers 0-6), which
    come from column c."""
    device = next(G.parameters()).device
    styles = list(range(min(7, G.num_ws))) if styles is None else styles
    bad = [s for s in styles if not 0 <= s < G.num_ws]
    if bad:
        raise ValueError(f"styles {bad} are outside this generator's 0..{G.num_ws - 1}")
    seeds = list(dict.fromkeys(row_seeds + col_seeds))
    z = seed_latents(seeds, G.z_dim).to(device)
    c = one_hot(torch.full((len(seeds),), class_index, device=device), G.c_dim)
    ws = dict(zip(seeds, G.mapping(z, c, truncation_psi=truncation), strict=True))

    def image(w: torch.Tensor) -> np.ndarray:
        return to_uint8(G.synthesis(w[None], noise_mode=noise_mode)[:, :3])[0]

    blank = np.full((G.img_resolution, G.img_resolution, 3), 255, np.uint8)  # RGB tiles
    rows = [[blank] + [image(ws[s]) for s in col_seeds]]
    for r in row_seeds:
        row = [image(ws[r])]
        for col in col_seeds:
            w = ws[r].clone()
            w[styles] = ws[col][styles]
            row.append(image(w))
        rows.append(row)
    return rows


def noise_buffers(G: nn.Module) -> dict[str, torch.Tensor]:
    """The synthesis network's constant noise maps, by name."""
    return {name: buf for name, buf in G.synthesis.named_buffers() if "noise_const" in name}


def project(G: nn.Module, target: np.ndarray, class_index: int = 0, steps: int = 1000,
            features: Callable[[torch.Tensor], torch.Tensor] | None = None,
            initial_lr: float = 0.1, initial_noise_factor: float = 0.05,
            lr_rampdown_length: float = 0.25, lr_rampup_length: float = 0.05,
            noise_ramp_length: float = 0.75, regularize_noise_weight: float = 1e5,
            w_avg_samples: int = 10000, seed: int = 0,
            progress: Callable[[int, float], None] | None = None
            ) -> tuple[torch.Tensor, np.ndarray, list[float]]:
    """Project ``target`` (RGB uint8, the generator's size) into W of class ``class_index``.

    Returns the W vector repeated per layer ([num_ws, w_dim]), the synthesised image (uint8)
    and the loss per step. ``features(images in [-1, 1]) -> [N, D]`` adds a feature distance
    to pixel MSE."""
    device = next(G.parameters()).device
    G = G.eval().requires_grad_(False)
    if target.shape[:2] != (G.img_resolution, G.img_resolution):
        raise ValueError(f"the target is {target.shape[1]}x{target.shape[0]} px; this "
                         f"generator makes {G.img_resolution}x{G.img_resolution} px images "
                         "(resize it first)")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        z = torch.randn(w_avg_samples, G.z_dim, generator=generator).to(device)
        c = one_hot(torch.full((w_avg_samples,), class_index, device=device), G.c_dim)
        w_samples = G.mapping(z, c)[:, :1, :]
        w_avg = w_samples.mean(0, keepdim=True)
        w_std = float(((w_samples - w_avg).square().sum() / w_avg_samples) ** 0.5)
    noises = noise_buffers(G)
    target_t = from_uint8(target).to(device)
    target_f = features(target_t) if features is not None else None
    w_opt = w_avg.clone().requires_grad_(True)
    originals = {k: v.detach().clone() for k, v in noises.items()}
    for buf in noises.values():
        buf.copy_(torch.randn(buf.shape, generator=generator).to(device))
        buf.requires_grad_(True)
    optimizer = torch.optim.Adam([w_opt, *noises.values()], betas=(0.9, 0.999), lr=initial_lr)
    losses = []
    try:
        for step in range(steps):
            t = step / max(1, steps)
            w_noise_scale = w_std * initial_noise_factor * max(0.0, 1.0 - t / noise_ramp_length) \
                ** 2
            lr_ramp = min(1.0, (1.0 - t) / lr_rampdown_length)
            lr_ramp = 0.5 - 0.5 * np.cos(lr_ramp * np.pi)
            lr_ramp = lr_ramp * min(1.0, t / lr_rampup_length)
            for group in optimizer.param_groups:
                group["lr"] = initial_lr * lr_ramp
            w_noise = torch.randn(w_opt.shape, generator=generator).to(device) * w_noise_scale
            ws = (w_opt + w_noise).repeat(1, G.num_ws, 1)
            synth = G.synthesis(ws, noise_mode="const")[:, :3]  # image + mask models: RGB
            dist = F.mse_loss(synth, target_t)
            if target_f is not None:
                dist = dist + (features(synth) - target_f).square().sum(1).mean()
            reg = noise_regularisation(list(noises.values()))
            loss = dist + reg * regularize_noise_weight
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():  # normalise the noise maps, as the reference
                for buf in noises.values():
                    buf -= buf.mean()
                    buf *= buf.square().mean().rsqrt()
            losses.append(float(dist.detach()))
            if progress is not None:
                progress(step, losses[-1])
        with torch.no_grad():
            w = w_opt.detach().repeat(1, G.num_ws, 1)
            image = to_uint8(G.synthesis(w, noise_mode="const")[:, :3])[0]
    finally:
        with torch.no_grad():  # the generator keeps its own noise maps
            for name, buf in noises.items():
                buf.requires_grad_(False)
                buf.copy_(originals[name])
    return w[0].cpu(), image, losses


def noise_regularisation(noises: list[torch.Tensor]) -> torch.Tensor:
    """The reference's noise regulariser: squared autocorrelation at every scale down to 8 px."""
    total = torch.zeros(())
    for noise in noises:
        n = noise[None, None] if noise.dim() == 2 else noise
        while True:
            total = total + (n * torch.roll(n, shifts=1, dims=3)).mean() ** 2 \
                + (n * torch.roll(n, shifts=1, dims=2)).mean() ** 2
            if n.shape[2] <= 8:
                break
            n = F.avg_pool2d(n, kernel_size=2)
    return total
