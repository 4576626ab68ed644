"""Supervised tasks end to end on demo data: they learn, evaluate with CIs, serve, relabel, CV."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_overrides
from mlflow.tracking import MlflowClient

from dermml.data.images import load_image
from dermml.data.manifest import read_manifest, write_manifest
from dermml.orchestration import tracking
from dermml.tasks import get_task
from dermml.training.inputs import training_inputs
from dermml.training.run import resolve_config, train
from dermml.training.setup import build_parts, run_loop

TASK_OVERRIDES = {
    "classification": ["model.backbone=resnet10t", "train.lr=0.003", "data.image_size=32",
                       "augment.flips=true"],
    "segmentation": [],
    "attributes": ["model.arch=small_unet", "model.base_channels=16", "model.depth=2",
                   "train.epochs=20", "data.batch_size=4",
                   "train.lr=0.01"],
}


def task_cfg(task_name: str, manifest: str, epochs: int, *extra: str):
    common = [o for o in tiny_overrides(manifest, epochs)
              if task_name == "segmentation" or not o.startswith("model.")]
    overrides = common + TASK_OVERRIDES[task_name] + list(extra)
    return resolve_config(task_name, None, overrides)


@pytest.mark.parametrize("task_name", ["classification", "segmentation", "attributes"])
def test_training_improves_the_validation_gate_metric(task_name, demo_data):
    task = get_task(task_name)
    cfg = task.prepare(task_cfg(task_name, demo_data, 8), read_manifest(demo_data))
    parts = build_parts(training_inputs(task, cfg))
    parts.model.eval()
    with torch.no_grad():
        untrained = task.validate(parts.model, parts.val_loader, torch.device("cpu"), cfg)
    result = run_loop(task, cfg, parts, torch.device("cpu"))
    gate = task.gate_metric
    assert result.best_metric > untrained[gate] + 0.1, (untrained[gate], result.history)


@pytest.fixture(scope="module")
def classification_model(demo_data, tmp_path_factory):
    home = tmp_path_factory.mktemp("cls-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DERMML_HOME", str(home))
        outcome = train("classification", task_cfg("classification", demo_data, 6),
                        progress=False)
    return home, outcome


def test_evaluation_reports_every_split_with_bootstrap_intervals(classification_model,
                                                                 demo_data, monkeypatch):
    from dermml.evaluation.run import evaluate

    home, outcome = classification_model
    monkeypatch.setenv("DERMML_HOME", str(home))
    result = evaluate(outcome.model_uri, demo_data, ["val", "test"], n_resamples=200)
    assert set(result.metrics) == {"val", "test"}
    for split in ("val", "test"):
        metrics, intervals = result.metrics[split], result.intervals[split]
        for name in ("accuracy", "balanced_accuracy", "roc_auc_macro", "recall/melanoma",
                     "specificity/nevus", "f1/seborrheic_keratosis"):
            low, high = intervals[name]
            assert low <= metrics[name] <= high, (name, low, metrics[name], high)
    artifacts = MlflowClient(tracking.tracking_uri()).list_artifacts(result.run_id,
                                                                     "evaluation")
    names = {a.path.split("/")[-1] for a in artifacts}
    assert {"test_roc.png", "test_pr.png", "test_confusion_matrix.png", "metrics.csv"} <= names


def test_classification_pyfunc_returns_labels_and_probabilities(classification_model,
                                                                demo_data, monkeypatch):
    from dermml.orchestration.tracking import load_python_model
    from dermml.serving.pyfunc import request_frame

    home, outcome = classification_model
    monkeypatch.setenv("DERMML_HOME", str(home))
    model = load_python_model(outcome.model_uri)
    manifest = read_manifest(demo_data)
    image = load_image(manifest.resolve(manifest.split("test").iloc[0]["image_uri"]))
    response = model.predict(None, request_frame([image]))
    probs = json.loads(response.loc[0, "probabilities"])
    assert set(probs) == {"melanoma", "nevus", "seborrheic_keratosis"}
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-4)
    assert response.loc[0, "label"] == max(probs, key=probs.get)


def test_postprocessing_is_identical_in_evaluation_and_serving(demo_data):
    """The served masks are the evaluated masks, post-processing (keep_largest) included."""
    import base64
    import io

    from PIL import Image

    from dermml.orchestration.tracking import load_python_model
    from dermml.serving.pyfunc import request_frame

    cfg = task_cfg("segmentation", demo_data, 2, "postprocess.keep_largest=true",
                   "postprocess.opening_radius=1")
    outcome = train("segmentation", cfg, progress=False)
    model = load_python_model(outcome.model_uri)
    manifest = read_manifest(demo_data)
    images = [load_image(manifest.resolve(u)) for u in manifest.split("test")["image_uri"][:5]]
    evaluated = model.predict_images(images)
    served = model.predict(None, request_frame(images), params={"threshold": 0.5})
    for mask, encoded in zip(evaluated, served["mask"], strict=True):
        decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded)))) > 127
        assert np.array_equal(mask, decoded)


def noisy_weak_manifest(demo_data: str, tmp_path) -> str:
    """Demo data with train split into sl_train (40%) and wl_train (60%, labels shuffled)."""
    manifest = read_manifest(demo_data)
    df = manifest.df.copy()
    for col in ("image_uri", "mask_uri"):
        df[col] = [manifest.resolve(u) for u in df[col]]
    df["attribute_mask_uris"] = None
    train_idx = np.flatnonzero(df["split"] == "train")
    rng = np.random.default_rng(0)
    weak = rng.permutation(train_idx)[: int(0.6 * len(train_idx))]
    df.loc[train_idx, "split"] = "sl_train"
    df.loc[weak, "split"] = "wl_train"
    df.loc[weak, "label"] = rng.permutation(df.loc[weak, "label"].to_numpy())
    uri = str(tmp_path / "weak.parquet")
    write_manifest(df, uri)
    return uri


def test_weak_label_loop_relabels_the_weak_set(demo_data, tmp_path):
    from dermml.training.schemes import train_with_weak_labels

    uri = noisy_weak_manifest(demo_data, tmp_path)
    cfg = task_cfg("classification", uri, 3)
    outcome = train_with_weak_labels("classification", cfg, "wl_train", "sl_train", repeats=1)
    (round1,) = outcome.rounds
    assert round1["weak_labels_changed"] > 0.1
    before = read_manifest(uri).df.set_index("sample_id")["label"]
    after = read_manifest(round1["manifest"]).df.set_index("sample_id")
    weak_ids = after.index[after["split"] == "wl_train"]
    assert (before[weak_ids] != after.loc[weak_ids, "label"]).any()
    assert (read_manifest(uri).df["split"] == "wl_train").sum() == len(weak_ids)  # untouched
    client = MlflowClient(tracking.tracking_uri())
    children = client.search_runs(
        [client.get_run(outcome.run_id).info.experiment_id],
        f"tags.mlflow.parentRunId = '{outcome.run_id}'")
    assert len(children) == 3  # strong, weak round 1, fine-tune round 1
    assert outcome.model_uri == client.get_run(round1["finetune_run_id"]).data.tags[
        "dermml.model_uri"]


def test_cross_validation_trains_k_folds_and_aggregates(demo_data):
    from dermml.training.schemes import cross_validate, fold_ids

    cfg = task_cfg("segmentation", demo_data, 1)
    outcome = cross_validate("segmentation", cfg, folds=3)
    assert len(outcome.folds) == 3 and len({o.run_id for o in outcome.folds}) == 3
    values = [o.metrics["best_val_gate"] for o in outcome.folds]
    assert outcome.mean["best_val_gate"] == pytest.approx(np.mean(values))
    assert outcome.std["best_val_gate"] == pytest.approx(np.std(values, ddof=1))
    logged = MlflowClient(tracking.tracking_uri()).get_run(outcome.run_id).data.metrics
    assert logged["cv_mean_best_val_gate"] == pytest.approx(outcome.mean["best_val_gate"])

    pool = read_manifest(demo_data).split("train", "val")
    folds = fold_ids(pool, 3)
    by_patient = pd.Series(folds).groupby(pool["patient_id"].to_numpy()).nunique()
    assert (by_patient == 1).all()  # a patient never spans folds


def test_a_size_too_small_for_the_network_is_a_config_error_before_training(demo_data):
    from dermml.config import ConfigError

    common = [o for o in tiny_overrides(demo_data, 1) if not o.startswith("model.")]
    cfg = resolve_config("attributes", None, common + ["data.image_size=64"])
    assert cfg.model.encoder == "tu-inception_v3"  # the reference's encoder, shipped default
    task = get_task("attributes")
    cfg = task.prepare(cfg, read_manifest(demo_data))
    with pytest.raises(ConfigError, match="64 px is too small.*Inception-v3"):
        build_parts(training_inputs(task, cfg))
    tiny = ["model.dim_x=8", "model.dim_g=8", "model.dim_x_mults=[1,2,3]",
            "model.dim_g_mults=[1,2,4]", "data.image_size=30"]
    # Without a size given, the shipped default is one Inception-v3 can take.
    default = task.prepare(resolve_config("attributes", None, [f"data.manifest={demo_data}"]),
                           read_manifest(demo_data))
    assert default.data.image_size == 256
    task.check_input_size(task.build_model(default), default)
    segdiff = resolve_config("segdiff", None, common + tiny)
    with pytest.raises(ConfigError, match=r"\[30\].*multiples of 4"):
        build_parts(training_inputs(get_task("segdiff"), segdiff))


def test_mixed_real_and_synthetic_training_composes_batches_from_both(demo_data, tmp_path):
    from dermml.data.demo import generate_demo

    synthetic = generate_demo(str(tmp_path / "synthetic"), n=40, size=32, seed=9)
    cfg = task_cfg("segmentation", demo_data, 1, f"mix.synthetic_manifest={synthetic}",
                   "mix.real_batch_ratio=0.5", "mix.synthetic_fraction=0.5")
    task = get_task("segmentation")
    parts = build_parts(training_inputs(task, cfg))
    mixed = parts.train_loader.dataset
    real, synth = mixed.datasets  # Subsets (real_ratio, synthetic_fraction) of the two sets
    assert len(synth) == len(synth.dataset) // 2
    assert synth.dataset.augment.stream == 1 != real.dataset.augment.stream
    n_real = len(real)
    for indices in parts.train_loader.batch_sampler:
        assert sum(i < n_real for i in indices) == len(indices) // 2 == 4
    result = run_loop(task, cfg, parts, torch.device("cpu"))
    assert len(result.history) == 1 and np.isfinite(result.history[0]["train_loss"])


def test_mixup_applies_the_configured_loss_to_both_partners(demo_data):
    """MixUp keeps label smoothing / class weights / focal: lam-weighted loss of both labels."""
    import torch.nn.functional as F

    from dermml.data.sampling import mixup_pairs

    task = get_task("classification")
    cfg = task.prepare(task_cfg("classification", demo_data, 1, "mixup_alpha=0.4",
                                "loss=[{name: label_smoothing, params: {label_smoothing: 0.3}}]"),
                       read_manifest(demo_data))
    model = task.build_model(cfg).eval()
    images, labels = torch.rand(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2])
    loss = task.loss_step(cfg)(model, (images, labels))
    mixed, a, b, lam, _ = mixup_pairs(images, labels, 0.4,
                                      torch.Generator().manual_seed(cfg.train.seed))
    logits = model(mixed)
    expected = (lam * F.cross_entropy(logits, a, label_smoothing=0.3)
                + (1 - lam) * F.cross_entropy(logits, b, label_smoothing=0.3))
    assert torch.allclose(loss, expected, atol=1e-6)
    without_smoothing = lam * F.cross_entropy(logits, a) + (1 - lam) * F.cross_entropy(logits, b)
    assert not torch.allclose(loss, without_smoothing, atol=1e-4)


def test_pretrained_weights_from_a_local_file(demo_data, tmp_path):
    from typer.testing import CliRunner

    from dermml.cli import app
    from dermml.models.pretrained import PretrainedWeightsError

    task = get_task("classification")
    cfg = task.prepare(task_cfg("classification", demo_data, 1), read_manifest(demo_data))
    source = task.build_model(cfg)
    weights = tmp_path / "resnet10t.pth"
    # A checkpoint as training scripts write it: prefixed keys inside a "state_dict" entry.
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}},
               weights)
    loaded = task.build_model(cfg.model_copy(
        update={"model": cfg.model.model_copy(update={"pretrained": str(weights)})}))
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

    unrelated = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3, 3)}, unrelated)
    with pytest.raises(PretrainedWeightsError, match="only 0 of"):
        task.build_model(cfg.model_copy(
            update={"model": cfg.model.model_copy(update={"pretrained": str(unrelated)})}))

    missing = tmp_path / "nope.pth"
    result = CliRunner().invoke(app, ["train", "classification", "--set",
                                      f"data.manifest={demo_data}", "--set",
                                      "model.backbone=resnet10t", "--pretrained", str(missing)])
    assert result.exit_code == 2 and str(missing) in result.output
    assert "file not found" in result.output and "model.pretrained=imagenet" in result.output


def test_attributes_evaluate_with_intervals_and_serve_the_evaluated_label_maps(demo_data,
                                                                              tmp_path):
    """Per-class Jaccard and AUC with bootstrap CIs, overlays logged, and the served label map
    is the evaluated one (per-class morphology included)."""
    import base64
    import io

    from PIL import Image

    from dermml.evaluation.run import evaluate
    from dermml.orchestration.tracking import load_python_model
    from dermml.serving.pyfunc import request_frame

    cfg = task_cfg("attributes", demo_data, 3, "data.image_size=32")
    outcome = train("attributes", cfg, progress=False)
    result = evaluate(outcome.model_uri, demo_data, ["test"], n_resamples=50)
    metrics, intervals = result.metrics["test"], result.intervals["test"]
    assert "mean_jaccard" in metrics and "mean_auc" in metrics
    per_class = [k for k in metrics if k.startswith(("jaccard/", "auc/"))]
    assert any(k.startswith("jaccard/") for k in per_class)
    assert any(k.startswith("auc/") for k in per_class)
    for name in ["mean_jaccard", *per_class]:
        low, high = intervals[name]
        assert low - 1e-9 <= metrics[name] <= high + 1e-9, (name, low, metrics[name], high)
    names = {a.path.split("/")[-1] for a in MlflowClient(tracking.tracking_uri())
             .list_artifacts(result.run_id, "evaluation")}
    assert any("attribute_overlays" in n for n in names), names

    model = load_python_model(outcome.model_uri)
    manifest = read_manifest(demo_data)
    images = [load_image(manifest.resolve(u)) for u in manifest.split("test")["image_uri"][:4]]
    evaluated = model.predict_images(images)
    served = model.predict(None, request_frame(images))
    for pred, encoded, fractions in zip(evaluated, served["label_map"],
                                        served["attribute_fractions"], strict=True):
        decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded))))
        assert np.array_equal(decoded, pred["label_map"])
        assert set(json.loads(fractions)) == set(cfg.attributes)


def test_weak_label_change_fraction_counts_labels_or_mask_pixels(tmp_path):
    """Classification relabels leave masks as they were: 0 labels changed is 0, not 1."""
    from dermml.config import ConfigError
    from dermml.data.images import encode_png
    from dermml.data.manifest import Manifest
    from dermml.training.schemes import _fraction_changed, train_with_weak_labels

    manifest = Manifest(df=pd.DataFrame(), uri=str(tmp_path / "m.parquet"), version="v",
                        base_dir=str(tmp_path))
    before = pd.DataFrame({"label": ["a", "b", "a", "b"], "mask_uri": [None] * 4})
    assert _fraction_changed(before, before.copy(), manifest) == 0.0
    after = before.assign(label=["a", "a", "a", "b"])
    assert _fraction_changed(before, after, manifest) == 0.25
    old = np.zeros((4, 4), bool)
    new = old.copy()
    new[0, :2] = True  # 2 of 16 pixels
    (tmp_path / "old.png").write_bytes(encode_png(old))
    (tmp_path / "new.png").write_bytes(encode_png(new))
    masks_before = pd.DataFrame({"label": ["a", "a"], "mask_uri": ["old.png", None]})
    masks_after = masks_before.assign(mask_uri=[str(tmp_path / "new.png"),
                                                str(tmp_path / "new.png")])
    assert _fraction_changed(masks_before, masks_after, manifest) == pytest.approx(
        (2 / 16 + 1.0) / 2)
    cfg = resolve_config("attributes", None, ["data.manifest=unused"])
    with pytest.raises(ConfigError, match="cannot relabel"):
        train_with_weak_labels("attributes", cfg, "wl_train", "sl_train")
