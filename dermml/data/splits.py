"""Seeded, stratified and optionally group-level train/val/test split assignment.

Rows already in a split keep it; only empty ``split`` values are filled (``fill_missing_splits``).
A task can instead train and evaluate on DermoSegDiff's fixed index splits
(``data.split_policy: reference``, ``with_split_policy``).
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from types import MappingProxyType

import numpy as np
import pandas as pd

from dermml import storage
from dermml.data.manifest import Manifest, is_missing

DEFAULT_FRACTIONS: Mapping[str, float] = MappingProxyType({"train": 0.7, "val": 0.15, "test": 0.15})
_ROW_UNIT = "\0row:"  # prefix of the unit key of a row without a group value
_NO_LABEL = "\0none"  # stratum of units whose stratify value is empty


def check_fractions(fractions: Mapping[str, float] | None) -> dict[str, float]:
    """A validated copy of ``fractions`` (None means the default 70/15/15)."""
    fractions = DEFAULT_FRACTIONS if fractions is None else fractions
    example = "e.g. {'train': 0.7, 'val': 0.15, 'test': 0.15}"
    if not isinstance(fractions, Mapping) or not fractions:
        raise ValueError(f"split fractions must map split names to fractions, {example}")
    checked: dict[str, float] = {}
    for name, value in fractions.items():
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"split names must be non-empty strings, got {name!r}")
        try:
            value = float(value)
        except (TypeError, ValueError):
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"split fraction for {name!r} must be a number > 0, got {value!r}")
        checked[name] = value
    total = sum(checked.values())
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        raise ValueError(f"split fractions must sum to 1, got {total:g} from {checked}; {example}")
    return checked


def _units(df: pd.DataFrame, group: str | None) -> pd.Series:
    """The unit each row is assigned with: its group value, or the row alone when it has none."""
    # Keying rows by sample_id (not position) makes the result independent of row order.
    keys = df["sample_id"] if "sample_id" in df.columns else pd.Series(df.index, index=df.index)
    row_units = _ROW_UNIT + keys.astype(str)
    if group is None:
        return row_units
    if group not in df.columns:
        raise ValueError(f"group column {group!r} not in the rows (columns: {list(df.columns)})")
    missing = is_missing(df[group])
    if missing.all():
        warnings.warn(f"group column {group!r} is empty for every row; splitting row by row",
                      stacklevel=3)
    return df[group].astype(str).where(~missing, row_units)


def _unit_strata(df: pd.DataFrame, units: pd.Series, stratify: str | None) -> pd.Series:
    """Stratum of each unit (index): the majority ``stratify`` value of its rows."""
    unique_units = pd.Index(units.unique())
    if stratify is None or stratify not in df.columns or is_missing(df[stratify]).all():
        return pd.Series("", index=unique_units)
    missing = is_missing(df[stratify])
    rows = pd.DataFrame({"unit": units.to_numpy(),
                         "label": df[stratify].astype(str).where(~missing, _NO_LABEL).to_numpy(),
                         "unlabeled": missing.to_numpy()})
    counts = rows.groupby(["unit", "label", "unlabeled"]).size().rename("n").reset_index()
    # Real labels beat empty ones, then the most frequent, then alphabetical: a stable majority.
    counts = counts.sort_values(["unit", "unlabeled", "n", "label"],
                                ascending=[True, True, False, True])
    return counts.drop_duplicates("unit").set_index("unit")["label"]


def _stratum_rng(seed: int, stratum: str) -> np.random.Generator:
    # Seeding per stratum keeps a class's split stable when other classes are added or removed.
    digest = int.from_bytes(hashlib.sha256(stratum.encode()).digest()[:8], "big")
    return np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, digest])


def _allocate(sizes: Sequence[int], fractions: dict[str, float],
              rng: np.random.Generator) -> list[str]:
    """Split names for shuffled units of ``sizes`` rows, filling each split toward its share."""
    names = list(fractions)
    targets = np.array([fractions[n] for n in names]) * float(sum(sizes))
    filled = np.zeros(len(names))
    tie_order = rng.permutation(len(names))  # equal shortfalls go a seeded way, not always to val
    every_split_once = len(sizes) >= len(names)
    chosen = []
    for i, size in enumerate(sizes):
        if every_split_once and i < len(names):
            k = i  # first, one unit for every split, so each split sees the class
        else:
            k = int(tie_order[np.argmax((targets - filled)[tie_order])])
        filled[k] += size
        chosen.append(names[k])
    return chosen


def assign_splits(df: pd.DataFrame, fractions: Mapping[str, float] | None = DEFAULT_FRACTIONS,
                  seed: int = 0, stratify: str | None = "label",
                  group: str | None = None) -> pd.Series:
    """A split name for every row of ``df``: seeded, stratified, and per group when ``group``.

    All rows sharing a ``group`` value (e.g. ``patient_id``) land in the same split, stratified by
    the group's majority label. Every split gets at least one unit of each class that has at least
    as many units as there are splits. The result depends on the seed and the rows, not their order.
    """
    fractions = check_fractions(fractions)
    if df.empty:
        return pd.Series([], index=df.index, dtype=object, name="split")
    units = _units(df, group)
    strata = _unit_strata(df, units, stratify)
    sizes = units.value_counts()
    unit_split: dict[str, str] = {}
    for stratum in sorted(strata.unique()):
        members = sorted(strata.index[strata == stratum])
        rng = _stratum_rng(seed, stratum)
        shuffled = [members[i] for i in rng.permutation(len(members))]
        chosen = _allocate([int(sizes[u]) for u in shuffled], fractions, rng)
        unit_split.update(zip(shuffled, chosen, strict=True))
    return units.map(unit_split).astype(object).rename("split")


def _inherited_splits(df: pd.DataFrame, missing: pd.Series, group: str) -> pd.Series:
    """Splits for unset rows whose group already has rows in a split (keeps the group together)."""
    if group not in df.columns:
        raise ValueError(f"group column {group!r} not in the rows (columns: {list(df.columns)})")
    known = df[~missing & ~is_missing(df[group])]
    if known.empty:
        return pd.Series([], dtype=object)
    group_split = known.groupby(known[group].astype(str))["split"].agg(lambda s: s.mode().iloc[0])
    pending = df[missing & ~is_missing(df[group])]
    return pending[group].astype(str).map(group_split).dropna()


def linked_units(df: pd.DataFrame, columns: Sequence[str] = (),
                 links: np.ndarray | None = None) -> pd.Series:
    """One unit key per row: rows sharing a value of any of ``columns`` (e.g. patient_id,
    lesion_id), or the same ``links`` number (e.g. near-duplicate groups), are one unit, also
    through chains (A shares a patient with B, B is a near-copy of C: A, B, C are one unit)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(df)
    # Rows are nodes 0..n-1; each (column, value) and each link number is one more node.
    edges_from, edges_to = [], []
    offset = n
    keys = [df[c] for c in columns if c in df.columns]
    if links is not None:
        keys.append(pd.Series(np.asarray(links), index=df.index))
    for values in keys:
        known = ~is_missing(values)
        codes, _ = pd.factorize(values[known].astype(str))
        edges_from.append(np.flatnonzero(known.to_numpy()))
        edges_to.append(codes + offset)
        offset += int(codes.max()) + 1 if codes.size else 0
    if not edges_from:
        return pd.Series([f"unit{i}" for i in range(n)], index=df.index, name="unit")
    rows, others = np.concatenate(edges_from), np.concatenate(edges_to)
    graph = coo_matrix((np.ones(rows.size), (rows, others)), shape=(offset, offset))
    _, labels = connected_components(graph, directed=False)
    return pd.Series([f"unit{label}" for label in labels[:n]], index=df.index, name="unit")


def fill_missing_splits(df: pd.DataFrame,
                        fractions: Mapping[str, float] | None = DEFAULT_FRACTIONS,
                        seed: int = 0, stratify: str | None = "label",
                        group: str | None = None) -> pd.DataFrame:
    """A copy of ``df`` whose empty ``split`` values are assigned; set splits are kept as they are.

    With ``group``, an unset row whose group already has a split joins that split.
    """
    fractions = check_fractions(fractions)
    out = df.copy()
    if "split" not in out.columns:
        out["split"] = None
    out["split"] = out["split"].astype(object)
    missing = is_missing(out["split"])
    if group is not None and missing.any():
        inherited = _inherited_splits(out, missing, group)
        out.loc[inherited.index, "split"] = inherited
        missing = is_missing(out["split"])
    if missing.any():
        out.loc[missing, "split"] = assign_splits(out[missing], fractions, seed, stratify, group)
    return out


# ------------------------------------------------------------- DermoSegDiff's fixed splits

SPLIT_POLICIES = ("manifest", "reference")
"""manifest: the manifest's ``split`` column. reference: DermoSegDiff's fixed index splits."""

REFERENCE_SPLIT_SIZES: Mapping[str, tuple[int, int, int]] = MappingProxyType({
    "isic2018": (1815, 259, 520),
    "ph2": (80, 20, 100),
    "ham10000": (7200, 1800, 1015),
})
"""(train, val, test) images of each dataset in the reference (src/datasets/*.py): the first
train images are ``train``, the next val ``val``, the rest ``test``."""

ISIC2018_TRAINING_FOLDER = "ISIC2018_Task1-2_Training_Input/"
"""The only ISIC 2018 folder the reference reads (it splits these 2594 images itself)."""


def file_name(uri: str) -> str:
    """The last part of a path or URI (``.../ISIC_0000000.jpg`` -> ``ISIC_0000000.jpg``)."""
    return str(uri).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


def reference_dataset(df: pd.DataFrame) -> tuple[str, pd.Index]:
    """Which of the reference's datasets ``df`` holds, told by its number of images, and the
    rows the reference splits (for ISIC 2018: those of its training folder)."""
    by_total = {sum(sizes): name for name, sizes in REFERENCE_SPLIT_SIZES.items()}
    if len(df) in by_total:
        return by_total[len(df)], df.index
    isic_training = df.index[df["image_uri"].astype(str).str.contains(ISIC2018_TRAINING_FOLDER,
                                                                      regex=False)]
    if len(isic_training) == sum(REFERENCE_SPLIT_SIZES["isic2018"]):
        return "isic2018", isic_training
    known = ", ".join(f"{name.upper()} {sum(sizes)}" for name, sizes in
                      REFERENCE_SPLIT_SIZES.items())
    raise ValueError(
        f"split_policy reference: the manifest has {len(df)} images ({len(isic_training)} in an "
        f"{ISIC2018_TRAINING_FOLDER} folder), but the reference splits whole datasets of "
        f"{known} images; import the complete dataset (ISIC 2018: its training folder), or use "
        "data.split_policy=manifest")


def _reference_order(names: pd.Series, order: Sequence[str], where: str) -> np.ndarray:
    """Positions that sort ``names`` (image file names) as ``order`` lists them."""
    listed = [file_name(line.strip()) for line in order
              if line.strip() and not line.lstrip().startswith("#")]
    twice = sorted(name for name, n in Counter(listed).items() if n > 1)
    if twice:
        raise ValueError(f"{where}: lists {len(twice)} file names more than once, e.g. "
                         f"{twice[:3]}")
    position = {name: i for i, name in enumerate(listed)}
    unlisted = names[~names.isin(position)]
    extra = sorted(set(listed) - set(names))
    if len(unlisted) or extra:
        raise ValueError(
            f"{where}: must list the {len(names)} images the reference splits, each once: "
            f"{len(unlisted)} are missing (e.g. {unlisted.head(3).tolist()}), {len(extra)} are "
            f"not in the manifest (e.g. {extra[:3]}); list them as the reference's glob did, "
            "e.g. python -c \"import glob; print(*glob.glob('DIR/*.jpg'), sep='\\n')\"")
    return np.argsort(names.map(position).to_numpy(), kind="stable")


def reference_splits(df: pd.DataFrame, order: Sequence[str] | None = None,
                     where: str = "reference order") -> pd.DataFrame:
    """``df`` with DermoSegDiff's splits: the images it reads, in file-name order (or in
    ``order``, a listing of their file names), first train, then val, then the rest test
    (``REFERENCE_SPLIT_SIZES``). Rows come back in that order; rows the reference does not
    read (ISIC 2018's official validation and test folders) follow with no split."""
    dataset, used = reference_dataset(df)
    rows = df.loc[used]
    names = rows["image_uri"].map(file_name)
    if order is None:
        keys = pd.DataFrame({"name": names.to_numpy(), "uri": rows["image_uri"].astype(str)})
        positions = np.lexsort((keys["uri"].to_numpy(), keys["name"].to_numpy()))
    else:
        positions = _reference_order(names.reset_index(drop=True), order, where)
    n_train, n_val, _ = REFERENCE_SPLIT_SIZES[dataset]
    split = np.full(len(rows), "test", dtype=object)
    split[:n_train], split[n_train:n_train + n_val] = "train", "val"
    ordered = rows.iloc[positions].assign(split=split)
    rest = df.drop(index=used).assign(split=None)
    return pd.concat([ordered, rest]).reset_index(drop=True)


def with_split_policy(manifest: Manifest, policy: str, order_uri: str = "") -> Manifest:
    """``manifest`` with the splits of ``policy`` (``SPLIT_POLICIES``): unchanged for
    ``manifest``; DermoSegDiff's fixed splits for ``reference`` (``reference_splits``, in the
    order of the file ``order_uri`` when given)."""
    if policy == "manifest":
        return manifest
    if policy != "reference":
        raise ValueError(f"data.split_policy {policy!r}: expected one of {list(SPLIT_POLICIES)}")
    order = None
    if order_uri:
        try:
            order = storage.read_bytes(order_uri).decode("utf-8").splitlines()
        except storage.StorageError as exc:
            raise ValueError(f"data.reference_order {order_uri}: cannot be read ({exc}); give "
                             "a text file of image file names, one per line") from None
    try:
        df = reference_splits(manifest.df, order, f"data.reference_order {order_uri}")
    except ValueError as exc:
        raise ValueError(f"{manifest.uri}: {exc}") from None
    return Manifest(df=df, uri=manifest.uri, version=manifest.version,
                    base_dir=manifest.base_dir, file_columns=manifest.file_columns)
