"""StyleGAN dataset archives (StyleGAN2-ADA / StyleGAN3 ``dataset_tool.py`` format): the format,
and the export of a manifest's images into one. The importer (``import_dataset("stylegan",
...)``) lives in ``dermml.data.importers.stylegan``.

The format, as ``dataset_tool.py`` writes it: an uncompressed (stored) ZIP of uncompressed
PNGs named ``00000/img00000000.png`` (one folder per 1000 images), all square with one
power-of-two side, and ``dataset.json`` holding ``{"labels": [["00000/img00000000.png", 2],
...]}`` (class indices) or ``{"labels": null}`` for an unconditional dataset. StyleGAN reads
only ``labels``; DermML adds a ``"dermml"`` key with the class names in index order, the
manifest, its version, the split and, per image, the manifest's sample/patient/lesion ids, so
an import gets names and ids back.

Entries carry a fixed timestamp, so one manifest and one set of options give the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import uuid
import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from dermml import storage
from dermml.data.images import load_image
from dermml.data.manifest import is_missing, read_manifest

DATASET_JSON = "dataset.json"
DERMML_KEY = "dermml"
FORMAT_VERSION = 1
"""Version of the ``dermml`` key's layout."""
ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)
"""Timestamp of every entry (the earliest a ZIP can hold): reproducible archives."""
SAMPLE_FIELDS = ("sample_id", "patient_id", "lesion_id")
"""Manifest columns recorded per image under ``dermml.samples``."""
MIN_RESOLUTION = 4
_WORKERS = 8  # decoding and resizing images: threads overlap storage reads
_CHUNK = 256  # images in flight at once: bounds memory on large exports


class StyleGANExportError(ValueError):
    """A manifest cannot be exported as a StyleGAN dataset; the message says why."""


def archive_name(index: int) -> str:
    """``dataset_tool.py``'s name of image ``index``: ``00001/img00001234.png``."""
    digits = f"{index:08d}"
    return f"{digits[:5]}/img{digits}.png"


def is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def encode_stored_png(image: np.ndarray) -> bytes:
    """An uncompressed PNG (``compress_level=0``, as ``dataset_tool.py``: fast to decode)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="png", compress_level=0, optimize=False)
    return buf.getvalue()


def center_crop_resize(image: np.ndarray, resolution: int) -> np.ndarray:
    """The central square of ``image``, resized (Lanczos) to ``resolution``: dataset_tool.py's
    ``--transform=center-crop`` with its default filter."""
    height, width = image.shape[:2]
    if height == width == resolution:
        return image
    crop = min(height, width)
    top, left = (height - crop) // 2, (width - crop) // 2
    square = image[top:top + crop, left:left + crop]
    if crop == resolution:
        return np.ascontiguousarray(square)
    return np.asarray(Image.fromarray(square).resize((resolution, resolution),
                                                     Image.Resampling.LANCZOS))


def _zip_entry(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=ZIP_DATE_TIME)
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    return info


def _labels(manifest_uri: str, df: pd.DataFrame, rows: pd.DataFrame, label_column: str,
            classes: Sequence[str] | None) -> tuple[list[str], pd.DataFrame, int]:
    """(class names in index order, the rows to export, rows left out for their class)."""
    if label_column not in df.columns:
        raise StyleGANExportError(
            f"{manifest_uri}: no column {label_column!r} to take labels from (columns: "
            f"{', '.join(map(str, df.columns))}); pass label_column='' for an unconditional "
            "dataset")
    unlabeled = is_missing(rows[label_column])
    if unlabeled.any():
        ids = rows.loc[unlabeled, "sample_id"].tolist()
        raise StyleGANExportError(
            f"{manifest_uri}: {len(ids)} of {len(rows)} rows have no {label_column}, e.g. "
            f"{ids[:3]}; label them, leave them out, or pass label_column='' for an "
            "unconditional dataset")
    known = sorted({str(v) for v in df.loc[~is_missing(df[label_column]), label_column]})
    if classes is None:
        return known, rows, 0
    classes = [str(c) for c in classes]
    repeated = sorted({c for c in classes if classes.count(c) > 1})
    unknown = [c for c in classes if c not in known]
    if repeated or unknown or not classes:
        problem = (f"repeats {repeated}" if repeated else f"names {unknown}, not labels of "
                   "this manifest" if unknown else "is empty")
        raise StyleGANExportError(f"classes {classes} {problem}; its {label_column} values: "
                                  f"{known}")
    keep = rows[label_column].astype(str).isin(classes)
    if not keep.any():
        raise StyleGANExportError(f"{manifest_uri}: no row of the selection is labelled one "
                                  f"of {classes}")
    return classes, rows[keep], int((~keep).sum())


def _check_size(image: np.ndarray, uri: str, first: tuple[str, tuple[int, int]] | None
                ) -> None:
    """Without a resolution every image must be square, power-of-two and of one size."""
    height, width = image.shape[:2]
    if first is not None and (height, width) != first[1]:
        raise StyleGANExportError(
            f"images differ in size: {first[0]} is {first[1][1]}x{first[1][0]} but {uri} is "
            f"{width}x{height}; pass resolution (a power of two) to center-crop and resize all")
    if height != width or not is_power_of_two(width):
        side = 1 << max(int(np.log2(max(min(height, width), 1))), 2)
        raise StyleGANExportError(
            f"{uri} is {width}x{height}: StyleGAN needs square images with a power-of-two "
            f"side; pass resolution (e.g. {side}) to center-crop and resize")


def export_stylegan_zip(manifest_uri: str, out_zip: str, label_column: str = "label",
                        resolution: int | None = None, split: str | None = "train",
                        classes: Sequence[str] | None = None, progress: bool = False) -> dict:
    """Write the images of ``split`` (comma-separated splits; None: every row) of a manifest
    as a StyleGAN dataset ZIP.

    Labels are the class indices of ``label_column`` in ``classes`` order (default: the
    column's sorted values over the whole manifest, so every split exports with the same
    indices); given ``classes`` also selects rows, leaving out those of other classes. An
    empty ``label_column`` writes an unconditional dataset (``labels: null``).

    With ``resolution`` (a power of two) images are center-cropped to a square and resized to
    it; without, they must already be square power-of-two images of one size. ``out_zip``
    (a ``.zip``, local or s3://) is never overwritten; it appears only once complete.

    Returns what was written: ``zip``, ``images``, ``resolution``, ``classes``, ``labeled``,
    ``left_out`` (rows of other classes), ``manifest``, ``version``, ``split``, ``sha256``.
    """
    out_zip = str(out_zip)
    if not out_zip.lower().endswith(".zip"):
        raise StyleGANExportError(f"{out_zip}: the StyleGAN dataset must be a .zip file")
    if resolution is not None and (not is_power_of_two(int(resolution))
                                   or resolution < MIN_RESOLUTION):
        raise StyleGANExportError(f"resolution {resolution}: StyleGAN needs a power of two of "
                                  f"at least {MIN_RESOLUTION} (e.g. 64, 128, 256)")
    if storage.exists(out_zip):
        raise FileExistsError(f"{out_zip} already exists; choose another output or delete it "
                              "first")
    manifest = read_manifest(manifest_uri)
    rows = manifest.split(*split.split(",")) if split is not None \
        else manifest.df.reset_index(drop=True)
    if rows.empty:
        raise StyleGANExportError(f"{manifest.uri}: no rows to export")
    class_names: list[str] = []
    left_out = 0
    if label_column:
        class_names, rows, left_out = _labels(manifest.uri, manifest.df, rows, label_column,
                                              classes)
    elif classes is not None:
        raise StyleGANExportError("classes given without a label_column to read them from")
    rows = rows.reset_index(drop=True)
    uris = [manifest.resolve(u) for u in rows["image_uri"]]
    source = manifest.uri if storage.is_remote(manifest.uri) else \
        os.path.abspath(manifest.uri.removeprefix("file://"))

    def prepare(uri: str) -> np.ndarray:
        image = load_image(uri)
        return center_crop_resize(image, resolution) if resolution else image

    fd, tmp = tempfile.mkstemp(suffix=".zip", prefix="stylegan-",
                               dir=None if storage.is_remote(out_zip) else
                               _local_parent(out_zip))
    os.close(fd)
    labels: list[list] = []
    samples: dict[str, dict[str, str]] = {}
    first: tuple[str, tuple[int, int]] | None = None
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf, \
                ThreadPoolExecutor(max_workers=_WORKERS) as pool, \
                tqdm(total=len(uris), disable=not progress, desc="stylegan: writing images",
                     unit="img") as bar:
            for start in range(0, len(uris), _CHUNK):
                chunk = uris[start:start + _CHUNK]
                for offset, image in enumerate(pool.map(prepare, chunk)):
                    index = start + offset
                    if resolution is None:
                        _check_size(image, uris[index], first)
                        first = first or (uris[index], image.shape[:2])
                    name = archive_name(index)
                    zf.writestr(_zip_entry(name), encode_stored_png(image))
                    row = rows.iloc[index]
                    if label_column:
                        labels.append([name, class_names.index(str(row[label_column]))])
                    samples[name] = {f: str(row[f]) for f in SAMPLE_FIELDS
                                     if f in row and _present(row[f])}
                    bar.update()
            side = resolution or first[1][0]
            meta = {"labels": labels if label_column else None,
                    DERMML_KEY: {"format": FORMAT_VERSION, "classes": class_names,
                                 "label_column": label_column or None,
                                 "manifest": source, "version": manifest.version,
                                 "split": split, "resolution": side, "samples": samples}}
            zf.writestr(_zip_entry(DATASET_JSON), json.dumps(meta))
        digest = _file_sha256(tmp)
        _publish(tmp, out_zip)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return {"zip": out_zip, "images": len(uris), "resolution": side, "classes": class_names,
            "labeled": bool(label_column), "left_out": left_out, "manifest": source,
            "version": manifest.version, "split": split, "sha256": digest}


def _present(value: object) -> bool:
    return not pd.isna(value) and not (isinstance(value, str) and not value.strip())


def _local_parent(path: str) -> str:
    parent = storage.parent(os.path.abspath(path.removeprefix("file://")))
    os.makedirs(parent, exist_ok=True)
    return parent


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _publish(tmp: str, out_zip: str) -> None:
    """Move the finished archive to ``out_zip``: a rename locally, one upload to S3."""
    if storage.is_remote(out_zip):
        with open(tmp, "rb") as fh:
            storage.write_bytes(out_zip, fh.read())
        return
    dest = out_zip.removeprefix("file://")
    try:
        os.replace(tmp, dest)
    except OSError:  # another filesystem
        partial = f"{dest}.tmp-{uuid.uuid4().hex[:8]}"
        shutil.copyfile(tmp, partial)
        os.replace(partial, dest)


def read_dataset_json(zf: zipfile.ZipFile, source: str) -> tuple[dict | None, dict]:
    """(``{archive name: label}`` or None when unlabeled, the ``dermml`` key or {}) of an
    archive's ``dataset.json``; ValueError naming ``source`` when it is malformed."""
    if DATASET_JSON not in zf.namelist():
        return None, {}
    try:
        meta = json.loads(zf.read(DATASET_JSON))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{source}: {DATASET_JSON} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{source}: {DATASET_JSON} must hold an object with 'labels'")
    extra = meta.get(DERMML_KEY) if isinstance(meta.get(DERMML_KEY), dict) else {}
    labels = meta.get("labels")
    if labels is None:
        return None, extra
    if not isinstance(labels, list) or not all(
            isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) for p in labels):
        raise ValueError(f"{source}: {DATASET_JSON} 'labels' must be null or a list of "
                         "[image name, label] pairs")
    return dict((name, value) for name, value in labels), extra
