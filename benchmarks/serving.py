"""Serving: p50/p99 latency and requests/s at 1, 4 and 16 concurrent clients, DermML's
serving path (its pyfunc through `mlflow models serve`, and through MLServer over the Open
Inference Protocol V2) against a plain baseline of the same network, with garbage mixed in.

Runs in a throwaway ``DERMML_HOME`` (embedded MLflow):

1. trains a segmentation model of the shipped config (``--config``, default the demo one) at
   ``--size`` px (256) for one optimizer step on procedural demo data, registers it and gives
   it the alias ``champion``;
2. logs the baseline: the same torch module (pickled whole) in a minimal pyfunc
   (``benchmarks/serving_baseline_model.py``): same request and response columns, no checks,
   no post-processing beyond the threshold, no refusals, no identity columns;
3. starts the three servers side by side (one worker process each: ``--workers 1`` for
   `mlflow models serve`, one MLServer parallel worker), then, for 1, 4 and 16 concurrent
   clients (threads with keep-alive sessions, request bodies built beforehand), sends each
   server ``--requests`` requests of one ``--size`` px test image, one in ``--garbage-every``
   of them garbage (bad base64, bytes that are no image, a 2x2 image, ``threshold`` 7, an
   unknown param), the servers taking turns at each level (the order rotates).

Latency counts the good requests only (client-side, send to parsed answer), requests/s all
good answers over the wall time of the level. DermML's servers must answer every good request
200 and every garbage one 4xx; the baseline's answers to garbage are printed as they come.
Exits non-zero if DermML's servers broke that contract.

    python benchmarks/serving.py [--requests 60] [--size 256] [--garbage-every 10]
        [--clients 1,4,16] [--config configs/segmentation/demo.yaml]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NAME = "dermml-segmentation"


def train_model(args, home: Path) -> tuple[str, object]:
    """A model of the shipped config at ``args.size`` trained for one step, registered as
    ``dermml-segmentation`` with the alias ``champion``; returns its run's model URI and
    the loaded DermML model."""
    from mlflow.tracking import MlflowClient

    from dermml.data.demo import generate_demo
    from dermml.orchestration import tracking
    from dermml.registry.gate import register
    from dermml.training.run import resolve_config, train

    manifest = generate_demo(str(home / "data"), n=16, size=args.size, seed=0)
    cfg = resolve_config("segmentation", str(args.config), [
        f"data.manifest={manifest}", f"data.image_size={args.size}", "data.batch_size=16",
        "train.epochs=1", "train.warmup_epochs=0", "ray.enabled=false"])
    outcome = train("segmentation", cfg, progress=False)  # <=16 training images: one step
    version = register(outcome.model_uri, "segmentation")
    uri = tracking.configure()
    MlflowClient(uri, registry_uri=uri).set_registered_model_alias(NAME, "champion", version)
    return manifest, tracking.load_python_model(f"models:/{NAME}@champion")


def log_baseline(model, home: Path) -> str:
    """The plain pyfunc of the same torch module; returns its model URI."""
    import mlflow
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    from dermml.orchestration import tracking

    tracking.configure()
    module_file, size_file = home / "module.pt", home / "image_size.txt"
    torch.save(model.model.cpu(), module_file)
    size_file.write_text(str(model.cfg.data.image_size))
    mlflow.set_experiment("benchmark-baseline")
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(
            name="plain", python_model=str(HERE / "serving_baseline_model.py"),
            artifacts={"module": str(module_file), "image_size": str(size_file)},
            signature=ModelSignature(inputs=Schema([ColSpec("string", "image")])))
    return info.model_uri


def bodies(image_b64: str, protocol: str, garbage: bool, k: int) -> bytes:
    """The JSON body of a good request, or of the k-th kind of garbage."""
    import pandas as pd

    from dermml.data.images import encode_png, to_base64
    from dermml.serving.client import mlflow_request, v2_request

    image, params = image_b64, None
    if garbage:
        kind = k % 5
        if kind == 0:
            image = "not base64 at all!"
        elif kind == 1:
            image = base64.b64encode(b"hello, not an image").decode()
        elif kind == 2:
            import numpy as np

            image = to_base64(encode_png(np.zeros((2, 2, 3), np.uint8)))
        elif kind == 3:
            params = {"threshold": 7}
        else:
            params = {"treshold": 0.5}
    frame = pd.DataFrame({"image": [image]})
    make = v2_request if protocol == "v2" else mlflow_request
    return json.dumps(make(frame, params)).encode()


GARBAGE_KINDS = ["bad base64", "not an image", "2x2 image", "threshold 7", "unknown param"]


def run_level(endpoint: str, good: bytes, garbage: list[bytes], n: int, every: int,
              clients: int) -> dict:
    """``n`` requests from ``clients`` threads; every ``every``-th is garbage."""
    import requests

    plan = [(i % every == every - 1) for i in range(n)]
    lock, position = threading.Lock(), [0]
    latencies: list[float] = []
    answers: list[tuple[bool, int, int]] = []  # (garbage?, status, garbage kind)

    def worker() -> None:
        session = requests.Session()
        headers = {"Content-Type": "application/json"}
        while True:
            with lock:
                i = position[0]
                position[0] += 1
            if i >= n:
                return
            is_garbage = plan[i]
            kind = (i // every) % len(garbage)
            body = garbage[kind] if is_garbage else good
            started = time.perf_counter()
            response = session.post(endpoint, data=body, headers=headers, timeout=300)
            if response.status_code == 200:
                response.json()
            elapsed = time.perf_counter() - started
            with lock:
                answers.append((is_garbage, response.status_code, kind))
                if not is_garbage:
                    latencies.append(elapsed)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    good_ok = sum(1 for g, s, _ in answers if not g and s == 200)
    return {"wall": wall, "latencies": sorted(latencies), "answers": answers,
            "good": sum(1 for g, _, _ in answers if not g), "good_ok": good_ok,
            "garbage": sum(1 for g, _, _ in answers if g),
            "garbage_4xx": sum(1 for g, s, _ in answers if g and 400 <= s < 500),
            "rps": good_ok / wall}


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (of a sorted list)."""
    if not values:
        return float("nan")
    rank = max(1, min(len(values), int(-(-q * len(values) // 100))))
    return values[rank - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=60,
                        help="requests per server and concurrency level")
    parser.add_argument("--size", type=int, default=256, help="model and image size (px)")
    parser.add_argument("--garbage-every", type=int, default=10)
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--config", type=Path, default=ROOT / "configs/segmentation/demo.yaml")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS of every server (default: as inherited, torch "
                             "then uses one thread per core)")
    args = parser.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    levels = [int(c) for c in args.clients.split(",")]

    home = Path(tempfile.mkdtemp(prefix="dermml-bench-serving-"))
    os.environ["DERMML_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from dermml.data.images import encode_png, load_image, to_base64
    from dermml.data.manifest import read_manifest
    from dermml.serving.server import serve_model, stop_server

    started = time.perf_counter()
    manifest_uri, model = train_model(args, home)
    baseline_uri = log_baseline(model, home)
    params = sum(p.numel() for p in model.model.parameters())
    print(f"model: {args.config.name} at {args.size} px ({model.cfg.model.arch}, "
          f"{params / 1e6:.2f}M parameters), trained one step, registered and logged in "
          f"{time.perf_counter() - started:.0f} s; torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, servers' OMP_NUM_THREADS "
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, load average "
          f"{os.getloadavg()[0]:.1f}")
    manifest = read_manifest(manifest_uri)
    row = manifest.df.iloc[0]
    image = load_image(manifest.resolve(row["image_uri"]))
    image_b64 = to_base64(encode_png(image))

    contenders = {  # name -> (model URI, protocol)
        "baseline (plain pyfunc, mlflow models serve)": (baseline_uri, "mlflow"),
        "DermML pyfunc, mlflow models serve": (f"models:/{NAME}@champion", "mlflow"),
        "DermML pyfunc, MLServer V2": (f"models:/{NAME}@champion", "v2"),
    }
    servers: dict[str, tuple] = {}
    started = time.perf_counter()
    with ThreadPoolExecutor(len(contenders)) as pool:
        futures = {name: pool.submit(serve_model, uri, str(home / f"serve-{i}.log"),
                                     protocol=protocol)
                   for i, (name, (uri, protocol)) in enumerate(contenders.items())}
        for name, future in futures.items():
            servers[name] = future.result()
    print(f"servers started side by side in {time.perf_counter() - started:.0f} s; "
          f"{image.shape[1]}x{image.shape[0]} px PNG request ({len(image_b64) / 1024:.0f} KiB "
          f"base64), {args.requests} requests per server and level, 1 in "
          f"{args.garbage_every} garbage")

    results: dict[tuple[str, int], dict] = {}
    problems: list[str] = []
    try:
        names = list(contenders)
        for level_index, clients in enumerate(levels):
            order = names[level_index % len(names):] + names[:level_index % len(names)]
            for name in order:
                _, protocol = contenders[name]
                _, url = servers[name]
                endpoint = (f"{url}/v2/models/{NAME}/infer" if protocol == "v2"
                            else f"{url}/invocations")
                good = bodies(image_b64, protocol, False, 0)
                garbage = [bodies(image_b64, protocol, True, k) for k in range(5)]
                run_level(endpoint, good, garbage, 3, 10**9, 1)  # warm-up
                result = run_level(endpoint, good, garbage, args.requests,
                                   args.garbage_every, clients)
                results[name, clients] = result
                if not name.startswith("baseline"):
                    if result["good_ok"] != result["good"]:
                        problems.append(f"{name}, {clients} clients: only {result['good_ok']}"
                                        f"/{result['good']} good requests answered 200")
                    if result["garbage_4xx"] != result["garbage"]:
                        problems.append(f"{name}, {clients} clients: only "
                                        f"{result['garbage_4xx']}/{result['garbage']} garbage "
                                        "requests answered 4xx")
    finally:
        for process, _ in servers.values():
            stop_server(process)

    print(f"\nload average at the end: {os.getloadavg()[0]:.1f} (1 min), "
          f"{os.getloadavg()[1]:.1f} (5 min)")
    print("| server | clients | p50 ms | p99 ms | good req/s | good 200 | garbage 4xx "
          "| req/s vs baseline | p50 vs baseline |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    baseline = names[0]
    for clients in levels:
        base = results[baseline, clients]
        for name in names:
            r = results[name, clients]
            p50, p99 = percentile(r["latencies"], 50), percentile(r["latencies"], 99)
            base_p50 = percentile(base["latencies"], 50)
            print(f"| {name} | {clients} | {p50 * 1000:.0f} | {p99 * 1000:.0f} | "
                  f"{r['rps']:.1f} | {r['good_ok']}/{r['good']} | "
                  f"{r['garbage_4xx']}/{r['garbage']} | {r['rps'] / base['rps']:.2f} | "
                  f"{p50 / base_p50:.2f} |")
    print()
    print("baseline's answers to garbage (status per kind, all levels):")
    for k, kind in enumerate(GARBAGE_KINDS):
        statuses = sorted({s for name_level, r in results.items()
                           if name_level[0] == baseline
                           for g, s, kk in r["answers"] if g and kk == k})
        print(f"  {kind}: {statuses or 'not sent'}")
    if problems:
        print("\nDermML's serving contract broken:\n  " + "\n  ".join(problems))
        sys.exit(1)
    print("\nDermML's servers: every good request 200, every garbage request 4xx.")


if __name__ == "__main__":
    main()
