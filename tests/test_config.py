"""Config files and --set overrides: typed, validated, and loud about typos."""

import os

import pytest

from dermml.config import ConfigError, flatten, load_config
from dermml.tasks.segmentation import SegmentationConfig


def test_set_overrides_parse_values_as_yaml():
    cfg = load_config(SegmentationConfig, overrides=["train.epochs=3", "train.lr=0.01",
                                                    "ray.enabled=false"])
    assert cfg.train.epochs == 3 and cfg.train.lr == 0.01 and cfg.ray.enabled is False


def test_unknown_set_key_names_the_key_and_lists_valid_ones():
    with pytest.raises(ConfigError) as err:
        load_config(SegmentationConfig, overrides=["train.epoch=3"])
    assert "train.epoch" in str(err.value) and "train.epochs" in str(err.value)


def test_bad_value_type_is_reported_with_its_key(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        load_config(SegmentationConfig, overrides=["train.epochs=many"])


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 7\n  lr: 0.5\n")
    cfg = load_config(SegmentationConfig, path, ["train.lr=0.1"])
    assert (cfg.train.epochs, cfg.train.lr) == (7, 0.1)


def test_unknown_key_in_file_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epocs: 7\n")
    with pytest.raises(ConfigError, match="epocs"):
        load_config(SegmentationConfig, path)


def test_missing_config_file_is_named():
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(SegmentationConfig, "nope.yaml")


def test_flatten_gives_dotted_keys():
    flat = flatten(SegmentationConfig())
    assert flat["train.epochs"] == 10 and flat["model.base_channels"] == 16


def test_shipped_configs_load_and_build_their_models():
    """Every shipped task config validates, names its own task, and its model builds (the
    DermoSegDiff presets are 321M parameters: their model is checked in its own tests)."""
    from pathlib import Path

    from dermml.orchestration.platform import load_platform
    from dermml.tasks import get_task, task_names
    from dermml.validation.suite import load_suite

    root = Path(__file__).parents[1] / "configs"
    checked = set()
    for name in task_names():
        task = get_task(name)
        for path in sorted((root / name).glob("*.yaml")):
            cfg = load_config(task.config_cls, path)
            assert cfg.task == name, path
            if name != "segdiff" and hasattr(cfg, "classes") and not cfg.classes:
                cfg = cfg.model_copy(update={"classes": ["a", "b", "c"]})
            if name != "segdiff":
                task.build_model(cfg)
            checked.add(name)
    assert {"segmentation", "classification", "attributes", "segdiff"} <= checked
    for path in (root / "platform").glob("*.yaml"):
        assert load_platform(path).pool_for("train")
    for path in (root / "validation").glob("*.yaml"):
        assert load_suite(str(path)).name == path.stem


def test_an_installed_package_finds_shipped_configs_from_the_image_workdir_or_env(tmp_path):
    """As in the container images: the package sits in site-packages, configs/ elsewhere."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    site = tmp_path / "site-packages"
    shutil.copytree(repo / "dermml", site / "dermml",
                    ignore=shutil.ignore_patterns("__pycache__"))
    configs = tmp_path / "app" / "configs"
    shutil.copytree(repo / "configs", configs)
    probe = ("from dermml.validation.suite import load_suite\n"
             "from dermml.orchestration.platform import load_platform\n"
             "from dermml.config import shipped_config\n"
             "print(load_suite('segdiff').name, load_platform().pools['gpu'].node_selector,"
             " shipped_config('segmentation', 'demo.yaml'))\n")

    def run(cwd: Path, **env: str) -> subprocess.CompletedProcess:
        clean = {k: v for k, v in os.environ.items() if k not in ("DERMML_CONFIGS",
                                                                  "DERMML_PLATFORM")}
        return subprocess.run([sys.executable, "-c", probe], cwd=cwd, capture_output=True,
                              text=True, env={**clean, "PYTHONPATH": str(site), **env})

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    lost = run(elsewhere)
    assert lost.returncode != 0 and "unknown validation suite 'segdiff'" in lost.stderr
    for found in (run(configs.parent), run(elsewhere, DERMML_CONFIGS=str(configs))):
        assert found.returncode == 0, found.stderr
        assert found.stdout.startswith("segdiff {") and str(configs) in found.stdout


def test_a_partial_section_keeps_the_task_defaults_of_the_rest_of_the_section():
    """attributes ships a U-Net/Inception-v3 + ASPP at 256 px: overriding one key of a section
    must not reset the others to the section class's generic defaults."""
    from dermml.training.run import resolve_config

    cfg = resolve_config("attributes", None, ["model.aspp=false", "data.batch_size=3"])
    assert (cfg.model.arch, cfg.model.encoder, cfg.model.aspp) == ("unet", "tu-inception_v3",
                                                                   False)
    assert (cfg.data.image_size, cfg.data.batch_size) == (256, 3)
    # Plain mappings are replaced, not merged (per-class settings are exactly what was given).
    cfg = resolve_config("attributes", None, ["postprocess={1: {closing_radius: 3}}"])
    assert list(cfg.postprocess) == [1] and cfg.postprocess[1].closing_radius == 3


def test_configs_stored_before_placement_moved_still_load():
    """Models logged before ray.kubernetes moved to the platform config hold that section in
    their bundle: loading them (serving, evaluation) must leave it out, not fail."""
    from dermml.config import stored_config
    from dermml.tasks import get_task

    task = get_task("segmentation")
    old = task.config_cls().model_dump()
    old["ray"]["kubernetes"] = {"enabled": False, "namespace": "dermml", "poll_seconds": 15.0}
    cfg = stored_config(task.config_cls, old)
    assert cfg.model_dump()["ray"] == task.config_cls().model_dump()["ray"]
