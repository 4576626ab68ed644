"""Training-step throughput per task: eager fp32 (the baseline) vs. DermML's configured path.

The configured path is what ``dermml.training.loop.fit`` does on the device: on CUDA,
channels_last + bf16 autocast + fused AdamW, and ``torch.compile`` where it pays; on CPU the
loop stays eager fp32 (channels_last and autocast are slower there), so the script also
measures ``torch.compile`` on CPU to show whether it would pay.

Runs with torch + timm + segmentation-models-pytorch (+ pydantic for the model configs), no
Ray/MLflow, so it can run on any GPU machine:

    python benchmarks/train_throughput.py [--tasks classification,segmentation,attributes]
        [--size 128] [--batch 32] [--steps 20] [--compile auto|on|off]

Prints images/second per task and path and the ratio configured / eager.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
import torch.nn.functional as F

from dermml.models.classifier import ClassifierConfig, build_classifier
from dermml.models.segmentation import SegModelConfig, build_segmenter
from dermml.training.loop import LoopConfig, amp_dtype

TASKS = {
    # name: (model builder, target builder, loss)
    "classification": (
        lambda: build_classifier(ClassifierConfig(backbone="resnet50"), 3),
        lambda n, s, d: torch.randint(0, 3, (n,), device=d),
        F.cross_entropy),
    "segmentation": (
        lambda: build_segmenter(SegModelConfig(arch="unet", encoder="resnet34"), 1),
        lambda n, s, d: (torch.rand(n, 1, s, s, device=d) > 0.5).float(),
        F.binary_cross_entropy_with_logits),
    "attributes": (
        lambda: build_segmenter(SegModelConfig(arch="unet", encoder="tu-inception_v3",
                                               aspp=True), 6),
        lambda n, s, d: torch.randint(0, 6, (n, s, s), device=d),
        F.cross_entropy),
}



def _amp_dtype() -> torch.dtype:
    """The training loop's autocast dtype on this GPU (bfloat16, or float16 without it)."""
    return amp_dtype(LoopConfig(), torch.device("cuda"))

def measure(task: str, size: int, batch: int, steps: int, device: torch.device,
            configured: bool, compile_model: bool) -> float:
    """Images/second of full training steps (forward, loss, backward, optimizer step)."""
    build_model, build_target, loss_fn = TASKS[task]
    torch.manual_seed(0)
    model = build_model().to(device)
    cuda = device.type == "cuda"
    if configured and cuda:
        model = model.to(memory_format=torch.channels_last)
    fused = {"fused": True} if configured and cuda else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, **fused)
    step_model = torch.compile(model) if compile_model else model
    x = torch.rand(batch, 3, size, size, device=device)
    if configured and cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    y = build_target(batch, size, device)
    amp = torch.autocast("cuda", dtype=_amp_dtype()) if configured and cuda else \
        contextlib.nullcontext()

    def step():
        with amp:
            loss = loss_fn(step_model(x).float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3 if not compile_model else 5):  # warm-up (and compilation)
        step()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="auto: compile on CUDA only (CPU compile takes minutes)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    threads = torch.get_num_threads()
    compile_model = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    print(f"device: {name} ({threads} CPU threads), torch {torch.__version__}, "
          f"size {args.size}, batch {args.batch}, {args.steps} steps")
    print(f"{'task':<16}{'eager fp32 img/s':>18}{'configured img/s':>18}{'ratio':>8}  path")
    for task in args.tasks.split(","):
        eager = measure(task, args.size, args.batch, args.steps, device, False, False)
        ours = measure(task, args.size, args.batch, args.steps, device, True, compile_model)
        path = "channels_last+bf16+fused" if device.type == "cuda" else "fp32"
        path += "+compile" if compile_model else ""
        print(f"{task:<16}{eager:>18.1f}{ours:>18.1f}{ours / eager:>8.2f}  {path}")


if __name__ == "__main__":
    main()
