"""Every backbone and segmentation architecture the configs name builds from scratch and runs."""

import pytest
import torch

from dermml.config import ConfigError
from dermml.models.classifier import ClassifierConfig, build_classifier
from dermml.models.segmentation import SegModelConfig, build_segmenter
from dermml.training.run import resolve_config


@pytest.mark.parametrize("backbone", ["resnet18", "resnet34", "resnet50", "efficientnet_b0",
                                      "efficientnet_b1", "efficientnet_b2", "inception_v3"])
def test_classifier_backbones_build_from_scratch_and_give_class_logits(backbone):
    model = build_classifier(ClassifierConfig(backbone=backbone), num_classes=3).eval()
    with torch.no_grad():
        logits = model(torch.rand(2, 3, 96, 96))
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


@pytest.mark.parametrize("cfg", [
    SegModelConfig(arch="unet", encoder="resnet18"),
    SegModelConfig(arch="unet", encoder="resnet34", aspp=True),
    SegModelConfig(arch="unet", encoder="efficientnet-b0"),
    SegModelConfig(arch="unet", encoder="tu-inception_v3", aspp=True),
    SegModelConfig(arch="deeplabv3", encoder="resnet18"),
], ids=["unet-resnet18", "unet-resnet34-aspp", "unet-effb0", "unet-inception_v3-aspp",
        "deeplabv3-resnet18"])
def test_segmenters_give_per_pixel_logits_at_the_input_size(cfg):
    model = build_segmenter(cfg, classes=6).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 128, 128))
    assert out.shape == (1, 6, 128, 128) and torch.isfinite(out).all()
    if cfg.aspp:
        dilations = {m.dilation for m in model.aspp.modules()
                     if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)}
        assert dilations == {(2, 2), (3, 3), (4, 4)}


def test_an_input_size_deeplabv3_cannot_take_is_a_config_error():
    from dermml.tasks import get_task

    task = get_task("segmentation")
    cfg = resolve_config("segmentation", None, ["model.arch=deeplabv3", "model.encoder=resnet18",
                                                "data.image_size=30"])
    with pytest.raises(ConfigError, match="30 px"):
        task.check_input_size(task.build_model(cfg), cfg)
