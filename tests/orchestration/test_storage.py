"""Local paths and s3:// URIs behave the same, against a real S3 endpoint (moto server)."""

import pytest
import torch

from dermml import storage
from dermml.data.manifest import read_manifest


def test_local_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "a" / "b.bin"
    storage.write_bytes(str(target), b"one")
    storage.write_bytes(str(target), b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["b.bin"]


def test_missing_file_error_names_the_uri(tmp_path):
    with pytest.raises(storage.StorageError, match="nothere.png"):
        storage.read_bytes(str(tmp_path / "nothere.png"))


def test_unknown_scheme_is_refused():
    with pytest.raises(storage.StorageError, match="gs://"):
        storage.read_bytes("gs://bucket/key")


@pytest.mark.integration
def test_s3_roundtrip_and_listing(s3_endpoint):
    storage.write_bytes("s3://dermml/t/x/1.txt", b"a")
    storage.write_bytes("s3://dermml/t/x/2.png", b"b")
    assert storage.read_bytes("s3://dermml/t/x/1.txt") == b"a"
    assert storage.exists("s3://dermml/t/x/2.png")
    assert not storage.exists("s3://dermml/t/x/3.png")
    assert storage.list_files("s3://dermml/t", (".png",)) == ["s3://dermml/t/x/2.png"]


@pytest.mark.integration
def test_demo_data_on_s3_trains_like_local(s3_endpoint):
    """Generate to s3://, read the manifest and its relative image URIs, take a training step."""
    from dermml.config import load_config
    from dermml.data.demo import generate_demo
    from dermml.tasks import get_task
    from dermml.training.inputs import training_inputs
    from dermml.training.setup import build_parts, run_loop

    uri = generate_demo("s3://dermml/demo32", n=30, size=32, seed=1)
    manifest = read_manifest("s3://dermml/demo32")
    assert manifest.uri == uri and manifest.resolve("images/x.png").startswith("s3://dermml/")
    task = get_task("segmentation")
    cfg = load_config(task.config_cls, overrides=[
        f"data.manifest={uri}", "data.image_size=32", "model.depth=2", "model.base_channels=8",
        "train.epochs=1", "ray.enabled=false"])
    result = run_loop(task, cfg, build_parts(training_inputs(task, cfg)), torch.device("cpu"))
    assert result.epochs_run == 1 and result.history[0]["train_loss"] > 0


@pytest.mark.integration
def test_import_train_evaluate_register_promote_all_from_s3(s3_endpoint, demo_data):
    """Every stage on s3:// URIs: a dataset layout on S3 is imported (listed, not copied), the
    manifest written to S3 trains, evaluates and passes the promotion gate."""
    from pathlib import Path

    from dermml.data.importers import import_dataset
    from dermml.evaluation.run import evaluate
    from dermml.registry.gate import promote, register
    from dermml.training.run import resolve_config, train

    local = read_manifest(demo_data)
    for _, row in local.df.iterrows():
        for column, folder in (("image_uri", "images"), ("mask_uri", "masks")):
            name = Path(row[column]).name
            storage.write_bytes(f"s3://dermml/layout/{folder}/{name}",
                                storage.read_bytes(local.resolve(row[column])))
    uri, version = import_dataset("segmentation", "s3://dermml/layout",
                                  "s3://dermml/manifests/seg.parquet", seed=0)
    manifest = read_manifest(uri)
    assert uri.startswith("s3://") and len(manifest.df) == len(local.df)
    assert all(u.startswith("s3://dermml/layout/") for u in map(manifest.resolve,
                                                                  manifest.df["image_uri"]))
    cfg = resolve_config("segmentation", None, [
        f"data.manifest={uri}", "data.image_size=32", "model.depth=2", "model.base_channels=8",
        "train.epochs=2", "ray.enabled=false"])
    outcome = train("segmentation", cfg, progress=False)
    result = evaluate(outcome.model_uri, uri, ["test"], n_resamples=20)
    assert result.dataset_version == version and 0 <= result.metrics["test"]["dice"] <= 1
    decision = promote("segmentation", register(outcome.model_uri, "segmentation"), uri)
    assert decision.promoted  # the first model has no champion to beat
