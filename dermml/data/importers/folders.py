"""Generic folder layouts: segmentation (images/ + masks/) and classification (class folders)."""


import warnings
from pathlib import PurePosixPath

import pandas as pd

from dermml.data.importers.common import (
    MASK_NAME_SUFFIXES,
    DatasetImportError,
    SourceTree,
    finish_rows,
    is_image,
    list_source,
    sample_row,
    stem_path,
)

# --- segmentation: images/ + masks/, optionally under split folders ----------------------------

SEGMENTATION_LAYOUT = ("'images/<name>.png' with masks 'masks/<name>.png' "
                       "(or '<split>/images/...' and '<split>/masks/...')")


def _segmentation_part(rel: str, folder: str) -> tuple[str | None, str] | None:
    """(split, path inside ``folder``) when ``rel`` is ``folder/...`` or ``<split>/folder/...``."""
    parts = rel.split("/")
    if len(parts) >= 2 and parts[0].lower() == folder:
        return None, "/".join(parts[1:])
    if len(parts) >= 3 and parts[1].lower() == folder:
        return parts[0], "/".join(parts[2:])
    return None


def _segmentation_masks(tree: SourceTree) -> dict[tuple[str | None, str], str]:
    """(split, mask path without extension) -> mask file; a .png wins over other formats."""
    masks: dict[tuple[str | None, str], str] = {}
    for rel in tree.files:
        found = _segmentation_part(rel, "masks")
        if found and is_image(rel):
            key = (found[0], stem_path(found[1]))
            if key not in masks or rel.lower().endswith(".png"):
                masks[key] = rel
    return masks


def import_segmentation(src: str, *, progress: bool = False) -> pd.DataFrame:
    """``SRC/[<split>/]images/*`` with masks ``SRC/[<split>/]masks/<stem>[_mask|...].png``."""
    tree = list_source("segmentation", src, SEGMENTATION_LAYOUT)
    masks = _segmentation_masks(tree)
    rows = []
    for rel in tree.files:
        found = _segmentation_part(rel, "images")
        if not (found and is_image(rel)):
            continue
        split, inner = found
        stem = stem_path(inner)
        mask = next((masks[(split, stem + suffix)] for suffix in MASK_NAME_SUFFIXES
                     if (split, stem + suffix) in masks), None)
        rows.append(sample_row(stem, tree.uri(rel), split=split,
                         mask_uri=tree.uri(mask) if mask else None))
    if not rows:
        raise DatasetImportError(f"segmentation: no images in an 'images' folder under "
                                 f"{tree.root} (expected {SEGMENTATION_LAYOUT})")
    return finish_rows(rows, tree, "segmentation", progress)


# --- classification: [<split>/]<label>/<image> ------------------------------------------------

CLASSIFICATION_LAYOUT = "'<label>/<image>.jpg' or '<split>/<label>/<image>.jpg'"


def import_classification(src: str, *, progress: bool = False) -> pd.DataFrame:
    """Class folders, flat (``SRC/<label>/*``) or under split folders (``SRC/<split>/<label>/*``).

    The layout has split folders when no top-level folder holds images directly.
    """
    tree = list_source("classification", src, CLASSIFICATION_LAYOUT)
    images = [rel for rel in tree.files if is_image(rel) and "/" in rel]
    loose = [rel for rel in tree.files if is_image(rel) and "/" not in rel]
    if loose:
        warnings.warn(f"classification: skipped {len(loose)} images directly in {tree.root} "
                      f"(not in a class folder), e.g. {loose[0]}", stacklevel=2)
    if not images:
        raise DatasetImportError(f"classification: no images in class folders under {tree.root} "
                                 f"(expected {CLASSIFICATION_LAYOUT})")
    has_splits = all(rel.count("/") >= 2 for rel in images)
    rows = []
    for rel in images:
        parts = rel.split("/")
        split, label = (parts[0], parts[1]) if has_splits else (None, parts[0])
        rows.append(sample_row(PurePosixPath(rel).stem, tree.uri(rel), label=label, split=split))
    return finish_rows(rows, tree, "classification", progress)
