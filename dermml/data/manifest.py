"""The manifest: every dataset is one Parquet table plus the files it points to.

URIs in a manifest may be absolute (local path or ``s3://``) or relative to the manifest's own
folder, so a dataset folder can be moved or uploaded whole. The SHA-256 of the manifest file is
the dataset version that every tracked run records.
"""

from __future__ import annotations

import hashlib
import io
from collections import Counter
from dataclasses import dataclass, field

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dermml import storage

MANIFEST_FILENAME = "manifest.parquet"

ATTRIBUTES = ("pigment_network", "negative_network", "streaks", "milia_like_cyst", "globules")
"""The ISIC 2018 task 2 dermoscopic attributes, in the order of their class indices (1..5)."""

DIAGNOSES = ("nevus", "melanoma", "seborrheic_keratosis")
"""Diagnosis labels of the procedural demo data (ISIC 2017 task 3 classes)."""

SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("image_uri", pa.string(), nullable=False),
        pa.field("mask_uri", pa.string()),
        pa.field("label", pa.string()),
        pa.field("split", pa.string()),
        pa.field("patient_id", pa.string()),
        pa.field("lesion_id", pa.string()),
        pa.field("source", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("sha256", pa.string()),
        pa.field("attribute_mask_uris", pa.map_(pa.string(), pa.string())),
        pa.field("boxes", pa.list_(pa.list_(pa.float32()))),
        pa.field("box_labels", pa.list_(pa.string())),
        pa.field("anatomy_uri", pa.string()),
        pa.field("depth_uri", pa.string()),
    ]
)
COLUMNS = tuple(SCHEMA.names)
REQUIRED = ("sample_id", "image_uri")


class ManifestError(ValueError):
    """A manifest is missing, unreadable or breaks the schema; the message says which and why."""


def _normalise_row_values(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    for name in COLUMNS:
        if name not in df.columns:
            df[name] = None
    if "attribute_mask_uris" in df:
        df["attribute_mask_uris"] = [
            list(v.items()) if isinstance(v, dict) else v for v in df["attribute_mask_uris"]
        ]
    extra = [c for c in df.columns if c not in COLUMNS]
    return df[list(COLUMNS) + extra]


def to_table(df: pd.DataFrame) -> pa.Table:
    """Convert rows to an Arrow table with the manifest schema (task columns kept after it)."""
    df = _normalise_row_values(df)
    for name in REQUIRED:
        missing = df[name].isna()
        if missing.any():
            raise ManifestError(f"column {name!r} is empty for {int(missing.sum())} rows")
    dupes = [k for k, n in Counter(df["sample_id"]).items() if n > 1]
    if dupes:
        raise ManifestError(f"duplicate sample_id values: {dupes[:5]}")
    extra = [c for c in df.columns if c not in COLUMNS]
    schema = SCHEMA
    for name in extra:  # typed by their present values (a NaN first must not make text float)
        absent = df[name].isna().to_numpy()
        present = [v for v, gone in zip(df[name].tolist(), absent, strict=True) if not gone]
        kind = pa.infer_type(present) if present else pa.string()
        if pa.types.is_null(kind):
            kind = pa.string()
        schema = schema.append(pa.field(name, kind))
        if not pa.types.is_floating(kind):
            df[name] = pd.Series([None if gone else v for v, gone in
                                  zip(df[name].tolist(), absent, strict=True)], dtype=object,
                                 index=df.index)
    return pa.Table.from_pandas(df, schema=schema, preserve_index=False)


def write_manifest(df: pd.DataFrame, uri: str) -> str:
    """Write ``df`` as a manifest at ``uri`` (a ``.parquet`` file) and return its version."""
    table = to_table(df)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    data = buf.getvalue()
    storage.write_bytes(uri, data)
    return hashlib.sha256(data).hexdigest()


@dataclass
class Manifest:
    """A loaded manifest: rows as a DataFrame plus where it lives and its version."""

    df: pd.DataFrame
    uri: str
    version: str
    base_dir: str = field(default="")
    file_columns: tuple[str, ...] = ()
    """Columns the manifest file itself has (``df`` also holds the schema's other columns,
    empty); empty when the manifest was built in memory."""

    def resolve(self, uri: str | None) -> str | None:
        """Absolute URI for a (possibly relative) URI stored in this manifest."""
        if uri is None or (isinstance(uri, float) and pd.isna(uri)) or uri == "":
            return None
        return storage.resolve(uri, self.base_dir)

    def split(self, *names: str) -> pd.DataFrame:
        """Rows of the given splits; raises with the known splits when one is empty."""
        rows = self.df[self.df["split"].isin(names)]
        if rows.empty:
            known = sorted(self.df["split"].dropna().unique().tolist())
            raise ManifestError(
                f"{self.uri}: split {'/'.join(names)} has no samples (splits here: {known})"
            )
        return rows.reset_index(drop=True)

    def counts(self) -> pd.DataFrame:
        """Samples per split and label."""
        labels = self.df["label"].fillna("-")
        splits = self.df["split"].fillna("-")
        return pd.crosstab(splits, labels, margins=True, margins_name="total")


def read_manifest(uri: str) -> Manifest:
    """Load a manifest from a ``.parquet`` URI or a dataset folder holding ``manifest.parquet``."""
    uri = str(uri)
    if not uri.endswith(".parquet") and storage.exists(storage.join(uri, MANIFEST_FILENAME)):
        uri = storage.join(uri, MANIFEST_FILENAME)
    try:
        data = storage.read_bytes(uri)
    except storage.StorageError as exc:
        raise ManifestError(f"{uri}: manifest not found; create one with `dermml data import` "
                            "or `dermml data demo`") from exc
    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise ManifestError(f"{uri}: not a readable Parquet manifest ({exc})") from exc
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise ManifestError(f"{uri}: manifest lacks required columns {missing}")
    df = table.to_pandas()
    for name in COLUMNS:
        if name not in df.columns:
            df[name] = None
    df["attribute_mask_uris"] = [
        dict(v) if v is not None and not (isinstance(v, float) and pd.isna(v)) else None
        for v in df["attribute_mask_uris"]
    ]
    return Manifest(df=df, uri=uri, version=hashlib.sha256(data).hexdigest(),
                    base_dir=storage.parent(uri), file_columns=tuple(table.column_names))
def is_missing(values: pd.Series) -> pd.Series:
    """True where a value is null or a blank string (an unset split, label or group)."""
    blank = values.map(lambda v: isinstance(v, str) and not v.strip())
    return values.isna() | blank.astype(bool)


def manifest_info(uri: str) -> str:
    """A printable summary of a manifest for ``dermml data info``."""
    manifest = read_manifest(uri)
    df = manifest.df
    total = len(df)
    sources = df["source"].fillna("-").value_counts()
    lines = [
        f"manifest: {manifest.uri}",
        f"version:  {manifest.version}",
        f"samples:  {total}",
        f"sources:  {', '.join(f'{name} ({n})' for name, n in sources.items()) or '-'}",
        f"no mask:  {int(is_missing(df['mask_uri']).sum())} of {total}",
        f"no size:  {int(df['width'].isna().sum())} of {total} (image header not readable)",
    ]
    with_boxes = int(df["boxes"].map(lambda b: b is not None and len(b) > 0).sum())
    if with_boxes:
        lines.append(f"boxes:    {with_boxes} images with boxes")
    lines += ["", "samples per split x label:",
              manifest.counts().to_string() if total else "(no samples)"]
    return "\n".join(lines)
