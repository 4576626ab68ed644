"""Checkpoints in a folder (local or s3://): ``last.pt`` every epoch, ``best.pt`` on improvement."""

from __future__ import annotations

import io

import torch

from dermml import storage


def state_to_bytes(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def state_from_bytes(data: bytes) -> dict:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


class FolderCheckpointer:
    """Saves training state under ``root``; ``load`` resumes from ``last.pt`` if present."""

    def __init__(self, root: str):
        self.root = root

    @property
    def last_uri(self) -> str:
        return storage.join(self.root, "last.pt")

    @property
    def best_uri(self) -> str:
        return storage.join(self.root, "best.pt")

    def load(self) -> dict | None:
        if not storage.exists(self.last_uri):
            return None
        return state_from_bytes(storage.read_bytes(self.last_uri))

    def save(self, state: dict, metrics: dict[str, float]) -> None:
        data = state_to_bytes(state)
        storage.write_bytes(self.last_uri, data)
        if state.get("is_best") or not storage.exists(self.best_uri):
            storage.write_bytes(self.best_uri, data)
