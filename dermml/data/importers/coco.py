"""COCO detection JSON: one row per image with its boxes and box labels."""


import json
import os
import warnings
from collections import Counter
from collections.abc import Mapping
from pathlib import PurePosixPath

import pandas as pd

from dermml import storage
from dermml.data.importers.common import (
    DatasetImportError,
    SourceTree,
    finish_rows,
    list_source,
    normalise_root,
    sample_row,
    stem_path,
)

# --- COCO detection ----------------------------------------------------------------------------

COCO_LAYOUT = "a COCO detection JSON with 'images', 'annotations' and 'categories'"


def _find_coco_json(tree: SourceTree) -> str:
    """The one ``.json`` in SRC or SRC/annotations, when ``annotations`` was not given."""
    candidates = [rel for rel in tree.files if rel.lower().endswith(".json")
                  and (rel.count("/") == 0 or rel.lower().startswith("annotations/"))]
    if len(candidates) != 1:
        found = f"found {candidates}" if candidates else "found none"
        raise DatasetImportError(f"coco: pass annotations=FILE (--annotations); looked for exactly "
                                 f"one .json in {tree.root} or its annotations/ folder, {found}")
    return tree.uri(candidates[0])


def _read_coco(uri: str) -> dict:
    try:
        coco = json.loads(storage.read_bytes(uri))
    except (storage.StorageError, ValueError) as exc:
        raise DatasetImportError(f"coco: cannot read {uri} ({exc}); "
                                 f"expected {COCO_LAYOUT}") from exc
    if not isinstance(coco, dict) or not isinstance(coco.get("images"), list):
        raise DatasetImportError(f"coco: {uri} has no 'images' list (expected {COCO_LAYOUT})")
    return coco


def _coco_boxes(coco: dict) -> dict[object, tuple[list, list]]:
    """image id -> ([[x, y, w, h], ...], [category name, ...]); malformed boxes are skipped."""
    names = {cat.get("id"): str(cat.get("name")) for cat in coco.get("categories") or []}
    boxes: dict[object, tuple[list, list]] = {}
    skipped = 0
    for ann in coco.get("annotations") or []:
        try:
            box = [float(v) for v in ann["bbox"]]
        except (KeyError, TypeError, ValueError):
            box = []
        if len(box) != 4:
            skipped += 1
            continue
        category = ann.get("category_id")
        image_boxes, image_labels = boxes.setdefault(ann.get("image_id"), ([], []))
        image_boxes.append(box)
        image_labels.append(names.get(category, str(category)))
    if skipped:
        warnings.warn(f"coco: skipped {skipped} annotations without a 4-number bbox", stacklevel=3)
    return boxes


class _CocoImageFinder:
    """Resolves a COCO ``file_name``: below SRC, else next to the JSON, else by unique basename."""

    def __init__(self, tree: SourceTree, annotations_uri: str):
        self.tree = tree
        self.files = set(tree.files)
        self.json_dir = storage.parent(annotations_uri)
        basenames = Counter(PurePosixPath(rel).name for rel in tree.files)
        self.by_basename = {PurePosixPath(rel).name: rel for rel in tree.files
                            if basenames[PurePosixPath(rel).name] == 1}

    def uri(self, file_name: str) -> str:
        if storage.is_remote(file_name) or os.path.isabs(file_name):
            return file_name
        rel = PurePosixPath(file_name).as_posix()
        if rel in self.files:
            return self.tree.uri(rel)
        beside_json = storage.join(self.json_dir, *rel.split("/"))
        if normalise_root(beside_json) != self.tree.uri(rel) and storage.exists(beside_json):
            return beside_json
        name = PurePosixPath(rel).name
        if name in self.by_basename:
            return self.tree.uri(self.by_basename[name])
        return self.tree.uri(rel)  # missing: still a row, validation reports it


def _coco_size(image: Mapping, key: str) -> int | None:
    try:
        return int(image[key])
    except (KeyError, TypeError, ValueError):
        return None


def import_coco(src: str, *, annotations: str | None = None, split: str | None = None,
                progress: bool = False) -> pd.DataFrame:
    """One row per COCO image: ``boxes`` ([x, y, w, h]) and ``box_labels`` (category names).

    Images are looked up below SRC or relative to the JSON's folder; ``split`` sets every row's
    split (e.g. ``train`` for ``instances_train2017.json``), else splits are assigned later.
    """
    tree = list_source("coco", src, "the images named by the JSON's 'file_name' entries")
    annotations_uri = normalise_root(annotations) if annotations else _find_coco_json(tree)
    coco = _read_coco(annotations_uri)
    boxes = _coco_boxes(coco)
    finder = _CocoImageFinder(tree, annotations_uri)
    rows = []
    images = [image for image in coco["images"]
              if isinstance(image, dict) and image.get("file_name")]
    if len(images) < len(coco["images"]):
        warnings.warn(f"coco: skipped {len(coco['images']) - len(images)} image entries without "
                      f"a file_name in {annotations_uri}", stacklevel=2)
    for image in images:
        file_name = str(image["file_name"])
        image_boxes, image_labels = boxes.get(image.get("id"), ([], []))
        rows.append(sample_row(_coco_sample_id(file_name), finder.uri(file_name), split=split,
                         boxes=image_boxes, box_labels=image_labels,
                         width=_coco_size(image, "width"), height=_coco_size(image, "height")))
    return finish_rows(rows, tree, "coco", progress)


def _coco_sample_id(file_name: str) -> str:
    if storage.is_remote(file_name) or os.path.isabs(file_name):
        return PurePosixPath(file_name).stem
    return stem_path(file_name)
