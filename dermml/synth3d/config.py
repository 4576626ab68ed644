"""Settings of 3D synthesis; defaults are DermSynth3D's (configs/blend.yaml, renderer.yaml and
the code that reads them), noted where a default differs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from dermml.config import Section
from dermml.synth3d.skin_tone import FITZPATRICK_TYPES

Range = tuple[float, float]


def _ordered(value: Range) -> Range:
    if value[0] > value[1]:
        raise ValueError(f"range {list(value)} has its lower bound above its upper bound")
    return value


class BodiesConfig(Section):
    """Which bodies are rendered."""

    source: str = "procedural:2"
    """A folder of meshes (3DBodyTex ``<id>/model_highres_0_normalized.obj`` or any OBJ with
    a texture) or ``procedural:N`` for N built-in bodies."""
    nonskin_dir: str = ""
    """Folder with ``<id>/model_highres_0_normalized_mask.png`` non-skin masks (DermSynth3D's
    data/lesions tree), when they are not beside the meshes."""
    anatomy_dir: str = ""
    """Folder with ``<id>/vertslabels_scan.npy`` anatomy labels (DermSynth3D's
    bodytex_anatomy_labels tree), when they are not beside the meshes."""
    texture_size: int = Field(1024, ge=32)
    """Texture side of procedural bodies, texels (3DBodyTex scans: 4096)."""
    edge: float = Field(0.025, gt=0.005, le=0.2)
    """Triangle edge length of procedural bodies, metres (0.025: ~15-20k faces)."""
    skin_types: list[str] = list(FITZPATRICK_TYPES)
    """Fitzpatrick types procedural skin is drawn from, uniformly."""

    @field_validator("skin_types")
    @classmethod
    def _known_types(cls, value: list[str]) -> list[str]:
        unknown = [t for t in value if t not in FITZPATRICK_TYPES]
        if unknown or not value:
            raise ValueError(f"skin types must be among {', '.join(FITZPATRICK_TYPES)}")
        return value

    def procedural_count(self) -> int | None:
        """N of ``procedural:N``, or None for a folder of meshes."""
        if not self.source.startswith("procedural"):
            return None
        _, _, count = self.source.partition(":")
        try:
            n = int(count or 1)
        except ValueError:
            raise ValueError(f"bodies {self.source!r}: write procedural:N, e.g. "
                             "procedural:4") from None
        if n < 1:
            raise ValueError(f"bodies {self.source!r}: N must be at least 1")
        return n


class PasteConfig(Section):
    """Placing lesions in body textures (DermSynth3D's SelectAndPaste)."""

    lesions_per_body: int = Field(50, ge=1, le=255)
    """Lesions pasted into each body's texture (blend.yaml num_paste); ids are stored as 8-bit
    values in the texture's lesion mask, as DermSynth3D's."""
    view_size: int = Field(512, ge=32)
    """Side of the view a lesion is placed and blended through, pixels (gen_data --view_size)."""
    distance: Range = (0.4, 0.6)
    """Camera distance along the surface normal of the placement view, metres."""
    max_size_fraction: float = Field(1 / 3, gt=0, le=1)
    """A lesion is shrunk to at most this fraction of the view's side."""
    crop_pad: int = Field(8, ge=0)
    """Pixels of source image kept around the lesion's box."""
    dilation: int = Field(8, ge=1)
    """Dilation of the lesion mask (pixels of the placed crop) checked for depth and overlap
    and blended over."""
    max_depth_change: float = Field(0.02, gt=0)
    """A placement is rejected where depth under the dilated lesion differs from the centre's
    by more than this (metres)."""
    colour_constancy_power: int = Field(6, ge=1)
    """Minkowski norm of the shades-of-grey colour correction of lesion images."""
    attempts_per_lesion: int = Field(25, ge=1)
    """Placements tried per lesion before it is given up (counted as ``gave_up``)."""

    _check = field_validator("distance")(lambda cls, v: _ordered(v))


class BlendConfig(Section):
    """Blending the pasted lesions into the skin (DermSynth3D's BlendLesions)."""

    method: Literal["paste", "poisson", "deep"] = "deep"
    """paste: copy the lesion; poisson: gradient-domain blend in the placement view; deep:
    optimise the texture through the differentiable renderer with the reference loss."""
    steps: int = Field(400, ge=1)
    """Optimisation steps per lesion (blend.yaml num_iter)."""
    lr: float = Field(0.005, gt=0)
    """Adam learning rate on texture pixels."""
    crop_pad: int = Field(32, ge=0)
    """The loss looks at the lesion's box in the view plus this many pixels."""
    distance_jitter: float = Field(0.025, ge=0)
    """Each step moves the camera along the normal by U(-j, j) (reference random_offset)."""
    grad_weight: float = 1e5
    """Weight of the Laplacian-gradient MSE."""
    content_weight: float = 2.0
    """Weight of the content loss (feature layer 2 of the lesion region)."""
    style_weight: float = 1e6
    """Weight of the Gram-matrix style loss (all four feature layers)."""
    tv_weight: float = 1e-4
    """Weight of the total-variation loss."""
    vgg16_weights: str = ""
    """Local VGG16 weights file (torchvision's state dict); empty uses the fallback feature
    network (docs/synth3d.md). Nothing is downloaded."""


class ViewsConfig(Section):
    """Rendering 2D views (DermSynth3D's Generate2DViews; blend.yaml generate.random)."""

    per_body: int = Field(20, ge=1)
    """Views rendered per body (blend.yaml num_views, per mesh)."""
    size: int = Field(512, ge=16)
    """View side, pixels."""
    fov: float = Field(30.0, gt=0, lt=180)
    """Vertical field of view, degrees (renderer.yaml)."""
    znear: float = Field(0.01, gt=0)
    """Near clipping distance, metres."""
    distance: Range = (0.1, 1.3)
    """Camera distance along the normal of the looked-at point (surface_offset_bounds)."""
    look_at: Literal["lesion", "skin"] = "lesion"
    """lesion: look at a point of a pasted lesion, so views show lesions; skin: any skin point
    (the reference samples the whole surface and keeps views without lesions)."""
    min_lesion_pixels: int = Field(1, ge=0)
    """Views showing fewer lesion pixels are rejected (0 keeps lesion-free views)."""
    min_skin_fraction: float = Field(0.1, ge=0, le=1)
    """Views with less skin are rejected (percent_skin)."""
    ambient: Range = (0.3, 0.99)
    """Ambient light intensity."""
    diffuse: Range = (0.3, 0.99)
    """Diffuse light intensity."""
    specular: Range = (0.0, 0.1)
    """Specular light intensity."""
    material_specular: Range = (0.0, 0.05)
    """Material specular reflectance (mat_specular_bounds)."""
    shininess: Range = (30.0, 60.0)
    """Phong exponent."""
    light_offset: float = Field(2.0, ge=0)
    """The light sits at the camera plus U(0, +-offset) per axis, away from the surface; at the
    camera when the body blocks it."""
    background_blur: tuple[int, int] = (0, 3)
    """Gaussian blur radius of the background, drawn as an integer in this range."""
    backgrounds: str = ""
    """Folder of background images; empty draws procedural rooms."""
    soft_composite: bool = True
    """Blend the body's edge into the background (5x5 Gaussian of the body mask)."""
    attempts_per_view: int = Field(100, ge=1)
    """Draws per view before the body is reported as unable to give more views."""

    _check = field_validator("distance", "ambient", "diffuse", "specular",
                             "material_specular", "shininess", "background_blur")(
        lambda cls, v: _ordered(v))


class Synth3DConfig(Section):
    """One synthesis run: bodies, lesions, placement, blending, views."""

    lesions: str = ""
    """Segmentation manifest of the lesions to paste (any with masks: ISIC, PH2, demo)."""
    bodies: BodiesConfig = BodiesConfig()
    paste: PasteConfig = PasteConfig()
    blend: BlendConfig = BlendConfig()
    views: ViewsConfig = ViewsConfig()
    backend: Literal["auto", "torch", "embree", "pytorch3d"] = "auto"
    """Rasterizer: auto = pytorch3d where importable and on a GPU, else the built-in torch one."""
    device: str = "auto"
    """torch device; auto = cuda when available."""
    seed: int = 0
    """Everything random derives from it: same seed, same output."""
    split_fractions: dict[str, float] = {"train": 0.7, "val": 0.15, "test": 0.15}
    """Bodies are split (stratified by skin type); a body draws lesions of its own split when
    the lesion manifest has that split."""

    @model_validator(mode="after")
    def _consistent(self) -> Synth3DConfig:
        self.bodies.procedural_count()  # a malformed procedural:N fails here, not in a worker
        return self
