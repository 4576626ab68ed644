"""Facts of a whole manifest, computed in worker processes and streamed back as small records
(never pixels), with a bounded number of batches in flight: memory grows with the number of rows,
not with image sizes."""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd

from dermml.data.manifest import Manifest
from dermml.validation.facts import FACT_COLUMNS, SampleFacts, batch_facts

_BATCH = 64  # rows per task sent to a worker: amortises inter-process overhead


def _facts_batch(rows: list[dict]) -> list[tuple]:
    # Plain tuples pickle several times faster than dataclasses on the way back.
    return [tuple(f.__dict__.values()) for f in batch_facts(rows)]


def _none_if_missing(value: Any) -> Any:
    return None if not isinstance(value, dict | list) and pd.isna(value) else value


def uri_resolver(manifest: Manifest):
    """``manifest.resolve`` with each folder resolved once (rows share a few folders)."""
    folders: dict[str, str | None] = {}

    def resolve(uri: Any) -> str | None:
        uri = _none_if_missing(uri)
        if not uri:
            return None
        head, sep, tail = str(uri).rpartition("/")
        if not sep or not head or tail in ("", ".", ".."):
            return manifest.resolve(uri)
        if head not in folders:
            folders[head] = manifest.resolve(head)
        return f"{folders[head]}{'/' if '://' in folders[head] else os.sep}{tail}"

    return resolve


def fact_rows(manifest: Manifest, attribute_masks: tuple[str, ...] | None = None,
              companion_columns: Iterable[str] = ()) -> Iterator[dict]:
    """Worker input per manifest row: resolved URIs plus the files the suite wants checked.

    ``attribute_masks``: check each row's attribute masks, and that these names have one.
    """
    companion_columns = tuple(companion_columns)
    resolve = uri_resolver(manifest)
    df = manifest.df
    columns = ["sample_id", "split", "label", "image_uri", "mask_uri"]
    extra = [c for c in ("attribute_mask_uris", *companion_columns) if c in df.columns]
    for values in zip(*(df[c] for c in columns + extra), strict=True):
        rec = dict(zip(columns + extra, values, strict=True))
        row = {"sample_id": str(rec["sample_id"]), "split": _none_if_missing(rec["split"]),
               "label": _none_if_missing(rec["label"]), "image_uri": resolve(rec["image_uri"]),
               "mask_uri": resolve(rec["mask_uri"])}
        if attribute_masks is not None:
            uris = dict(rec.get("attribute_mask_uris") or {})
            row["attribute_mask_uris"] = {name: resolve(uris.get(name))
                                          for name in sorted(set(uris) | set(attribute_masks))}
        if companion_columns:
            row["companions"] = {c: resolve(rec.get(c)) for c in companion_columns}
        yield row


def default_processes() -> int:
    """Worker processes when none are asked for: the CPUs this process may use (max 16), with a
    container's CPU limit (cgroup v2 ``cpu.max``) taken into account."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus or 1, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return max(1, min(cpus or 1, 16))


def stream_fact_tuples(rows: Iterable[dict], total: int, processes: int | None = None,
                       progress: bool = False) -> Iterator[tuple]:
    """Facts (as tuples in ``FACT_COLUMNS`` order) of ``rows``, in order, from worker processes.

    At most ``4 * processes`` batches are in flight, so neither inputs nor results pile up.
    Workers are started by a fork server (about a second), never forked from this process:
    a fork copies locks held by this process's threads (MLflow's system-metrics thread, torch,
    the S3 client) and can deadlock. The fork server imports this module once, so workers
    start with it loaded.
    """
    processes = processes or default_processes()
    bar = _progress(total, progress)
    batches = _batched(rows, _BATCH)
    try:
        if processes <= 1 or total < 2 * _BATCH:
            for batch in batches:
                yield from _emit(_facts_batch(batch), bar)
            return
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        with ProcessPoolExecutor(processes, context, initializer=_init_worker,
                                 initargs=(_storage_env(),)) as pool:
            pending: deque = deque()
            for batch in batches:
                pending.append(pool.submit(_facts_batch, batch))
                if len(pending) >= 4 * processes:
                    yield from _emit(pending.popleft().result(), bar)
            while pending:
                yield from _emit(pending.popleft().result(), bar)
    finally:
        if bar is not None:
            bar.close()


_STORAGE_ENV = ("DERMML_S3_ENDPOINT", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION")


def _storage_env() -> dict[str, str | None]:
    return {k: os.environ.get(k) for k in _STORAGE_ENV}


def _init_worker(env: dict[str, str | None]) -> None:
    # The fork server keeps the environment it started with; take the caller's storage settings.
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    # The workers already use every core; BLAS threads would only fight over them.
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)


def _batched(rows: Iterable[dict], size: int) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _emit(results: list[tuple], bar) -> Iterator[tuple]:
    if bar is not None:
        bar.update(len(results))
    yield from results


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="validating", unit="img", disable=None)  # a terminal only


def collect_facts(manifest: Manifest, processes: int | None = 2,
                  progress: bool = False) -> Iterator[SampleFacts]:
    """Facts of every row, computed in ``processes`` worker processes, in manifest order."""
    for values in stream_fact_tuples(fact_rows(manifest), len(manifest.df), processes,
                                     progress):
        yield SampleFacts(*values)


def facts_frame(manifest: Manifest, processes: int | None = None, progress: bool = False,
                attribute_masks: tuple[str, ...] | None = None,
                companion_columns: Iterable[str] = ()) -> pd.DataFrame:
    """All facts as one DataFrame (one row per manifest row, ``FACT_COLUMNS``)."""
    rows = fact_rows(manifest, attribute_masks, companion_columns)
    records = list(stream_fact_tuples(rows, len(manifest.df), processes, progress))
    return pd.DataFrame.from_records(records, columns=list(FACT_COLUMNS))
