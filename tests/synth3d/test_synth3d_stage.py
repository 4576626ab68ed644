"""`dermml synth3d` as a platform stage: CLI, MLflow run, determinism, resume, Ray, the
synth3d validation suite, the dermsynth3d importer, and one-line errors for bad input."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from dermml.cli import app
from dermml.data.manifest import read_manifest, write_manifest

TINY = ["--set", "bodies.texture_size=128", "--set", "bodies.edge=0.07",
        "--set", "paste.view_size=96", "--set", "device=cpu", "--set", "backend=torch"]


@pytest.fixture(scope="module")
def lesions_uri(tmp_path_factory):
    from dermml.data.demo import generate_demo

    return generate_demo(str(tmp_path_factory.mktemp("lesions") / "demo"), n=8, size=64, seed=0)


def synth3d(out, lesions, *extra):
    args = ["synth3d", "--out", str(out), "--lesions", lesions, "--bodies", "procedural:2",
            "--views", "2", "--size", "48", "--blend", "paste", "--lesions-per-body", "2",
            "--no-ray", *TINY, *extra]
    return CliRunner().invoke(app, args)


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, lesions_uri):
    home = tmp_path_factory.mktemp("home")
    mp = pytest.MonkeyPatch()
    mp.setenv("DERMML_HOME", str(home))
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path_factory.mktemp("synth") / "out"
    result = synth3d(out, lesions_uri)
    yield out, result, home
    mp.undo()


def test_synth3d_writes_a_manifest_that_passes_the_synth3d_suite(tracked_run):
    from dermml.validation.run import validate

    out, result, _ = tracked_run
    assert result.exit_code == 0, result.output
    manifest = read_manifest(str(out))
    df = manifest.df
    assert len(df) == 4 and set(df["patient_id"]) == {"p0000", "p0001"}
    assert df["skin_type"].isin(["I", "II", "III", "IV", "V", "VI"]).all()
    assert df.groupby("patient_id")["split"].nunique().eq(1).all()  # a body stays in a split
    assert all(len(b) >= 1 for b in df["boxes"])
    outcome = validate(manifest.uri, "synth3d", None, track=False, progress=False)
    assert outcome.report.passed, outcome.report.summary()
    scene = pd.read_csv(out / "data.csv")
    for column in ("file_id", "bodytex_id", "look_at", "camera_pos", "light_pos", "ambient",
                   "diffuse", "specular", "shininess", "normal_weight", "background_id"):
        assert column in scene.columns
    assert (out / "bodies" / "p0000" / "model_highres_0_normalized.obj").exists()


def test_synth3d_logs_counts_samples_and_distributions_to_mlflow(tracked_run, monkeypatch):
    from mlflow.tracking import MlflowClient

    from dermml.orchestration import tracking

    out, result, home = tracked_run
    monkeypatch.setenv("DERMML_HOME", str(home))
    run_id = json.loads(result.output[result.output.index("{"):])["run_id"]
    client = MlflowClient(tracking.tracking_uri(), registry_uri=tracking.tracking_uri())
    run = client.get_run(run_id)
    assert run.data.metrics["views_written"] == 4
    assert sum(v for k, v in run.data.metrics.items()
               if k.startswith("bodies_skin_type.")) == 2
    assert any(k.startswith("rejected_") for k in run.data.metrics) or \
        run.data.metrics["lesions_placed"] == 4
    assert run.data.params["blend.method"] == "paste" and run.data.params["seed"] == "0"
    assert run.data.tags["synth3d.blend_features"] == "none"
    assert run.data.tags[tracking.TAG_DATASET_VERSION] == read_manifest(str(out)).version
    artifacts = {a.path for a in client.list_artifacts(run_id)} | \
        {a.path for d in ("samples", "plots") for a in client.list_artifacts(run_id, d)}
    assert {"samples/views.png", "plots/scene_parameters.png", "data.csv",
            "bodies.csv", "config.yaml"} <= artifacts


def test_synth3d_is_deterministic_by_seed_and_resumes(tracked_run, lesions_uri, tmp_path):
    out, _, _ = tracked_run
    again = synth3d(tmp_path / "again", lesions_uri, "--no-track")
    assert again.exit_code == 0, again.output
    first = read_manifest(str(out)).df.set_index("sample_id")["sha256"]
    second = read_manifest(str(tmp_path / "again")).df.set_index("sample_id")["sha256"]
    assert first.sort_index().equals(second.sort_index())
    resumed = synth3d(tmp_path / "again", lesions_uri, "--no-track")
    counts = json.loads(resumed.output[resumed.output.index("{"):])["counts"]
    assert counts["views_skipped"] == 4 and counts["views_written"] == 0
    other = synth3d(tmp_path / "again", lesions_uri, "--no-track", "--seed", "1")
    assert other.exit_code == 2 and "other settings (seed differ)" in other.output


@pytest.mark.integration
def test_synth3d_runs_one_ray_task_per_body(lesions_uri, tmp_path):
    import ray

    from dermml.synthesis.run import resolve_config, synthesize

    cfg = resolve_config(None, [f"lesions={lesions_uri}", "bodies.source=procedural:2",
                                "views.per_body=2", "views.size=48", "blend.method=paste",
                                "paste.lesions_per_body=2"] + TINY[1::2])
    try:
        outcome = synthesize(cfg, str(tmp_path / "ray"), use_ray=True, track=False,
                             progress=False)
    finally:
        ray.shutdown()
    assert outcome.n_views == 4 and outcome.counts["bodies"] == 2


def test_a_lesion_manifest_without_masks_is_one_line_naming_it(tmp_path):
    uri = str(tmp_path / "nomasks.parquet")
    write_manifest(pd.DataFrame([{"sample_id": "a", "image_uri": "a.png"}]), uri)
    result = synth3d(tmp_path / "out", uri, "--no-track")
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "nomasks.parquet" in lines[0] and "mask_uri" in lines[0]
    assert not (tmp_path / "out" / "manifest.parquet").exists()


def test_a_body_folder_with_a_mesh_without_uvs_is_one_line_naming_it(tmp_path, lesions_uri):
    folder = tmp_path / "bodies" / "b1"
    folder.mkdir(parents=True)
    (folder / "body.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    Image.new("RGB", (32, 32)).save(folder / "body.png")
    result = synth3d(tmp_path / "out", lesions_uri, "--no-track", "--bodies",
                     str(tmp_path / "bodies"))
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "body.obj has no texture coordinates" in lines[0]
    assert not (tmp_path / "out" / "manifest.parquet").exists()
    assert not list((tmp_path / "out").glob("params/*.json"))


def _reference_layout(root: Path) -> None:
    """A DermSynth3D gen_data.py output: gen_006/images, targets (.npz) and data.csv."""
    gen = root / "gen_006"
    (gen / "images").mkdir(parents=True)
    (gen / "targets").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for k in range(3):
        file_id = f"{k:032x}"
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
            gen / "images" / f"{file_id}.png")
        masks = np.zeros((32, 32, 5), np.float32)
        masks[4:10, 5:12, 0] = 1
        masks[20:24, 20:22, 0] = 1
        masks[..., 1] = 1 - masks[..., 0]
        masks[..., 3] = 2
        masks[..., 4] = 0.5
        masks[:2, :, 3], masks[:2, :, 4], masks[:2, :, 1] = 0, -1, 0
        np.savez_compressed(gen / "targets" / f"{file_id}.npz", masks=masks)
        rows.append({"file_id": file_id, "bodytex_id": "006-f-run"})
    pd.DataFrame(rows).to_csv(gen / "data.csv", index=False)


def test_dermsynth3d_importer_reads_the_reference_output(tmp_path):
    from dermml.data.importers import import_dataset

    _reference_layout(tmp_path / "src")
    uri, _ = import_dataset("dermsynth3d", str(tmp_path / "src"), str(tmp_path / "ds"))
    df = read_manifest(uri).df
    assert len(df) == 3 and set(df["patient_id"]) == {"006-f-run"}
    assert df["split"].nunique() == 1  # one body: one split
    row = df.iloc[0]
    assert [list(b) for b in row["boxes"]] == [[5.0, 4.0, 7.0, 6.0], [20.0, 20.0, 2.0, 4.0]]
    mask = np.asarray(Image.open(row["mask_uri"]))
    assert mask.max() == 255 and (mask > 0).sum() == 6 * 7 + 4 * 2
    depth = np.asarray(Image.open(row["depth_uri"]))
    assert depth.dtype == np.uint16 and (depth[:2] == 0).all() and depth[5, 5] == 5000
    assert str(tmp_path / "ds") in row["mask_uri"]  # derived files beside the manifest
    assert not list((tmp_path / "src").rglob("*.parquet"))  # the source is untouched


def test_dermsynth3d_importer_reads_dermml_synth3d_output(tracked_run, tmp_path):
    from dermml.data.importers import import_dataset

    out, _, _ = tracked_run
    uri, _ = import_dataset("dermsynth3d", str(out), str(tmp_path / "ds.parquet"))
    df = read_manifest(uri).df
    ours = read_manifest(str(out)).df
    assert sorted(df["sample_id"]) == sorted(ours["sample_id"])
    assert set(df["patient_id"]) == set(ours["patient_id"])


def test_segmentation_training_data_reads_the_synthetic_manifest(tracked_run):
    from dermml.data.datasets import SegmentationDataset

    out, _, _ = tracked_run
    manifest = read_manifest(str(out))
    dataset = SegmentationDataset(manifest, manifest.df, 32)
    image, mask = dataset[0][:2]
    assert tuple(image.shape[-2:]) == (32, 32) and float(mask.max()) == 1.0


@pytest.mark.integration
def test_synth3d_writes_to_and_resumes_on_s3(s3_endpoint, lesions_uri):
    out = "s3://dermml/synth3d"
    first = synth3d(out, lesions_uri, "--no-track")
    assert first.exit_code == 0, first.output
    manifest = read_manifest(out)
    assert len(manifest.df) == 4
    from dermml import storage

    assert storage.exists(storage.join(out, "bodies", "p0000", "body.json"))
    again = synth3d(out, lesions_uri, "--no-track")
    counts = json.loads(again.output[again.output.index("{"):])["counts"]
    assert counts["views_skipped"] == 4
