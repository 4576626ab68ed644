"""Split assignment: seeded, stratified, group-level, and never touching splits already set."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dermml.data.splits import assign_splits, check_fractions, fill_missing_splits


def _rows(n_per_label: dict[str, int], rows_per_patient: int = 1) -> pd.DataFrame:
    labels = [label for label, n in n_per_label.items() for _ in range(n)]
    return pd.DataFrame({
        "sample_id": [f"s{i:04d}" for i in range(len(labels))],
        "label": labels,
        "patient_id": [f"p{i // rows_per_patient:04d}" for i in range(len(labels))],
    })


def test_same_seed_gives_same_splits_and_another_seed_differs():
    df = _rows({"nevus": 60, "melanoma": 40})
    first = assign_splits(df, seed=3)
    assert first.equals(assign_splits(df, seed=3))
    assert not first.equals(assign_splits(df, seed=4))


def test_splits_do_not_depend_on_row_order():
    df = _rows({"nevus": 30, "melanoma": 20})
    shuffled = df.sample(frac=1, random_state=1)
    assert assign_splits(shuffled, seed=0).sort_index().equals(assign_splits(df, seed=0))


def test_splits_are_stratified_by_label_with_requested_fractions():
    df = _rows({"nevus": 200, "melanoma": 100})
    counts = pd.crosstab(assign_splits(df), df["label"])
    assert counts.loc["train", "nevus"] == 140 and counts.loc["train", "melanoma"] == 70
    assert counts.loc["val", "nevus"] == 30 and counts.loc["test", "melanoma"] == 15


def test_every_split_gets_a_rare_class_when_it_has_enough_samples():
    df = _rows({"nevus": 50, "melanoma": 3, "seborrheic_keratosis": 1})
    splits = assign_splits(df)
    assert set(splits[df["label"] == "melanoma"]) == {"train", "val", "test"}
    assert set(splits[df["label"] == "seborrheic_keratosis"]) == {"train"}


def test_group_split_never_puts_one_patient_in_two_splits():
    df = _rows({"nevus": 90, "melanoma": 60}, rows_per_patient=3)
    splits = assign_splits(df, group="patient_id", seed=7)
    assert df.assign(split=splits).groupby("patient_id")["split"].nunique().max() == 1
    assert set(splits) == {"train", "val", "test"}


def test_group_split_stratifies_by_each_groups_majority_label():
    df = pd.DataFrame({"sample_id": [f"s{i}" for i in range(30)],
                       "patient_id": [f"p{i // 2}" for i in range(30)],
                       "label": ["melanoma", "nevus"] * 3 + ["nevus"] * 24})
    splits = assign_splits(df, group="patient_id")
    melanoma_patients = df.assign(split=splits)[df["label"] == "melanoma"]
    assert set(melanoma_patients["split"]) == {"train", "val", "test"}


def test_rows_without_a_group_value_are_split_one_by_one():
    df = _rows({"nevus": 20})
    df["patient_id"] = None
    with pytest.warns(UserWarning, match="empty for every row"):
        splits = assign_splits(df, group="patient_id")
    assert set(splits) == {"train", "val", "test"}


def test_missing_group_column_is_a_clear_error():
    with pytest.raises(ValueError, match="'lesion_id' not in the rows"):
        assign_splits(_rows({"nevus": 5}), group="lesion_id")


def test_without_a_label_column_splits_follow_fractions():
    df = _rows({"x": 100}).drop(columns="label")
    assert assign_splits(df, {"train": 0.8, "test": 0.2}).value_counts().to_dict() == {
        "train": 80, "test": 20}


def test_fill_missing_splits_keeps_preset_splits():
    df = _rows({"nevus": 40, "melanoma": 20})
    df["split"] = None
    df.loc[:9, "split"] = "external_test"
    filled = fill_missing_splits(df, seed=1)
    assert (filled.loc[:9, "split"] == "external_test").all()
    assert set(filled.loc[10:, "split"]) == {"train", "val", "test"}
    assert df.loc[10:, "split"].isna().all()  # the input frame is left as it was


def test_fill_missing_splits_puts_new_rows_of_a_known_patient_in_its_split():
    df = _rows({"nevus": 12}, rows_per_patient=4)
    df["split"] = [None, None, "test", None] + [None] * 8
    filled = fill_missing_splits(df, group="patient_id")
    assert (filled.loc[:3, "split"] == "test").all()


def test_fill_missing_splits_adds_a_split_column_when_absent():
    assert fill_missing_splits(_rows({"nevus": 10}))["split"].notna().all()


def test_empty_rows_get_an_empty_split_series():
    assert assign_splits(_rows({})).empty


@pytest.mark.parametrize("fractions, message", [
    ({"train": 0.7, "val": 0.2}, "sum to 1"),
    ({"train": 1.2, "val": -0.2}, "must be a number > 0"),
    ({"train": 1.0, "val": 0.0}, "must be a number > 0"),
    ({"train": "most", "val": 0.1}, "must be a number > 0"),
    ({}, "must map split names"),
])
def test_bad_fractions_are_rejected(fractions, message):
    with pytest.raises(ValueError, match=message):
        assign_splits(_rows({"nevus": 10}), fractions)
    with pytest.raises(ValueError, match=message):
        check_fractions(fractions)


def test_linked_units_join_rows_through_shared_ids_and_near_duplicate_links():
    from dermml.data.splits import linked_units

    df = pd.DataFrame({"sample_id": list("abcdef"),
                       "patient_id": ["p1", "p1", None, None, "p2", ""],
                       "lesion_id": [None, "l1", "l1", None, None, None]})
    # a-b share a patient, b-c a lesion, c-d are near-duplicates (link 7); e and f stand alone.
    units = linked_units(df, ["patient_id", "lesion_id"], np.array([0, 1, 7, 7, 4, 5]))
    assert units.iloc[0] == units.iloc[1] == units.iloc[2] == units.iloc[3]
    assert len({units.iloc[0], units.iloc[4], units.iloc[5]}) == 3
    alone = linked_units(df, [])
    assert alone.nunique() == len(df)


# --- DermoSegDiff's fixed index splits (data.split_policy: reference) ------------------------

def _dataset(n: int, folder: str, prefix: str = "ISIC_", ext: str = "jpg",
             seed: int = 0) -> pd.DataFrame:
    """``n`` images named like the dataset's files, in a scrambled row order."""
    import numpy as np

    ids = [f"{prefix}{i:07d}" for i in np.random.default_rng(seed).permutation(n)]
    return pd.DataFrame({"sample_id": ids, "image_uri": [f"{folder}/{i}.{ext}" for i in ids],
                         "split": "train"})


@pytest.mark.parametrize("n, sizes, folder, prefix, ext", [
    (2594, (1815, 259, 520), "ISIC2018_Task1-2_Training_Input", "ISIC_", "jpg"),
    (200, (80, 20, 100), "PH2 Dataset images/x", "IMD", "bmp"),
    (10015, (7200, 1800, 1015), "HAM10000/images", "ISIC_", "jpg"),
])
def test_reference_splits_slice_the_file_name_order_at_the_reference_boundaries(
        n, sizes, folder, prefix, ext):
    from dermml.data.splits import reference_splits

    out = reference_splits(_dataset(n, folder, prefix, ext))
    names = [f"{prefix}{i:07d}.{ext}" for i in range(n)]  # sorted file names
    assert out["image_uri"].str.rsplit("/", n=1).str[-1].tolist() == names
    n_train, n_val, n_test = sizes
    assert out["split"].tolist() == ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    assert out.loc[n_train, "sample_id"] == f"{prefix}{n_train:07d}"  # first val image
    assert out.loc[n_train + n_val, "sample_id"] == f"{prefix}{n_train + n_val:07d}"


def test_reference_splits_follow_a_listing_in_the_reference_glob_order():
    import numpy as np

    from dermml.data.splits import reference_splits

    df = _dataset(200, "trainx", "IMD", "bmp")
    listing = [f"/data/PH2/trainx/IMD{i:07d}.bmp"
               for i in np.random.default_rng(5).permutation(200)]
    out = reference_splits(df, ["# glob order", *listing, ""])
    assert out["image_uri"].str.rsplit("/", n=1).str[-1].tolist() == [
        p.rsplit("/", 1)[-1] for p in listing]
    assert (out["split"].iloc[:80] == "train").all() and (out["split"].iloc[100:] == "test").all()
    with pytest.raises(ValueError, match="1 are missing.*IMD.*1 are not in the manifest"):
        reference_splits(df, [*listing[:-1], "IMD9999999.bmp"])
    with pytest.raises(ValueError, match="more than once"):
        reference_splits(df, [*listing, listing[0]])


def test_isic2018_official_holdout_folders_are_left_out_and_other_sizes_refused():
    from dermml.data.splits import reference_splits

    training = _dataset(2594, "ISIC2018_Task1-2_Training_Input")
    holdout = _dataset(100, "ISIC2018_Task1-2_Validation_Input", prefix="ISIC_9")
    out = reference_splits(pd.concat([holdout, training], ignore_index=True))
    assert out["split"].value_counts().to_dict() == {"train": 1815, "val": 259, "test": 520}
    assert out["split"].iloc[2594:].isna().all()
    assert out["image_uri"].iloc[2594:].str.contains("Validation").all()
    with pytest.raises(ValueError, match=r"2593 images.*ISIC2018 2594, PH2 200, HAM10000 10015"):
        reference_splits(training.iloc[1:])


def test_task_config_split_policy_reference_gives_training_and_evaluation_the_fixed_splits(
        tmp_path):
    from dermml.data.manifest import write_manifest
    from dermml.tasks.base import read_task_manifest
    from dermml.tasks.segdiff import SegDiffConfig

    df = _dataset(200, "trainx", "IMD", "bmp")
    write_manifest(df, str(tmp_path / "ph2.parquet"))
    listing = tmp_path / "order.txt"
    listing.write_text("\n".join(sorted(df["image_uri"], reverse=True)))
    cfg = SegDiffConfig.model_validate({"data": {"manifest": str(tmp_path / "ph2.parquet")}})
    assert cfg.data.split_policy == "manifest"  # the default: the manifest's own splits
    assert set(read_task_manifest(cfg).df["split"]) == {"train"}
    cfg = SegDiffConfig.model_validate({"data": {"manifest": str(tmp_path / "ph2.parquet"),
                                                 "split_policy": "reference",
                                                 "reference_order": str(listing)}})
    manifest = read_task_manifest(cfg)
    assert manifest.split("test")["sample_id"].tolist() == [f"IMD{i:07d}" for i in
                                                             range(99, -1, -1)]
    assert len(manifest.split("train")) == 80 and len(manifest.split("val")) == 20
    with pytest.raises(ValueError, match="data.reference_order .*nope.txt.*cannot be read"):
        read_task_manifest(cfg.model_copy(update={"data": cfg.data.model_copy(
            update={"reference_order": str(tmp_path / "nope.txt")})}))
