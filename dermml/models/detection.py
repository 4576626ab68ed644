"""Lesion detectors: torchvision Faster R-CNN or RetinaNet over a ResNet / MobileNetV3 FPN.

The default is DermSynth3D's detector (``dermsynth3d/models/model.py::faster_rcnn_texture_model``):
Faster R-CNN ResNet50-FPN whose anchor generator has one size per FPN level, ``((32,), (24,),
(22,), (16,), (8,))`` from the finest level (stride 4) to the pooled one (stride 64), and
aspect ratios (0.75, 1, 1.25) on every level, an RPN head for those three anchors per
location, and a box predictor for the task's classes plus the background. Their images are
not resized by the network (``max_size`` = the input size); here ``min_size`` = ``max_size`` =
``data.image_size`` does the same.

Every backbone here has five feature levels (ResNet: C2-C5 + max-pool, RetinaNet: P3-P7,
MobileNetV3-Large: its stride 4-32 stages + max-pool), so one anchor setting fits all. Weights
are never downloaded by torchvision: ``model.pretrained`` is a local file (a torchvision
detector checkpoint, or the backbone's ImageNet weights) or ``imagenet`` (ResNets: torchvision's
ImageNet weights from the Hugging Face hub cache, timm's ``<resnet>.tv_in1k``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator
from torch import nn

from dermml.config import ConfigError, Section

LEVELS = 5
"""Feature maps every backbone here gives the detection head."""

DERMSYNTH3D_ANCHORS = [[32.0], [24.0], [22.0], [16.0], [8.0]]
DERMSYNTH3D_ASPECT_RATIOS = [0.75, 1.0, 1.25]


class DetectorConfig(Section):
    """The detection network (defaults: DermSynth3D's Faster R-CNN)."""

    arch: Literal["fasterrcnn", "retinanet"] = "fasterrcnn"
    """fasterrcnn: two-stage Faster R-CNN (DermSynth3D); retinanet: one-stage RetinaNet
    (focal loss; P3-P7 pyramid)."""
    backbone: Literal["resnet50", "resnet34", "resnet18", "mobilenet_v3"] = "resnet50"
    """Backbone under the FPN; resnet18 / mobilenet_v3 (MobileNetV3-Large) are small enough
    to train on a CPU."""
    anchor_sizes: list[list[float]] = DERMSYNTH3D_ANCHORS
    """Anchor sizes (pixels at data.image_size), one list per feature level from the finest
    (stride 4; RetinaNet: 8) to the coarsest; a number alone is a one-size level.
    DermSynth3D: [[32], [24], [22], [16], [8]] at 256 px."""
    aspect_ratios: list[float] = DERMSYNTH3D_ASPECT_RATIOS
    """Anchor height/width ratios, the same on every level (DermSynth3D: 0.75, 1, 1.25)."""
    pretrained: str = ""
    """Weights to start from: empty (from scratch), a local file (a torchvision detector
    checkpoint, e.g. fasterrcnn_resnet50_fpn_coco, whose matching tensors are loaded, or the
    backbone's ImageNet weights) or ``imagenet`` (ResNets only: torchvision's ImageNet weights,
    ``<backbone>.tv_in1k``, through the Hugging Face hub cache; see docs/training.md)."""
    norm: Literal["auto", "batch", "frozen"] = "auto"
    """Backbone normalisation: frozen batch norm (torchvision's choice over pretrained weights)
    or trainable batch norm (from scratch); auto = frozen with pretrained weights."""
    trainable_layers: int | None = Field(None, ge=0, le=6)
    """Backbone stages trained, counted from the top (ResNet: 0-5, MobileNetV3: 0-6); None =
    torchvision's defaults: all from scratch, 3 over pretrained weights."""
    rpn_proposals_train: int = Field(2000, ge=1)
    """fasterrcnn: RPN proposals kept per image (before and after NMS) in training."""
    rpn_proposals_test: int = Field(1000, ge=1)
    """fasterrcnn: RPN proposals kept per image at inference."""
    rpn_batch_size: int = Field(256, ge=1)
    """fasterrcnn: anchors sampled per image for the RPN loss."""
    roi_batch_size: int = Field(512, ge=1)
    """fasterrcnn: proposals sampled per image for the box head's loss (the CPU cost of a
    training step grows with it)."""
    box_head_size: int = Field(1024, ge=8)
    """fasterrcnn: width of the two-layer box head (torchvision: 1024)."""
    min_score: float = Field(0.05, ge=0.0, le=1.0)
    """Detections below this score are dropped by the network (the floor of the
    precision-recall curve; serving's score_threshold filters what is returned)."""
    nms_iou: float = Field(0.5, gt=0.0, le=1.0)
    """IoU above which the lower-scoring of two detections of a class is suppressed."""
    detections_per_image: int = Field(100, ge=1)
    """Most detections the network returns per image (COCO's AP counts 100)."""

    @field_validator("anchor_sizes", mode="before")
    @classmethod
    def _levels(cls, value):
        if isinstance(value, list | tuple):
            value = [list(v) if isinstance(v, list | tuple) else [v] for v in value]
            if len(value) != LEVELS:
                raise ValueError(f"give one list of sizes per feature level: {LEVELS} levels "
                                 f"(got {len(value)}), e.g. [[32], [24], [22], [16], [8]]")
            if any(not level for level in value):
                raise ValueError("every feature level needs at least one anchor size")
        return value


def resolved(cfg: DetectorConfig) -> DetectorConfig:
    """``cfg`` with ``norm`` and ``trainable_layers`` decided from ``pretrained``: what the
    trained network was, so a model rebuilt without its weights file has the same layers."""
    pretrained = bool(cfg.pretrained)
    norm = cfg.norm if cfg.norm != "auto" else ("frozen" if pretrained else "batch")
    layers = cfg.trainable_layers
    if layers is None:
        layers = 3 if pretrained else (6 if cfg.backbone == "mobilenet_v3" else 5)
    if cfg.backbone != "mobilenet_v3" and layers > 5:
        raise ConfigError(f"model.trainable_layers={layers}: a ResNet has 5 stages (0-5)")
    return cfg.model_copy(update={"norm": norm, "trainable_layers": layers})


def _backbone(cfg: DetectorConfig) -> nn.Module:
    from torchvision.models.detection.backbone_utils import (
        mobilenet_backbone,
        resnet_fpn_backbone,
    )
    from torchvision.ops import misc as misc_nn_ops
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    norm_layer = misc_nn_ops.FrozenBatchNorm2d if cfg.norm == "frozen" else nn.BatchNorm2d
    retina = cfg.arch == "retinanet"
    # RetinaNet (torchvision's v1): P3-P5 from the backbone, P6-P7 from P5.
    extra = {"returned_layers": [2, 3, 4], "extra_blocks": LastLevelP6P7(256, 256)} \
        if retina else {}
    if cfg.backbone == "mobilenet_v3":
        returned = extra.pop("returned_layers", [1, 2, 3, 4])
        return mobilenet_backbone(backbone_name="mobilenet_v3_large", weights=None, fpn=True,
                                  norm_layer=norm_layer, trainable_layers=cfg.trainable_layers,
                                  returned_layers=returned, **extra)
    return resnet_fpn_backbone(backbone_name=cfg.backbone, weights=None, norm_layer=norm_layer,
                               trainable_layers=cfg.trainable_layers, **extra)


def build_detector(cfg: DetectorConfig, num_classes: int, image_size: int) -> nn.Module:
    """The detector of ``cfg`` for ``num_classes`` object classes (plus the background, class
    0), taking images of ``image_size`` pixels unresized, with ``cfg.pretrained`` loaded."""
    from torchvision.models.detection import FasterRCNN, RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

    cfg = resolved(cfg)
    backbone = _backbone(cfg)
    anchors = AnchorGenerator(sizes=tuple(tuple(level) for level in cfg.anchor_sizes),
                              aspect_ratios=(tuple(cfg.aspect_ratios),) * LEVELS)
    size = {"min_size": image_size, "max_size": image_size}
    if cfg.arch == "retinanet":
        model = RetinaNet(backbone, num_classes + 1, anchor_generator=anchors,
                          score_thresh=cfg.min_score, nms_thresh=cfg.nms_iou,
                          detections_per_img=cfg.detections_per_image, **size)
    else:
        resolution = 7  # torchvision's MultiScaleRoIAlign output
        model = FasterRCNN(
            backbone, num_classes=None, rpn_anchor_generator=anchors,
            box_head=TwoMLPHead(backbone.out_channels * resolution**2, cfg.box_head_size),
            box_predictor=FastRCNNPredictor(cfg.box_head_size, num_classes + 1),
            rpn_pre_nms_top_n_train=cfg.rpn_proposals_train,
            rpn_post_nms_top_n_train=cfg.rpn_proposals_train,
            rpn_pre_nms_top_n_test=cfg.rpn_proposals_test,
            rpn_post_nms_top_n_test=cfg.rpn_proposals_test,
            rpn_batch_size_per_image=cfg.rpn_batch_size,
            box_batch_size_per_image=cfg.roi_batch_size, box_score_thresh=cfg.min_score,
            box_nms_thresh=cfg.nms_iou, box_detections_per_img=cfg.detections_per_image,
            **size)
    if cfg.pretrained:
        load_detector_weights(model, cfg)
    return model


def load_detector_weights(model: nn.Module, cfg: DetectorConfig) -> dict[str, int]:
    """Load ``cfg.pretrained`` into ``model``: a whole-detector checkpoint where at least half
    of the detector's tensors match (heads of another shape are skipped), else the backbone's
    ImageNet weights into the backbone under the FPN."""
    from dermml.models.pretrained import (
        IMAGENET,
        PretrainedWeightsError,
        load_backbone_weights,
        load_pretrained,
    )

    body = model.backbone.body
    if cfg.backbone == "mobilenet_v3":  # torchvision names the layers features.N...
        holder = nn.Module()
        holder.features = body
        body = holder
    if cfg.pretrained.strip().lower() == IMAGENET:
        if cfg.backbone == "mobilenet_v3":
            raise PretrainedWeightsError(
                "model.pretrained=imagenet: only the ResNet backbones have hub weights here; "
                "pass torchvision's mobilenet_v3_large weights as a local file")
        return load_backbone_weights(body, IMAGENET, f"{cfg.backbone}.tv_in1k")
    try:
        return load_pretrained(model, cfg.pretrained)
    except PretrainedWeightsError:
        return load_pretrained(body, cfg.pretrained)
