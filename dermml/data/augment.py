"""Training augmentation: one albumentations pipeline over an image and its (optional) mask,
or over an image and its boxes (``build_box_augment``: flips and 90-degree rotations only).

Geometry moves image and mask (or boxes) together; colour, blur, hair and dropout touch the
image only.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.core.transforms_interface import BaseTransformInitSchema, ImageOnlyTransform
from PIL import Image, ImageDraw
from pydantic import Field

from dermml.config import Section


class AugmentConfig(Section):
    """Training augmentation (albumentations); probabilities are per image."""

    policy: Literal["dermml", "dermosegdiff"] = "dermml"
    """dermml: the options below. dermosegdiff: the DermoSegDiff reference set (12 pixel-level
    and 11 spatial transforms, each with probability ``reference_p``, the whole set applied to
    ``reference_apply`` of the images); the options below are then ignored."""
    reference_p: float = Field(0.05, ge=0, le=1)
    """dermosegdiff policy: probability of each transform (reference: 0.05)."""
    reference_apply: float = Field(0.5, ge=0, le=1)
    """dermosegdiff policy: fraction of images augmented at all (reference: 0.5)."""

    flips: bool = True
    """Random horizontal/vertical flips and 90-degree rotations (lesions have no orientation)."""
    rotate_degrees: float = Field(0.0, ge=0, le=180)
    """Free rotation by up to ± this many degrees, borders reflected (0 disables)."""
    scale: float = Field(0.0, ge=0, lt=1)
    """Random zoom by a factor in [1 - scale, 1 + scale], borders reflected (0 disables)."""
    color_jitter: float = Field(0.1, ge=0)
    """Brightness/contrast/saturation jitter strength, applied to half the images (0 disables)."""
    hue: float = Field(0.0, ge=0, le=0.5)
    """Hue jitter (fraction of the colour circle), applied with the colour jitter (0 disables)."""
    elastic: float = Field(0.0, ge=0, le=1)
    """Probability of a mild elastic deformation (about 1 px smooth displacement, 2-3 at most)."""
    clahe: float = Field(0.0, ge=0, le=1)
    """Probability of CLAHE contrast equalisation (dermoscope exposure differences)."""
    hair: float = Field(0.0, ge=0, le=1)
    """Probability of drawing hair strands over the image (never over the mask)."""
    hair_strands: tuple[int, int] = (1, 6)
    """Least and most hair strands drawn when hair is applied."""
    blur: float = Field(0.0, ge=0, le=1)
    """Probability of a slight Gaussian blur (defocused dermoscope)."""
    coarse_dropout: float = Field(0.0, ge=0, le=1)
    """Probability of blanking a few small rectangles of the image (the mask is kept)."""


# ------------------------------------------------------------------------------ hair strands

HAIR_BLACK = np.array([18.0, 14.0, 12.0], np.float32)
HAIR_DARK_BROWN = np.array([72.0, 46.0, 30.0], np.float32)


class HairOcclusion(ImageOnlyTransform):
    """Thin dark curved strands (quadratic Bézier curves) drawn over the image.

    Hair occludes dermoscopy images but is not lesion, so masks pass through untouched. All
    randomness comes from the transform's own generator, so ``A.Compose(..., seed=...)``
    reproduces it.
    """

    class InitSchema(BaseTransformInitSchema):
        strands: tuple[int, int] = Field(description="least and most strands drawn")
        width_px: tuple[float, float] = Field(description="strand width range in pixels")
        opacity: tuple[float, float] = Field(description="strand opacity range (0..1)")

    def __init__(self, strands: tuple[int, int] = (1, 6),
                 width_px: tuple[float, float] = (1.0, 2.0),
                 opacity: tuple[float, float] = (0.75, 0.95), p: float = 0.5):
        super().__init__(p=p)
        if not 1 <= strands[0] <= strands[1]:
            raise ValueError(f"HairOcclusion strands must satisfy 1 <= low <= high (got {strands})")
        self.strands = strands
        self.width_px = width_px
        self.opacity = opacity

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("strands", "width_px", "opacity")

    def get_params_dependent_on_data(self, params: dict[str, Any],
                                     data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        rng = self.random_generator
        count = int(rng.integers(self.strands[0], self.strands[1] + 1))
        alpha = hair_alpha(rng, height, width, count, self.width_px)
        # One colour per image: a person's hairs look alike; shade between black and dark brown.
        shade = rng.uniform(0.0, 1.0)
        colour = HAIR_BLACK + shade * (HAIR_DARK_BROWN - HAIR_BLACK)
        return {"hair_alpha": alpha * rng.uniform(*self.opacity), "hair_colour": colour}

    def apply(self, img: np.ndarray, hair_alpha: np.ndarray, hair_colour: np.ndarray,
              **params: Any) -> np.ndarray:
        colour = hair_colour if img.dtype == np.uint8 else hair_colour / 255.0
        if img.ndim == 2 or img.shape[-1] != colour.size:
            colour = colour.mean()  # grey or multi-band input: a dark grey strand
        alpha = hair_alpha[..., None] if img.ndim == 3 else hair_alpha
        out = img.astype(np.float32) * (1 - alpha) + colour * alpha
        if img.dtype == np.uint8:
            return np.clip(out + 0.5, 0, 255).astype(np.uint8)
        return out.astype(img.dtype)


def hair_alpha(rng: np.random.Generator, height: int, width: int, count: int,
               width_px: tuple[float, float]) -> np.ndarray:
    """Anti-aliased coverage (0..1, float32 H x W) of ``count`` quadratic Bézier strands."""
    # Draw large, then box-downsample, so 1-2 px strands stay smooth on small images.
    scale = max(1, min(4, 512 // max(height, width)))
    layer = Image.new("L", (width * scale, height * scale), 0)
    pen = ImageDraw.Draw(layer)
    size = np.array([width, height], np.float64) * scale
    t = np.linspace(0.0, 1.0, 32)[:, None]
    for _ in range(count):
        start = rng.uniform(-0.1, 1.1, 2) * size
        angle = rng.uniform(0, 2 * math.pi)
        direction = np.array([math.cos(angle), math.sin(angle)])
        end = start + direction * rng.uniform(0.4, 1.3) * size.max()
        # Control point pushed sideways from the chord's middle bends the strand.
        normal = np.array([-direction[1], direction[0]])
        control = (start + end) / 2 + normal * rng.normal(0, 0.25) * size.max()
        points = (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t**2 * end
        stroke = max(1, round(rng.uniform(*width_px) * scale))
        pen.line([tuple(p) for p in points], fill=int(rng.integers(200, 256)), width=stroke,
                 joint="curve")
    small = layer.resize((width, height), Image.Resampling.BOX)
    return np.asarray(small, np.float32) / 255.0


# -------------------------------------------------------------------------------- pipeline


def geometry_ops(cfg: AugmentConfig) -> list[A.BasicTransform]:
    """Transforms that move pixels: applied identically to image and mask (nearest for masks)."""
    ops: list[A.BasicTransform] = []
    if cfg.flips:
        ops += [A.HorizontalFlip(), A.VerticalFlip(), A.RandomRotate90()]
    if cfg.rotate_degrees > 0 or cfg.scale > 0:
        d, s = cfg.rotate_degrees, cfg.scale
        # Reflected borders keep skin texture at the corners instead of black wedges.
        ops.append(A.Affine(rotate=(-d, d), scale=(1 - s, 1 + s),
                            border_mode=cv2.BORDER_REFLECT_101, interpolation=cv2.INTER_LINEAR,
                            mask_interpolation=cv2.INTER_NEAREST, p=1.0))
    if cfg.elastic > 0:
        ops.append(A.ElasticTransform(alpha=60, sigma=6, border_mode=cv2.BORDER_REFLECT_101,
                                      mask_interpolation=cv2.INTER_NEAREST, p=cfg.elastic))
    return ops


def pixel_ops(cfg: AugmentConfig) -> list[A.BasicTransform]:
    """Image-only transforms; hair comes first so colour jitter and blur also affect it."""
    ops: list[A.BasicTransform] = []
    if cfg.hair > 0:
        ops.append(HairOcclusion(strands=cfg.hair_strands, p=cfg.hair))
    if cfg.clahe > 0:
        ops.append(A.CLAHE(clip_limit=(1.0, 3.0), tile_grid_size=(4, 4), p=cfg.clahe))
    if cfg.color_jitter > 0 or cfg.hue > 0:
        j = cfg.color_jitter
        ops.append(A.ColorJitter(brightness=j, contrast=j, saturation=j, hue=cfg.hue, p=0.5))
    if cfg.blur > 0:
        ops.append(A.GaussianBlur(sigma_limit=(0.3, 1.2), p=cfg.blur))
    if cfg.coarse_dropout > 0:
        ops.append(A.CoarseDropout(num_holes_range=(1, 4), hole_height_range=(0.05, 0.15),
                                   hole_width_range=(0.05, 0.15), fill=0, fill_mask=None,
                                   p=cfg.coarse_dropout))
    return ops


class Augmenter:
    """``augment(image, mask) -> (image, mask)``: mask None, bool (H, W) or integer label map.

    A class rather than a closure so that DataLoader workers can pickle it. Each worker
    reseeds from the loader's per-worker seed, otherwise every worker would replay the same
    augmentation stream.
    """

    def __init__(self, pipeline: A.Compose, seed: int | None = None):
        self.pipeline = pipeline
        self.seed = seed
        self.stream = 0
        self._worker: tuple[int, int] | None = None

    def use_stream(self, stream: int) -> None:
        """Draw from an independent stream of the same seed: a second dataset augmented with
        the same config (synthetic data mixed into real batches) must not replay the first's
        transforms sample for sample."""
        self.stream, self._worker = stream, None
        entropy = [0 if self.seed is None else self.seed, stream]
        self.pipeline.set_random_seed(int(np.random.SeedSequence(entropy).generate_state(1)[0]))

    def __call__(self, image: np.ndarray, mask: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray | None]:
        self._reseed_in_worker()
        if mask is None:
            return self.pipeline(image=image)["image"], None
        out = self.pipeline(image=image, mask=encode_mask(mask))
        return out["image"], decode_mask(out["mask"], mask.dtype)

    def with_masks(self, image: np.ndarray, masks: list[np.ndarray]
                   ) -> tuple[np.ndarray, list[np.ndarray]]:
        """As ``__call__`` for several pixel-aligned maps at once (bool or integer each, e.g.
        a lesion map, an anatomy map and a depth map in integer units): one draw of the
        geometry moves the image and every map."""
        self._reseed_in_worker()
        if not masks:
            return self.pipeline(image=image)["image"], []
        out = self.pipeline(image=image, masks=[encode_mask(m) for m in masks])
        return out["image"], [decode_mask(o, m.dtype)
                              for o, m in zip(out["masks"], masks, strict=True)]

    def _reseed_in_worker(self) -> None:
        info = torch.utils.data.get_worker_info()
        if info is None or self._worker == (info.id, info.seed):
            return
        self._worker = (info.id, info.seed)
        entropy = [info.seed] if self.seed is None else [self.seed, info.seed]
        if self.stream:
            entropy.append(self.stream)
        self.pipeline.set_random_seed(int(np.random.SeedSequence(entropy).generate_state(1)[0]))


def encode_mask(mask: np.ndarray) -> np.ndarray:
    """A mask as an unsigned dtype that every OpenCV warp supports."""
    if mask.dtype == bool:
        return mask.astype(np.uint8)
    if not np.issubdtype(mask.dtype, np.integer):
        raise TypeError(f"augment: mask must be bool or an integer label map (got {mask.dtype})")
    low, high = (int(mask.min()), int(mask.max())) if mask.size else (0, 0)
    if low < 0 or high > np.iinfo(np.uint16).max:
        raise ValueError(f"augment: label map values must lie in 0..65535 (got {low}..{high})")
    return mask.astype(np.uint8 if high <= 255 else np.uint16)


def decode_mask(mask: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return mask > 0 if np.dtype(dtype) == np.bool_ else mask.astype(dtype)


def dermosegdiff_ops(p: float) -> tuple[list[A.BasicTransform], list[A.BasicTransform]]:
    """(pixel-level, spatial) transforms of DermoSegDiff's configs (``augmentation.levels``),
    in the reference order, translated to albumentations 2: GaussNoise ``var_limit`` (10, 200)
    on 0..255 becomes ``std_range`` of sqrt(10)/255..sqrt(200)/255; ElasticTransform loses
    ``alpha_affine`` (removed from albumentations); ``Flip`` (a random axis) is one of the
    horizontal, vertical or both flips; Spatter keeps albumentations' defaults (the reference's
    values are out of range in albumentations 2). Masks: nearest-neighbour, never dropped out.
    """
    nearest = cv2.INTER_NEAREST
    pixel = [
        A.CLAHE(clip_limit=4, tile_grid_size=(3, 3), p=p),
        A.Emboss(p=p),
        A.GaussNoise(std_range=(math.sqrt(10) / 255, math.sqrt(200) / 255), p=p),
        A.HueSaturationValue(hue_shift_limit=7, sat_shift_limit=30, val_shift_limit=20, p=p),
        A.MultiplicativeNoise(multiplier=(0.8, 1.25), elementwise=True, p=p),
        A.RGBShift(p=p),
        A.RandomBrightnessContrast(p=p),
        A.RandomGamma(gamma_limit=(70, 130), p=p),
        A.RandomToneCurve(scale=0.15, p=p),
        A.Sharpen(p=p),
        A.Spatter(p=p),
        A.UnsharpMask(p=p),
    ]
    spatial = [
        A.Affine(mask_interpolation=nearest, p=p),
        A.CoarseDropout(num_holes_range=(1, 5), hole_height_range=(4, 16),
                        hole_width_range=(4, 16), fill=(10, 20, 60), fill_mask=None, p=p),
        A.ElasticTransform(alpha=0.5, sigma=1.3, border_mode=cv2.BORDER_REFLECT,
                           mask_interpolation=nearest, p=p),
        A.HorizontalFlip(p=p),
        A.VerticalFlip(p=p),
        A.OneOf([A.HorizontalFlip(p=1), A.VerticalFlip(p=1),
                 A.Compose([A.HorizontalFlip(p=1), A.VerticalFlip(p=1)])], p=p),
        A.GridDistortion(border_mode=cv2.BORDER_REFLECT_101, mask_interpolation=nearest, p=p),
        _quiet(A.PiecewiseAffine, mask_interpolation=nearest, p=p),  # warns that it is slow
        A.PixelDropout(p=p),
        A.RandomRotate90(p=p),
        A.Rotate(border_mode=cv2.BORDER_REFLECT_101, mask_interpolation=nearest, p=p),
    ]
    return pixel, spatial


def _quiet(transform: type, **kwargs: Any) -> A.BasicTransform:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return transform(**kwargs)


class BoxAugmenter(Augmenter):
    """``augment(image, boxes, labels) -> (image, boxes, labels)``: COCO [x, y, w, h] boxes
    (N, 4) in pixels move with the image (``build_box_augment``)."""

    def __call__(self, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self._reseed_in_worker()
        out = self.pipeline(image=image, bboxes=np.asarray(boxes, np.float32).reshape(-1, 4),
                            labels=np.asarray(labels, np.int64))
        return (out["image"], np.asarray(out["bboxes"], np.float32).reshape(-1, 4),
                np.asarray(out["labels"], np.int64))


BOX_GEOMETRY = ("rotate_degrees", "scale", "elastic")
"""Geometry options that boxes cannot follow exactly (a rotated box is not a box)."""


def box_augment_problems(cfg: AugmentConfig) -> list[str]:
    """Why ``cfg`` cannot augment images with boxes (empty: it can)."""
    problems = [f"augment.{name}" for name in BOX_GEOMETRY if getattr(cfg, name) > 0]
    if cfg.policy != "dermml":
        problems.append(f"augment.policy={cfg.policy}")
    return problems


def build_box_augment(cfg: AugmentConfig, seed: int | None = None) -> BoxAugmenter | None:
    """The training augmentation of images with boxes: flips and 90-degree rotations (which
    move boxes exactly) and the image-only transforms; None when all is off."""
    problems = box_augment_problems(cfg)
    if problems:
        raise ValueError(f"{', '.join(problems)}: boxes follow only flips and 90-degree "
                         "rotations (augment.flips); set these to 0 / dermml")
    ops: list[A.BasicTransform] = []
    if cfg.flips:
        ops += [A.HorizontalFlip(), A.VerticalFlip(), A.RandomRotate90()]
    ops += pixel_ops(cfg)
    if not ops:
        return None
    params = A.BboxParams(format="coco", label_fields=["labels"], clip=True)
    return BoxAugmenter(A.Compose(ops, bbox_params=params, seed=seed), seed)


def build_augment(cfg: AugmentConfig, seed: int | None = None) -> Augmenter | None:
    """The training augmentation of ``cfg`` (same seed, same stream), or None when all is off."""
    if cfg.policy == "dermosegdiff":
        pixel, spatial = dermosegdiff_ops(cfg.reference_p)
        pipeline = A.Compose([A.Compose(pixel, p=1.0), A.Compose(spatial, p=1.0)],
                             p=cfg.reference_apply, seed=seed)
        return Augmenter(pipeline, seed)
    ops = geometry_ops(cfg) + pixel_ops(cfg)
    if not ops:
        return None
    return Augmenter(A.Compose(ops, seed=seed), seed)
