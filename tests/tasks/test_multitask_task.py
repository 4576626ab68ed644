"""The multitask task (DermSynth3D's multi-task DeepLabV3) on tiny synth3d output: every head
learns, a frozen backbone stays frozen, single-head configs work, real sets (lesion masks only)
are scored on the lesion head alone, and the served response has the heads' columns."""

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from dermml.config import ConfigError
from dermml.data.manifest import read_manifest, write_manifest
from dermml.tasks import get_task
from dermml.training.inputs import training_inputs
from dermml.training.run import resolve_config
from dermml.training.setup import build_parts, run_loop

SMALL = ["data.image_size=48", "data.batch_size=4", "model.encoder=resnet18",
         "model.output_stride=16", "model.decoder_channels=32", "model.atrous_rates=[1,2,3]",
         "train.lr=0.003", "ray.enabled=false", "augment.flips=false", "augment.color_jitter=0",
         "loss.lesion_dice=1.0"]
"""A CPU-sized network: ResNet-18 encoder at output stride 16, 32-channel decoders."""
ALL_HEADS = "heads=[lesion,anatomy,depth]"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Idle OpenMP threads spin on a shared CPU (docs/architecture.md): one thread is faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def synth_views(tmp_path_factory) -> str:
    """32 synth3d views at 48 px of 4 procedural bodies (paste blending, no Ray): bodies
    p0000-p0002 train, p0003 test (a manifest beside the synth3d one, same relative URIs)."""
    from dermml.data.demo import generate_demo
    from dermml.synthesis.run import resolve_config as synth_config
    from dermml.synthesis.run import synthesize

    root = tmp_path_factory.mktemp("multitask")
    lesions = generate_demo(str(root / "lesions"), n=8, size=64, seed=0)
    cfg = synth_config(None, [f"lesions={lesions}", "bodies.source=procedural:4",
                              "views.per_body=8", "views.size=48", "blend.method=paste",
                              "paste.lesions_per_body=3", "bodies.texture_size=128",
                              "bodies.edge=0.07", "paste.view_size=96", "device=cpu",
                              "backend=torch"])
    out = root / "synth"
    outcome = synthesize(cfg, str(out), use_ray=False, track=False, progress=False)
    assert outcome.n_views == 32
    df = read_manifest(str(out)).df.copy()
    df["split"] = np.where(df["patient_id"] == "p0003", "test", "train")
    uri = str(out / "multitask.parquet")
    write_manifest(df, uri)
    return uri


def cfg_for(manifest: str, *extra: str):
    return resolve_config("multitask", None, [f"data.manifest={manifest}", *SMALL, *extra])


def test_every_head_learns_on_synth3d_views(synth_views):
    """Trained on the training bodies' views, each head beats the untrained network there
    (a learning test: lesion Dice, skin/non-skin and anatomy mIoU up, depth abs-rel down)."""
    task = get_task("multitask")
    cfg = task.prepare(cfg_for(synth_views, ALL_HEADS, "train.epochs=12",
                               "data.val_split=train"), read_manifest(synth_views))
    parts = build_parts(training_inputs(task, cfg))
    parts.model.eval()
    with torch.no_grad():
        before = task.validate(parts.model, parts.val_loader, torch.device("cpu"), cfg)
    result = run_loop(task, cfg, parts, torch.device("cpu"))
    after = {k[4:]: v for k, v in result.history[-1].items() if k.startswith("val_")}
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < 0.8 * losses[0], losses
    assert after["lesion_dice"] > before["lesion_dice"] + 0.15, (before, after)
    assert after["seg_miou"] > before["seg_miou"] + 0.1, (before, after)
    assert after["anatomy_miou"] > before["anatomy_miou"] + 0.05, (before, after)
    assert after["depth_abs_rel"] < 0.7 * before["depth_abs_rel"], (before, after)
    assert after["depth_rmse"] < before["depth_rmse"], (before, after)


def test_frozen_backbone_keeps_the_encoder_and_trains_the_heads(synth_views):
    task = get_task("multitask")
    cfg = cfg_for(synth_views, ALL_HEADS, "model.freeze_backbone=true", "train.epochs=1",
                  "train.max_steps_per_epoch=2", "data.val_split=test")
    parts = build_parts(training_inputs(task, cfg))
    start = {k: v.clone() for k, v in parts.model.state_dict().items()}
    run_loop(task, cfg, parts, torch.device("cpu"))
    end = parts.model.state_dict()
    encoder = [k for k in start if k.startswith("encoder.")]
    assert encoder and all(torch.equal(start[k], end[k]) for k in encoder)  # BN stats too
    changed = [k for k in start if not k.startswith("encoder.")
               and not torch.equal(start[k], end[k])]
    assert any(k.startswith("outputs.anatomy") for k in changed)
    assert any(k.startswith("decoders.") for k in changed)


def test_a_single_head_config_builds_trains_and_serves_only_its_head(synth_views, demo_data):
    task = get_task("multitask")
    cfg = cfg_for(synth_views, "heads=[lesion]", "model.shared_decoder=false",
                  "train.epochs=1", "train.max_steps_per_epoch=2", "data.val_split=test")
    inputs = training_inputs(task, cfg)
    files = inputs.files()
    assert not any("/anatomy/" in f or "/depth/" in f for f in files)  # never read
    parts = build_parts(inputs)
    assert set(parts.model(torch.rand(2, 3, 48, 48))) == {"lesion"}
    result = run_loop(task, cfg, parts, torch.device("cpu"))
    assert "val_lesion_dice" in result.history[0] and "val_seg_miou" in result.history[0]
    assert not any("anatomy" in k or "depth" in k for k in result.history[0])
    assert [c for c, _ in task.response_schema_for(cfg)] == [
        "lesion_mask", "skin_mask", "lesion_fraction", "height", "width"]
    with pytest.raises(ValueError, match="lesion head is required"):
        cfg_for(synth_views, "heads=[anatomy]")
    # A real set has no anatomy or depth: those heads need synth3d data to train on.
    with pytest.raises(ConfigError, match=r"heads \['anatomy', 'depth'\].*synth3d"):
        task.prepare(cfg_for(demo_data, ALL_HEADS), read_manifest(demo_data))
    mixed = cfg_for(demo_data, ALL_HEADS, f"mix.synthetic_manifest={synth_views}")
    assert task.prepare(mixed, read_manifest(demo_data)) is mixed


def test_rows_without_a_target_add_nothing_to_its_head(demo_data, synth_views):
    """A real image (lesion mask only) has no skin, anatomy or depth target: those losses
    ignore it, and its lesion loss only asks lesion vs. not lesion (skin or non-skin)."""
    from dermml.data.multitask import LESION, NONSKIN, SKIN, MultitaskDataset
    from dermml.losses.multitask import anatomy_loss, depth_loss, lesion_head_loss

    real = read_manifest(demo_data)
    sample = MultitaskDataset(real, real.split("test").iloc[:1], 32)[0]
    assert sample["has_lesion"] and not sample["has_seg"]
    assert not sample["has_anatomy"] and not sample["has_depth"]
    synth = read_manifest(synth_views)
    view = MultitaskDataset(synth, synth.split("test").iloc[:1], 48)[0]
    assert view["has_lesion"] and view["has_seg"] and view["has_anatomy"] and view["has_depth"]
    assert set(view["seg"].unique().tolist()) <= {NONSKIN, SKIN, LESION}
    assert view["anatomy"].max() < 8 and (view["depth"] > 0).any()
    assert torch.equal(view["seg"] == LESION, view["lesion"] > 0.5)

    logits = torch.randn(2, 8, 4, 4, requires_grad=True)
    assert anatomy_loss(logits, torch.zeros(2, 4, 4, dtype=torch.long),
                        torch.tensor([False, False])).item() == 0
    assert depth_loss(logits[:, :1], torch.ones(2, 4, 4), torch.tensor([False, False])) == 0
    assert depth_loss(logits[:, :1], torch.zeros(2, 4, 4), torch.tensor([True, True])) == 0
    # Depth loss of the sample with depth only: the other one's prediction does not matter.
    one = depth_loss(logits[:1, :1], torch.ones(1, 4, 4), torch.tensor([True]))
    both = depth_loss(logits[:, :1], torch.ones(2, 4, 4), torch.tensor([True, False]))
    assert torch.allclose(one, both)

    lesion = torch.zeros(1, 4, 4)
    lesion[0, :2] = 1
    seg = torch.zeros(1, 4, 4, dtype=torch.long)
    a = torch.randn(1, 3, 4, 4)
    b = a.clone()
    b[:, [NONSKIN, SKIN]] = b[:, [SKIN, NONSKIN]]  # skin and non-skin swapped
    no = torch.tensor([False])
    for dice in (0.0, 1.0):
        la = lesion_head_loss(a, lesion, torch.tensor([True]), seg, no, dice)
        lb = lesion_head_loss(b, lesion, torch.tensor([True]), seg, no, dice)
        assert torch.allclose(la, lb)
    known = seg.clone()
    known[0, 2:] = SKIN
    known[lesion > 0.5] = LESION
    assert not torch.allclose(lesion_head_loss(a, lesion, no, known, torch.tensor([True])),
                              lesion_head_loss(b, lesion, no, known, torch.tensor([True])))
    assert lesion_head_loss(a, lesion, no, seg, no) == 0


def test_real_and_synthetic_samples_train_together(demo_data, synth_views):
    """DermSynth3D's setting: real lesion masks (train split of the demo data) mixed half and
    half with synth3d views; validation on the real set reports lesion metrics only."""
    task = get_task("multitask")
    cfg = task.prepare(cfg_for(demo_data, ALL_HEADS, f"mix.synthetic_manifest={synth_views}",
                               "mix.real_batch_ratio=0.5", "train.epochs=1",
                               "train.max_steps_per_epoch=3"), read_manifest(demo_data))
    parts = build_parts(training_inputs(task, cfg))
    batch = next(iter(parts.train_loader))
    assert batch["has_lesion"].all() and batch["has_seg"].sum() == 2
    assert torch.equal(batch["has_seg"], batch["has_anatomy"])
    assert torch.equal(batch["has_seg"], batch["has_depth"])
    result = run_loop(task, cfg, parts, torch.device("cpu"))
    (epoch,) = result.history
    assert np.isfinite(epoch["train_loss"])
    assert {k for k in epoch if k.startswith("val_")} == {"val_lesion_dice", "val_lesion_iou"}


def test_validation_and_evaluation_share_one_definition_of_every_metric(synth_views):
    """At the input size (no resizing either way) the per-epoch validation and the per-sample
    records aggregated as evaluation aggregates them give the same numbers."""
    task = get_task("multitask")
    cfg = cfg_for(synth_views, ALL_HEADS, "data.val_split=test", "serving.threshold=0.3")
    manifest = read_manifest(synth_views)
    rows = manifest.split("test")
    parts = build_parts(training_inputs(task, cfg))
    model = parts.model.eval()
    with torch.no_grad():
        validated = task.validate(model, parts.val_loader, torch.device("cpu"), cfg)
    images = [parts.val_loader.dataset.load(i)[0] for i in range(len(rows))]
    evaluated = task.aggregate(task.score(task.predict(model, images, cfg), rows, manifest))
    assert set(validated) == set(evaluated)
    for name, value in validated.items():
        assert evaluated[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name


@pytest.fixture(scope="module")
def trained(synth_views, tmp_path_factory):
    """A tracked multi-head run (two epochs on the synth3d views) and its MLflow home."""
    from dermml.training.run import train

    home = tmp_path_factory.mktemp("multitask-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DERMML_HOME", str(home))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        cfg = cfg_for(synth_views, ALL_HEADS, "train.epochs=2", "data.val_split=test")
        outcome = train("multitask", cfg, progress=False)
    return home, outcome


def test_evaluation_scores_the_heads_each_test_set_labels(trained, synth_views, demo_data,
                                                          monkeypatch):
    """On a real set (lesion masks only): lesion metrics and nothing else; on synth3d views:
    every head's metrics, each with a bootstrap interval."""
    from dermml.evaluation.run import evaluate

    home, outcome = trained
    monkeypatch.setenv("DERMML_HOME", str(home))
    real = evaluate(outcome.model_uri, demo_data, ["test"], n_resamples=30)
    metrics = real.metrics["test"]
    assert set(metrics) == {"lesion_dice", "lesion_iou"}
    low, high = real.intervals["test"]["lesion_dice"]
    assert low <= metrics["lesion_dice"] <= high
    synth = evaluate(outcome.model_uri, synth_views, ["test"], n_resamples=30)
    metrics = synth.metrics["test"]
    for name in ("lesion_dice", "seg_miou", "skin_iou", "nonskin_iou", "anatomy_miou",
                 "anatomy_pixel_accuracy", "depth_abs_rel", "depth_rmse", "depth_delta1"):
        assert np.isfinite(metrics[name]), name
        assert name in synth.intervals["test"], name


def test_the_served_response_has_a_column_per_head(trained, synth_views, monkeypatch):
    from dermml.data.images import load_image
    from dermml.orchestration.tracking import load_python_model
    from dermml.serving.pyfunc import request_frame
    from dermml.synth3d.outputs import DEPTH_SCALE

    home, outcome = trained
    monkeypatch.setenv("DERMML_HOME", str(home))
    model = load_python_model(outcome.model_uri)
    manifest = read_manifest(synth_views)
    image = load_image(manifest.resolve(manifest.split("test").iloc[0]["image_uri"]))
    big = np.asarray(Image.fromarray(image).resize((80, 60)))
    response = model.predict(None, request_frame([image, big]), params={"threshold": 0.4})
    assert list(response.columns) == ["lesion_mask", "skin_mask", "lesion_fraction", "height",
                                      "width", "anatomy", "depth"]

    def decode(text):
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))))

    assert decode(response.loc[1, "lesion_mask"]).shape == (60, 80)
    assert set(np.unique(decode(response.loc[1, "skin_mask"]))) <= {0, 255}
    assert decode(response.loc[1, "anatomy"]).max() < 8
    depth = decode(response.loc[1, "depth"])
    assert depth.dtype == np.uint16 and depth.shape == (60, 80) and depth.min() > 0
    evaluated = model.predict_images([big], {"threshold": 0.4})[0]
    assert np.allclose(depth / DEPTH_SCALE, evaluated["depth"], atol=1e-4)
    assert np.array_equal(decode(response.loc[1, "lesion_mask"]) > 127, evaluated["lesion"])
    signature = model_signature_columns(outcome.model_uri)
    assert signature == list(response.columns)


def model_signature_columns(model_uri: str) -> list[str]:
    import mlflow

    info = mlflow.models.get_model_info(model_uri)
    return [c.name for c in info.signature.outputs.inputs]
