"""ISIC challenge layouts (2016-2019, tasks 1-3) and HAM10000."""


import re
import warnings

import pandas as pd

from dermml.data.importers.common import (
    DatasetImportError,
    SourceTree,
    finish_rows,
    list_source,
    sample_row,
)
from dermml.data.manifest import (
    ATTRIBUTES,
)

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
        rows.append(sample_row(sample_id, tree.uri(rel), split=split, lesion_id=sample_id,
                         mask_uri=tree.uri(masks[sample_id]) if sample_id in masks else None,
                         attribute_mask_uris=attributes.get(sample_id)))
    return finish_rows(rows, tree, "isic2018", progress)
