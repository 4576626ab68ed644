"""Importers: public dataset layouts -> manifests that reference, never copy, the source files.

Each importer lists the source once, records every sample it finds (a later validation stage judges
missing masks or unreadable images), and fails only when the layout cannot be read at all.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import PurePosixPath

import pandas as pd
from PIL import Image
from tqdm import tqdm

from dermml import storage
from dermml.data.manifest import (
    ATTRIBUTES,
    COLUMNS,
    MANIFEST_FILENAME,
    read_manifest,
    write_manifest,
)
from dermml.data.phash import NEAR_DUPLICATE_HAMMING, image_hash, near_duplicate_groups
from dermml.data.splits import check_fractions, fill_missing_splits, is_missing, linked_units

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MASK_NAME_SUFFIXES = ("", "_mask", "_segmentation", "_lesion")
"""Mask file names accepted for image ``<stem>``: ``<stem><suffix>.png``, in order of preference."""

PH2_CLINICAL_LABELS = {"0": "common_nevus", "1": "atypical_nevus", "2": "melanoma"}
PH2_LABELS_FILENAME = "PH2_dataset.txt"
_READ_WORKERS = 8  # reading images is I/O bound (S3 latency): threads overlap the waits


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


def _normalise_root(src: str) -> str:
    """An absolute, clean form of ``src`` so manifest URIs hold no ``..`` or trailing slashes."""
    src = str(src)
    if storage.is_remote(src):
        return src.rstrip("/")
    return os.path.normpath(os.path.abspath(src.removeprefix("file://")))


def _is_hidden(rel: str) -> bool:
    # Archive and OS clutter (.DS_Store, __MACOSX/) is never part of a dataset.
    return any(part.startswith(".") or part == "__MACOSX" for part in rel.split("/"))


def _is_image(rel: str) -> bool:
    return rel.lower().endswith(IMAGE_SUFFIXES)


def list_source(fmt: str, src: str, expected: str) -> SourceTree:
    """List every file below ``src`` or raise naming the folder and the ``expected`` layout."""
    root = _normalise_root(src)
    try:
        uris = storage.list_files(root)
    except (OSError, storage.StorageError) as exc:
        raise DatasetImportError(f"{fmt}: cannot list {root} ({exc}); expected {expected}") from exc
    prefix = root + "/"
    rels = [uri[len(prefix):] for uri in uris if uri.startswith(prefix)]
    rels = [rel for rel in rels if not _is_hidden(rel)]
    if not rels:
        raise DatasetImportError(f"{fmt}: {root} is missing or holds no files "
                                 f"(expected {expected})")
    return SourceTree(root, tuple(rels))


def _stem_path(rel: str) -> str:
    """``a/b/ISIC_1.jpg`` -> ``a/b/ISIC_1``: a file's path without its extension."""
    return str(PurePosixPath(rel).with_suffix(""))


# --- rows and image facts ----------------------------------------------------------------------


def _row(sample_id: str, image_uri: str, **fields: object) -> dict:
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
    with ThreadPoolExecutor(max_workers=_READ_WORKERS) as pool:
        facts = list(tqdm(pool.map(image_facts, uris), total=len(uris), disable=not progress,
                          desc=f"{source}: reading image headers", unit="img"))
    for row, (width, height, digest) in zip(rows, facts, strict=True):
        row["source"], row["sha256"] = source, digest
        if row["width"] is None or row["height"] is None:  # COCO brings its own sizes
            row["width"], row["height"] = width, height
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    df[["width", "height"]] = df[["width", "height"]].astype("Int32")
    return df


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
        if found and _is_image(rel):
            key = (found[0], _stem_path(found[1]))
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
        if not (found and _is_image(rel)):
            continue
        split, inner = found
        stem = _stem_path(inner)
        mask = next((masks[(split, stem + suffix)] for suffix in MASK_NAME_SUFFIXES
                     if (split, stem + suffix) in masks), None)
        rows.append(_row(stem, tree.uri(rel), split=split,
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
    images = [rel for rel in tree.files if _is_image(rel) and "/" in rel]
    loose = [rel for rel in tree.files if _is_image(rel) and "/" not in rel]
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
        rows.append(_row(PurePosixPath(rel).stem, tree.uri(rel), label=label, split=split))
    return finish_rows(rows, tree, "classification", progress)


# --- ISIC 2018 task 1 (+ task 2 attribute masks) ----------------------------------------------

ISIC2018_LAYOUT = ("'ISIC2018_Task1-2_Training_Input/ISIC_0000000.jpg' and "
                   "'ISIC2018_Task1_Training_GroundTruth/ISIC_0000000_segmentation.png'")
_ISIC_PHASES = r"(?P<phase>Training|Validation|Test)"
_ISIC_INPUT = re.compile(rf"ISIC2018_Task1-2_{_ISIC_PHASES}_Input/(?P<id>ISIC_\d+)\.jpe?g",
                         re.IGNORECASE)
_ISIC_MASK = re.compile(rf"ISIC2018_Task1_{_ISIC_PHASES}_GroundTruth/"
                        r"(?P<id>ISIC_\d+)_segmentation\.png", re.IGNORECASE)
_ISIC_ATTRIBUTE = re.compile(rf"ISIC2018_Task2_{_ISIC_PHASES}_GroundTruth(?:_v\d+)?/"
                             r"(?P<id>ISIC_\d+)_attribute_(?P<name>\w+)\.png", re.IGNORECASE)
_ISIC_SPLITS = {"training": "train", "validation": "val", "test": "test"}


def _isic_match(pattern: re.Pattern, rel: str) -> re.Match | None:
    # Match on "<folder>/<file>" only, so the ISIC folders may sit at any depth below SRC.
    return pattern.fullmatch("/".join(rel.split("/")[-2:]))


def _isic_attribute_masks(tree: SourceTree) -> dict[str, dict[str, str]]:
    """ISIC id -> {attribute name: mask URI}, for the five ISIC 2018 task 2 attributes."""
    found: dict[str, dict[str, str]] = {}
    unknown = set()
    for rel in tree.files:
        match = _isic_match(_ISIC_ATTRIBUTE, rel)
        if not match:
            continue
        if match["name"] in ATTRIBUTES:
            found.setdefault(match["id"], {})[match["name"]] = tree.uri(rel)
        else:
            unknown.add(match["name"])
    if unknown:
        warnings.warn(f"isic2018: ignored unknown attribute masks {sorted(unknown)} "
                      f"(known: {list(ATTRIBUTES)})", stacklevel=3)
    return found


def import_isic2018(src: str, *, progress: bool = False) -> pd.DataFrame:
    """ISIC 2018 task 1 images and lesion masks; Validation/Test folders become ``val``/``test``.

    Training rows are ``train`` when official val/test folders exist, else left for assignment.
    """
    tree = list_source("isic2018", src, ISIC2018_LAYOUT)
    images = [(m, rel) for rel in tree.files if (m := _isic_match(_ISIC_INPUT, rel))]
    if not images:
        raise DatasetImportError(f"isic2018: no ISIC2018_Task1-2_<Training|Validation|Test>_Input "
                                 f"folder with ISIC_*.jpg under {tree.root} "
                                 f"(expected {ISIC2018_LAYOUT})")
    masks = {m["id"]: rel for rel in tree.files if (m := _isic_match(_ISIC_MASK, rel))}
    attributes = _isic_attribute_masks(tree)
    has_official_holdout = any(m["phase"].lower() != "training" for m, _ in images)
    rows = []
    for match, rel in images:
        split = _ISIC_SPLITS[match["phase"].lower()]
        if split == "train" and not has_official_holdout:
            split = None
        sample_id = match["id"]
        rows.append(_row(sample_id, tree.uri(rel), split=split, lesion_id=sample_id,
                         mask_uri=tree.uri(masks[sample_id]) if sample_id in masks else None,
                         attribute_mask_uris=attributes.get(sample_id)))
    return finish_rows(rows, tree, "isic2018", progress)


# --- PH2 ---------------------------------------------------------------------------------------

PH2_LAYOUT = "'PH2 Dataset images/IMD002/IMD002_Dermoscopic_Image/IMD002.bmp'"
_PH2_IMAGE = re.compile(r"(?P<id>IMD\d+)/(?P=id)_Dermoscopic_Image/"
                        r"(?P=id)\.(?i:bmp|png|jpe?g|tiff?)")
_PH2_MASK = re.compile(r"(?P<id>IMD\d+)/(?P=id)_lesion/(?P=id)_lesion\.(?i:bmp|png)")
_PH2_ROW = re.compile(r"IMD\d+")


_PH2_ONE_HOT = {"common nevus": "common_nevus", "atypical nevus": "atypical_nevus",
                "melanoma": "melanoma"}


def ph2_labels_from_table(rows: Iterable[Iterable[object]]) -> dict[str, str | None]:
    """IMD id -> label from the PH2 table as cells, whatever file it came from.

    The header row names ``Name``/``Image Name`` and either a ``Clinical Diagnosis`` column of
    codes (0 common nevus, 1 atypical nevus, 2 melanoma: ``PH2_dataset.txt``, its tab/comma
    copies) or one column per diagnosis marked ``X`` (``PH2_dataset.xlsx``). Legend and blank
    rows are skipped; unknown codes map to None.
    """
    code_column, one_hot, name_column = None, {}, 0
    labels: dict[str, str | None] = {}
    for raw in rows:
        cells = ["" if c is None or c != c else str(c).strip() for c in raw]
        lowered = [" ".join(c.lower().split()) for c in cells]
        if any(c in ("name", "image name") for c in lowered):  # a header, not a legend line
            name_column = next(i for i, c in enumerate(lowered) if c in ("name", "image name"))
            codes = [i for i, c in enumerate(lowered) if c == "clinical diagnosis"]
            code_column = codes[0] if codes else None
            one_hot = {i: _PH2_ONE_HOT[c] for i, c in enumerate(lowered) if c in _PH2_ONE_HOT}
            continue
        ids = [c for c in cells if _PH2_ROW.fullmatch(c)]
        if not ids:
            continue
        sample_id = cells[name_column] if _PH2_ROW.fullmatch(cells[name_column]) else ids[0]
        label = None
        if code_column is not None and code_column < len(cells):
            label = PH2_CLINICAL_LABELS.get(cells[code_column].removesuffix(".0"))
        elif one_hot:
            marked = [name for i, name in one_hot.items() if i < len(cells) and cells[i]]
            label = marked[0] if len(marked) == 1 else None
        labels[sample_id] = label
    return labels


def parse_ph2_labels(text: str) -> dict[str, str | None]:
    """IMD id -> label from ``PH2_dataset.txt``: the published ``||``-separated table, or the
    tab-, comma- or semicolon-separated copies many mirrors carry (``ph2_labels_from_table``)."""
    lines = [line for line in text.lstrip("\ufeff").splitlines() if line.strip()]
    if any(line.strip().startswith("||") for line in lines):
        rows = [line.strip().split("||")[1:] for line in lines if line.strip().startswith("||")]
    else:
        sample = "\n".join(lines[:5])
        sep = max(("\t", ",", ";"), key=sample.count)
        rows = [line.split(sep) for line in lines]
    return ph2_labels_from_table(rows)


PH2_LABEL_FILES = (PH2_LABELS_FILENAME, "PH2_dataset.csv", "PH2_dataset.xlsx")
"""Label tables looked for, in this order: the published text file, then its CSV/Excel forms."""


def _ph2_labels_uri(tree: SourceTree) -> str | None:
    """The first of ``PH2_LABEL_FILES`` inside SRC (shallowest first) or next to it."""
    for filename in PH2_LABEL_FILES:
        inside = sorted((rel for rel in tree.files
                         if PurePosixPath(rel).name.lower() == filename.lower()),
                        key=lambda rel: rel.count("/"))
        if inside:
            return tree.uri(inside[0])
    for filename in PH2_LABEL_FILES:
        beside = storage.join(storage.parent(tree.root), filename)
        try:
            if storage.exists(beside):
                return beside
        except (OSError, storage.StorageError):  # SRC may be a bucket root with no parent
            return None
    return None


def _read_ph2_labels(uri: str) -> dict[str, str | None]:
    data = storage.read_bytes(uri)
    if uri.lower().endswith(".xlsx"):
        try:
            sheet = pd.read_excel(io.BytesIO(data), header=None, dtype=str)
        except (ValueError, OSError, KeyError) as exc:  # openpyxl's errors for a bad workbook
            raise DatasetImportError(f"ph2: {uri} is not a readable Excel workbook ({exc})") \
                from None
        return ph2_labels_from_table(sheet.itertuples(index=False))
    return parse_ph2_labels(data.decode("utf-8", errors="replace"))


def _ph2_labels(tree: SourceTree) -> dict[str, str | None]:
    uri = _ph2_labels_uri(tree)
    if uri is None:
        warnings.warn(f"ph2: no label table ({', '.join(PH2_LABEL_FILES)}) found in {tree.root} "
                      "or its parent; labels left empty", stacklevel=3)
        return {}
    labels = _read_ph2_labels(uri)
    if not any(labels.values()):
        raise DatasetImportError(
            f"ph2: {uri} holds no clinical diagnosis for any image; expected a header row with "
            "'Name' and 'Clinical Diagnosis' (codes 0/1/2) or 'Image Name' with 'Common Nevus', "
            "'Atypical Nevus', 'Melanoma' columns marked X; fix or remove the file")
    return labels


def _ph2_match(pattern: re.Pattern, rel: str) -> re.Match | None:
    # "<IMD>/<IMD>_<kind>/<file>" at any depth: SRC may be the dataset root or the images folder.
    return pattern.fullmatch("/".join(rel.split("/")[-3:]))


def import_ph2(src: str, *, progress: bool = False) -> pd.DataFrame:
    """PH2 dermoscopic images, lesion masks and clinical-diagnosis labels (``PH2_dataset.txt``)."""
    tree = list_source("ph2", src, PH2_LAYOUT)
    images = [(m["id"], rel) for rel in tree.files if (m := _ph2_match(_PH2_IMAGE, rel))]
    if not images:
        raise DatasetImportError(f"ph2: no IMDxxx folders under {tree.root} "
                                 f"(expected {PH2_LAYOUT})")
    masks = {m["id"]: rel for rel in tree.files if (m := _ph2_match(_PH2_MASK, rel))}
    labels = _ph2_labels(tree)
    unlabeled = [sample_id for sample_id, _ in images if labels and not labels.get(sample_id)]
    if unlabeled:
        warnings.warn(f"ph2: no clinical diagnosis for {len(unlabeled)} images, e.g. "
                      f"{unlabeled[:3]}", stacklevel=2)
    rows = [_row(sample_id, tree.uri(rel), label=labels.get(sample_id), lesion_id=sample_id,
                 mask_uri=tree.uri(masks[sample_id]) if sample_id in masks else None)
            for sample_id, rel in images]
    return finish_rows(rows, tree, "ph2", progress)


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
        if _normalise_root(beside_json) != self.tree.uri(rel) and storage.exists(beside_json):
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
    annotations_uri = _normalise_root(annotations) if annotations else _find_coco_json(tree)
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
        rows.append(_row(_coco_sample_id(file_name), finder.uri(file_name), split=split,
                         boxes=image_boxes, box_labels=image_labels,
                         width=_coco_size(image, "width"), height=_coco_size(image, "height")))
    return finish_rows(rows, tree, "coco", progress)


def _coco_sample_id(file_name: str) -> str:
    if storage.is_remote(file_name) or os.path.isabs(file_name):
        return PurePosixPath(file_name).stem
    return _stem_path(file_name)


# --- registry and the import stage -------------------------------------------------------------

IMPORTERS: dict[str, Callable[..., pd.DataFrame]] = {
    "segmentation": import_segmentation,
    "classification": import_classification,
    "isic2018": import_isic2018,
    "ph2": import_ph2,
    "coco": import_coco,
}


def get_importer(fmt: str) -> Callable[..., pd.DataFrame]:
    """The importer registered as ``fmt``; the error lists the known formats."""
    if fmt not in IMPORTERS:
        raise DatasetImportError(f"unknown dataset format {fmt!r}; known formats: "
                                 f"{', '.join(sorted(IMPORTERS))}")
    return IMPORTERS[fmt]


def importer_options(fmt: str) -> list[str]:
    """The keyword options the ``fmt`` importer accepts besides ``src`` and ``progress``."""
    params = inspect.signature(get_importer(fmt)).parameters
    return [name for name in params if name not in ("src", "progress")]


def _check_options(fmt: str, options: Iterable[str]) -> None:
    accepted = importer_options(fmt)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise DatasetImportError(f"{fmt}: unknown option(s) {unknown}; "
                                 f"it accepts {accepted or 'no options'}")


def manifest_uri_for(out: str) -> str:
    """``out`` itself when it names a ``.parquet`` file, else ``out/manifest.parquet``."""
    out = str(out)
    return out if out.endswith(".parquet") else storage.join(out, MANIFEST_FILENAME)


def _is_inside(uri: str, folder: str) -> bool:
    def real(u: str) -> str:  # resolve symlinks locally so a linked output folder is caught too
        u = _normalise_root(u)
        return u if storage.is_remote(u) else os.path.realpath(u)

    inner, outer = real(uri), real(folder)
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def _check_output(manifest_uri: str, src: str) -> None:
    if _is_inside(manifest_uri, src):
        raise DatasetImportError(f"refusing to write {manifest_uri} inside the source {src}: "
                                 "imports never modify the source; choose an output outside it")
    if storage.exists(manifest_uri):
        raise FileExistsError(f"{manifest_uri} already exists; a manifest is never overwritten "
                              "(its hash is the dataset version): choose another output "
                              "or delete it first")


METADATA_KEYS = ("sample_id", "image_id", "image", "isic_id", "image_name")
"""Columns a metadata CSV may key its rows by (HAM10000: image_id; ISIC 2019: image;
ISIC 2020: image_name), matched against sample ids (file stems)."""
METADATA_COLUMNS = ("patient_id", "lesion_id")


def apply_metadata(rows: pd.DataFrame, metadata_uri: str) -> pd.DataFrame:
    """``rows`` with patient_id / lesion_id taken from a metadata CSV (e.g.
    HAM10000_metadata.csv), so splits can keep each patient or lesion in one split."""
    try:
        meta = pd.read_csv(io.BytesIO(storage.read_bytes(metadata_uri)), dtype=str)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise DatasetImportError(f"{metadata_uri}: not a readable CSV ({exc})") from None
    key = next((k for k in METADATA_KEYS if k in meta.columns), None)
    if key is None:
        raise DatasetImportError(
            f"{metadata_uri}: no column to match samples by; name one of {', '.join(METADATA_KEYS)}"
            f" (columns: {', '.join(meta.columns)})")
    columns = [c for c in METADATA_COLUMNS if c in meta.columns]
    if not columns:
        raise DatasetImportError(f"{metadata_uri}: none of the columns "
                                 f"{', '.join(METADATA_COLUMNS)} (columns: "
                                 f"{', '.join(meta.columns)})")
    dupes = meta[key][meta[key].duplicated()].unique().tolist()
    if dupes:
        raise DatasetImportError(f"{metadata_uri}: {len(dupes)} {key} values appear more than "
                                 f"once, e.g. {dupes[:3]}")
    table = meta.set_index(key)[columns]
    ids = rows["sample_id"].astype(str)
    matched = ids.isin(table.index)
    if not matched.any():
        raise DatasetImportError(
            f"{metadata_uri}: no {key} matches a sample id (e.g. sample {ids.iloc[0]!r}, "
            f"{key} {table.index[0]!r}); the key must be the image file name without extension")
    if not matched.all():
        warnings.warn(f"{metadata_uri}: {int((~matched).sum())} of {len(rows)} samples have no "
                      f"metadata row (e.g. {ids[~matched].iloc[0]!r}); their "
                      f"{', '.join(columns)} stay as the importer found them", stacklevel=2)
    out = rows.copy()
    for column in columns:
        values = ids.map(table[column])
        keep = values.notna() & (values.astype(str).str.strip() != "")
        out[column] = out[column].astype(object) if column in out else None
        out.loc[keep, column] = values[keep]
    return out


GROUP_AUTO = "auto"
GROUP_NEAR_DUPLICATES = "near-duplicates"
GROUP_NONE = "none"
GROUP_COLUMNS = ("patient_id", "lesion_id")
"""Columns the default grouping (``auto``) keeps together, where the importer or metadata fill
them; near-duplicate images are kept together too."""


def _image_hashes(uris: list[str], progress: bool) -> list[str | None]:
    def one(uri: str) -> str | None:
        try:
            return image_hash(storage.read_bytes(uri))
        except storage.StorageError:
            return None

    with ThreadPoolExecutor(max_workers=_READ_WORKERS) as pool:
        return list(tqdm(pool.map(one, uris), total=len(uris), disable=not progress,
                         desc="near-duplicates: hashing images", unit="img"))


def split_units(rows: pd.DataFrame, group: str, max_hamming: int = NEAR_DUPLICATE_HAMMING,
                progress: bool = False) -> pd.Series | None:
    """The unit each row is split with (None: row by row).

    ``auto``: rows sharing a patient_id or lesion_id, and perceptually near-identical images
    (several photographs of one lesion), stay together; ``near-duplicates``: only the latter;
    a column name: that column and near-duplicates; ``none``: every row alone.
    """
    if group == GROUP_NONE:
        return None
    columns = (list(GROUP_COLUMNS) if group == GROUP_AUTO
               else [] if group == GROUP_NEAR_DUPLICATES else [group])
    if group in COLUMNS and is_missing(rows[group]).all():
        warnings.warn(f"group column {group!r} is empty for every row; only near-duplicate "
                      "images are kept together (pass --metadata to fill it)", stacklevel=3)
    links = near_duplicate_groups(_image_hashes(rows["image_uri"].tolist(), progress),
                                  max_hamming)
    return linked_units(rows, columns, links)


def _check_group(group: str) -> None:
    if group not in (GROUP_AUTO, GROUP_NEAR_DUPLICATES, GROUP_NONE) and group not in COLUMNS:
        raise ValueError(f"group must be {GROUP_AUTO!r} (patient_id, lesion_id and "
                         f"near-duplicates), {GROUP_NEAR_DUPLICATES!r}, {GROUP_NONE!r} or a "
                         f"manifest column such as 'patient_id', got {group!r}")


def import_dataset(fmt: str, src: str, out: str, *, seed: int = 0,
                   fractions: Mapping[str, float] | None = None, group: str = GROUP_AUTO,
                   metadata: str | None = None, near_duplicate_distance: int =
                   NEAR_DUPLICATE_HAMMING, progress: bool = False,
                   **options: object) -> tuple[str, str]:
    """Build rows with the named importer, fill missing splits, write the manifest to ``out``.

    ``out`` is a ``.parquet`` file or a folder (``manifest.parquet`` inside). Returns
    ``(manifest_uri, version)``; an existing manifest is never overwritten. ``metadata`` is a
    CSV giving patient_id / lesion_id per sample (see ``apply_metadata``). ``group`` says what
    stays in one split (``split_units``); by default patients, lesions and near-duplicate
    images (Hamming distance of perceptual hashes <= ``near_duplicate_distance``, the
    threshold validation's leakage check uses), so a fresh import passes its own leakage check.
    """
    importer = get_importer(fmt)
    _check_options(fmt, options)
    fractions = check_fractions(fractions)  # fail before a long listing, not after
    _check_group(group)
    manifest_uri = manifest_uri_for(out)
    _check_output(manifest_uri, src)
    rows = importer(src, progress=progress, **options)
    if metadata:
        rows = apply_metadata(rows, metadata)
    units = None
    if is_missing(rows["split"]).any():
        units = split_units(rows, group, near_duplicate_distance, progress)
    if units is None:
        rows = fill_missing_splits(rows, fractions, seed=seed, stratify="label")
    else:
        rows = fill_missing_splits(rows.assign(_unit=units), fractions, seed=seed,
                                   stratify="label", group="_unit").drop(columns="_unit")
    return manifest_uri, write_manifest(rows, manifest_uri)


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
