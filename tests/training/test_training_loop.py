"""The shared training loop: it learns, checkpoints, resumes, and stops early."""

import numpy as np
import torch
from conftest import tiny_overrides

from dermml.config import load_config
from dermml.data.manifest import read_manifest
from dermml.tasks import get_task
from dermml.training.checkpoint import FolderCheckpointer
from dermml.training.inputs import training_inputs
from dermml.training.setup import build_parts, run_loop
from dermml.visualization import image_grid


def tiny_cfg(manifest, epochs, **extra):
    overrides = tiny_overrides(manifest, epochs) + [f"{k}={v}" for k, v in extra.items()]
    task = get_task("segmentation")
    return task, load_config(task.config_cls, overrides=overrides)


def test_training_loss_goes_down(demo_data):
    task, cfg = tiny_cfg(demo_data, 4)
    parts = build_parts(training_inputs(task, cfg))
    result = run_loop(task, cfg, parts, torch.device("cpu"))
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0] * 0.8


def test_small_model_beats_chance_on_held_out_demo_images(demo_data):
    """Demo data is learnable: a few CPU epochs clearly beat the all-lesion baseline."""
    task, cfg = tiny_cfg(demo_data, 8)
    parts = build_parts(training_inputs(task, cfg))
    run_loop(task, cfg, parts, torch.device("cpu"))
    manifest = read_manifest(demo_data)
    test_rows = manifest.split("test")
    from dermml.data.images import load_image

    images = [load_image(manifest.resolve(u)) for u in test_rows["image_uri"]]
    preds = task.predict(parts.model, images, cfg)
    summary = task.aggregate(task.score(preds, test_rows, manifest))
    all_lesion = [np.ones(img.shape[:2], bool) for img in images]
    baseline = task.aggregate(task.score(all_lesion, test_rows, manifest))
    assert summary["dice"] > 0.75, summary
    assert summary["dice"] > baseline["dice"] + 0.4, (summary, baseline)


def test_resume_continues_from_last_checkpoint(demo_data, tmp_path):
    task, cfg = tiny_cfg(demo_data, 2, **{"train.max_steps_per_epoch": 2})
    ckpt = FolderCheckpointer(str(tmp_path / "ckpt"))
    first = run_loop(task, cfg, build_parts(training_inputs(task, cfg)), torch.device("cpu"),
                     checkpointer=ckpt)
    assert first.epochs_run == 2
    _, cfg4 = tiny_cfg(demo_data, 4, **{"train.max_steps_per_epoch": 2})
    resumed = run_loop(task, cfg4, build_parts(training_inputs(task, cfg4)), torch.device("cpu"),
                       checkpointer=ckpt)
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2, 3]
    assert resumed.history[:2] == first.history  # epochs 0-1 were not trained again


def test_early_stopping_stops_when_gate_metric_stalls(demo_data):
    # lr 0 never improves after the first epoch, so patience 1 stops at epoch 2.
    task, cfg = tiny_cfg(demo_data, 10, **{"train.lr": 0.0, "train.early_stopping_patience": 1,
                                           "train.max_steps_per_epoch": 1})
    result = run_loop(task, cfg, build_parts(training_inputs(task, cfg)), torch.device("cpu"))
    assert result.stopped_early and result.epochs_run == 2


def test_preview_grid_shows_all_requested_samples(demo_data):
    task, cfg = tiny_cfg(demo_data, 1)
    parts = build_parts(training_inputs(task, cfg))
    grid = task.preview(parts.model, parts.val_loader.dataset, cfg, n=8)
    assert grid.shape[0] > 2 * 128 and grid.shape[1] > 4 * 128 and grid.dtype == np.uint8
    assert image_grid([np.zeros((4, 4, 3), np.uint8)] * 5, columns=4).shape == (2 * 6 + 2,
                                                                                  4 * 6 + 2, 3)


def test_compiled_training_step_learns_and_checkpoints_the_eager_weights(demo_data):
    """train.compile=true runs the step through torch.compile (aot_eager here: no C++ toolchain
    needed); the loss goes down and the saved state has the eager module's keys."""
    import torch._dynamo

    torch._dynamo.reset()
    task, cfg = tiny_cfg(demo_data, 3, **{"train.compile": "true",
                                          "train.compile_backend": "aot_eager"})
    parts = build_parts(training_inputs(task, cfg))
    keys = set(parts.model.state_dict())
    result = run_loop(task, cfg, parts, torch.device("cpu"))
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0] * 0.9
    assert set(result.best_model) == keys  # no "_orig_mod." prefixes
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1


def test_epoch_aware_samplers_see_every_epoch():
    """A DistributedSampler (Ray, several workers) repeats its order unless told the epoch."""
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from dermml.training.inputs import sampler_epochs

    data = TensorDataset(torch.arange(32))
    loader = DataLoader(data, batch_size=4,
                        sampler=DistributedSampler(data, num_replicas=2, rank=0, seed=0))
    seen = []
    start = sampler_epochs(loader, seen.append)
    orders = []
    for epoch in range(3):
        start(epoch)
        orders.append(torch.cat([b[0] for b in loader]).tolist())
    assert seen == [0, 1, 2]
    assert orders[0] != orders[1] != orders[2]
    assert loader.sampler.epoch == 2


def test_amp_dtype_is_bfloat16_where_the_gpu_has_it_else_float16(monkeypatch):
    from dermml.training.loop import LoopConfig, amp_dtype

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert amp_dtype(LoopConfig(), cpu) is None and amp_dtype(LoopConfig(amp=False), cuda) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert amp_dtype(LoopConfig(), cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # T4, V100
    assert amp_dtype(LoopConfig(), cuda) == torch.float16
    assert amp_dtype(LoopConfig(amp_dtype="bfloat16"), cuda) == torch.bfloat16


def test_float16_training_scales_the_loss_learns_and_checkpoints_the_scaler(demo_data, tmp_path,
                                                                             monkeypatch):
    """The float16 path (GradScaler) run on the CPU: the loss goes down and the scaler state is
    checkpointed with the rest, so a resumed run keeps its loss scale."""
    from dermml.training import loop

    monkeypatch.setattr(loop, "amp_dtype", lambda cfg, device: torch.float16)
    task, cfg = tiny_cfg(demo_data, 3)
    checkpoints = FolderCheckpointer(str(tmp_path / "ckpt"))
    result = run_loop(task, cfg, build_parts(training_inputs(task, cfg)), torch.device("cpu"),
                      checkpointer=checkpoints)
    losses = [h["train_loss"] for h in result.history]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    scaler_state = checkpoints.load()["scaler"]
    assert scaler_state and scaler_state["scale"] > 0


def test_epoch_progress_bar_shows_on_a_terminal_only(monkeypatch):
    import io
    import sys

    from dermml.training.loop import _progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for stream, shown in ((Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr(sys, "stderr", stream)
        assert list(_progress(range(3), 3, True, "epoch 1/2")) == [0, 1, 2]
        assert ("epoch 1/2:" in stream.getvalue()) is shown, stream.getvalue()


def test_zero_epochs_logs_the_starting_weights_unchanged(demo_data, tmp_path, monkeypatch):
    """train.epochs=0 is how given weights (a published checkpoint through --pretrained, a
    logged model through init_from) are evaluated as they are: the logged model holds exactly
    the starting weights, validated once."""
    import pytest
    import torch
    from conftest import tiny_overrides

    from dermml.orchestration.tracking import load_python_model
    from dermml.training.run import resolve_config, train

    monkeypatch.setenv("DERMML_HOME", str(tmp_path / "home"))
    first = train("segmentation", resolve_config("segmentation", None,
                                                 tiny_overrides(demo_data, 1)), progress=False)
    cfg = resolve_config("segmentation", None,
                         tiny_overrides(demo_data, 0) + [f"init_from={first.model_uri}"])
    outcome = train("segmentation", cfg, progress=False)
    assert outcome.metrics["epochs_run"] == 0
    assert outcome.metrics["best_val_gate"] == pytest.approx(first.metrics["best_val_gate"])
    start = load_python_model(first.model_uri).model.state_dict()
    logged = load_python_model(outcome.model_uri).model.state_dict()
    assert all(torch.equal(logged[k], v) for k, v in start.items())
