"""What every importer shares: the listed source tree, manifest rows, image facts, errors."""


import hashlib
import io
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import PurePosixPath

import pandas as pd
from PIL import Image
from tqdm import tqdm

from dermml import storage
from dermml.data.manifest import (
    COLUMNS,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MASK_NAME_SUFFIXES = ("", "_mask", "_segmentation", "_lesion")
"""Mask file names accepted for image ``<stem>``: ``<stem><suffix>.png``, in order of preference."""

READ_WORKERS = 8  # reading images is I/O bound (S3 latency): threads overlap the waits


class DatasetImportError(ValueError):
    """A source layout cannot be read at all; the message names the path and what was expected."""


# --- the source tree ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceTree:
    """The files below a source folder, listed once; ``files`` are sorted relative POSIX paths."""

    root: str
    files: tuple[str, ...]

    def uri(self, rel: str) -> str:
        return storage.join(self.root, *rel.split("/"))


def normalise_root(src: str) -> str:
    """An absolute, clean form of ``src`` so manifest URIs hold no ``..`` or trailing slashes."""
    src = str(src)
    if storage.is_remote(src):
        return src.rstrip("/")
    return os.path.normpath(os.path.abspath(src.removeprefix("file://")))


def is_hidden(rel: str) -> bool:
    # Archive and OS clutter (.DS_Store, __MACOSX/) is never part of a dataset.
    return any(part.startswith(".") or part == "__MACOSX" for part in rel.split("/"))


def is_image(rel: str) -> bool:
    return rel.lower().endswith(IMAGE_SUFFIXES)


def list_source(fmt: str, src: str, expected: str) -> SourceTree:
    """List every file below ``src`` or raise naming the folder and the ``expected`` layout."""
    root = normalise_root(src)
    try:
        uris = storage.list_files(root)
    except (OSError, storage.StorageError) as exc:
        raise DatasetImportError(f"{fmt}: cannot list {root} ({exc}); expected {expected}") from exc
    prefix = root + "/"
    rels = [uri[len(prefix):] for uri in uris if uri.startswith(prefix)]
    rels = [rel for rel in rels if not is_hidden(rel)]
    if not rels:
        raise DatasetImportError(f"{fmt}: {root} is missing or holds no files "
                                 f"(expected {expected})")
    return SourceTree(root, tuple(rels))


def stem_path(rel: str) -> str:
    """``a/b/ISIC_1.jpg`` -> ``a/b/ISIC_1``: a file's path without its extension."""
    return str(PurePosixPath(rel).with_suffix(""))


# --- rows and image facts ----------------------------------------------------------------------


def sample_row(sample_id: str, image_uri: str, **fields: object) -> dict:
    row = dict.fromkeys(COLUMNS)
    row.update(sample_id=sample_id, image_uri=image_uri, **fields)
    return row


def image_facts(uri: str) -> tuple[int | None, int | None, str | None]:
    """(width, height, sha256) of an image file; None for whatever cannot be read."""
    try:
        data = storage.read_bytes(uri)
    except storage.StorageError:
        return None, None, None
    digest = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as image:  # lazy: parses the header, decodes no pixels
            width, height = image.size
    except Exception:  # PIL raises many exception types for corrupt or unknown files
        return None, None, digest
    return int(width), int(height), digest


def _unique_sample_ids(rows: list[dict], tree: SourceTree) -> None:
    """Replace clashing sample ids (same name in two splits) with the path below the source."""
    prefix = tree.root + "/"
    counts = Counter(row["sample_id"] for row in rows)
    for row in rows:
        if counts[row["sample_id"]] > 1:
            uri = row["image_uri"]
            row["sample_id"] = uri[len(prefix):] if uri.startswith(prefix) else uri
    seen: Counter[str] = Counter()
    for row in rows:  # two rows naming one image file (a repeated COCO entry) still need two ids
        seen[row["sample_id"]] += 1
        if seen[row["sample_id"]] > 1:
            row["sample_id"] = f"{row['sample_id']}#{seen[row['sample_id']]}"


def finish_rows(rows: list[dict], tree: SourceTree, source: str,
                progress: bool = False) -> pd.DataFrame:
    """Rows as a manifest-shaped DataFrame, with unique ids, source, sizes and hashes filled in."""
    _unique_sample_ids(rows, tree)
    uris = [row["image_uri"] for row in rows]
    with ThreadPoolExecutor(max_workers=READ_WORKERS) as pool:
        facts = list(tqdm(pool.map(image_facts, uris), total=len(uris), disable=not progress,
                          desc=f"{source}: reading image headers", unit="img"))
    for row, (width, height, digest) in zip(rows, facts, strict=True):
        row["source"], row["sha256"] = row.get("source") or source, digest
        if row["width"] is None or row["height"] is None:  # COCO brings its own sizes
            row["width"], row["height"] = width, height
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    df[["width", "height"]] = df[["width", "height"]].astype("Int32")
    return df
