"""segdiff as a platform task: the shared loop, registry/serving contract, samplers, resume."""

from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.exceptions import MlflowException

from dermml.data.images import load_image
from dermml.data.manifest import read_manifest
from dermml.tasks import get_task
from dermml.training.checkpoint import FolderCheckpointer
from dermml.training.inputs import training_inputs
from dermml.training.run import resolve_config, train
from dermml.training.setup import build_parts, run_loop

DEMO = str(Path(__file__).resolve().parents[2] / "configs" / "segdiff" / "demo.yaml")


def demo_cfg(manifest: str, epochs: int, *extra: str):
    return resolve_config("segdiff", DEMO, [f"data.manifest={manifest}", "ray.enabled=false",
                                            f"train.epochs={epochs}", *extra])


@pytest.fixture(scope="module")
def trained(demo_data, tmp_path_factory):
    home = tmp_path_factory.mktemp("segdiff-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DERMML_HOME", str(home))
        outcome = train("segdiff", demo_cfg(demo_data, 8), progress=False)
    return home, outcome


def test_segdiff_learns_in_the_shared_loop(trained):
    from mlflow.tracking import MlflowClient

    from dermml.orchestration import tracking

    home, outcome = trained
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DERMML_HOME", str(home))
        history = MlflowClient(tracking.tracking_uri()).get_metric_history(outcome.run_id,
                                                                           "val_dice")
    dice = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert len(dice) == 8 and max(dice) > dice[0] + 0.15, dice


def test_serving_params_choose_the_sampler_and_garbage_is_refused(trained, demo_data,
                                                                  monkeypatch):
    from dermml.orchestration.tracking import load_python_model
    from dermml.serving.pyfunc import request_frame, signature_for

    home, outcome = trained
    monkeypatch.setenv("DERMML_HOME", str(home))
    model = load_python_model(outcome.model_uri)
    manifest = read_manifest(demo_data)
    image = load_image(manifest.resolve(manifest.split("test").iloc[0]["image_uri"]))
    ddim = model.predict(None, request_frame([image]),
                         {"sampler": "ddim", "steps": 5, "ensemble": 2})
    again = model.predict(None, request_frame([image]),
                          {"sampler": "ddim", "steps": 5, "ensemble": 2})
    assert ddim.loc[0, "mask"] == again.loc[0, "mask"]  # seeded noise: same image, same mask
    assert {"height", "width"} <= set(ddim) and ddim.loc[0, "height"] == image.shape[0]
    params = {p.name for p in signature_for("segdiff", model.cfg).params.params}
    assert {"sampler", "steps", "ensemble", "eta", "seed", "threshold"} <= params
    with pytest.raises(MlflowException) as err:
        model.predict(None, request_frame([image]), {"sampler": "euler"})
    assert err.value.get_http_status_code() == 400
    with pytest.raises(MlflowException):
        model.predict(None, request_frame([image]), {"ensemble": 0})


def test_ddpm_and_ddim_are_compared_on_the_same_test_set_in_one_run(trained, demo_data,
                                                                   monkeypatch):
    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from dermml.cli import app
    from dermml.orchestration import tracking

    home, outcome = trained
    monkeypatch.setenv("DERMML_HOME", str(home))
    result = CliRunner().invoke(app, [
        "evaluate", outcome.model_uri, "--data", demo_data, "--splits", "test",
        "--param", "ensemble=2", "--compare", "sampler=ddpm", "--compare", "sampler=ddim,steps=10",
        "--compare", "sampler=dpm,steps=10"])
    assert result.exit_code == 0, result.output
    assert "sampler=ddpm" in result.output and "sampler=ddim,steps=10" in result.output
    assert "sampler=dpm,steps=10" in result.output
    client = MlflowClient(tracking.tracking_uri())
    experiment = client.get_experiment_by_name("dermml/segdiff")
    (run,) = client.search_runs([experiment.experiment_id], "tags.`dermml.stage` = 'compare'")
    metrics = run.data.metrics
    for label in ("ensemble_2_sampler_ddpm", "ensemble_2_sampler_ddim_steps_10",
                  "ensemble_2_sampler_dpm_steps_10"):
        assert 0.0 < metrics[f"{label}_dice"] <= 1.0
        assert 0.0 <= metrics[f"{label}_precision"] <= 1.0 and f"{label}_hd95" in metrics
        assert metrics[f"{label}_seconds_per_image"] > 0
    # 10 DDIM or DPM-Solver++ steps instead of all T DDPM steps: clearly faster per image.
    for fast in ("ddim", "dpm"):
        assert metrics[f"ensemble_2_sampler_{fast}_steps_10_seconds_per_image"] < \
            metrics["ensemble_2_sampler_ddpm_seconds_per_image"] / 3
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert "evaluation/compare.csv" in artifacts


def test_sampler_params_the_model_cannot_run_are_a_bad_request(trained, demo_data, monkeypatch):
    from dermml.orchestration.tracking import load_python_model
    from dermml.serving.pyfunc import request_frame

    home, outcome = trained
    monkeypatch.setenv("DERMML_HOME", str(home))
    model = load_python_model(outcome.model_uri)
    manifest = read_manifest(demo_data)
    image = load_image(manifest.resolve(manifest.split("test").iloc[0]["image_uri"]))
    T = model.cfg.diffusion.timesteps
    for params, message in (({"sampler": "ddpm", "steps": 5}, "DDPM always runs all"),
                            ({"sampler": "ddim", "steps": T + 1}, "more than the model"),
                            ({"sampler": "dpm", "steps": T + 1}, "more than the model")):
        with pytest.raises(MlflowException, match=message) as err:
            model.predict(None, request_frame([image]), params)
        assert err.value.get_http_status_code() == 400


def test_every_sampler_gives_masks_and_the_same_seed_the_same_masks(trained, demo_data,
                                                                      monkeypatch):
    from dermml.data.datasets import image_to_tensor, resize_image
    from dermml.models.schedulers import SAMPLERS
    from dermml.orchestration.tracking import load_python_model

    home, outcome = trained
    monkeypatch.setenv("DERMML_HOME", str(home))
    served = load_python_model(outcome.model_uri)
    task, cfg = get_task("segdiff"), served.cfg
    manifest = read_manifest(demo_data)
    image = load_image(manifest.resolve(manifest.split("test").iloc[0]["image_uri"]))
    x = image_to_tensor(resize_image(image, cfg.data.image_size))[None]
    for name in SAMPLERS:
        steps = None if name == "ddpm" else 5
        first, again, other = (task.sample_masks(served.model, x, cfg, name, steps, 2, 0.5,
                                                 seed)[0] for seed in (3, 3, 4))
        assert first.shape == (1, 1, *x.shape[2:]) and 0 <= first.min() <= first.max() <= 1
        assert torch.equal(first, again), name
        assert not torch.allclose(first, other), name
    (mask,) = served.predict_images([image], {"sampler": "dpm", "steps": 5, "ensemble": 2})
    (again,) = served.predict_images([image], {"sampler": "dpm", "steps": 5, "ensemble": 2})
    assert mask.shape == image.shape[:2] and set(np.unique(mask)) <= {0, 1}
    assert 0 < mask.mean() < 1 and np.array_equal(mask, again)


def test_resume_restores_ema_weights_and_step_counter(demo_data, tmp_path):
    task = get_task("segdiff")
    cfg = demo_cfg(demo_data, 2, "train.max_steps_per_epoch=3", "ema.update_after_step=2")
    ckpt = FolderCheckpointer(str(tmp_path / "ckpt"))
    parts = build_parts(training_inputs(task, cfg))
    run_loop(task, cfg, parts, torch.device("cpu"), checkpointer=ckpt)
    saved = ckpt.load()["model"]
    assert int(saved["ema_step"]) == 6
    ema_key = next(k for k in saved if k.startswith("ema_unet."))
    assert not torch.equal(saved[ema_key], saved[ema_key.replace("ema_unet.", "unet.")])

    cfg3 = demo_cfg(demo_data, 3, "train.max_steps_per_epoch=3", "ema.update_after_step=2")
    resumed = build_parts(training_inputs(task, cfg3))
    seen = {}

    def spy(epoch):  # state right after the checkpoint was loaded, before epoch 2 trains
        seen["ema_step"] = int(resumed.model.ema_step)
        seen["ema"] = resumed.model.state_dict()[ema_key].clone()

    from dermml.training.loop import Hooks

    result = run_loop(task, cfg3, resumed, torch.device("cpu"), Hooks(on_epoch_start=spy),
                      checkpointer=ckpt)
    assert seen["ema_step"] == 6 and torch.equal(seen["ema"], saved[ema_key])
    assert int(resumed.model.ema_step) == 9 and [h["epoch"] for h in result.history] == [0, 1, 2]


def test_cli_predict_by_task_name_uses_the_champion_and_the_sampler_flags(trained, demo_data,
                                                                          tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from PIL import Image
    from typer.testing import CliRunner

    from dermml.cli import app
    from dermml.orchestration import tracking
    from dermml.registry.gate import register

    home, outcome = trained
    monkeypatch.setenv("DERMML_HOME", str(home))
    version = register(outcome.model_uri, "segdiff")
    MlflowClient(tracking.configure()).set_registered_model_alias("dermml-segdiff", "champion",
                                                                  version)
    manifest = read_manifest(demo_data)
    image = manifest.resolve(manifest.split("test").iloc[0]["image_uri"])
    args = ["predict", "segdiff", image, "--out", str(tmp_path / "out"), "--sampler", "ddim",
            "--steps", "3", "--ensemble", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    mask = Image.open(tmp_path / "out" / f"{Path(image).stem}_mask.png")
    assert mask.size == Image.open(image).size and set(np.unique(mask)) <= {0, 255}
    assert "lesion_fraction" in (tmp_path / "out" / "predictions.csv").read_text()
    again = CliRunner().invoke(app, args)  # never overwrites an earlier prediction
    assert again.exit_code != 0 and "exists" in again.output
    bad = CliRunner().invoke(app, [*args[:4], str(tmp_path / "other"), "--sampler", "euler"])
    assert bad.exit_code != 0 and "euler" in bad.output


def test_logged_model_keeps_only_the_ema_network_and_serves_from_it(trained, tmp_path,
                                                                     monkeypatch):
    import mlflow

    from dermml.orchestration.tracking import load_python_model

    home, outcome = trained
    monkeypatch.setenv("DERMML_HOME", str(home))
    folder = mlflow.artifacts.download_artifacts(outcome.model_uri, dst_path=str(tmp_path))
    (bundle,) = Path(folder).rglob("model.pt")
    state = torch.load(bundle, map_location="cpu", weights_only=True)["state_dict"]
    assert state and not any(k.startswith("unet.") for k in state)
    assert any(k.startswith("ema_unet.") for k in state) and "ema_step" in state
    net = load_python_model(outcome.model_uri).model
    for (name, ema), (_, live) in zip(net.ema_unet.state_dict().items(),
                                      net.unet.state_dict().items(), strict=True):
        assert torch.equal(ema, live), name
        assert torch.equal(ema, state[f"ema_unet.{name}"]), name


def test_boundary_map_comes_from_the_loader_and_gives_the_same_loss(demo_data):
    """The hybrid-loss presets compute the boundary distance map in the DataLoader workers:
    the training step gets it with the batch and its loss equals the in-step computation."""
    from torch.utils.data import DataLoader

    from dermml.losses.diffusion import boundary_proximity
    from dermml.tasks.segdiff import WithBoundaryProximity

    task = get_task("segdiff")
    cfg = demo_cfg(demo_data, 1, "loss.kind=hybrid", "loss.gamma=0.25")
    manifest = read_manifest(demo_data)
    train_ds, val_ds = task.datasets(cfg, manifest)
    assert isinstance(train_ds, WithBoundaryProximity) and len(val_ds[0]) == 2
    images, masks, proximity = next(iter(DataLoader(train_ds, batch_size=4, num_workers=1)))
    assert torch.allclose(proximity, boundary_proximity(masks), equal_nan=True)
    assert torch.isfinite(proximity).any()
    model = task.build_model(cfg)
    step = task.loss_step(cfg)
    torch.manual_seed(3)
    from_loader = step(model, (images, masks, proximity))
    torch.manual_seed(3)
    in_step = step(model, (images, masks))
    assert torch.allclose(from_loader, in_step)


@pytest.mark.integration
def test_killed_cli_training_resumes_the_same_run_with_ema_and_step_counter(demo_data,
                                                                           dermml_home):
    """`dermml train segdiff` is killed after its first checkpoint; `--resume RUN_ID` continues
    that run from the checkpoint: EMA weights and step counter included, epochs not repeated."""
    import os
    import subprocess
    import sys
    import time

    from mlflow.tracking import MlflowClient

    from dermml.orchestration import tracking

    bin_dir = Path(sys.executable).parent
    steps = 3
    common = ["--set", "ray.enabled=false", "--set", f"train.max_steps_per_epoch={steps}",
              "--set", "ema.update_after_step=2"]
    first = subprocess.Popen(
        [str(bin_dir / "dermml"), "train", "segdiff", "--config", DEMO, "--set",
         f"data.manifest={demo_data}", "--set", "train.epochs=40", *common],
        env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = dermml_home / "checkpoints"
    deadline = time.monotonic() + 120
    while not list(checkpoints.glob("*/last.pt")) and time.monotonic() < deadline:
        assert first.poll() is None, "training ended before its first checkpoint"
        time.sleep(0.2)
    first.kill()  # SIGKILL: no cleanup, as a lost node
    first.wait()
    (last,) = checkpoints.glob("*/last.pt")
    run_id = last.parent.name
    killed_at = FolderCheckpointer(str(last.parent)).load()["epoch"]
    assert killed_at < 39

    resumed = subprocess.run(
        [str(bin_dir / "dermml"), "train", "segdiff", "--resume", run_id, "--set",
         f"train.epochs={killed_at + 3}", *common],
        env=os.environ.copy(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    state = FolderCheckpointer(str(last.parent)).load()
    assert state["epoch"] == killed_at + 2
    # One EMA update per optimizer step since the very first: the counter was not reset.
    assert int(state["model"]["ema_step"]) == (killed_at + 3) * steps
    history = MlflowClient(tracking.tracking_uri()).get_metric_history(run_id, "val_dice")
    steps_logged = [m.step for m in history]
    assert len(steps_logged) == len(set(steps_logged))  # no epoch trained twice
    # (The kill may land between an epoch's checkpoint and its metrics: that point can be
    # missing, never repeated.)
    assert {killed_at + 1, killed_at + 2} <= set(steps_logged) <= set(range(killed_at + 3))
