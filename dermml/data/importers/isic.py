"""ISIC challenge layouts (2016-2019, tasks 1-3) and HAM10000, as the archives unpack.

Files are recognised by ``<folder>/<file>`` alone, so the release folders may sit at any depth
below SRC and several releases may sit side by side. Images pair with lesion masks (task 1),
attribute masks (ISIC 2018 task 2) and diagnosis tables (task 3, HAM10000 metadata) by ISIC id
within a phase; Training/Validation/Test phases become ``train``/``val``/``test`` splits.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import pandas as pd

from dermml import storage
from dermml.data.importers.common import (
    DatasetImportError,
    SourceTree,
    finish_rows,
    list_source,
    sample_row,
)
from dermml.data.manifest import ATTRIBUTES

_PHASE = r"(?P<phase>Training|Validation|Test)"
_ID = r"(?P<id>ISIC_\d+)"
_I = re.IGNORECASE


@dataclass(frozen=True)
class IsicRelease:
    """How one release names its files (each pattern matches ``<folder>/<file>``)."""

    name: str
    layout: str
    """An example of the layout, for error messages."""
    images: tuple[re.Pattern, ...]
    masks: tuple[re.Pattern, ...] = ()
    label_tables: tuple[re.Pattern, ...] = ()
    """Diagnosis CSVs (one-hot, melanoma/seborrheic_keratosis, benign/malignant or dx columns)."""
    lesion_tables: tuple[re.Pattern, ...] = ()
    """CSVs with ``image``/``image_id`` and ``lesion_id`` columns."""


RELEASES: tuple[IsicRelease, ...] = (
    IsicRelease(
        "isic2016", "'ISBI2016_ISIC_Part1_Training_Data/ISIC_0000000.jpg' with "
        "'ISBI2016_ISIC_Part1_Training_GroundTruth/ISIC_0000000_Segmentation.png'",
        images=(re.compile(rf"ISBI2016_ISIC_Part[13]_{_PHASE}_Data/{_ID}\.jpe?g", _I),),
        masks=(re.compile(rf"ISBI2016_ISIC_Part1_{_PHASE}_GroundTruth/{_ID}_Segmentation\.png",
                          _I),),
        label_tables=(re.compile(rf"ISBI2016_ISIC_Part3_{_PHASE}_GroundTruth\.csv", _I),)),
    IsicRelease(
        "isic2017", "'ISIC-2017_Training_Data/ISIC_0000000.jpg' with "
        "'ISIC-2017_Training_Part1_GroundTruth/ISIC_0000000_segmentation.png'",
        images=(re.compile(rf"ISIC-2017_{_PHASE}(?:_v2)?_Data/{_ID}\.jpe?g", _I),),
        masks=(re.compile(rf"ISIC-2017_{_PHASE}(?:_v2)?_Part1_GroundTruth/{_ID}_segmentation"
                          r"\.png", _I),),
        label_tables=(re.compile(rf"ISIC-2017_{_PHASE}(?:_v2)?_Part3_GroundTruth\.csv", _I),)),
    IsicRelease(
        "isic2018", "'ISIC2018_Task1-2_Training_Input/ISIC_0000000.jpg' and "
        "'ISIC2018_Task1_Training_GroundTruth/ISIC_0000000_segmentation.png' (task 1/2), "
        "'ISIC2018_Task3_Training_Input/ISIC_0024306.jpg' with "
        "'ISIC2018_Task3_Training_GroundTruth.csv' (task 3)",
        images=(re.compile(rf"ISIC2018_Task1-2_{_PHASE}_Input/{_ID}\.jpe?g", _I),
                re.compile(rf"ISIC2018_Task3_{_PHASE}_Input/{_ID}\.jpe?g", _I)),
        masks=(re.compile(rf"ISIC2018_Task1_{_PHASE}_GroundTruth/{_ID}_segmentation\.png", _I),),
        label_tables=(re.compile(rf"ISIC2018_Task3_{_PHASE}_GroundTruth\.csv", _I),),
        lesion_tables=(re.compile(rf"ISIC2018_Task3_{_PHASE}_LesionGroupings\.csv", _I),)),
    IsicRelease(
        "isic2019", "'ISIC_2019_Training_Input/ISIC_0000000.jpg' with "
        "'ISIC_2019_Training_GroundTruth.csv' (and ISIC_2019_Training_Metadata.csv)",
        images=(re.compile(rf"ISIC_2019_{_PHASE}_Input/{_ID}(?:_downsampled)?\.jpe?g", _I),),
        label_tables=(re.compile(rf"ISIC_2019_{_PHASE}_GroundTruth\.csv", _I),),
        lesion_tables=(re.compile(rf"ISIC_2019_{_PHASE}_Metadata\.csv", _I),)),
    IsicRelease(
        "ham10000", "'HAM10000_images_part_1/ISIC_0024306.jpg' with 'HAM10000_metadata.csv' "
        "(and 'HAM10000_segmentations_lesion_tschandl/ISIC_0024306_segmentation.png')",
        images=(re.compile(rf"HAM10000_images(?:_part_\d+)?/{_ID}\.jpe?g", _I),),
        masks=(re.compile(rf"HAM10000_segmentations_lesion(?:_tschandl)?/{_ID}_segmentation"
                          r"\.png", _I),),
        label_tables=(re.compile(r"HAM10000_metadata(?:\.csv)?", _I),),
        lesion_tables=(re.compile(r"HAM10000_metadata(?:\.csv)?", _I),)),
)
_BY_NAME = {release.name: release for release in RELEASES}
_SPLITS = {"training": "train", "validation": "val", "test": "test"}

DIAGNOSIS_CODES = {
    "mel": "melanoma", "nv": "nevus", "bcc": "basal_cell_carcinoma",
    "akiec": "actinic_keratosis", "ak": "actinic_keratosis", "bkl": "benign_keratosis",
    "df": "dermatofibroma", "vasc": "vascular_lesion", "scc": "squamous_cell_carcinoma",
    "unk": None,
}
"""ISIC 2018 task 3 / 2019 / HAM10000 diagnosis codes -> DermML labels (UNK: no label)."""

_ATTRIBUTE = re.compile(rf"ISIC2018_Task2_{_PHASE}_GroundTruth(?:_v\d+)?/{_ID}_attribute_"
                        r"(?P<name>\w+)\.png", _I)
_IMAGE_KEYS = ("image", "image_id", "isic_id", "image_name")


def _tail(rel: str, parts: int = 2) -> str:
    return "/".join(rel.split("/")[-parts:])


def _phase(match: re.Match) -> str:
    groups = match.groupdict()
    return (groups.get("phase") or "Training").lower()


# --- label tables ------------------------------------------------------------------------------


def _label_of_row(row: pd.Series, columns: list[str]) -> str | None:
    lowered = {c.lower(): c for c in columns}
    if "dx" in lowered:  # HAM10000 metadata
        return DIAGNOSIS_CODES.get(str(row[lowered["dx"]]).strip().lower())
    one_hot = [c for c in columns if c.lower() in DIAGNOSIS_CODES]
    if one_hot:  # ISIC 2018 task 3 / 2019: one column per diagnosis, 1.0 for the true one
        values = pd.to_numeric(row[one_hot], errors="coerce")
        if values.isna().all() or values.max() < 0.5:
            return None
        return DIAGNOSIS_CODES[str(values.idxmax()).lower()]
    if "melanoma" in lowered:  # ISIC 2017 task 3: melanoma, seborrheic_keratosis, else nevus
        if float(row[lowered["melanoma"]]) >= 0.5:
            return "melanoma"
        sk = lowered.get("seborrheic_keratosis")
        return "seborrheic_keratosis" if sk and float(row[sk]) >= 0.5 else "nevus"
    return None


def _read_csv(uri: str, header: bool = True) -> pd.DataFrame:
    try:
        return pd.read_csv(io.BytesIO(storage.read_bytes(uri)), dtype=str,
                           header=0 if header else None)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise DatasetImportError(f"{uri}: not a readable CSV ({exc})") from None


def parse_label_table(uri: str) -> dict[str, str | None]:
    """ISIC id -> label from one diagnosis table (any of the releases' forms)."""
    table = _read_csv(uri)
    key = next((c for c in table.columns if c.lower() in _IMAGE_KEYS), None)
    if key is None:  # ISIC 2016 part 3: no header, "<id>,<benign|malignant|0.0|1.0>"
        table = _read_csv(uri, header=False)
        if table.shape[1] < 2 or not table[0].str.fullmatch(r"ISIC_\d+").any():
            raise DatasetImportError(f"{uri}: no image column ({', '.join(_IMAGE_KEYS)}) and "
                                     "not an '<ISIC id>,<diagnosis>' table")
        verdict = table[1].str.strip().str.lower()
        malignant = verdict.isin(["malignant", "1", "1.0"])
        benign = verdict.isin(["benign", "0", "0.0"])
        labels = pd.Series(None, index=table.index, dtype=object)
        labels[malignant], labels[benign] = "malignant", "benign"
        return dict(zip(table[0], labels, strict=True))
    columns = [c for c in table.columns if c != key]
    labels = {row[key]: _label_of_row(row, columns) for _, row in table.iterrows()}
    if not any(labels.values()):
        raise DatasetImportError(f"{uri}: no diagnosis found; expected one-hot diagnosis "
                                 f"columns ({', '.join(c.upper() for c in DIAGNOSIS_CODES)}), "
                                 "a dx column, or melanoma/seborrheic_keratosis columns")
    return labels


def parse_lesion_table(uri: str) -> dict[str, str]:
    """ISIC id -> lesion id (rows without one are left out)."""
    table = _read_csv(uri)
    key = next((c for c in table.columns if c.lower() in _IMAGE_KEYS), None)
    if key is None or "lesion_id" not in table.columns:
        return {}
    known = table[table["lesion_id"].notna() & (table["lesion_id"].str.strip() != "")]
    return dict(zip(known[key], known["lesion_id"], strict=True))


# --- the importer ------------------------------------------------------------------------------


def _match_any(patterns: Iterable[re.Pattern], rel: str) -> re.Match | None:
    tail = _tail(rel)
    return next((m for p in patterns if (m := p.fullmatch(tail) or p.fullmatch(_tail(rel, 1)))),
                None)


def _attribute_masks(tree: SourceTree) -> dict[tuple[str, str], dict[str, str]]:
    """(ISIC id, phase) -> {attribute name: mask URI}, for the five ISIC 2018 task 2 attributes."""
    found: dict[tuple[str, str], dict[str, str]] = {}
    unknown = set()
    for rel in tree.files:
        match = _ATTRIBUTE.fullmatch(_tail(rel))
        if not match:
            continue
        if match["name"] in ATTRIBUTES:
            found.setdefault((match["id"], _phase(match)), {})[match["name"]] = tree.uri(rel)
        else:
            unknown.add(match["name"])
    if unknown:
        warnings.warn(f"isic2018: ignored unknown attribute masks {sorted(unknown)} "
                      f"(known: {list(ATTRIBUTES)})", stacklevel=4)
    return found


def _tables(tree: SourceTree, release: IsicRelease, which: str,
            parse: Callable[[str], dict]) -> dict[tuple[str, str], object]:
    """(ISIC id, phase) -> value from every table of the release (``which``: label/lesion)."""
    patterns = release.label_tables if which == "label" else release.lesion_tables
    out: dict[tuple[str, str], object] = {}
    for rel in tree.files:
        match = _match_any(patterns, rel)
        if match:
            phase = _phase(match)
            out.update({(sample_id, phase): value
                        for sample_id, value in parse(tree.uri(rel)).items()})
    return out


def _release_rows(tree: SourceTree, release: IsicRelease) -> list[dict]:
    images: dict[tuple[str, str], str] = {}
    for rel in tree.files:
        match = _match_any(release.images, rel)
        if match:  # the same image in two task folders (ISIC 2016 parts 1 and 3) is one row
            images.setdefault((match["id"], _phase(match)), rel)
    if not images:
        return []
    masks = {(m["id"], _phase(m)): rel for rel in tree.files
             if (m := _match_any(release.masks, rel))}
    labels = _tables(tree, release, "label", parse_label_table)
    lesions = _tables(tree, release, "lesion", parse_lesion_table)
    attributes = _attribute_masks(tree) if release.name == "isic2018" else {}
    has_holdout = any(phase != "training" for _, phase in images)
    rows = []
    for (sample_id, phase), rel in sorted(images.items()):
        split = _SPLITS[phase] if (phase != "training" or has_holdout) else None
        key = (sample_id, phase)
        rows.append(sample_row(
            sample_id, tree.uri(rel), split=split, label=labels.get(key),
            lesion_id=lesions.get(key, sample_id),
            mask_uri=tree.uri(masks[key]) if key in masks else None,
            attribute_mask_uris=attributes.get(key), source=release.name))
    unlabeled = sum(1 for row in rows if row["label"] is None)
    if labels and unlabeled:
        warnings.warn(f"{release.name}: {unlabeled} of {len(rows)} images have no diagnosis in "
                      "the release's ground-truth tables", stacklevel=4)
    return rows


def import_isic(src: str, *, progress: bool = False, releases: tuple[str, ...] = ()) -> \
        pd.DataFrame:
    """Every image of the ISIC releases (``releases``: all known) found below ``src``."""
    chosen = [_BY_NAME[name] for name in releases] if releases else list(RELEASES)
    name = releases[0] if len(releases) == 1 else "isic"
    layouts = "; ".join(f"{r.name}: {r.layout}" for r in chosen)
    tree = list_source(name, src, layouts)
    rows = [row for release in chosen for row in _release_rows(tree, release)]
    if not rows:
        raise DatasetImportError(f"{name}: no images of a known ISIC layout under {tree.root} "
                                 f"(expected {layouts})")
    return finish_rows(rows, tree, name, progress)


def import_isic2016(src: str, *, progress: bool = False) -> pd.DataFrame:
    """ISIC 2016 (ISBI) part 1 images + masks and part 3 benign/malignant labels."""
    return import_isic(src, progress=progress, releases=("isic2016",))


def import_isic2017(src: str, *, progress: bool = False) -> pd.DataFrame:
    """ISIC 2017 part 1 images + masks and part 3 melanoma / seborrheic keratosis / nevus."""
    return import_isic(src, progress=progress, releases=("isic2017",))


def import_isic2018(src: str, *, progress: bool = False) -> pd.DataFrame:
    """ISIC 2018 task 1 images + masks, task 2 attribute masks, task 3 images + diagnoses."""
    return import_isic(src, progress=progress, releases=("isic2018",))


def import_isic2019(src: str, *, progress: bool = False) -> pd.DataFrame:
    """ISIC 2019 images, diagnoses (8 classes, UNK unlabelled) and lesion ids."""
    return import_isic(src, progress=progress, releases=("isic2019",))


def import_ham10000(src: str, *, progress: bool = False) -> pd.DataFrame:
    """HAM10000 images, diagnoses and lesion ids (HAM10000_metadata), lesion masks if present."""
    return import_isic(src, progress=progress, releases=("ham10000",))
