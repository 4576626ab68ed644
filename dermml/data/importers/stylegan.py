"""StyleGAN dataset ZIPs (``dataset_tool.py``'s, or ``export_stylegan_zip``'s): the PNGs are
extracted into ``derived_root`` (the folder of the manifest being written, never the source),
since a manifest references files and an archive member is none.

Labels are class indices in ``dataset.json``: named from its ``dermml.classes`` when the archive
has them, else the index as text; one-hot label vectors are read as their index. Sample,
patient and lesion ids recorded by ``export_stylegan_zip`` come back too; other archives'
samples are named after their files (``img00000012``).
"""

from __future__ import annotations

import posixpath
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor

import pandas as pd
from tqdm import tqdm

from dermml import storage
from dermml.data.importers.common import (
    READ_WORKERS,
    DatasetImportError,
    SourceTree,
    finish_rows,
    is_hidden,
    is_image,
    normalise_root,
    sample_row,
)
from dermml.data.stylegan_zip import DATASET_JSON, read_dataset_json

LAYOUT = (f"a StyleGAN dataset .zip: PNGs such as '00000/img00000000.png' and {DATASET_JSON}, "
          "as StyleGAN2-ADA's dataset_tool.py writes it")
DERIVED = "stylegan"
"""Folder under ``derived_root`` the images are extracted to."""


def _class_name(value: object, classes: list, name: str, src: str) -> str | None:
    """Class name of one ``dataset.json`` label (an index or a one-hot vector)."""
    if value is None:
        return None
    if isinstance(value, list) and value and all(v in (0, 1) for v in value) and \
            sum(value) == 1:
        value = value.index(1)
    if isinstance(value, bool) or not isinstance(value, int):
        raise DatasetImportError(f"stylegan: {src}: label of {name} is {value!r}; only class "
                                 "indices (or one-hot vectors) are read")
    if classes:
        if not 0 <= value < len(classes):
            raise DatasetImportError(f"stylegan: {src}: label of {name} is {value}, outside "
                                     f"the {len(classes)} classes {classes} of "
                                     f"{DATASET_JSON}")
        return str(classes[value])
    return str(value)


def _image_names(zf: zipfile.ZipFile, src: str) -> list[str]:
    names = []
    for name in sorted(zf.namelist()):
        if name.endswith("/") or not is_image(name):
            continue
        parts = name.split("/")
        if name.startswith("/") or "\\" in name or ".." in parts or ":" in parts[0]:
            raise DatasetImportError(f"stylegan: {src} holds an unsafe member path {name!r}; "
                                     "refusing to extract it")
        if not is_hidden(name):
            names.append(name)
    if not names:
        raise DatasetImportError(f"stylegan: {src} holds no images (expected {LAYOUT})")
    return names


def import_stylegan_zip(src: str, derived_root: str = "", progress: bool = False
                        ) -> pd.DataFrame:
    """One row per image of a StyleGAN dataset ZIP, extracted to ``derived_root/stylegan/``
    under its archive name, with its class as ``label``."""
    if not derived_root:
        raise DatasetImportError("stylegan: derived_root (the folder for the extracted "
                                 "images) is required; `dermml data import` sets it")
    src = normalise_root(src)
    try:
        found = storage.exists(src) and not storage.is_dir(src)
    except (OSError, storage.StorageError) as exc:
        raise DatasetImportError(f"stylegan: cannot read {src} ({exc}); expected {LAYOUT}") \
            from None
    if not found:
        raise DatasetImportError(f"stylegan: {src} is missing or not a file (expected "
                                 f"{LAYOUT})")
    out_dir = storage.join(derived_root, DERIVED)
    with storage.local_copy(src) as path:
        try:
            zf = zipfile.ZipFile(path)
        except zipfile.BadZipFile:
            raise DatasetImportError(f"stylegan: {src} is not a ZIP archive (expected "
                                     f"{LAYOUT})") from None
        with zf:
            names = _image_names(zf, src)
            try:
                labels, extra = read_dataset_json(zf, src)
            except ValueError as exc:
                raise DatasetImportError(f"stylegan: {exc}") from None
            classes = extra.get("classes") if isinstance(extra.get("classes"), list) else []
            samples = extra.get("samples") if isinstance(extra.get("samples"), dict) else {}
            names_of = {name: _class_name(labels.get(name), classes, name, src)
                        for name in names} if labels is not None else {}

            def extract(name: str) -> str:
                uri = storage.join(out_dir, *name.split("/"))
                storage.write_bytes(uri, zf.read(name))
                return uri

            with ThreadPoolExecutor(max_workers=READ_WORKERS) as pool:
                uris = list(tqdm(pool.map(extract, names), total=len(names),
                                 disable=not progress, desc="stylegan: extracting images",
                                 unit="img"))
    if labels is not None:
        unlabeled = [name for name in names if name not in labels]
        if unlabeled:
            warnings.warn(f"stylegan: {len(unlabeled)} images of {src} have no label in "
                          f"{DATASET_JSON}, e.g. {unlabeled[0]}; their label stays empty",
                          stacklevel=2)
    rows = []
    for name, uri in zip(names, uris, strict=True):
        ids = samples.get(name) if isinstance(samples.get(name), dict) else {}
        stem = posixpath.splitext(posixpath.basename(name))[0]
        rows.append(sample_row(str(ids.get("sample_id") or stem), uri,
                               label=names_of.get(name), patient_id=ids.get("patient_id"),
                               lesion_id=ids.get("lesion_id"), source="stylegan"))
    return finish_rows(rows, SourceTree(out_dir, tuple(names)), "stylegan", progress)
