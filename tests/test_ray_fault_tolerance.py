"""Ray Train on a local Ray cluster: a worker killed mid-training resumes from its checkpoint."""

from pathlib import Path

import pytest
from conftest import tiny_overrides

from dermml import storage
from dermml.orchestration.ray_train import fit_with_ray
from dermml.training.run import resolve_config

pytestmark = pytest.mark.integration


def test_killed_worker_resumes_from_s3_checkpoint(demo_data, s3_endpoint, tmp_path,
                                                  monkeypatch):
    monkeypatch.setenv("DERMML_FAULT_KILL_AT_EPOCH", "1")
    monkeypatch.setenv("DERMML_FAULT_MARKER_DIR", str(tmp_path))
    cfg = resolve_config("segmentation", None, tiny_overrides(demo_data, 4, ray=True) + [
        "ray.storage_path=s3://dermml/ray", "ray.max_failures=2",
        "train.max_steps_per_epoch=2"])
    import ray

    try:
        result = fit_with_ray("segmentation", cfg, run_name="fault-drill")
    finally:
        ray.shutdown()
    assert Path(tmp_path, "killed").read_text() == "1"  # the worker really died after epoch 1
    assert result.epochs_run == 4
    assert [h["epoch"] for h in result.history] == [0, 1, 2, 3]  # no epoch trained twice
    assert storage.list_files("s3://dermml/ray/fault-drill", (".pt",))  # checkpoints on S3
