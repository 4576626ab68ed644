"""What a hyper-parameter search is: the search space (``dotted.key: distribution``, the same
keys as ``--set``) and the search settings, checked against a task's config before any trial
starts. Knows nothing of Ray: ``orchestration/ray_tune.py`` turns a ``Distribution`` into a Tune
domain."""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field

from dermml.config import ConfigError, Section, load_config, read_yaml_mapping, shipped_config

SHAPES = {
    "uniform": "uniform(LOW, HIGH)",
    "quniform": "quniform(LOW, HIGH, STEP)",
    "loguniform": "loguniform(LOW, HIGH)  (0 < LOW < HIGH)",
    "randint": "randint(LOW, HIGH)  (integers, HIGH excluded)",
    "choice": "choice([A, B, ...])",
}
"""The distributions a space file may use, as they are written."""

NOT_HYPERPARAMETERS = ("task", "ray.", "data.manifest", "init_from")
"""Keys a search may not vary: where and on what a trial trains is not a hyper-parameter."""

PBT_FIXED = ("model.", "train.optimizer", "train.scheduler", "train.epochs", "data.image_size")
"""Keys population-based training cannot perturb: a trial restarts from another trial's
checkpoint, whose weights and optimizer state must still fit."""

_CALL = re.compile(r"^\s*([A-Za-z_]\w*)\s*\((.*)\)\s*$", re.DOTALL)


def _number(value: Any) -> Any:
    """YAML reads ``1e-5`` (no dot) as text: numbers written so become numbers."""
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return int(number) if re.fullmatch(r"[+-]?\d+", value.strip()) else number
    return value


@dataclass(frozen=True)
class Distribution:
    """One searched key: ``train.lr: loguniform(1e-5, 1e-2)``."""

    key: str
    kind: str
    args: tuple
    text: str

    def probes(self) -> list[Any]:
        """Values the config must accept for the distribution to be usable: its ends, an inner
        value that is not a whole number, or every option of a choice."""
        if self.kind == "choice":
            return list(self.args[0])
        low, high = self.args[0], self.args[1]
        if self.kind == "randint":
            return [low, high - 1]
        if self.kind == "loguniform":
            inner = math.exp(math.log(low) + 0.37 * (math.log(high) - math.log(low)))
        else:
            inner = low + 0.37 * (high - low)
        return [low, high] if self.kind == "quniform" else [low, inner, high]

    @property
    def is_log(self) -> bool:
        return self.kind == "loguniform"


def parse_distribution(key: str, text: Any, source: str = "search space") -> Distribution:
    """``loguniform(1e-5, 1e-2)`` -> a Distribution; a malformed one is a one-line ConfigError."""
    shapes = "; ".join(SHAPES.values())
    where = f"{source}: {key}"
    if not isinstance(text, str) or not (call := _CALL.match(text)):
        raise ConfigError(f"{where}: {text!r} is not a distribution; write one of {shapes} "
                          f"(a fixed value goes in --set {key}=VALUE)")
    kind, raw = call.group(1), call.group(2)
    if kind not in SHAPES:
        raise ConfigError(f"{where}: unknown distribution {kind!r}; use one of {shapes}")
    try:
        args = yaml.safe_load(f"[{raw}]")
    except yaml.YAMLError:
        raise ConfigError(f"{where}: cannot read the arguments of {text!r}; write "
                          f"{SHAPES[kind]}") from None
    if kind == "choice":
        if len(args) != 1 or not isinstance(args[0], list) or not args[0]:
            raise ConfigError(f"{where}: {text!r} needs one non-empty list: {SHAPES[kind]}")
        return Distribution(key, kind, ([_number(a) for a in args[0]],), text)
    args = [_number(a) for a in args]
    wanted = 3 if kind == "quniform" else 2
    if len(args) != wanted or not all(isinstance(a, int | float) and not isinstance(a, bool)
                                      for a in args):
        raise ConfigError(f"{where}: {text!r} needs {wanted} numbers: {SHAPES[kind]}")
    low, high = args[0], args[1]
    if not low < high:
        raise ConfigError(f"{where}: {text!r}: LOW must be below HIGH")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: {text!r}: loguniform needs 0 < LOW")
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise ConfigError(f"{where}: {text!r}: randint takes integers")
    if kind == "quniform" and args[2] <= 0:
        raise ConfigError(f"{where}: {text!r}: STEP must be positive")
    return Distribution(key, kind, tuple(args), text)


def plain(value: Any) -> Any:
    """A sampled value as plain Python (searchers hand back numpy scalars)."""
    return value.item() if hasattr(value, "item") else value


def sample_overrides(sample: dict[str, Any]) -> list[str]:
    """``{"train.lr": 0.001}`` -> ``["train.lr=0.001"]`` (JSON is YAML: lists and text too)."""
    return [f"{key}={json.dumps(plain(value))}" for key, value in sample.items()]


def trial_config(config_cls: type[BaseModel], base: dict, sample: dict[str, Any]) -> Any:
    """The config one trial trains with: the search's config with the sampled values set."""
    return load_config(config_cls, base=base, overrides=sample_overrides(sample))


def _one_line(exc: ConfigError) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return "; ".join(lines[1:] if lines[0].startswith("invalid config") else lines)


def check_space(space: dict[str, Any], config_cls: type[BaseModel], base: dict,
                source: str = "search space", scheduler: str = "") -> list[Distribution]:
    """Every key of ``space`` parsed and tried on the config (unknown keys, malformed
    distributions and values the config refuses are a one-line ConfigError naming the key)."""
    if not space:
        raise ConfigError(f"{source}: no keys to search; write one per line, e.g. "
                          "'train.lr: loguniform(1e-5, 1e-2)'")
    distributions = []
    for key, text in space.items():
        key = str(key)
        if key == "task" or key.startswith(NOT_HYPERPARAMETERS):
            raise ConfigError(f"{source}: {key}: what a trial trains on and where it runs is "
                              "not a hyper-parameter; set it with --set or in the config")
        if scheduler == "pbt" and key.startswith(PBT_FIXED):
            raise ConfigError(f"{source}: {key}: --scheduler pbt restarts trials from other "
                              "trials' checkpoints, so it cannot vary the network, optimizer, "
                              "schedule, epochs or image size; search it with asha or none")
        dist = parse_distribution(key, text, source)
        for probe in dist.probes():
            try:
                trial_config(config_cls, base, {key: probe})
            except ConfigError as exc:
                raise ConfigError(f"{source}: {key}: {dist.text} gives {probe!r}, which the "
                                  f"config refuses: {_one_line(exc)}") from None
        distributions.append(dist)
    return distributions


def read_space(space: str) -> dict[str, Any]:
    """The mapping of a space file (YAML: ``dotted.key: distribution`` per line), found as
    given or among the shipped configs (``configs/tune/segmentation.yaml`` in an image), or
    the mapping written inline (``{train.lr: 'loguniform(1e-4, 1e-2)'}``, a pipeline
    parameter)."""
    path = Path(space)
    if not path.is_file() and "configs" in path.parts:
        shipped = shipped_config(*path.parts[len(path.parts) - path.parts[::-1].index("configs"):])
        path = shipped if shipped is not None else path
    if path.is_file() or not space.lstrip().startswith("{"):
        return read_yaml_mapping(path, "search space")
    try:
        inline = yaml.safe_load(space)
    except yaml.YAMLError as exc:
        raise ConfigError(f"search space {space!r} is neither a file nor a YAML mapping: "
                          f"{exc}") from None
    if not isinstance(inline, dict):
        raise ConfigError(f"search space {space!r} is neither a file nor a YAML mapping")
    return inline


class SearchConfig(Section):
    """One hyper-parameter search: what varies, how trials are chosen and stopped, how many."""

    space: dict[str, Any] = {}
    """Dotted config key (as --set) -> distribution, e.g. train.lr: loguniform(1e-5, 1e-2)
    (anything else is refused by ``check_space``, naming the key)."""
    search: Literal["random", "optuna", "hyperopt"] = "random"
    """How the next trial's values are chosen: random sampling, Optuna's TPE, HyperOpt's TPE."""
    scheduler: Literal["asha", "pbt", "none"] = "asha"
    """asha: stop trials that trail the others at each rung; pbt: population-based training
    (restart weak trials from strong ones' checkpoints with perturbed values); none."""
    trials: int = Field(8, ge=1)
    """Trials in the search."""
    concurrent: int = Field(2, ge=1)
    """Trials at once (on a cluster: RayJob worker pods / ray.num_workers)."""
    gpus_per_trial: float | None = Field(None, ge=0)
    """GPUs per trial, split over its ray.num_workers workers (0.5: two trials share a GPU);
    unset: the task config's ray.use_gpu (one per worker)."""
    metric: str = ""
    """Reported metric to optimise (val_<name> or train_loss); empty: the task's gate metric."""
    mode: Literal["max", "min", ""] = ""
    """max or min; empty: the task's gate direction (for the gate metric) or max."""
    seed: int = 0
    """Seed of the search algorithm and the schedulers (the trials' own seed is train.seed)."""
    grace_period: int = Field(1, ge=1)
    """asha: epochs every trial runs before it can be stopped."""
    reduction_factor: float = Field(2.0, gt=1)
    """asha: the fraction 1/reduction_factor of trials continues at each rung."""
    perturbation_interval: int = Field(1, ge=1)
    """pbt: epochs between exploit/explore steps."""
    name: str = ""
    """Name of the search (its Tune experiment); empty: task + a hash of config, data and
    search, so rerunning the same command with --resume finds it."""


def metric_and_mode(search: SearchConfig, gate_metric: str, gate_mode: str) -> tuple[str, str]:
    """The metric the search optimises and its direction (defaults: the task's gate)."""
    metric = search.metric or f"val_{gate_metric}"
    if not (metric.startswith("val_") or metric == "train_loss"):
        raise ConfigError(f"--metric {metric}: trials report train_loss and val_<metric> "
                          f"(e.g. val_{gate_metric}) once per epoch")
    if search.mode:
        return metric, search.mode
    if metric == f"val_{gate_metric}":
        return metric, gate_mode
    return metric, "min" if metric.endswith("loss") else "max"


def check_search(search: SearchConfig, epochs: int) -> None:
    """Settings that cannot work together, refused before Ray starts."""
    if search.scheduler == "pbt" and search.search != "random":
        raise ConfigError(f"--scheduler pbt chooses the next values itself; use --search "
                          f"random with it, not {search.search}")
    if epochs < 1:
        raise ConfigError("train.epochs: a search needs at least 1 epoch per trial")
    if search.scheduler == "asha" and search.grace_period >= epochs:
        raise ConfigError(f"--grace-period {search.grace_period}: asha can only stop a trial "
                          f"before its last epoch, so it must be below train.epochs={epochs}")
    if search.scheduler == "pbt" and search.perturbation_interval >= epochs:
        raise ConfigError(f"--perturbation-interval {search.perturbation_interval}: must be "
                          f"below train.epochs={epochs}, or pbt never perturbs")


def default_name(task: str, config: dict, dataset_version: str, search: SearchConfig) -> str:
    """``<task>-<12 hex>``: the same command on the same data names the same search."""
    spec = {"task": task, "config": config, "data": dataset_version,
            "search": search.model_dump(exclude={"name", "concurrent"})}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode())
    return f"{task}-{digest.hexdigest()[:12]}"
