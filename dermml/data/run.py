"""Data stages: produce the manifest a pipeline trains on (given, or procedural demo data)."""

from __future__ import annotations

from dermml import storage
from dermml.config import dermml_home
from dermml.data.manifest import MANIFEST_FILENAME, read_manifest


def demo_dataset_uri(root: str, n: int, size: int, seed: int) -> str:
    """Where demo data of these parameters lives under ``root`` (deterministic, so reusable)."""
    return storage.join(root, f"demo-n{n}-s{size}-seed{seed}")


def prepare_dataset(manifest_uri: str, demo_root: str, n: int, size: int, seed: int) -> str:
    """``manifest_uri`` if given; else demo data under ``demo_root`` (made once, then reused)."""
    from dermml.data.demo import generate_demo

    if manifest_uri:
        return read_manifest(manifest_uri).uri
    demo_root = demo_root or str(dermml_home() / "data")
    out = demo_dataset_uri(demo_root, n, size, seed)
    existing = storage.join(out, MANIFEST_FILENAME)
    if storage.exists(existing):
        return existing
    return generate_demo(out, n=n, size=size, seed=seed, progress=True)
