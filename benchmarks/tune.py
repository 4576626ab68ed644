"""Ray Tune searches: trials per hour with and without ASHA, and the Tune layer's overhead per
trial against the same training run alone.

Runs on demo data in a throwaway ``DERMML_HOME`` (embedded MLflow, local Ray started once and
shared by every measurement, so Ray's own start-up is not counted):

1. baseline: the training run alone, as ``dermml train`` runs it under Ray (an MLflow run,
   ``fit_with_ray``: TorchTrainer, rank-0 curves, checkpoints), ``--repeats`` times;
2. a search of the same training with one trial at a time and no scheduler: its wall time per
   trial minus the baseline is what the Tune layer adds to each trial (trial, runner and child
   run set-up, reports and Tune checkpoints, the driver);
3. the same search (``--trials``, ``--concurrent`` at once) without a scheduler and with ASHA:
   trials per hour, and the epochs ASHA saved.

The searches are timed around ``ray_tune.run_search`` (the trials), not the stage's report and
best-model logging, which a search pays once.

    python benchmarks/tune.py [--trials 6] [--concurrent 2] [--epochs 8] [--n 300] [--size 64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

SPACE = {"train.lr": "loguniform(1e-5, 3e-2)", "loss.0.weight": "uniform(0.5, 2)"}


def overrides(manifest: str, args) -> list[str]:
    return [f"data.manifest={manifest}", f"data.image_size={args.size}", "data.batch_size=16",
            "model.base_channels=16", "model.depth=3", f"train.epochs={args.epochs}",
            "train.lr=0.003", "ray.enabled=true", "ray.cpus_per_worker=1"]


def train_alone(cfg) -> float:
    """Seconds of one training run under Ray with its MLflow run, as `dermml train` does."""
    from dermml.orchestration import tracking
    from dermml.orchestration.ray_train import fit_with_ray
    from dermml.training.inputs import training_inputs

    run_id = tracking.create_parent_run("segmentation", "train", "benchmark-baseline")
    started = time.perf_counter()  # from the datasets on, as a trial builds its own
    inputs = training_inputs("segmentation", cfg, prepare=True)
    fit_with_ray(inputs, run_name=f"baseline-{run_id}", tracking_uri=tracking.tracking_uri(),
                 mlflow_run_id=run_id)
    return time.perf_counter() - started


def search(cfg, scheduler: str, trials: int, concurrent: int, name: str) -> dict:
    """Wall seconds of the trials of one search, and the epochs they trained."""
    from dermml.orchestration import ray_tune
    from dermml.tuning import run as tuning
    from dermml.tuning.space import SearchConfig

    timing: dict = {}
    original = ray_tune.run_search

    def timed(*a, **kw):
        started = time.perf_counter()
        outcomes = original(*a, **kw)
        timing["seconds"] = time.perf_counter() - started
        timing["epochs"] = sum(int(o.last.get("epoch", -1)) + 1 for o in outcomes)
        timing["stopped"] = sum(int(o.last.get("epoch", -1)) + 1 < cfg.train.epochs
                                for o in outcomes)
        return outcomes

    ray_tune.run_search = timed
    try:
        spec = SearchConfig(space=SPACE, search="random", scheduler=scheduler, trials=trials,
                            concurrent=concurrent, seed=0, name=name)
        tuning.tune("segmentation", cfg, spec, register=False)
    finally:
        ray_tune.run_search = original
    return timing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--concurrent", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--n", type=int, default=300, help="demo samples")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="baseline runs")
    parser.add_argument("--overhead-trials", type=int, default=3,
                        help="trials of the one-at-a-time search")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="dermml-bench-tune-"))
    os.environ["DERMML_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    import ray

    from dermml.data.demo import generate_demo
    from dermml.orchestration.ray_train import ensure_ray
    from dermml.training.run import resolve_config

    manifest = generate_demo(str(home / "data"), n=args.n, size=args.size, seed=0)
    cfg = resolve_config("segmentation", None, overrides(manifest, args))
    started = time.perf_counter()
    ensure_ray()
    print(f"Ray start: {time.perf_counter() - started:.1f} s (not counted below)")

    alone = [train_alone(cfg) for _ in range(args.repeats)]
    base = statistics.median(alone)
    print(f"training run alone ({args.epochs} epochs): median {base:.1f} s "
          f"({', '.join(f'{s:.1f}' for s in alone)})")

    one = search(cfg, "none", args.overhead_trials, 1, "bench-one-at-a-time")
    per_trial = one["seconds"] / args.overhead_trials
    print(f"search, 1 trial at a time, no scheduler: {per_trial:.1f} s per trial -> Tune "
          f"layer overhead {per_trial - base:.1f} s per trial ({per_trial / base:.2f}x the run "
          "alone)")

    rows = []
    for scheduler in ("none", "asha"):
        result = search(cfg, scheduler, args.trials, args.concurrent, f"bench-{scheduler}")
        per_hour = args.trials / (result["seconds"] / 3600)
        rows.append((scheduler, result, per_hour))
        print(f"search, {args.trials} trials, {args.concurrent} at a time, scheduler "
              f"{scheduler}: {result['seconds']:.1f} s, {per_hour:.0f} trials/hour, "
              f"{result['epochs']} epochs trained, {result['stopped']} trials stopped early")
    (_, none, none_rate), (_, asha, asha_rate) = rows
    print(f"ASHA vs none: {asha_rate / none_rate:.2f}x trials/hour, "
          f"{asha['epochs']}/{none['epochs']} epochs")
    ray.shutdown()


if __name__ == "__main__":
    main()
