"""StyleGAN2-ADA training speed (s/kimg), peak memory and generation images/s.

Trains the gan task's loop (``dermml.training.gan_loop.fit_gan``: all four phases with lazy
R1 / path-length regularisation, ADA bgc, G_ema) on random images held in memory, so disk
and decoding do not count, and compares DermML's path with eager fp32 of the same networks:

- ``eager fp32``: the loop with TF32 off (the reference's setting);
- ``ours``: the loop as configured (on CUDA: TF32 matmuls/convolutions; on CPU the same fp32
  path, so the ratio only shows noise).

Runs with torch + DermML's core modules (no Ray, MLflow or data files), so a GPU machine needs
only torch, numpy, scipy and pydantic next to the ``dermml`` folder:

    python benchmarks/gan.py --size 64 --kimg 0.25 --fmaps 0.125   # the CPU figure
    python benchmarks/gan.py --size 256 --kimg 2 --paper256  # the GPU figure

The reference's published speed is 21.6-24.2 s/kimg at 256 px on one V100 (paper256).
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

from dermml.models.gan_sampling import generate
from dermml.models.stylegan2 import StyleGAN2, StyleGAN2Config
from dermml.training.gan_loop import GanTrainConfig, fit_gan


def networks(size: int, paper256: bool, fmaps: float) -> StyleGAN2Config:
    if paper256:  # --cfg paper256: half feature maps, 8-layer mapping, mbstd group 8
        return StyleGAN2Config(channel_base=16384, channel_max=512, mapping_layers=8,
                               mbstd_group=8)
    # --cfg auto below 512 px: half feature maps (fmaps 0.5), 2-layer mapping
    return StyleGAN2Config(channel_base=int(fmaps * 32768), channel_max=int(fmaps * 1024),
                           mapping_layers=2)


def loader(size: int, batch: int, n: int = 256) -> DataLoader:
    torch.manual_seed(0)
    images = torch.rand(n, 3, size, size)
    labels = torch.randint(0, 2, (n,))
    return DataLoader(TensorDataset(images, labels), batch_size=batch, shuffle=True,
                      drop_last=True)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def seconds_per_kimg(size: int, batch: int, kimg: float, device: torch.device, tf32: bool,
                     paper256: bool, fmaps: float) -> tuple[float, float, StyleGAN2]:
    torch.manual_seed(0)
    model = StyleGAN2(networks(size, paper256, fmaps), size, 2)
    cfg = GanTrainConfig(kimg=kimg + 0.25, tick_kimg=0.25, tf32=tf32, r1_gamma=1.0,
                         aug="ada", augpipe="bgc", ada_kimg=100)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = fit_gan(model, loader(size, batch), cfg, 2, [0.5, 0.5], device)
    ticks = [h for h in result.history[1:]]  # the first tick pays warm-up
    seconds = sum(h["epoch_seconds"] for h in ticks)
    shown = (result.history[-1]["kimg"] - result.history[0]["kimg"])
    return seconds / max(shown, 1e-9), peak_memory_mb(device), model


def generation_rate(model: StyleGAN2, device: torch.device, n: int, batch: int) -> float:
    G = model.G_ema.eval()
    generate(G, [0] * batch, list(range(batch)), 0.7, batch=batch)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    generate(G, [i % 2 for i in range(n)], list(range(n)), 0.7, batch=batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=0, help="0: the auto spec's batch")
    parser.add_argument("--kimg", type=float, default=0.5, help="measured kimg per contender")
    parser.add_argument("--paper256", action="store_true", help="the paper256 networks")
    parser.add_argument("--generate", type=int, default=64, help="images for generation rate")
    parser.add_argument("--fmaps", type=float, default=0.5,
                        help="feature-map multiplier of the auto networks (the reference: 0.5 "
                             "below 512 px; 0.125 keeps a CPU run to minutes)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = args.batch or max(min(4096 // args.size, 32), 1)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; {args.size} px, batch {batch}, "
          f"{'paper256' if args.paper256 else f'auto networks (fmaps {args.fmaps})'}, "
          f"{args.kimg} kimg measured")
    eager, eager_mem, _ = seconds_per_kimg(args.size, batch, args.kimg, device, False,
                                           args.paper256, args.fmaps)
    ours, ours_mem, model = seconds_per_kimg(args.size, batch, args.kimg, device, True,
                                             args.paper256, args.fmaps)
    rate = generation_rate(model, device, args.generate, min(batch, 16))
    print("| path | s/kimg | peak memory (MiB) |\n| --- | --- | --- |")
    print(f"| eager fp32 (TF32 off) | {eager:.1f} | {eager_mem:.0f} |")
    print(f"| ours ({'TF32' if device.type == 'cuda' else 'fp32, same path on CPU'}) | "
          f"{ours:.1f} (×{eager / ours:.2f} faster) | {ours_mem:.0f} |")
    print(f"generation: {rate:.1f} images/s (truncation 0.7, batch {min(batch, 16)})")


if __name__ == "__main__":
    main()
