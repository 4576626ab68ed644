"""The gan task end to end on a two-colour toy set: it learns (FID falls), resumes with its
kimg counter and ADA p, generates deterministically by seed, serves the requested class over
HTTP, evaluates as a set, and its images train a classifier through mix:."""

import base64
import io
import json

import numpy as np
import pandas as pd
import pytest
import requests
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from dermml.config import ConfigError
from dermml.data.images import encode_png
from dermml.data.manifest import read_manifest, write_manifest
from dermml.orchestration import tracking
from dermml.tasks import get_task
from dermml.training.checkpoint import FolderCheckpointer
from dermml.training.inputs import training_inputs
from dermml.training.run import resolve_config, train
from dermml.training.setup import build_parts, run_loop

TINY = ["data.image_size=16", "data.batch_size=8", "model.z_dim=16", "model.w_dim=16",
        "model.mapping_layers=2", "model.channel_base=256", "model.channel_max=16",
        "gan.tick_kimg=0.25", "gan.lr_g=0.005", "gan.lr_d=0.005", "gan.ema_kimg=0.05",
        "gan.ada_kimg=5", "metrics.num_real=64", "metrics.num_fake=64",
        "metrics.kid_subsets=10", "metrics.kid_subset_size=32", "metrics.every_ticks=1",
        "ray.enabled=false"]
COLOURS = {"red": (200, 40, 40), "blue": (40, 40, 200)}


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> str:
    """Two classes told apart by colour: 48 noisy 16 px images each, train/val/test."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    rows = []
    for name, rgb in COLOURS.items():
        for i in range(48):
            image = np.clip(np.array(rgb)[None, None] + rng.normal(0, 25, (16, 16, 3)), 0, 255)
            path = root / f"{name}{i}.png"
            path.write_bytes(encode_png(image.astype(np.uint8)))
            split = "train" if i < 32 else ("val" if i < 40 else "test")
            rows.append({"sample_id": f"{name}{i}", "image_uri": path.name, "label": name,
                         "split": split})
    uri = str(root / "manifest.parquet")
    write_manifest(pd.DataFrame(rows), uri)
    return uri


def gan_cfg(manifest: str, kimg: float, *extra: str):
    return resolve_config("gan", None, [f"data.manifest={manifest}", f"gan.kimg={kimg}",
                                        *TINY, *extra])


def mean_rgb(image: np.ndarray) -> np.ndarray:
    return image.reshape(-1, 3).astype(float).mean(0)


@pytest.fixture(scope="module")
def trained(colours, tmp_path_factory):
    """A tiny GAN trained for 2 kimg, logged to its own embedded MLflow."""
    home = tmp_path_factory.mktemp("gan-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DERMML_HOME", str(home))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        torch.set_num_threads(2)
        outcome = train("gan", gan_cfg(colours, 2.0), progress=False)
    return home, outcome


def test_training_lowers_fid_and_logs_grids_and_the_extractor(trained, monkeypatch):
    home, outcome = trained
    monkeypatch.setenv("DERMML_HOME", str(home))
    client = MlflowClient(tracking.tracking_uri())
    fid = [m.value for m in sorted(client.get_metric_history(outcome.run_id, "val_fid"),
                                   key=lambda m: m.step)]
    assert len(fid) == 8 and min(fid[-3:]) < 0.7 * fid[0], fid
    kimg = [m.value for m in client.get_metric_history(outcome.run_id, "kimg")]
    assert max(kimg) == pytest.approx(2.0, abs=0.01)
    run = client.get_run(outcome.run_id)
    assert run.data.tags["dermml.gan.extractor"].startswith("random-conv")
    assert len(run.data.tags["dermml.gan.extractor_digest"]) == 64
    assert run.data.params["gan.kimg"] == "2.0"
    fakes = {a.path for a in client.list_artifacts(outcome.run_id, "fakes")}
    assert len(fakes) == 8
    snapshots = [a.path for a in client.list_artifacts(outcome.run_id, "snapshots")]
    assert len(snapshots) == 8 and snapshots[-1].endswith("0000002000img.pt")
    assert outcome.metrics["best_val_gate"] == pytest.approx(min(fid))


def test_generation_is_deterministic_by_seed_and_follows_the_class(trained, monkeypatch):
    home, outcome = trained
    monkeypatch.setenv("DERMML_HOME", str(home))
    model = tracking.load_python_model(outcome.model_uri)
    requests_ = [{"class": c, "seed": s, "truncation": 0.7} for c in COLOURS for s in (1, 2)]
    first = model.task.predict(model.model, requests_, model.cfg)
    again = model.task.predict(model.model, requests_, model.cfg)
    for a, b in zip(first, again, strict=True):
        assert np.array_equal(a["image"], b["image"])
    assert not np.array_equal(first[0]["image"], first[1]["image"])  # seeds differ
    for prediction in first:
        r, _, b = mean_rgb(prediction["image"])
        assert (r > b + 30) if prediction["class"] == "red" else (b > r + 30), prediction["class"]


def test_served_model_returns_an_image_of_the_requested_class(trained, monkeypatch, tmp_path):
    from dermml.serving.server import serve_model, stop_server

    home, outcome = trained
    monkeypatch.setenv("DERMML_HOME", str(home))
    server, url = serve_model(outcome.model_uri, log_file=str(tmp_path / "serve.log"))
    try:
        body = {"dataframe_split": {"columns": ["class", "seed"],
                                    "data": [["red", 3], ["blue", 3]]},
                "params": {"truncation": 0.5}}
        response = requests.post(f"{url}/invocations", json=body, timeout=60)
        assert response.status_code == 200, response.text
        rows = response.json()["predictions"]
        for row in rows:
            image = np.asarray(Image.open(io.BytesIO(base64.b64decode(row["image"]))))
            assert image.shape == (16, 16, 3) and row["truncation"] == 0.5
            r, _, b = mean_rgb(image)
            assert (r > b + 30) if row["class"] == "red" else (b > r + 30)
        bad = requests.post(f"{url}/invocations", json={"dataframe_split": {
            "columns": ["class", "seed"], "data": [["green", 1]]}}, timeout=60)
        assert bad.status_code == 400 and "green" in bad.text and "red" in bad.text
    finally:
        stop_server(server)


def test_served_over_v2_answers_as_over_mlflow(trained, monkeypatch, tmp_path):
    """The GAN's request (class, seed; truncation as a param) through MLServer's V2: the
    images `mlflow models serve` answers, and a class the model lacks is HTTP 400."""
    from dermml.serving.client import PredictionError, predict_frame
    from dermml.serving.server import serve_model, stop_server

    home, outcome = trained
    monkeypatch.setenv("DERMML_HOME", str(home))
    request = pd.DataFrame({"class": ["red", "blue"], "seed": [3, 4]})
    answers = {}
    for protocol in ("v2", "mlflow"):
        server, url = serve_model(outcome.model_uri, log_file=str(tmp_path / f"{protocol}.log"),
                                  protocol=protocol)
        try:
            answers[protocol] = predict_frame(url, request, {"truncation": 0.5},
                                              protocol=protocol)
            with pytest.raises(PredictionError, match="green") as refused:
                predict_frame(url, pd.DataFrame({"class": ["green"], "seed": [1]}),
                              protocol=protocol)
            assert refused.value.status == 400
        finally:
            stop_server(server)
    v2, mlflow = answers["v2"], answers["mlflow"]
    assert v2["image"].tolist() == mlflow["image"].tolist()
    assert v2["class"].tolist() == ["red", "blue"] and set(v2["truncation"]) == {0.5}
    assert v2["model_name"].tolist() == ["model", "model"]  # a run's model: no registered name


def test_evaluate_scores_the_generator_against_a_split_with_its_extractor(trained, colours,
                                                                          monkeypatch):
    from dermml.evaluation.run import evaluate

    home, outcome = trained
    monkeypatch.setenv("DERMML_HOME", str(home))
    result = evaluate(outcome.model_uri, colours, ["test"], n_resamples=0)
    metrics = result.metrics["test"]
    assert {"fid", "kid", "precision", "recall"} <= set(metrics)
    assert np.isfinite(metrics["fid"]) and metrics["num_real"] == 16
    run = tracking.get_run(result.run_id)
    assert run.data.tags["dermml.gan.extractor"].startswith("random-conv")


def test_generate_writes_a_manifest_that_trains_a_classifier(trained, colours, monkeypatch,
                                                             tmp_path):
    from dermml.synthesis.gan import generate_dataset, synthetic_training_set

    home, outcome = trained
    monkeypatch.setenv("DERMML_HOME", str(home))
    out = str(tmp_path / "generated")
    made = generate_dataset(outcome.model_uri, out, seeds=[0, 1, 2], classes=["blue"],
                            truncation=0.7)
    df = read_manifest(made.manifest_uri).df
    assert made.n_images == 3 and set(df["label"]) == {"blue"}
    assert df["seed"].tolist() == [0, 1, 2] and set(df["truncation"]) == {0.7}
    assert set(df["split"]) == {"train"} and df["model_version"].iloc[0] == outcome.model_uri
    again = generate_dataset(outcome.model_uri, out, seeds=[0, 1, 2], classes=["blue"],
                             truncation=0.7)
    assert again.version == made.version  # same seeds, same manifest

    synthetic = synthetic_training_set(outcome.model_uri, {"red": 4, "blue": 6})
    cfg = resolve_config("classification", None,
                         [f"data.manifest={colours}", "data.image_size=16",
                          "model.backbone=resnet10t"], synthetic_manifest=synthetic)
    inputs = training_inputs(get_task("classification"), cfg, prepare=True)
    assert len(inputs.train_set) == 64 + 10


def test_resume_continues_the_kimg_counter_and_ada_p(colours, tmp_path):
    task = get_task("gan")
    manifest = read_manifest(colours)
    checkpoints = FolderCheckpointer(str(tmp_path / "ckpt"))
    extra = ["gan.ada_target=0.0"]  # any positive sign of D raises p: p moves every tick
    short = task.prepare(gan_cfg(colours, 0.5, *extra), manifest)
    first = run_loop(task, short, build_parts(training_inputs(task, short)),
                     torch.device("cpu"), checkpointer=checkpoints)
    assert [h["kimg"] for h in first.history] == pytest.approx([0.256, 0.504], abs=0.01)
    p_then = first.history[-1]["augment_p"]
    assert p_then > 0
    longer = task.prepare(gan_cfg(colours, 1.0, *extra), manifest)
    second = run_loop(task, longer, build_parts(training_inputs(task, longer)),
                      torch.device("cpu"), checkpointer=checkpoints)
    kimgs = [h["kimg"] for h in second.history]
    assert kimgs[:2] == [h["kimg"] for h in first.history] and len(kimgs) == 4
    assert kimgs[2] > kimgs[1] and kimgs[3] == pytest.approx(1.0, abs=0.01)
    assert second.history[2]["augment_p"] >= p_then


def test_bad_gan_settings_are_one_line_errors(colours, demo_data, tmp_path):
    task = get_task("gan")
    rows = read_manifest(colours).df
    one_class = str(tmp_path / "red.parquet")
    write_manifest(rows[rows["label"] == "red"].assign(
        image_uri=[str(read_manifest(colours).resolve(u)) for u in
                   rows[rows["label"] == "red"]["image_uri"]]), one_class)
    with pytest.raises(ConfigError, match="gan.conditional.*one class"):
        task.prepare(gan_cfg(one_class, 1.0), read_manifest(one_class))
    unconditional = task.prepare(gan_cfg(one_class, 1.0, "gan.conditional=false"),
                                 read_manifest(one_class))
    assert task.build_model(unconditional).G.c_dim == 0
    with pytest.raises(ConfigError, match="data.image_size.*power of two"):
        task.prepare(gan_cfg(colours, 1.0, "data.image_size=24"), read_manifest(colours))
    with pytest.raises(ValueError, match="inception_weights"):
        gan_cfg(colours, 1.0, "metrics.extractor=inception")
    missing = tmp_path / "nowhere" / "inception.pth"
    cfg = gan_cfg(colours, 1.0, "metrics.extractor=inception",
                  f"metrics.inception_weights={missing}")
    with pytest.raises(ValueError, match="inception"):
        task.extractor(task.prepare(cfg, read_manifest(colours)))


def test_cli_generate_and_style_mix(trained, monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from dermml.cli import app

    home, outcome = trained
    monkeypatch.setenv("DERMML_HOME", str(home))
    runner = CliRunner()
    out = tmp_path / "gen"
    result = runner.invoke(app, ["generate", "gan", outcome.model_uri, "--seeds", "0-3",
                                 "--class", "red", "--trunc", "0.7", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["images"] == 4
    grid = tmp_path / "mix.png"
    result = runner.invoke(app, ["style-mix", "gan", outcome.model_uri, "--rows", "1,2",
                                 "--cols", "3,4,5", "--styles", "0-1", "--out", str(grid)])
    assert result.exit_code == 0, result.output
    assert Image.open(grid).size[0] > Image.open(grid).size[1]  # 4 columns x 3 rows
    result = runner.invoke(app, ["generate", "gan", outcome.model_uri, "--seeds", "x-1",
                                 "--out", str(tmp_path / "bad")])
    assert result.exit_code == 2 and "--seeds" in result.output


def test_a_stylegan_zip_exported_from_a_manifest_trains_the_gan(colours, tmp_path):
    from typer.testing import CliRunner

    from dermml.cli import app

    archive = tmp_path / "colours.zip"
    result = CliRunner().invoke(app, ["data", "export", "stylegan", colours, "--out",
                                      str(archive), "--split", "train,val,test"])
    assert result.exit_code == 0, result.output
    task = get_task("gan")
    cfg = task.prepare(gan_cfg(str(archive), 0.05, "metrics.every_ticks=0"),
                       read_manifest(colours))
    inputs = training_inputs(task, cfg)
    assert len(inputs.train_set) + len(inputs.val_set) > 64
    assert sorted(set(inputs.train_set.labels)) == [0, 1]


@pytest.mark.slow
def test_two_ray_workers_train_one_gan_averaging_their_gradients(colours, tmp_path,
                                                                 monkeypatch):
    monkeypatch.setenv("DERMML_HOME", str(tmp_path / "home"))
    overrides = [o for o in TINY if not o.startswith("ray.")] + [
        f"data.manifest={colours}", "gan.kimg=0.5", "ray.enabled=true", "ray.num_workers=2"]
    outcome = train("gan", resolve_config("gan", None, overrides), progress=False)
    client = MlflowClient(tracking.tracking_uri())
    kimg = [m.value for m in client.get_metric_history(outcome.run_id, "kimg")]
    # Two workers of 8 images each: 16 images per iteration, 0.5 kimg in 32 iterations.
    assert max(kimg) == pytest.approx(0.512, abs=0.001)
    assert np.isfinite(outcome.metrics["best_val_gate"])


def test_an_image_and_mask_gan_makes_samples_that_train_segmentation(demo_data, tmp_path,
                                                                     monkeypatch):
    from dermml.synthesis.gan import generate_dataset

    monkeypatch.setenv("DERMML_HOME", str(tmp_path / "home"))
    cfg = gan_cfg(demo_data, 0.1, "gan.with_masks=true", "metrics.every_ticks=0",
                  "gan.tick_kimg=0.1")
    outcome = train("gan", cfg, progress=False)
    made = generate_dataset(outcome.model_uri, str(tmp_path / "gen"), seeds=[0, 1],
                            classes=["melanoma"], progress=False)
    manifest = read_manifest(made.manifest_uri)
    masks = [np.asarray(Image.open(manifest.resolve(u))) for u in manifest.df["mask_uri"]]
    assert len(masks) == 2 and all(m.shape == (16, 16) and set(np.unique(m)) <= {0, 255}
                                   for m in masks)
    seg = resolve_config("segmentation", None, [f"data.manifest={demo_data}"],
                         synthetic_manifest=made.manifest_uri)
    inputs = training_inputs(get_task("segmentation"), seg, prepare=True)
    image, mask = inputs.train_set[len(inputs.train_set) - 1]
    assert image.shape[0] == 3 and mask.shape[0] == 1
