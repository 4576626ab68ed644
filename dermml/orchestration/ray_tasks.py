"""Ray adapter for embarrassingly parallel stages: one Ray task per work item, results handed
back as they finish (for progress), a GPU per task when the cluster has GPUs."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from dermml.orchestration.ray_train import ensure_ray


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def map_unordered(fn: Callable[..., Any], items: Iterable[tuple], address: str = "",
                  num_cpus: float = 1, num_gpus: float | None = None) -> Iterator[Any]:
    """``fn(*item)`` for every item as Ray tasks; yields results in completion order.

    ``num_gpus=None`` gives each task one GPU when the cluster has any, else none. An error
    raised in a task is raised here (Ray's task error is also an instance of the original
    exception type, so input errors keep their one-line report)."""
    import ray

    ensure_ray(address)
    if num_gpus is None:
        num_gpus = 1 if cluster_has_gpus() else 0
    remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=0)(fn)
    pending = [remote.remote(*item) for item in items]
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
    finally:
        for ref in pending:
            ray.cancel(ref)
