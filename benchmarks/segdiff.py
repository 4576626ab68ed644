"""DermoSegDiff speed: training images/s and peak memory, eager fp32 (the baseline: the
reference's training step) vs. DermML's path (bf16 autocast, channels_last, fused Adam,
torch.compile), and sampling time per image, DDPM-250 x ensemble 5 (reference) vs. DDIM-K
and DPM-Solver++-K.

Needs torch and DermML's model modules only (dermml.models.dermosegdiff/diffusion,
dermml.losses.diffusion; pydantic for the config), so it runs on any GPU machine:

    python benchmarks/segdiff.py                    # ISIC2018 preset, batch 32, 128 px (CUDA)
    python benchmarks/segdiff.py --small --batch 8  # a reduced model (CPU-sized)

Prints one line per measurement and the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from dermml.losses.diffusion import diffusion_loss
from dermml.models.dermosegdiff import DermoSegDiffConfig, DermoSegDiffUNet
from dermml.models.diffusion import GaussianDiffusion, beta_schedule, ensemble_masks, sample
from dermml.models.schedulers import get_sampler
from dermml.training.loop import LoopConfig, amp_dtype

SMALL = DermoSegDiffConfig(dim_x=32, dim_g=16, dim_x_mults=[1, 2, 3, 4],
                           dim_g_mults=[1, 2, 4, 8], resnet_block_groups=8)



def _amp_dtype() -> torch.dtype:
    """The training loop's autocast dtype on this GPU (bfloat16, or float16 without it)."""
    return amp_dtype(LoopConfig(), torch.device("cuda"))

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_speed(cfg: DermoSegDiffConfig, size: int, batch: int, steps: int,
                device: torch.device, ours: bool, compile_model: bool) -> tuple[float, float]:
    """(images/s, peak GiB) of full ε-prediction training steps (l2, T=250)."""
    torch.manual_seed(0)
    model = DermoSegDiffUNet(cfg).to(device)
    cuda = device.type == "cuda"
    fmt = torch.channels_last if ours and cuda else torch.contiguous_format
    model = model.to(memory_format=fmt)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.7, 0.99),
                                 **({"fused": True} if ours and cuda else {}))
    net = torch.compile(model) if compile_model else model
    diffusion = GaussianDiffusion(beta_schedule("linear", 250))
    g = torch.rand(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    x0 = (torch.rand(batch, 1, size, size, device=device) > 0.5).float() * 2 - 1
    amp = torch.autocast("cuda", dtype=_amp_dtype()) if ours and cuda else \
        contextlib.nullcontext()

    def step():
        t = torch.randint(1, 250, (batch,), device=device)
        noise = torch.randn_like(x0)
        with amp:
            eps = net(diffusion.q_sample(x0, t, noise).float().contiguous(memory_format=fmt), t, g)
        loss = diffusion_loss(eps.float(), noise, "l2")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(5 if compile_model else 2):
        step()
    sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return batch * steps / seconds, peak


def sampling_seconds(cfg: DermoSegDiffConfig, size: int, device: torch.device, sampler: str,
                     steps: int | None, ensemble: int, ours: bool) -> float:
    """Seconds to segment one image: ``ensemble`` samples in one batch, then averaged."""
    model = DermoSegDiffUNet(cfg).to(device).eval()
    diffusion = GaussianDiffusion(beta_schedule("linear", 250))
    spec = get_sampler(sampler)
    g = torch.rand(ensemble, 3, size, size, device=device)
    amp = torch.autocast("cuda", dtype=_amp_dtype()) if ours and device.type == "cuda" \
        else contextlib.nullcontext()
    with torch.no_grad(), amp:
        sync(device)
        start = time.perf_counter()
        x0, _ = sample(lambda x, t: model(x, t, g).float(), (ensemble, 1, size, size),
                       spec.build(diffusion, 0.0), spec.steps(steps, 250), device=device,
                       generator=torch.Generator(device=device).manual_seed(0))
        ensemble_masks(list(x0.split(1)))
        sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="reduced model (default on CPU)")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="timed training steps")
    parser.add_argument("--ddim-steps", type=int, default=25)
    parser.add_argument("--dpm-steps", type=int, default=20)
    parser.add_argument("--ensemble", type=int, default=5)
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    small = args.small or device.type == "cpu"
    cfg = SMALL if small else DermoSegDiffConfig()
    compile_model = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    name = torch.cuda.get_device_name() if device.type == "cuda" else \
        f"CPU ({torch.get_num_threads()} threads)"
    params = sum(p.numel() for p in DermoSegDiffUNet(cfg).parameters()) / 1e6
    print(f"device {name}; torch {torch.__version__}; model "
          f"{'reduced' if small else 'ISIC2018 preset'} ({params:.1f}M params); "
          f"{args.size}px, batch {args.batch}")
    eager = train_speed(cfg, args.size, args.batch, args.steps, device, False, False)
    ours = train_speed(cfg, args.size, args.batch, args.steps, device, True, compile_model)
    print(f"train eager fp32        : {eager[0]:8.1f} img/s   peak {eager[1]:.2f} GiB")
    print(f"train ours{' +compile' if compile_model else '         '}     : {ours[0]:8.1f} img/s"
          f"   peak {ours[1]:.2f} GiB   speed-up x{ours[0] / eager[0]:.2f}")
    ddpm = sampling_seconds(cfg, args.size, device, "ddpm", None, args.ensemble, True)
    ddim = sampling_seconds(cfg, args.size, device, "ddim", args.ddim_steps, args.ensemble, True)
    print(f"sample DDPM-250 x {args.ensemble}     : {ddpm:8.2f} s/image")
    dpm = sampling_seconds(cfg, args.size, device, "dpm", args.dpm_steps, args.ensemble, True)
    print(f"sample DDIM-{args.ddim_steps} x {args.ensemble}      : {ddim:8.2f} s/image"
          f"   speed-up x{ddpm / ddim:.1f}")
    print(f"sample DPM-{args.dpm_steps} x {args.ensemble}       : {dpm:8.2f} s/image"
          f"   speed-up x{ddpm / dpm:.1f}")


if __name__ == "__main__":
    main()
