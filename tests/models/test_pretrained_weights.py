"""model.pretrained=imagenet: published weights through the Hugging Face hub cache, offline from
a pre-seeded HF_HOME (as on an air-gapped cluster); a clear error when they are not cached."""

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_overrides
from safetensors.torch import save_file
from typer.testing import CliRunner

from dermml.models.classifier import ClassifierConfig, build_classifier
from dermml.models.pretrained import PretrainedWeightsError, hub_weights
from dermml.models.segmentation import SegModelConfig, build_segmenter

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def seed_hub_cache(hf_home: Path, repo_id: str, state: dict[str, torch.Tensor],
                   revision: str | None = None) -> Path:
    """``state`` as ``repo_id``'s model.safetensors in the layout huggingface_hub writes:
    hub/models--org--name/{blobs/<sha256>, snapshots/<commit>/model.safetensors -> blob,
    refs/main = <commit>} (a pinned revision is the commit itself)."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = revision or COMMIT
    tmp = hf_home / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    blob = repo / "blobs" / hashlib.sha256(tmp.read_bytes()).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(blob)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (snapshot / "model.safetensors").symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)  # no newline, as huggingface_hub writes it
    return snapshot / "model.safetensors"


@pytest.fixture()
def offline_hub(tmp_path, monkeypatch) -> Path:
    """An empty HF_HOME and HF_HUB_OFFLINE=1: nothing may come from the network."""
    home = tmp_path / "hf-home"
    home.mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.mark.parametrize("backbone, repo", [
    ("resnet10t", "timm/resnet10t.c3_in1k"), ("resnet18", "timm/resnet18.a1_in1k"),
    ("resnet34", "timm/resnet34.a1_in1k"), ("resnet50", "timm/resnet50.a1_in1k"),
    ("resnet50.tv_in1k", "timm/resnet50.tv_in1k"),
    ("efficientnet_b0", "timm/efficientnet_b0.ra_in1k"),
    ("efficientnet_b1", "timm/efficientnet_b1.ra4_e3600_r240_in1k"),
    ("efficientnet_b2", "timm/efficientnet_b2.ra_in1k"),
    ("inception_v3", "timm/inception_v3.tv_in1k")])
def test_timm_backbones_resolve_to_their_default_hub_weights(backbone, repo):
    weights = hub_weights(backbone, "timm")
    assert (weights.repo_id, weights.filenames[0], weights.revision) == \
        (repo, "model.safetensors", None)
    assert hub_weights(f"tu-{backbone}", "smp") == weights  # smp's timm-universal encoders


@pytest.mark.parametrize("encoder", ["resnet18", "resnet34", "resnet50", "efficientnet-b0",
                                     "efficientnet-b2"])
def test_smp_encoders_resolve_to_smps_pinned_imagenet_weights(encoder):
    weights = hub_weights(encoder, "smp")
    assert weights.repo_id == f"smp-hub/{encoder}.imagenet"
    assert len(weights.revision) == 40 and weights.filenames == ("model.safetensors",)


def test_classifier_takes_imagenet_weights_from_the_offline_hub_cache(offline_hub):
    import timm

    published = timm.create_model("resnet18", num_classes=1000).state_dict()  # random "ImageNet"
    seed_hub_cache(offline_hub, "timm/resnet18.a1_in1k", published)
    model = build_classifier(ClassifierConfig(backbone="resnet18", pretrained="imagenet"),
                             num_classes=3)
    state = model.state_dict()
    for key, value in published.items():
        if not key.startswith("fc."):
            assert torch.equal(state[key], value), key
    assert state["fc.weight"].shape == (3, 512)  # the 1000-class head is not loaded
    assert not torch.equal(state["conv1.weight"], timm.create_model(
        "resnet18", num_classes=3).state_dict()["conv1.weight"])


@pytest.mark.parametrize("cfg, repo, revision", [
    (SegModelConfig(arch="unet", encoder="resnet18", pretrained="imagenet"),
     "smp-hub/resnet18.imagenet", "smp"),
    (SegModelConfig(arch="deeplabv3", encoder="tu-resnet18", pretrained="imagenet"),
     "timm/resnet18.a1_in1k", None),
], ids=["smp-encoder", "timm-universal-encoder"])
def test_segmenter_encoders_take_imagenet_weights_from_the_offline_hub_cache(offline_hub, cfg,
                                                                             repo, revision):
    if revision == "smp":
        revision = hub_weights(cfg.encoder, "smp").revision
    def encoder(model):  # timm-universal encoders hold the timm model under .model
        smp_encoder = model.encoder if cfg.arch == "deeplabv3" else model.net.encoder
        return getattr(smp_encoder, "model", smp_encoder)

    scratch = build_segmenter(cfg.model_copy(update={"pretrained": ""}), classes=1)
    published = {k: torch.randn_like(v) if v.is_floating_point() else v
                 for k, v in encoder(scratch).state_dict().items()}
    seed_hub_cache(offline_hub, repo, published, revision)
    loaded = encoder(build_segmenter(cfg, classes=1)).state_dict()
    assert set(published) <= set(loaded)
    for key, value in published.items():
        assert torch.equal(loaded[key], value), key


def test_offline_without_cached_weights_is_one_clear_error(offline_hub, demo_data):
    with pytest.raises(PretrainedWeightsError) as info:
        build_classifier(ClassifierConfig(backbone="resnet18", pretrained="imagenet"), 3)
    message = str(info.value)
    assert "\n" not in message
    for part in ("timm/resnet18.a1_in1k/model.safetensors", str(offline_hub / "hub"),
                 f"HF_HOME={offline_hub}", "HF_HUB_OFFLINE=1", "run once with network",
                 "hf download timm/resnet18.a1_in1k model.safetensors", "local"):
        assert part in message, (part, message)
    with pytest.raises(PretrainedWeightsError, match=r"smp-hub/resnet34\.imagenet@[0-9a-f]{40}"
                                                     r"/model\.safetensors is not in"):
        build_segmenter(SegModelConfig(arch="unet", encoder="resnet34", pretrained="imagenet"), 1)

    from dermml.cli import app

    result = CliRunner().invoke(app, ["train", "classification", "--set",
                                      f"data.manifest={demo_data}", "--set",
                                      "model.backbone=resnet10t", "--pretrained", "imagenet"])
    assert result.exit_code == 2, result.output
    # One error line (after the line naming the stage's log file).
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert errors and errors[0].startswith("error: model.pretrained=imagenet: "
                                           "timm/resnet10t.c3_in1k"), result.output
    assert "Traceback" not in result.output


def test_pretrained_needs_an_encoder_with_published_weights(offline_hub):
    with pytest.raises(PretrainedWeightsError, match="small_unet has no pretrained encoder"):
        build_segmenter(SegModelConfig(pretrained="imagenet"), 1)
    with pytest.raises(PretrainedWeightsError, match="publishes no hub weights for 'resnet10'"):
        hub_weights("resnet10", "timm")


def test_a_model_trained_from_imagenet_weights_serves_without_the_hub_cache(offline_hub,
                                                                           demo_data,
                                                                           tmp_path,
                                                                           monkeypatch):
    import timm

    from dermml.data.images import load_image
    from dermml.data.manifest import read_manifest
    from dermml.orchestration.tracking import load_python_model
    from dermml.training.run import resolve_config, train

    seed_hub_cache(offline_hub, "timm/resnet10t.c3_in1k",
                   timm.create_model("resnet10t").state_dict())
    overrides = [o for o in tiny_overrides(demo_data, 1) if not o.startswith("model.")]
    cfg = resolve_config("classification", None, overrides + [
        "model.backbone=resnet10t", "model.pretrained=imagenet"])
    outcome = train("classification", cfg, progress=False)
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    monkeypatch.setenv("HF_HOME", str(empty))  # a serving pod: no cache, no network
    model = load_python_model(outcome.model_uri)
    manifest = read_manifest(demo_data)
    image = load_image(manifest.resolve(manifest.split("test").iloc[0]["image_uri"]))
    (probs,) = model.predict_images([image])
    assert np.isclose(sum(probs.values()), 1.0, atol=1e-4)
