"""3D synthesis throughput: views/second of the built-in rasterizer against ray casting.

One procedural body (default 0.025 m triangles, 1024-texel texture) with pasted demo lesions is
rendered to random views exactly as ``dermml synth3d`` does (camera/light/material draws,
rejection tests, Phong shading, unlit masks, background), without writing files:

- render only, per view size and rasterizer backend: ``torch`` (built-in, the default), the
  baseline ``embree`` (one ray per pixel through trimesh + embreex, measured in the same run) and
  ``pytorch3d`` when it is importable (the GPU image);
- with deep blending: the reference blends each lesion for 400 Adam steps before any view is
  rendered; the script times ``--blend-steps`` steps per lesion, and prints the seconds per step
  and the views/second of a body with ``--lesions`` lesions and ``--views-per-body`` views at
  the reference's 400 steps (the per-step time times 400: an extrapolation, said so).

    python benchmarks/synth3d.py [--sizes 256,512] [--views 20] [--backends torch,embree]
        [--device cpu|cuda] [--lesions 4] [--blend-steps 10] [--views-per-body 20]
        [--processes 2] [--threads 1]

On CPU the stage runs one single-threaded Ray task per core, so the default measures that:
``--processes`` processes (default: the number of cores) with ``--threads`` torch threads each
(default 1) render at the same time, and the views/second of all of them are added up.

Needs torch, trimesh, embreex, xatlas, manifold3d, scipy, pandas/pyarrow (for the demo lesion
manifest); no Ray or MLflow.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import Counter

import numpy as np
import torch


def build_scene(args, backend: str, lesions_uri: str):
    from dermml.synth3d.config import Synth3DConfig
    from dermml.synth3d.generate import CropDrawer
    from dermml.synth3d.lesions import lesion_sources
    from dermml.synth3d.paste import place_lesion
    from dermml.synth3d.procedural import procedural_body
    from dermml.synth3d.scene import BodyScene

    cfg = Synth3DConfig.model_validate({
        "lesions": lesions_uri, "device": args.device, "backend": backend,
        "bodies": {"texture_size": args.texture_size, "edge": args.edge},
        "paste": {"lesions_per_body": args.lesions, "view_size": args.paste_view},
        "blend": {"method": "paste", "steps": args.blend_steps}})
    body = procedural_body("bench", seed=0, texture_size=args.texture_size, edge=args.edge)
    scene = BodyScene(body, args.device, backend)
    rng = np.random.default_rng(0)
    rejected = Counter()
    draw = CropDrawer(lesion_sources(lesions_uri), cfg, rng, rejected)
    placements = []
    with torch.no_grad():
        for lesion_id in range(1, args.lesions + 1):
            placed = place_lesion(scene, draw, lesion_id, cfg.paste, "paste", rng, rejected)
            if placed is not None:
                placements.append(placed)
    return cfg, body, scene, placements


def views_per_second(scene, cfg, size: int, n_views: int, placements
                     ) -> tuple[float, float, Counter]:
    """(views per wall-clock second, CPU seconds of this process per view, rejections)."""
    from dermml.synth3d.backgrounds import Backgrounds
    from dermml.synth3d.views import render_view

    cfg.views.size = size
    textures = [p.lesion_texels for p in placements]
    backgrounds = Backgrounds()
    rejected = Counter()
    render_view(scene, cfg.views, backgrounds, np.random.default_rng(99), textures, Counter())
    if scene.device.type == "cuda":
        torch.cuda.synchronize()
    started, cpu = time.perf_counter(), time.process_time()
    for k in range(n_views):
        render_view(scene, cfg.views, backgrounds, np.random.default_rng([1, k]), textures,
                    rejected)
    if scene.device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - started
    return n_views / wall, (time.process_time() - cpu) / n_views, rejected


def blend_seconds_per_step(scene, cfg, placements) -> float:
    from dermml.synth3d.blend import deep_blend_lesion
    from dermml.synth3d.features import feature_network

    features = feature_network(cfg.blend.vgg16_weights).to(scene.device)
    pasted = scene.texture.clone()
    deep_blend_lesion(scene, placements[0], pasted, features, cfg.blend.model_copy(
        update={"steps": 1}), cfg.paste.view_size, np.random.default_rng(0))  # warm-up
    started = time.perf_counter()
    steps = 0
    for placement in placements:
        steps += len(deep_blend_lesion(scene, placement, pasted, features, cfg.blend,
                                       cfg.paste.view_size, np.random.default_rng(0)))
    if scene.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / max(steps, 1)


def _render_cell(job) -> tuple[float, float, dict, int]:
    args, backend, lesions_uri, sizes = job
    torch.set_num_threads(args.threads)
    cfg, body, scene, placements = build_scene(args, backend, lesions_uri)
    out = []
    for size in sizes:
        rate, cpu, rejected = views_per_second(scene, cfg, size, args.views, placements)
        out.append((rate, cpu, dict(rejected), len(body.faces)))
    return out


def render_rates(args, backend: str, lesions_uri: str, sizes: list[int]):
    """Per size: (summed views/s of all processes, CPU-s/view, rejections, faces)."""
    job = (args, backend, lesions_uri, sizes)
    if args.processes <= 1 or args.device == "cuda":
        per_process = [_render_cell(job)]
    else:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(args.processes) as pool:
            per_process = pool.map(_render_cell, [job] * args.processes)
    results = []
    for k in range(len(sizes)):
        cells = [p[k] for p in per_process]
        results.append((sum(c[0] for c in cells), float(np.mean([c[1] for c in cells])),
                        cells[0][2], cells[0][3]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256,512")
    parser.add_argument("--views", type=int, default=20, help="views timed per size/backend")
    parser.add_argument("--backends", default="torch,embree",
                        help="comma-separated; pytorch3d is added when importable")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--texture-size", type=int, default=1024)
    parser.add_argument("--edge", type=float, default=0.025)
    parser.add_argument("--lesions", type=int, default=4)
    parser.add_argument("--paste-view", type=int, default=512)
    parser.add_argument("--blend-steps", type=int, default=10,
                        help="deep-blending steps timed per lesion (reference: 400)")
    parser.add_argument("--views-per-body", type=int, default=20)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1,
                        help="render-only: processes rendering at once (CPU)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from dermml.data.demo import generate_demo
    from dermml.synth3d.raster import pytorch3d_available

    backends = [b for b in args.backends.split(",") if b]
    if pytorch3d_available() and "pytorch3d" not in backends:
        backends.append("pytorch3d")
    if args.device == "cuda":
        backends = [b for b in backends if b != "embree"]  # Embree is CPU-only
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        lesions_uri = generate_demo(f"{tmp}/lesions", n=16, size=128, seed=0)
        print(f"device {args.device}, {args.processes} process(es) x {args.threads} torch "
              f"thread(s), texture {args.texture_size}, edge {args.edge} m, {args.views} views "
              f"per process and cell, load average before {os.getloadavg()[0]:.1f}")
        rates: dict[tuple[str, int], float] = {}
        for backend in backends:
            for size, (rate, cpu, rejected, faces) in zip(
                    sizes, render_rates(args, backend, lesions_uri, sizes), strict=True):
                rates[backend, size] = rate
                print(f"render only  {backend:9s} {size:4d}^2  {rate:7.2f} views/s  "
                      f"{cpu:.3f} CPU-s/view  (faces {faces}, rejected draws {rejected}, "
                      f"load average {os.getloadavg()[0]:.1f})")
        base = "embree" if "embree" in backends else backends[0]
        for size in sizes:
            for backend in backends:
                if backend != base:
                    print(f"ratio {backend}/{base} at {size}^2: "
                          f"{rates[backend, size] / rates[base, size]:.2f}")
        # Deep blending: each process blends its own body's lesions (one Ray task per body).
        per_step = blend_rate(args, backends[0], lesions_uri)
        print(f"deep blending ({backends[0]}, {args.paste_view}^2 blend view, fallback "
              f"features unless a VGG16 file is set): {per_step:.3f} s/step per process, "
              f"{per_step * 400:.1f} s per lesion at 400 steps (extrapolated)")
        for size in sizes:
            # Per body: its blending, then its views; bodies run side by side, one per process.
            per_view = args.processes / rates[backends[0], size]
            body_seconds = per_step * 400 * args.lesions + args.views_per_body * per_view
            rate = args.processes * args.views_per_body / body_seconds
            print(f"with deep blending {backends[0]} {size:4d}^2: {rate:.4f} views/s for "
                  f"{args.lesions} lesions x 400 steps + {args.views_per_body} views per body "
                  f"(ratio to render only {rate / rates[backends[0], size]:.4f})")


def _blend_cell(job) -> float:
    args, backend, lesions_uri = job
    torch.set_num_threads(args.threads)
    cfg, _, scene, placements = build_scene(args, backend, lesions_uri)
    return blend_seconds_per_step(scene, cfg, placements)


def blend_rate(args, backend: str, lesions_uri: str) -> float:
    """Mean seconds per deep-blending step, ``--processes`` processes blending at once."""
    job = (args, backend, lesions_uri)
    if args.processes <= 1 or args.device == "cuda":
        return _blend_cell(job)
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(args.processes) as pool:
        return float(np.mean(pool.map(_blend_cell, [job] * args.processes)))


if __name__ == "__main__":
    main()
