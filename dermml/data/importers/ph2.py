"""PH2: dermoscopic images, lesion masks and the clinical-diagnosis table in any published form."""


import io
import re
import warnings
from collections.abc import Iterable
from pathlib import PurePosixPath

import pandas as pd

from dermml import storage
from dermml.data.importers.common import (
    DatasetImportError,
    SourceTree,
    finish_rows,
    list_source,
    sample_row,
)

# --- PH2 ---------------------------------------------------------------------------------------

PH2_CLINICAL_LABELS = {"0": "common_nevus", "1": "atypical_nevus", "2": "melanoma"}
PH2_LABELS_FILENAME = "PH2_dataset.txt"
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
    rows = [sample_row(sample_id, tree.uri(rel), label=labels.get(sample_id), lesion_id=sample_id,
                 mask_uri=tree.uri(masks[sample_id]) if sample_id in masks else None)
            for sample_id, rel in images]
    return finish_rows(rows, tree, "ph2", progress)
