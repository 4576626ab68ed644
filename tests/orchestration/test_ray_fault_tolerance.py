"""Ray Train on a local Ray cluster: a worker killed mid-training resumes from its checkpoint."""

from pathlib import Path

import pytest
from conftest import tiny_overrides
from mlflow.tracking import MlflowClient

from dermml import storage
from dermml.orchestration import tracking
from dermml.orchestration.ray_train import fit_with_ray
from dermml.training.inputs import training_inputs
from dermml.training.run import resolve_config

pytestmark = pytest.mark.integration


@pytest.mark.slow  # local-checkpoint resume is in make test; S3 storage: `make test-slow`
def test_killed_worker_resumes_from_s3_checkpoint(demo_data, s3_endpoint, tmp_path,
                                                  monkeypatch):
    monkeypatch.setenv("DERMML_FAULT_KILL_AT_EPOCH", "1")
    monkeypatch.setenv("DERMML_FAULT_MARKER_DIR", str(tmp_path))
    cfg = resolve_config("segmentation", None, tiny_overrides(demo_data, 4, ray=True) + [
        "ray.storage_path=s3://dermml/ray", "ray.max_failures=2",
        "train.max_steps_per_epoch=2"])
    import ray

    try:
        result = fit_with_ray(training_inputs("segmentation", cfg), run_name="fault-drill")
    finally:
        ray.shutdown()
    assert Path(tmp_path, "killed").read_text() == "1"  # the worker really died after epoch 1
    assert result.epochs_run == 4
    assert [h["epoch"] for h in result.history] == [0, 1, 2, 3]  # no epoch trained twice
    assert storage.list_files("s3://dermml/ray/fault-drill", (".pt",))  # checkpoints on S3


def test_two_workers_split_each_mixed_epoch_and_return_a_plain_model(demo_data, tmp_path,
                                                                     monkeypatch, capfd):
    """Data-parallel training (DDP over gloo) with real + synthetic batches on 2 Ray workers."""
    import math

    import ray

    from dermml.data.demo import generate_demo
    from dermml.data.manifest import read_manifest
    from dermml.tasks import get_task

    monkeypatch.setenv("DERMML_HOME", str(tmp_path / "home"))
    synthetic = generate_demo(str(tmp_path / "synthetic"), n=40, size=32, seed=9)
    cfg = resolve_config("segmentation", None, tiny_overrides(demo_data, 2, ray=True) + [
        "ray.num_workers=2", "ray.cpus_per_worker=0.5", f"mix.synthetic_manifest={synthetic}",
        "mix.real_batch_ratio=0.5"])
    run_id = tracking.create_parent_run("segmentation", "train", "two-workers")
    try:
        result = fit_with_ray(training_inputs("segmentation", cfg), run_name="two-workers",
                              tracking_uri=tracking.tracking_uri(), mlflow_run_id=run_id)
    finally:
        ray.shutdown()
    n_real = len(read_manifest(demo_data).split("train"))
    batches = math.ceil(n_real / 4)  # 4 real + 4 synthetic per batch of 8
    assert result.epochs_run == 2
    assert [h["optimizer_steps"] for h in result.history] == [math.ceil(batches / 2)] * 2
    model = get_task("segmentation").build_model(cfg)
    model.load_state_dict(result.best_model)  # no DDP "module." prefix
    out, err = capfd.readouterr()  # worker logs reach the driver; the cleaner's poll is quiet
    assert "world_size=2" in out + err
    assert "Failed to query Ray Train Controller" not in out + err
    # Rank 0 prints one line per epoch (once: not again through Ray's print patch), and
    # Ray's TrainingReport repr of every report is gone.
    for epoch in (1, 2):
        assert (out + err).count(f"epoch {epoch}/2  train_loss ") == 1, err
    assert "TrainingReport(" not in out + err
    client = MlflowClient(tracking.tracking_uri())
    assert [m.step for m in client.get_metric_history(run_id, "val_dice")] == [0, 1]
    assert "plots/loss_curve.png" in {a.path for a in client.list_artifacts(run_id, "plots")}
