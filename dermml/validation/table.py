"""The tables a suite's expectations run over, with one column per cross-row rule.

``samples``: one row per manifest row (manifest columns + facts + rule columns such as
``exact_leak`` with its partner sample), so every rule, leakage included, is an ordinary
great-expectations column expectation. ``classes``: samples per split and label.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dermml.data.manifest import Manifest
from dermml.data.phash import hash_bits
from dermml.validation.suite import SuiteConfig

_NULLABLE = {"image_ok": "boolean", "mask_ok": "boolean", "mask_binary": "boolean",
             "mask_touches_border": "boolean", "file_size": "Int64", "channels": "Int64",
             "width": "Int64", "height": "Int64", "exif_orientation": "Int64",
             "mask_width": "Int64", "mask_height": "Int64", "mask_components": "Int64",
             "attribute_masks_bad": "Int64", "companions_bad": "Int64"}
_SIMILARITY_BLOCK = 8_000_000  # hash pairs compared per matrix product (32 MB of float32)


def samples_table(manifest: Manifest, facts: pd.DataFrame, suite: SuiteConfig,
                  leakage: bool = True) -> pd.DataFrame:
    """Manifest + facts + the columns of box and leakage rules; ``_row`` is the row position."""
    table = facts.astype(_NULLABLE)
    table.insert(0, "_row", np.arange(len(table)))
    table.attrs["file_columns"] = tuple(manifest.file_columns or manifest.df.columns)
    for column in manifest.df.columns:
        if column not in table.columns:
            table[column] = manifest.df[column].to_numpy()
    both = table["image_ok"] & table["mask_ok"]
    table["mask_size_matches"] = ((table["mask_width"] == table["width"])
                                  & (table["mask_height"] == table["height"])).where(both)
    if suite.boxes_inside_image.enabled or suite.boxes_positive_area.enabled:
        _add_box_columns(table, manifest.df["boxes"], suite)
    if leakage:
        rank = split_rank(table["split"], suite.split_order())
        _add_exact_leaks(table, rank)
        _add_exact_duplicates(table)
        _add_near_leaks(table, rank, suite.no_near_duplicates_across_splits.max_hamming)
        _add_group_leaks(table, rank, suite.no_group_across_splits.columns)
    return table


def split_rank(splits: pd.Series, order: list[str]) -> np.ndarray:
    """Leakage priority of each row's split: listed splits first, others by name; -1 = none."""
    known = {s: i for i, s in enumerate(order)}
    others = sorted(set(splits.dropna()) - set(known))
    known.update({s: len(order) + i for i, s in enumerate(others)})
    return splits.map(known).fillna(-1).astype(int).to_numpy()


# --------------------------------------------------------------------------- boxes


def _add_box_columns(table: pd.DataFrame, boxes: pd.Series, suite: SuiteConfig) -> None:
    tolerance = suite.boxes_inside_image.tolerance
    counts = np.zeros((len(table), 3), dtype=np.int64)  # boxes, outside, degenerate
    problems = [""] * len(table)
    widths, heights = table["width"].to_numpy(), table["height"].to_numpy()
    for i, value in enumerate(boxes):
        if value is None or (isinstance(value, float) and np.isnan(value)) or len(value) == 0:
            continue
        found = []
        for box in value:
            box = [float(v) for v in box]
            if len(box) != 4:
                counts[i, 2] += 1
                found.append(f"{box} does not have 4 numbers")
                continue
            x0, y0, a, b = box
            x1, y1 = (x0 + a, y0 + b) if suite.box_format == "xywh" else (a, b)
            if x1 <= x0 or y1 <= y0:
                counts[i, 2] += 1
                found.append(f"{box} has no area")
            if widths[i] is not pd.NA and (x0 < -tolerance or y0 < -tolerance
                                          or x1 > widths[i] + tolerance
                                          or y1 > heights[i] + tolerance):
                counts[i, 1] += 1
                found.append(f"{box} ({suite.box_format}) is outside the image")
        counts[i, 0] = len(value)
        problems[i] = "; ".join(found[:3]) + (" ..." if len(found) > 3 else "")
    table["n_boxes"], table["boxes_outside"], table["boxes_degenerate"] = counts.T
    table["box_problem"] = problems


# --------------------------------------------------------------------------- leakage


def _partner_columns(table: pd.DataFrame, prefix: str, leak: np.ndarray,
                     partner: np.ndarray) -> None:
    """``<prefix>`` flag plus the partner's sample id, split and file on leaking rows."""
    table[prefix] = pd.array(leak, dtype="boolean")
    for column, source in (("partner", "sample_id"), ("split", "split"), ("file", "image_uri")):
        values = table[source].to_numpy(dtype=object)[np.maximum(partner, 0)]
        table[f"{prefix}_{column}"] = np.where(leak, values, None)


def _add_exact_leaks(table: pd.DataFrame, rank: np.ndarray) -> None:
    """Rows whose file bytes equal a row's in an earlier split."""
    # Undecodable files (empty ones share a hash) are reported by image_decodable instead.
    valid = table["sha256"].notna().to_numpy() & table["image_ok"].to_numpy(bool) & (rank >= 0)
    first = (pd.DataFrame({"sha": table["sha256"].to_numpy()[valid], "rank": rank[valid],
                           "row": np.flatnonzero(valid)})
             .sort_values(["rank", "row"]).drop_duplicates("sha").set_index("sha")["row"])
    partner = np.full(len(table), -1)
    partner[valid] = first.reindex(table["sha256"].to_numpy()[valid]).to_numpy()
    leak = valid & (partner >= 0) & (rank > rank[np.maximum(partner, 0)])
    _partner_columns(table, "exact_leak", leak, partner)


def _add_exact_duplicates(table: pd.DataFrame) -> None:
    """Rows whose file bytes equal an earlier row's in the same split (counted twice)."""
    valid = table["sha256"].notna().to_numpy() & table["image_ok"].to_numpy(bool)
    rows = np.flatnonzero(valid)
    sub = pd.DataFrame({"split": table["split"].to_numpy(dtype=object)[rows],
                        "sha": table["sha256"].to_numpy(dtype=object)[rows], "row": rows})
    partner = np.full(len(table), -1)
    partner[rows] = sub.groupby(["split", "sha"], dropna=False)["row"].transform("min")
    duplicate = valid & (partner >= 0) & (partner != np.arange(len(table)))
    _partner_columns(table, "exact_dup", duplicate, partner)


def _add_near_leaks(table: pd.DataFrame, rank: np.ndarray, max_hamming: int) -> None:
    """Rows whose perceptual hash is within ``max_hamming`` bits of a row's in an earlier split."""
    valid = table["phash"].notna().to_numpy() & (rank >= 0)
    rows = np.flatnonzero(valid)
    partner = np.full(len(table), -1)
    distance = np.full(len(table), -1)
    if rows.size:
        signs = hash_bits(table["phash"].to_numpy()[rows])
        n_bits = signs.shape[1]
        for r in np.unique(rank[rows]):
            queries, refs = np.flatnonzero(rank[rows] == r), np.flatnonzero(rank[rows] < r)
            if not refs.size:
                continue
            chunk = max(1, _SIMILARITY_BLOCK // refs.size)
            for start in range(0, queries.size, chunk):
                q = queries[start:start + chunk]
                agree = signs[q] @ signs[refs].T  # n_bits - 2 * hamming
                best = agree.argmax(axis=1)
                partner[rows[q]] = rows[refs[best]]
                distance[rows[q]] = np.rint((n_bits - agree[np.arange(q.size), best]) / 2)
    leak = (partner >= 0) & (distance <= max_hamming) & ~table["exact_leak"].to_numpy(bool)
    _partner_columns(table, "near_leak", leak, partner)
    table["near_leak_distance"] = pd.Series(distance, dtype="Int64").where(leak)


def _add_group_leaks(table: pd.DataFrame, rank: np.ndarray, columns: list[str]) -> None:
    """Rows of a patient/lesion whose samples sit mostly (or first) in another split."""
    details = pd.Series("", index=table.index, dtype=object)
    for column in columns:
        if column not in table.columns:
            continue
        sub = pd.DataFrame({"id": table[column], "split": table["split"], "rank": rank,
                            "sample_id": table["sample_id"]})
        sub = sub[sub["id"].notna() & (sub["rank"] >= 0)]
        per_split = (sub.groupby(["id", "split", "rank"], sort=False)
                     .agg(n=("sample_id", "size"), example=("sample_id", "first")).reset_index())
        spread = per_split.groupby("id")["split"].transform("size") > 1
        per_split = per_split[spread]
        if per_split.empty:
            continue
        home = (per_split.sort_values(["id", "n", "rank"], ascending=[True, False, True])
                .drop_duplicates("id").set_index("id"))
        ids = sub["id"]
        in_home = home.reindex(ids.to_numpy())
        leaking = in_home["split"].notna().to_numpy() & (
            in_home["split"].to_numpy() != sub["split"].to_numpy())
        for index, pid, split_here, home_split, example in zip(
                sub.index[leaking], ids[leaking], sub["split"][leaking],
                in_home["split"][leaking], in_home["example"][leaking], strict=True):
            text = (f"{column} {pid} is also in split {home_split!r} (e.g. {example}); this "
                    f"sample is in {split_here!r}: leakage")
            details[index] = f"{details[index]}; {text}" if details[index] else text
    table["group_leak"] = pd.array(details.to_numpy() != "", dtype="boolean")
    table["group_leak_detail"] = details.to_numpy()


# --------------------------------------------------------------------------- classes


def classes_table(samples: pd.DataFrame) -> pd.DataFrame:
    """Samples per (split, label) for every split and label seen, zeros included."""
    sub = samples[["split", "label"]].dropna()
    if sub.empty:
        return pd.DataFrame({"split": pd.Series(dtype=str), "label": pd.Series(dtype=str),
                             "count": pd.Series(dtype="int64"),
                             "share_of_largest": pd.Series(dtype=float)})
    counts = pd.crosstab(sub["split"], sub["label"]).stack().rename("count").reset_index()
    largest = counts.groupby("split")["count"].transform("max")
    counts["share_of_largest"] = counts["count"] / largest
    return counts
