"""Validation throughput: ``dermml validate`` vs. merely decoding the same files once.

Baseline (measured in the same run, same worker processes, same batches): read every image and
mask the validator reads through ``dermml.storage`` and decode it with PIL (``Image.load()``),
nothing else. The validator decodes each file once too, and on top computes every per-sample fact
(hashes, colour statistics, mask analysis), the cross-split leakage columns, runs the
great-expectations suite, and writes the report (JSON, facts CSV, quarantine CSV, Data Docs).

    python benchmarks/validation.py                       # 10,000 demo samples at 64 px
    python benchmarks/validation.py --n 2000 --processes 2
    python benchmarks/validation.py --data /tmp/demo10k   # reuse a demo dataset folder

Prints samples/second of both, their ratio (target >= 0.7) and peak memory (RSS).
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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


def time_validate(manifest_uri: str, processes: int, report: str) -> tuple[float, dict]:
    from dermml.validation.run import validate

    start = time.perf_counter()
    outcome = validate(manifest_uri, "segmentation", report_dir=report, track=False,
                       progress=True, processes=processes, warn_only=True)
    return time.perf_counter() - start, outcome.report.timings


def peak_rss_mb() -> tuple[float, float]:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, children


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="samples to generate")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--processes", type=int, default=2, help="worker processes (both)")
    parser.add_argument("--data", help="existing dataset folder or manifest (skips generation)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each; best kept")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="dermml-bench-") as tmp:
        manifest_uri = args.data
        if not manifest_uri:
            from dermml.data.demo import generate_demo

            print(f"generating {args.n} demo samples at {args.size} px ...", flush=True)
            manifest_uri = generate_demo(os.path.join(tmp, "data"), n=args.n, size=args.size,
                                         progress=True)
        files, n_samples = files_of(manifest_uri)
        start = time.perf_counter()
        import great_expectations  # noqa: F401  (once per process, like the CLI's start-up)

        import_s = time.perf_counter() - start
        decode_batch(files)  # warm the page cache for both contenders, untimed

        decode_s, validate_s, timings = float("inf"), float("inf"), {}
        for i in range(args.repeats):
            decode_s = min(decode_s, time_decode(files, args.processes))
            seconds, run_timings = time_validate(manifest_uri, args.processes,
                                                 os.path.join(tmp, f"report{i}"))
            if seconds < validate_s:
                validate_s, timings = seconds, run_timings
        own, children = peak_rss_mb()

    decode_rate, validate_rate = n_samples / decode_s, n_samples / validate_s
    print(f"\nsamples: {n_samples} ({len(files)} image files), processes: {args.processes}, "
          f"CPUs: {os.cpu_count()}, best of {args.repeats}")
    print(f"decode only (read + PIL decode once): {decode_s:7.2f} s  {decode_rate:8.0f} samples/s")
    print(f"dermml validate (facts + GE + report): {validate_s:6.2f} s  {validate_rate:8.0f} "
          f"samples/s")
    print("  stages: " + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
    print(f"ratio validate / decode: {validate_rate / decode_rate:.2f}  (target >= 0.7)")
    print(f"great_expectations import (once per process, not in the timings): {import_s:.1f} s")
    print(f"peak RSS: main process {own:.0f} MB, largest worker {children:.0f} MB")


if __name__ == "__main__":
    main()
