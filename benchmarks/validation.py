"""Validation throughput: ``dermml validate`` vs. merely decoding the same files once.

Baseline (measured in the same run, same worker processes, same batches): read every image and
mask the validator reads through ``dermml.storage`` and decode it with PIL (``Image.load()``),
nothing else. The validator decodes each file once too, and on top computes every per-sample fact
(hashes, colour statistics, mask analysis), the cross-split leakage columns, runs the
great-expectations suite, and writes the report (JSON, facts CSV, quarantine CSV, Data Docs).

    python benchmarks/validation.py                       # 10,000 demo samples at 64 px
    python benchmarks/validation.py --n 2000 --processes 2
    python benchmarks/validation.py --upscale-to 256      # the same images at 256 px
    python benchmarks/validation.py --data /tmp/demo10k   # reuse a dataset folder

Prints samples/second of both, their ratio (median over alternating runs; target >= 0.7) and the
peak memory (RSS) of the validating process and its workers.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402
from PIL import Image  # noqa: E402

from dermml import storage  # noqa: E402
from dermml.data.manifest import read_manifest  # noqa: E402

BATCH = 64  # the validator's batch size


def decode_batch(uris: list[str]) -> int:
    """The baseline: read and decode each file once."""
    for uri in uris:
        with Image.open(io.BytesIO(storage.read_bytes(uri))) as img:
            img.load()
    return len(uris)


def upscale(manifest_uri: str, side: int) -> None:
    """Resize a generated demo dataset's images and masks in place (attribute masks dropped)."""
    from dermml.data.manifest import write_manifest

    manifest = read_manifest(manifest_uri)
    for image, mask in zip(manifest.df["image_uri"], manifest.df["mask_uri"], strict=True):
        for uri, resample in ((image, Image.Resampling.BICUBIC),
                              (mask, Image.Resampling.NEAREST)):
            path = manifest.resolve(uri)
            Image.open(path).resize((side, side), resample).save(path)
    df = manifest.df.assign(attribute_mask_uris=None, width=side, height=side, sha256=None)
    os.remove(manifest_uri)
    write_manifest(df, manifest_uri)


def files_of(manifest_uri: str) -> tuple[list[str], int]:
    """Every image and mask the validator decodes, in manifest order; and the sample count."""
    manifest = read_manifest(manifest_uri)
    files = []
    for image, mask in zip(manifest.df["image_uri"], manifest.df["mask_uri"], strict=True):
        files.append(manifest.resolve(image))
        if manifest.resolve(mask):
            files.append(manifest.resolve(mask))
    return files, len(manifest.df)


def time_decode(files: list[str], processes: int) -> float:
    batches = [files[i:i + 2 * BATCH] for i in range(0, len(files), 2 * BATCH)]
    start = time.perf_counter()
    with ProcessPoolExecutor(processes) as pool:
        done = sum(pool.map(decode_batch, batches))
    assert done == len(files)
    return time.perf_counter() - start


class RssSampler(threading.Thread):
    """Peak resident memory of this process and of its (grand)children while running."""

    def __init__(self):
        super().__init__(daemon=True)
        self.main_mb = self.worker_mb = 0.0
        self.done = threading.Event()

    def run(self) -> None:
        me = psutil.Process()
        while not self.done.wait(0.05):
            self.main_mb = max(self.main_mb, me.memory_info().rss / 2**20)
            for child in me.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    self.worker_mb = max(self.worker_mb, child.memory_info().rss / 2**20)


def time_validate(manifest_uri: str, processes: int, report: str) -> tuple[float, dict, tuple]:
    from dermml.validation.run import validate

    sampler = RssSampler()
    sampler.start()
    start = time.perf_counter()
    outcome = validate(manifest_uri, "segmentation", report_dir=report, track=False,
                       progress=True, processes=processes, warn_only=True)
    seconds = time.perf_counter() - start
    sampler.done.set()
    sampler.join()
    return seconds, outcome.report.timings, (sampler.main_mb, sampler.worker_mb)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="samples to generate")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--processes", type=int, default=2, help="worker processes (both)")
    parser.add_argument("--data", help="existing dataset folder or manifest (skips generation)")
    parser.add_argument("--upscale-to", type=int, default=0,
                        help="resize the generated images (bicubic) and masks (nearest) to this "
                             "side: large demo images in minutes instead of hours")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="dermml-bench-") as tmp:
        manifest_uri = args.data
        if not manifest_uri:
            from dermml.data.demo import generate_demo

            print(f"generating {args.n} demo samples at {args.size} px ...", flush=True)
            manifest_uri = generate_demo(os.path.join(tmp, "data"), n=args.n, size=args.size,
                                         progress=True)
            if args.upscale_to:
                upscale(manifest_uri, args.upscale_to)
        files, n_samples = files_of(manifest_uri)
        start = time.perf_counter()
        import great_expectations  # noqa: F401  (once per process, like the CLI's start-up)

        import_s = time.perf_counter() - start
        decode_batch(files)  # warm the page cache for both contenders, untimed

        before_mb = psutil.Process().memory_info().rss / 2**20
        runs, peaks = [], []  # alternating runs, so that other load hits both contenders
        for i in range(args.repeats):
            decode = time_decode(files, args.processes)
            seconds, timings, peak = time_validate(manifest_uri, args.processes,
                                                   os.path.join(tmp, f"report{i}"))
            runs.append((decode, seconds, timings))
            peaks.append(peak)

    decode_s = min(r[0] for r in runs)
    validate_s, _, timings = min((r[1], i, r[2]) for i, r in enumerate(runs))
    ratios = sorted(r[0] / r[1] for r in runs)
    print(f"\nsamples: {n_samples} ({len(files)} image files), processes: {args.processes}, "
          f"CPUs: {os.cpu_count()}, {args.repeats} alternating runs each")
    print(f"decode only (read + PIL decode once): {decode_s:7.2f} s  "
          f"{n_samples / decode_s:8.0f} samples/s (best)")
    print(f"dermml validate (facts + GE + report): {validate_s:6.2f} s  "
          f"{n_samples / validate_s:8.0f} samples/s (best)")
    print("  stages of that run: " + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
    print(f"ratio validate / decode: {statistics.median(ratios):.2f} (median of runs; "
          f"range {ratios[0]:.2f}-{ratios[-1]:.2f}; target >= 0.7)")
    print(f"great_expectations import (once per process, not in the timings): {import_s:.1f} s")
    print(f"peak RSS during validate: main process {max(p[0] for p in peaks):.0f} MB (before: "
          f"{before_mb:.0f} MB, modules loaded), largest worker {max(p[1] for p in peaks):.0f} MB")


if __name__ == "__main__":
    main()
