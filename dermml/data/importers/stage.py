"""The import stage: the importer registry, metadata, split units, and the written manifest."""


import inspect
import io
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor

import pandas as pd
from tqdm import tqdm

from dermml import storage
from dermml.data.importers.coco import import_coco
from dermml.data.importers.common import READ_WORKERS, DatasetImportError, normalise_root
from dermml.data.importers.dermsynth3d import import_dermsynth3d
from dermml.data.importers.folders import import_classification, import_segmentation
from dermml.data.importers.isic import (
    import_ham10000,
    import_isic,
    import_isic2016,
    import_isic2017,
    import_isic2018,
    import_isic2019,
)
from dermml.data.importers.ph2 import import_ph2
from dermml.data.importers.stylegan import import_stylegan_zip
from dermml.data.manifest import (
    COLUMNS,
    MANIFEST_FILENAME,
    is_missing,
    write_manifest,
)
from dermml.data.phash import NEAR_DUPLICATE_HAMMING, image_hash, near_duplicate_groups
from dermml.data.splits import check_fractions, fill_missing_splits, linked_units

# --- registry and the import stage -------------------------------------------------------------

IMPORTERS: dict[str, Callable[..., pd.DataFrame]] = {
    "segmentation": import_segmentation,
    "classification": import_classification,
    "isic": import_isic,
    "isic2016": import_isic2016,
    "isic2017": import_isic2017,
    "isic2018": import_isic2018,
    "isic2019": import_isic2019,
    "ham10000": import_ham10000,
    "ph2": import_ph2,
    "coco": import_coco,
    "dermsynth3d": import_dermsynth3d,
    "stylegan": import_stylegan_zip,
}
DERIVED_ROOT = "derived_root"
"""Option of importers that derive files from the source (masks held inside archives): they
write them into the manifest's folder, which ``import_dataset`` passes."""


def get_importer(fmt: str) -> Callable[..., pd.DataFrame]:
    """The importer registered as ``fmt``; the error lists the known formats."""
    if fmt not in IMPORTERS:
        raise DatasetImportError(f"unknown dataset format {fmt!r}; known formats: "
                                 f"{', '.join(sorted(IMPORTERS))}")
    return IMPORTERS[fmt]


def importer_options(fmt: str) -> list[str]:
    """The keyword options the ``fmt`` importer accepts besides ``src`` and ``progress``."""
    params = inspect.signature(get_importer(fmt)).parameters
    return [name for name in params if name not in ("src", "progress", DERIVED_ROOT)]


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
        u = normalise_root(u)
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

    with ThreadPoolExecutor(max_workers=READ_WORKERS) as pool:
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
    if DERIVED_ROOT in inspect.signature(importer).parameters:
        options[DERIVED_ROOT] = storage.parent(manifest_uri)
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
