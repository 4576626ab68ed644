"""What `dermml tune` checks before any trial runs: space files and settings (one-line errors,
Ray never started), dotted list keys, and PBT's restart state."""

import pytest
import torch
from conftest import tiny_overrides
from typer.testing import CliRunner

from dermml.cli import app
from dermml.config import ConfigError
from dermml.training.loop import LoopConfig, fit, with_hyperparameters
from dermml.training.run import resolve_config


def tune_args(demo_data, space, *extra):
    sets = [f"--set={o}" for o in tiny_overrides(demo_data, 3, ray=True)]
    return ["tune", "segmentation", "--space", str(space), *sets, *extra]


@pytest.mark.parametrize(("space", "message"), [
    ("train.lrr: loguniform(1e-5, 1e-2)\n", "train.lrr: loguniform(1e-5, 1e-2) gives 1e-05, "
     "which the config refuses: unknown config key 'train.lrr'; did you mean 'train.lr'?"),
    ("train.lr: loguniform(0, 1e-2)\n", "train.lr: 'loguniform(0, 1e-2)': loguniform needs "
     "0 < LOW"),
    ("train.lr: lognormal(1, 2)\n", "unknown distribution 'lognormal'"),
    ("train.lr: 0.01\n", "train.lr: 0.01 is not a distribution"),
    ("train.lr: uniform(1e-3)\n", "'uniform(1e-3)' needs 2 numbers"),
    ("train.epochs: uniform(2, 4)\n", "train.epochs: uniform(2, 4) gives 2.74, which the config "
     "refuses: train.epochs: Input should be a valid integer"),
    ("model.arch: choice([small_unet, transformer])\n", "gives 'transformer', which the config "
     "refuses"),
    ("loss.2.weight: uniform(0.5, 2)\n", "loss is a list of 2 item(s); give its index"),
    ("ray.num_workers: randint(1, 4)\n", "ray.num_workers: what a trial trains on and where "
     "it runs is not a hyper-parameter"),
    ("train.lr: [0.1\n", "is not valid YAML"),
    ("", "no keys to search"),
])
def test_a_bad_space_file_is_one_line_before_ray_starts(space, message, demo_data, tmp_path,
                                                        dermml_home):
    import ray

    path = tmp_path / "space.yaml"
    path.write_text(space)
    result = CliRunner().invoke(app, tune_args(demo_data, path, "--trials", "2"))
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[0].startswith(f"error: {path}") or lines[0].startswith("error: search space")
    assert message in lines[0], lines[0]
    assert not ray.is_initialized()
    assert not (dermml_home / "ray_results").exists() and not (dermml_home / "mlflow.db").exists()


def test_settings_that_cannot_work_together_are_refused_before_ray(demo_data, tmp_path):
    import ray

    path = tmp_path / "space.yaml"
    for space, extra, message in (
            ("model.base_channels: choice([8, 16])", ["--scheduler", "pbt"],
             "--scheduler pbt restarts trials from other trials' checkpoints, so it cannot "
             "vary the network"),
            ("train.lr: loguniform(1e-4, 1e-2)", ["--search", "optuna", "--scheduler", "pbt"],
             "use --search random with it"),
            ("train.lr: loguniform(1e-4, 1e-2)", ["--grace-period", "3"],
             "must be below train.epochs=3"),
            ("train.lr: loguniform(1e-4, 1e-2)", ["--search", "grid"],
             "--search: Input should be 'random', 'optuna' or 'hyperopt'"),
            ("train.lr: loguniform(1e-4, 1e-2)", ["--metric", "dice"],
             "trials report train_loss and val_<metric>")):
        path.write_text(space + "\n")
        result = CliRunner().invoke(app, tune_args(demo_data, path, *extra))
        assert result.exit_code == 2 and message in result.output, (extra, result.output)
    assert not ray.is_initialized()


def test_set_reaches_a_list_item_by_index_and_keeps_the_others():
    cfg = resolve_config("segmentation", None, ["loss.0.weight=2", "loss.1.name=tversky"])
    assert [(t.name, t.weight) for t in cfg.loss] == [("bce", 2.0), ("tversky", 1.0)]
    with pytest.raises(ConfigError, match=r"did you mean 'loss.0.weight'"):
        resolve_config("segmentation", None, ["loss.0.wieght=2"])


def test_a_pbt_restart_continues_the_schedule_at_the_new_learning_rate():
    """A checkpoint taken at lr 0.01 (cosine, mid-way) restarted with lr 0.001 trains on at a
    tenth of its rate, at the same point of the schedule, with the new weight decay."""
    model = torch.nn.Linear(4, 1)
    data = [(torch.randn(8, 4), torch.randn(8, 1)) for _ in range(4)]
    states = []

    class Keep:
        def load(self):
            return None

        def save(self, state, metrics):
            states.append(state)

    def loss_step(m, batch):
        return torch.nn.functional.mse_loss(m(batch[0]), batch[1])

    fit(model, data, None, LoopConfig(epochs=2, lr=0.01), loss_step, None, "dice",
        checkpointer=Keep())
    old = states[0]
    new = with_hyperparameters(old, LoopConfig(epochs=2, lr=0.001, weight_decay=0.5))
    old_group, group = old["optimizer"]["param_groups"][0], new["optimizer"]["param_groups"][0]
    assert group["lr"] == pytest.approx(old_group["lr"] / 10) and group["initial_lr"] == 0.001
    assert group["weight_decay"] == 0.5 and new["scheduler"]["base_lrs"] == [0.001]

    class Resume(Keep):
        def load(self):
            return new

    resumed = torch.nn.Linear(4, 1)
    fit(resumed, data, None, LoopConfig(epochs=2, lr=0.001, weight_decay=0.5), loss_step,
        None, "dice", checkpointer=Resume())
    final = states[-1]["optimizer"]["param_groups"][0]
    assert states[-1]["epoch"] == 1  # continued at epoch 1, not from 0
    assert final["lr"] == pytest.approx(states[1]["optimizer"]["param_groups"][0]["lr"] / 10)




def test_the_shipped_search_spaces_fit_their_tasks():
    from pathlib import Path

    from dermml.tasks import get_task
    from dermml.tuning.space import check_space, read_space

    shipped = sorted((Path(__file__).parents[2] / "configs" / "tune").glob("*.yaml"))
    assert {p.stem for p in shipped} >= {"segmentation", "classification"}
    for path in shipped:
        task = get_task(path.stem)
        base = resolve_config(path.stem, None, []).model_dump()
        assert check_space(read_space(str(path)), task.config_cls, base, str(path))
