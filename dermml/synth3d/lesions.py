"""Lesions to paste: image + mask rows of a segmentation manifest, cropped around the lesion,
colour-corrected (shades of grey), shrunk to fit the placement view and randomly flipped."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from dermml.data.images import load_image, load_mask
from dermml.data.manifest import Manifest, ManifestError, is_missing, read_manifest


@dataclass(frozen=True)
class LesionSource:
    """One lesion of the manifest, by resolved URIs."""

    sample_id: str
    image_uri: str
    mask_uri: str
    split: str | None
    label: str | None


def lesion_sources(manifest_uri: str) -> list[LesionSource]:
    """The rows of ``manifest_uri`` that have a mask; an error names the manifest when none
    has one."""
    if not manifest_uri:
        raise ManifestError("no lesion manifest given: pass --lesions MANIFEST (a segmentation "
                            "manifest with masks, e.g. from `dermml data import isic2018` or "
                            "`dermml data demo`)")
    manifest: Manifest = read_manifest(manifest_uri)
    df = manifest.df
    with_mask = df[~is_missing(df["mask_uri"])]
    if with_mask.empty:
        raise ManifestError(f"{manifest.uri}: none of its {len(df)} rows has a mask_uri; "
                            "lesions are pasted by their masks: use a segmentation manifest")
    out = []
    for row in with_mask.itertuples(index=False):
        split = row.split if isinstance(row.split, str) and row.split.strip() else None
        out.append(LesionSource(str(row.sample_id), manifest.resolve(row.image_uri),
                                manifest.resolve(row.mask_uri), split,
                                row.label if isinstance(row.label, str) else None))
    return out


def lesions_for_split(sources: list[LesionSource], split: str | None) -> list[LesionSource]:
    """The lesions of ``split`` when the manifest has any, else all of them (so a synthetic
    body of the test split never shows a lesion that a real training image shows)."""
    same = [s for s in sources if split is not None and s.split == split]
    return same or sources


def shades_of_grey(image: np.ndarray, power: int = 6) -> np.ndarray:
    """Colour constancy (Finlayson & Trezzi): scale channels so the image's Minkowski-``power``
    mean is grey. Float RGB in [0, 1] in and out."""
    norm = np.power(np.mean(np.power(image.astype(np.float64), power), axis=(0, 1)), 1 / power)
    norm = norm / max(float(np.sqrt((norm ** 2).sum())), 1e-12)
    gains = 1.0 / np.maximum(norm * np.sqrt(3), 1e-6)
    return np.clip(image * gains, 0, 1).astype(np.float32)


@dataclass
class LesionCrop:
    """A lesion ready to place: RGB crop and its mask, even height and width."""

    image: np.ndarray
    """(h, w, 3) float32 in [0, 1]."""
    mask: np.ndarray
    """(h, w) bool."""
    sample_id: str


class EmptyLesionMask(ValueError):
    """The lesion's mask has no lesion pixel (the row is skipped and counted)."""


def load_crop(source: LesionSource, max_side: int, pad: int, power: int,
              rng: np.random.Generator) -> LesionCrop:
    """The lesion box (+ ``pad`` pixels) of a colour-corrected image, shrunk (never enlarged)
    to fit ``max_side``, flipped / rotated at random, with even sides."""
    image = load_image(source.image_uri).astype(np.float32) / 255.0
    mask = load_mask(source.mask_uri)
    if mask.shape != image.shape[:2]:
        raise ManifestError(f"mask {source.mask_uri} is {mask.shape[1]}x{mask.shape[0]} but "
                            f"image {source.image_uri} is {image.shape[1]}x{image.shape[0]}")
    rows, cols = np.nonzero(mask)
    if not len(rows):
        raise EmptyLesionMask(f"mask {source.mask_uri} is empty")
    image = shades_of_grey(image, power)
    r0, r1 = max(rows.min() - pad, 0), min(rows.max() + pad + 1, mask.shape[0])
    c0, c1 = max(cols.min() - pad, 0), min(cols.max() + pad + 1, mask.shape[1])
    image, mask = image[r0:r1, c0:c1], mask[r0:r1, c0:c1]
    pil_image = Image.fromarray((image * 255 + 0.5).astype(np.uint8))
    pil_mask = Image.fromarray(mask.astype(np.uint8) * 255)
    pil_image.thumbnail((max_side, max_side), Image.BILINEAR)
    pil_mask.thumbnail((max_side, max_side), Image.NEAREST)
    image = np.asarray(pil_image, dtype=np.float32) / 255.0
    mask = np.asarray(pil_mask) > 127
    if rng.random() > 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    if rng.random() > 0.5:
        image, mask = image[::-1], mask[::-1]
    if rng.random() > 0.5:
        image, mask = np.rot90(image), np.rot90(mask)
    h, w = mask.shape[0] // 2 * 2, mask.shape[1] // 2 * 2
    image, mask = np.ascontiguousarray(image[:h, :w]), np.ascontiguousarray(mask[:h, :w])
    if not mask.any():
        raise EmptyLesionMask(f"mask {source.mask_uri} vanishes when shrunk to {max_side} px")
    return LesionCrop(image, mask, source.sample_id)
