"""Classification, HD95, attribute and bootstrap metrics on known and hand-computed cases."""

import math

import numpy as np
import pytest

from dermml.metrics.attributes import per_class_auc, per_class_jaccard
from dermml.metrics.bootstrap import bootstrap_ci, bootstrap_metrics, mean_ci
from dermml.metrics.classification import classification_metrics, confusion_matrix
from dermml.metrics.segmentation import hd95, mean_scores, segmentation_scores

NAMES = ["nevus", "melanoma", "bkl"]


def square(size=32, top=8, left=8, side=10):
    m = np.zeros((size, size), bool)
    m[top:top + side, left:left + side] = True
    return m


# --- classification -------------------------------------------------------------------------


def hand_example():
    """6 samples, 3 classes. Predictions (argmax): 0 0 1 1 2 0 for labels 0 0 1 1 2 2."""
    y = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array([
        [0.8, 0.1, 0.1],
        [0.6, 0.3, 0.1],
        [0.2, 0.7, 0.1],
        [0.3, 0.6, 0.1],
        [0.1, 0.2, 0.7],
        [0.5, 0.1, 0.4],  # a bkl called nevus
    ])
    return y, probs


def test_confusion_matrix_rows_are_truth_columns_predictions():
    cm = confusion_matrix(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 0]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]


def test_confusion_matrix_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match="label 3 is outside 0..2"):
        confusion_matrix(np.array([3]), np.array([0]), 3)


def test_classification_metrics_hand_example():
    y, probs = hand_example()
    m = classification_metrics(y, probs, NAMES)
    assert m["accuracy"] == pytest.approx(5 / 6)
    # recalls: nevus 2/2, melanoma 2/2, bkl 1/2
    assert m["balanced_accuracy"] == pytest.approx((1 + 1 + 0.5) / 3)
    # nevus: tp 2, fp 1, fn 0 -> precision 2/3, F1 = 4/5; bkl: tp 1, fp 0, fn 1 -> F1 = 2/3
    assert m["precision/nevus"] == pytest.approx(2 / 3)
    assert m["f1/nevus"] == pytest.approx(4 / 5)
    assert m["recall/bkl"] == pytest.approx(0.5)
    assert m["f1/bkl"] == pytest.approx(2 / 3)
    assert m["macro_f1"] == pytest.approx((4 / 5 + 1 + 2 / 3) / 3)
    # nevus specificity: of 4 non-nevus samples, 1 called nevus -> 3/4
    assert m["specificity/nevus"] == pytest.approx(3 / 4)
    # melanoma scores: positives 0.7, 0.6; negatives 0.1 0.3 0.2 0.1 -> perfectly ranked
    assert m["roc_auc/melanoma"] == pytest.approx(1.0)
    # bkl scores: positives 0.7, 0.4; negatives all 0.1 -> perfectly ranked
    assert m["roc_auc/bkl"] == pytest.approx(1.0)
    # nevus: positives 0.8, 0.6; negatives 0.2 0.3 0.1 0.5 -> perfectly ranked
    assert m["roc_auc_macro"] == pytest.approx(1.0)


def test_auc_of_a_perfect_scorer_is_one():
    y = np.repeat([0, 1, 2], 4)
    probs = np.eye(3)[y] * 0.9 + 0.05
    m = classification_metrics(y, probs, NAMES)
    assert m["roc_auc_macro"] == 1.0 and m["accuracy"] == 1.0 and m["macro_f1"] == 1.0


def test_auc_of_an_inverted_scorer_is_zero():
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.2, 0.8], [0.3, 0.7], [0.9, 0.1], [0.6, 0.4]])
    assert classification_metrics(y, probs, ["a", "b"])["roc_auc_macro"] == 0.0


def test_class_absent_from_labels_is_nan_and_skipped_in_macro_averages():
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1]])
    m = classification_metrics(y, probs, NAMES)
    assert math.isnan(m["roc_auc/bkl"]) and math.isnan(m["recall/bkl"])
    assert math.isnan(m["f1/bkl"]) and math.isnan(m["precision/bkl"])
    assert m["roc_auc_macro"] == 1.0 and m["macro_f1"] == 1.0 and m["balanced_accuracy"] == 1.0


def test_classification_metrics_shape_mismatch_names_the_classes():
    with pytest.raises(ValueError, match="do not match 3 classes"):
        classification_metrics(np.array([0, 1]), np.ones((2, 2)) / 2, NAMES)


# --- HD95 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 5])
def test_hd95_of_squares_offset_by_k_pixels_is_k(k):
    assert hd95(square(left=8 + k), square()) == pytest.approx(k)


def test_hd95_scales_with_spacing():
    assert hd95(square(left=11), square(), spacing=0.5) == pytest.approx(1.5)


def test_hd95_of_a_perfect_prediction_is_zero():
    assert hd95(square(), square()) == 0.0


def test_hd95_of_two_empty_masks_is_zero_and_of_one_empty_mask_is_nan():
    empty = np.zeros((16, 16), bool)
    assert hd95(empty, empty) == 0.0
    assert math.isnan(hd95(empty, square(16, 2, 2, 4)))
    assert math.isnan(hd95(square(16, 2, 2, 4), empty))


def test_hd95_of_disjoint_one_pixel_masks_is_their_distance():
    a, b = np.zeros((20, 20), bool), np.zeros((20, 20), bool)
    a[2, 2], b[5, 6] = True, True
    assert hd95(a, b) == pytest.approx(5.0)


def test_hd95_counts_the_image_edge_as_boundary():
    # a lesion cut by the image border: its border pixels are on the edge, distance 0 both ways
    full = np.ones((8, 8), bool)
    assert hd95(full, full) == 0.0
    assert hd95(full[:, :7].copy(), full[:, :7].copy()) == 0.0


# --- attributes -----------------------------------------------------------------------------


def test_per_class_jaccard_sums_intersections_and_unions_over_the_dataset():
    t1 = np.array([[1, 1, 0], [0, 2, 2]])
    p1 = np.array([[1, 0, 0], [0, 2, 2]])  # class 1: I 1, U 2; class 2: I 2, U 2
    t2 = np.array([[0, 0, 0], [0, 0, 0]])
    p2 = np.array([[1, 0, 0], [0, 0, 0]])  # class 1: I 0, U 1 (a false positive)
    j = per_class_jaccard([p1, p2], [t1, t2], n_classes=4)
    assert j[1] == pytest.approx((1 + 0) / (2 + 1))
    assert j[2] == pytest.approx(1.0)
    assert math.isnan(j[3])  # in no target and no prediction
    assert 0 not in j


def test_per_class_jaccard_of_disjoint_masks_is_zero():
    t = np.array([[1, 1, 0, 0]])
    p = np.array([[0, 0, 1, 1]])
    assert per_class_jaccard([p], [t], n_classes=2) == {1: 0.0}


def test_per_class_jaccard_rejects_labels_beyond_n_classes():
    with pytest.raises(ValueError, match="prediction 0 has label 5"):
        per_class_jaccard([np.array([[5]])], [np.array([[0]])], n_classes=3)


def attribute_maps(seed=0, n=3, size=16):
    rng = np.random.default_rng(seed)
    targets = [rng.integers(0, 3, (size, size)) for _ in range(n)]
    return targets, rng


def test_per_class_auc_of_a_perfect_scorer_is_one():
    targets, _ = attribute_maps()
    probs = [np.eye(3)[t].transpose(2, 0, 1) for t in targets]
    assert per_class_auc(probs, targets, 3) == {1: 1.0, 2: 1.0}


def test_per_class_auc_subsample_is_seeded_and_close_to_the_full_value():
    targets, rng = attribute_maps(n=4, size=64)
    probs = [np.eye(3)[t].transpose(2, 0, 1) + rng.normal(0, 0.8, (3, *t.shape))
             for t in targets]
    full = per_class_auc(probs, targets, 3, ignore=())
    sampled = per_class_auc(probs, targets, 3, max_pixels=4000, seed=1, ignore=())
    assert sampled == per_class_auc(probs, targets, 3, max_pixels=4000, seed=1, ignore=())
    assert sampled != full
    for c in range(3):
        assert sampled[c] == pytest.approx(full[c], abs=0.03)


def test_per_class_auc_of_an_absent_class_is_nan():
    targets = [np.zeros((4, 4), int)]
    targets[0][0, 0] = 1
    probs = [np.random.default_rng(0).random((3, 4, 4))]
    auc = per_class_auc(probs, targets, 3)
    assert not math.isnan(auc[1]) and math.isnan(auc[2])


# --- bootstrap ------------------------------------------------------------------------------


def test_bootstrap_ci_contains_the_point_estimate():
    values = np.random.default_rng(0).normal(0.8, 0.1, 50)
    point, lo, hi = mean_ci(values)
    assert point == pytest.approx(values.mean())
    assert lo < point < hi


def test_bootstrap_ci_narrows_with_more_samples():
    rng = np.random.default_rng(0)
    _, lo_small, hi_small = mean_ci(rng.normal(0, 1, 20))
    _, lo_big, hi_big = mean_ci(rng.normal(0, 1, 2000))
    assert hi_big - lo_big < (hi_small - lo_small) / 4


def test_bootstrap_ci_is_deterministic_by_seed():
    values = np.random.default_rng(0).random(30)
    assert mean_ci(values, seed=3) == mean_ci(values, seed=3)
    assert mean_ci(values, seed=3) != mean_ci(values, seed=4)


def test_mean_ci_equals_the_generic_bootstrap_of_the_mean():
    values = np.random.default_rng(0).random(31)
    generic = bootstrap_ci(lambda i: values[i].mean(), len(values), n_resamples=200, seed=5)
    assert mean_ci(values, n_resamples=200, seed=5) == pytest.approx(generic)


def test_bootstrap_ci_of_a_constant_is_a_point():
    assert mean_ci(np.full(10, 0.7)) == pytest.approx((0.7, 0.7, 0.7))


def test_bootstrap_ci_skips_resamples_where_the_statistic_is_nan():
    # AUC-like statistic: undefined when a resample has only one class
    labels = np.array([0, 1, 1, 1, 1, 1, 1, 1])

    def share_of_first_class(idx):
        counts = np.bincount(labels[idx], minlength=2)
        return np.nan if counts[0] == 0 else counts[0] / len(idx)

    point, lo, hi = bootstrap_ci(share_of_first_class, len(labels), seed=0)
    assert point == pytest.approx(1 / 8)
    assert not math.isnan(lo) and lo >= 1 / 8 and hi > lo


def test_mean_ci_drops_nan_values():
    assert mean_ci(np.array([1.0, np.nan, 1.0])) == pytest.approx((1.0, 1.0, 1.0))
    assert all(math.isnan(v) for v in mean_ci(np.array([np.nan])))


def test_bootstrap_metrics_gives_each_metric_the_interval_of_bootstrap_ci():
    values = np.random.default_rng(0).random(25)
    intervals = bootstrap_metrics(
        lambda i: {"mean": values[i].mean(), "max": values[i].max()}, len(values),
        n_resamples=300, seed=2)
    _, lo, hi = bootstrap_ci(lambda i: values[i].mean(), len(values), n_resamples=300, seed=2)
    assert intervals["mean"] == pytest.approx((lo, hi))
    assert intervals["max"][1] == pytest.approx(values.max())


def test_bootstrap_metrics_skips_resamples_missing_a_metric():
    labels = np.array([0, 1, 1, 1, 1, 1, 1, 1])

    def scores(idx):
        counts = np.bincount(labels[idx], minlength=2)
        return {"share0": counts[0] / len(idx)} if counts[0] else {}

    low, high = bootstrap_metrics(scores, len(labels), seed=0)["share0"]
    assert low >= 1 / 8 and high > low


def test_attributes_training_validation_and_evaluation_agree_on_jaccard_and_on_absent_classes():
    """Three copies once disagreed on a class that occurs nowhere (0.0 vs NaN): one definition
    now serves the metric function, the task's validation and its evaluation aggregate."""
    import torch

    from dermml.metrics.attributes import mean_jaccard
    from dermml.tasks.attributes import AttributesTask

    target = np.zeros((1, 8, 8), np.int64)
    target[0, :4, :4] = 1  # class 1 present, classes 2 and 3 absent everywhere
    logits = torch.full((1, 4, 8, 8), -5.0)
    logits[:, 0] = 0.0
    logits[0, 1, :4, :6] = 5.0  # class 1 predicted over 24 px, 16 of them right
    task = AttributesTask()
    scores = task.validate(lambda x: logits, [(torch.zeros(1, 3, 8, 8), torch.from_numpy(target))],
                           "cpu")
    reference = per_class_jaccard([logits[0].argmax(0).numpy()], [target[0]], n_classes=4)
    assert reference[1] == pytest.approx(16 / 24) and np.isnan(reference[2])
    assert scores == {"jaccard_1": pytest.approx(16 / 24), "mean_jaccard": pytest.approx(16 / 24)}
    assert mean_jaccard(reference) == pytest.approx(16 / 24)
    assert np.isnan(mean_jaccard({1: float("nan")}))


# --- the reference's pooled metrics (DermoSegDiff's src/metrics.py + src/testing.py) ---------


def test_reference_pooled_scores_hand_example():
    from dermml.metrics.segmentation import reference_pooled_scores

    # tp 30, fp 10, fn 20, tn 40 pixels over a whole test set
    scores = reference_pooled_scores(30, 10, 20, 40)
    expected = {"f1": 60 / 90, "dice": 60 / 90, "accuracy": 0.7, "precision": 0.75,
                "specificity": 0.8, "recall": 0.6, "jaccard": 0.5}
    assert scores == pytest.approx(expected)


def test_reference_pooled_scores_are_zero_where_torchmetrics_divides_by_zero():
    from dermml.metrics.segmentation import reference_pooled_scores

    # no lesion anywhere, none predicted (torchmetrics 1.1 gives exactly these)
    assert reference_pooled_scores(0, 0, 0, 16) == {
        "f1": 0.0, "dice": 0.0, "accuracy": 1.0, "precision": 0.0, "specificity": 1.0,
        "recall": 0.0, "jaccard": 0.0}
    assert reference_pooled_scores(16, 0, 0, 0)["specificity"] == 0.0


@pytest.mark.parametrize("shape", [(767, 1022), (128, 128), (50, 70), (129, 255)])
def test_nearest_resize_picks_the_pixels_torch_interpolate_picks(shape):
    import torch

    from dermml.metrics.segmentation import nearest_resize

    mask = np.random.default_rng(0).random(shape) > 0.5
    expected = torch.nn.functional.interpolate(torch.from_numpy(mask)[None, None].float(),
                                               size=(128, 128), mode="nearest")[0, 0].bool()
    assert np.array_equal(nearest_resize(mask, 128), expected.numpy())


def test_reference_confusion_counts_pixels_at_128():
    from dermml.metrics.segmentation import reference_confusion

    truth = square(256, top=40, left=40, side=20)  # 10 x 10 at 128
    pred = square(256, top=40, left=60, side=20)  # beside it, touching: no overlap
    assert reference_confusion(pred, truth) == (0, 100, 100, 128 * 128 - 200)
    assert reference_confusion(truth, truth) == (100, 0, 0, 128 * 128 - 100)


def test_segmentation_evaluation_reports_pooled_ref_metrics_beside_per_image_ones(tmp_path):
    import pandas as pd

    from dermml.data.images import encode_png
    from dermml.data.manifest import Manifest
    from dermml.tasks import get_task

    # Image a: lesion 20 x 20, predicted exactly. Image b: lesion 10 x 10, prediction shifted
    # right by 5 (tp 50, fp 50, fn 50). Both at 128 x 128, so nothing is resized.
    truths = [square(128, 10, 10, 20), square(128, 60, 60, 10)]
    preds = [truths[0], square(128, 60, 65, 10)]
    for name, truth in zip("ab", truths, strict=True):
        (tmp_path / f"{name}.png").write_bytes(encode_png(truth))
    rows = pd.DataFrame({"sample_id": ["a", "b"], "mask_uri": ["a.png", "b.png"]})
    manifest = Manifest(df=rows, uri=str(tmp_path / "manifest.parquet"), version="v",
                        base_dir=str(tmp_path))
    task = get_task("segmentation")
    summary = task.aggregate(task.score(preds, rows, manifest))
    tp, fp, fn = 400 + 50, 50, 50
    tn = 2 * 128 * 128 - tp - fp - fn
    assert summary["pooled_ref_dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert summary["pooled_ref_f1"] == summary["pooled_ref_dice"]
    assert summary["pooled_ref_jaccard"] == pytest.approx(tp / (tp + fp + fn))
    assert summary["pooled_ref_precision"] == pytest.approx(tp / (tp + fp))
    assert summary["pooled_ref_recall"] == pytest.approx(tp / (tp + fn))
    assert summary["pooled_ref_specificity"] == pytest.approx(tn / (tn + fp))
    assert summary["pooled_ref_accuracy"] == pytest.approx((tp + tn) / (2 * 128 * 128))
    assert summary["dice"] == pytest.approx((1.0 + 0.5) / 2)  # per-image mean: not the same
    assert summary["pooled_ref_dice"] == pytest.approx(0.9)


# --- segmentation scores on known cases ---------------------------------------------------


def square_mask(size=8, lo=2, hi=6):
    m = np.zeros((size, size), bool)
    m[lo:hi, lo:hi] = True
    return m


def test_perfect_prediction_scores_one():
    s = segmentation_scores(square_mask(), square_mask())
    assert s == pytest.approx({"dice": 1, "iou": 1, "sensitivity": 1, "specificity": 1,
                               "precision": 1, "accuracy": 1})


def test_disjoint_prediction_scores_zero_overlap():
    pred = np.zeros((8, 8), bool)
    pred[0, 0] = True
    s = segmentation_scores(pred, square_mask())
    assert s["dice"] == 0 and s["iou"] == 0 and s["sensitivity"] == 0 and s["precision"] == 0


def test_empty_prediction_of_empty_mask_is_perfect():
    empty = np.zeros((4, 4), bool)
    assert segmentation_scores(empty, empty)["dice"] == 1.0


def test_half_overlap_matches_hand_computation():
    truth = square_mask(8, 0, 4)  # 16 px
    pred = np.zeros((8, 8), bool)
    pred[0:4, 2:6] = True  # 16 px, 8 overlapping
    s = segmentation_scores(pred, truth)
    assert s["dice"] == pytest.approx(2 * 8 / 32)
    assert s["iou"] == pytest.approx(8 / 24)
    assert s["specificity"] == pytest.approx(40 / 48)
    assert s["precision"] == pytest.approx(8 / 16)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        segmentation_scores(np.zeros((3, 3), bool), np.zeros((4, 4), bool))


def test_mean_scores_average_per_image():
    assert mean_scores([{"dice": 1.0}, {"dice": 0.0}])["dice"] == 0.5
