"""Dense targets of the multitask task: whatever a manifest row labels, with a flag per target.

A row of ``dermml synth3d`` output labels everything: the lesion mask (``mask_uri``), the
lesion / skin / non-skin map (the non-skin channel of DermSynth3D's ``targets/<id>.npz``,
``target_uri``), the anatomy map (``anatomy_uri``: DermSynth3D's 17 labels, trained as its
8-class simplification) and depth (``depth_uri``: uint16 PNG in 0.1 mm steps, 0 where unknown).
A row of a real set (ISIC, PH2, the demo data) has the lesion mask only; the rest is flagged
missing and left out of losses and metrics.

Label maps are resized with nearest neighbours; depth bilinearly over known pixels only (a
pixel next to the background keeps its own depth instead of a blend with the background's 0).
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

from dermml import storage
from dermml.data.augment import Augmenter
from dermml.data.datasets import check_same_size, image_to_tensor, resize_image, resize_mask
from dermml.data.images import ImageReadError, load_image, load_mask
from dermml.data.manifest import Manifest
from dermml.synth3d.anatomy import SIMPLE_ANATOMY_LABELS, to_simple_anatomy
from dermml.synth3d.outputs import DEPTH_SCALE
from dermml.synth3d.views import NONSKIN as NONSKIN_CHANNEL

SEG_LABELS = ("nonskin", "skin", "lesion")
"""Classes of the lesion head's map (DermSynth3D's lesion, skin and non-skin targets, with the
background class first): non-skin is everything that is not skin (background, clothes, hair),
skin is skin that is not lesion."""
NONSKIN, SKIN, LESION = range(3)
ANATOMY_LABELS = SIMPLE_ANATOMY_LABELS
"""Classes of the anatomy head: DermSynth3D's 8-class simplification (0 background)."""
TARGETS = ("lesion", "seg", "anatomy", "depth")
"""Target keys of a sample; each has a ``has_<key>`` flag."""
HEAD_TARGETS = {"lesion": ("lesion", "seg"), "anatomy": ("anatomy",), "depth": ("depth",)}
"""The targets each head trains on."""


def _read(uri: str) -> bytes:
    try:
        return storage.read_bytes(uri)
    except storage.StorageError as exc:
        raise ImageReadError(str(exc)) from exc


def load_label_map(uri: str) -> np.ndarray:
    """The raw values of a single-channel PNG label map (uint8 or uint16), as stored."""
    data = _read(uri)
    try:
        with Image.open(io.BytesIO(data)) as img:
            array = np.asarray(img)
    except Exception as exc:  # PIL raises many types for corrupt files
        raise ImageReadError(f"{uri}: not a decodable image ({exc})") from exc
    if array.ndim != 2:
        raise ImageReadError(f"{uri}: a label map must have one channel, got shape "
                             f"{array.shape}")
    return array


def load_anatomy(uri: str) -> np.ndarray:
    """The 8-class anatomy map (uint8) of an anatomy PNG of DermSynth3D's 17 labels."""
    labels = load_label_map(uri)
    try:
        return to_simple_anatomy(labels)
    except ValueError as exc:
        raise ImageReadError(f"{uri}: {exc}") from None


def load_depth(uri: str) -> np.ndarray:
    """Depth in metres (float32) of a depth PNG (uint16, 0.1 mm steps); 0 where unknown."""
    raw = load_label_map(uri)
    if raw.dtype not in (np.uint16, np.int32, np.uint8):
        raise ImageReadError(f"{uri}: a depth map is a 16-bit PNG, got {raw.dtype}")
    return raw.astype(np.float32) / DEPTH_SCALE


def load_nonskin(uri: str) -> np.ndarray:
    """The non-skin pixels (bool) of a DermSynth3D target .npz (``masks``: H x W x 5)."""
    try:
        with np.load(io.BytesIO(_read(uri))) as data:
            masks = data["masks"]
    except ImageReadError:
        raise
    except Exception as exc:
        raise ImageReadError(f"{uri}: not a DermSynth3D target .npz ({exc})") from exc
    if masks.ndim != 3 or masks.shape[-1] <= NONSKIN_CHANNEL:
        raise ImageReadError(f"{uri}: masks are {masks.shape}, expected H x W x 5")
    return masks[..., NONSKIN_CHANNEL] > 0.5


def seg_map(lesion: np.ndarray, nonskin: np.ndarray) -> np.ndarray:
    """The lesion head's 3-class map (uint8): lesion, else non-skin, else skin."""
    out = np.full(lesion.shape, SKIN, np.uint8)
    out[nonskin] = NONSKIN
    out[lesion] = LESION
    return out


def resize_labels(labels: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """A uint8 label map resized with nearest neighbours to ``size`` (side, or (h, w))."""
    h, w = (size, size) if isinstance(size, int) else size
    if labels.shape == (h, w):
        return labels
    return np.asarray(Image.fromarray(labels.astype(np.uint8)).resize((w, h), Image.NEAREST))


def resize_depth(depth: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Depth (0 = unknown) resized bilinearly over the known pixels only: a pixel is known
    where all of its bilinear support is (no blend of a body's depth with the background's)."""
    h, w = (size, size) if isinstance(size, int) else size
    if depth.shape == (h, w):
        return depth
    known = (depth > 0).astype(np.float32)

    def bilinear(a: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(a.astype(np.float32), mode="F").resize(
            (w, h), Image.BILINEAR))

    weight = bilinear(known)
    value = bilinear(depth * known)
    return np.where(weight > 0.999, value / np.maximum(weight, 1e-6), 0).astype(np.float32)


def _uris(manifest: Manifest, rows: pd.DataFrame, column: str) -> list[str | None]:
    if column not in rows:
        return [None] * len(rows)
    return [manifest.resolve(u) for u in rows[column]]


def row_targets(manifest: Manifest, row: pd.Series, heads: tuple[str, ...]
                ) -> dict[str, np.ndarray]:
    """The full-size targets of one manifest row that ``heads`` train on (those it has)."""
    uris = {c: manifest.resolve(row.get(c)) for c in ("mask_uri", "target_uri", "anatomy_uri",
                                                       "depth_uri")}
    return _targets(uris, heads)


def _targets(uris: dict[str, str | None], heads: tuple[str, ...]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    if "lesion" in heads and uris["mask_uri"]:
        out["lesion"] = load_mask(uris["mask_uri"])
        if uris["target_uri"]:
            nonskin = load_nonskin(uris["target_uri"])
            check_same_size(nonskin, uris["target_uri"], out["lesion"], uris["mask_uri"])
            out["seg"] = seg_map(out["lesion"], nonskin)
    if "anatomy" in heads and uris["anatomy_uri"]:
        out["anatomy"] = load_anatomy(uris["anatomy_uri"])
    if "depth" in heads and uris["depth_uri"]:
        out["depth"] = load_depth(uris["depth_uri"])
    return out


class MultitaskDataset(Dataset):
    """An image and a dict of targets with validity flags: ``lesion`` (float 0/1), ``seg``
    (int64 3-class map), ``anatomy`` (int64 8-class map), ``depth`` (float metres, 0 unknown)
    and ``has_<target>`` (bool); a missing target is zeros with its flag False.

    ``heads``: the model's heads; only the targets they train on are read.
    """

    def __init__(self, manifest: Manifest, rows: pd.DataFrame, image_size: int,
                 heads: tuple[str, ...] = ("lesion", "anatomy", "depth"),
                 augment: Augmenter | None = None):
        self.image_uris = [manifest.resolve(u) for u in rows["image_uri"]]
        self.sample_ids = rows["sample_id"].tolist()
        self.uris = [dict(zip(("mask_uri", "target_uri", "anatomy_uri", "depth_uri"), values,
                              strict=True))
                     for values in zip(*(_uris(manifest, rows, c) for c in (
                         "mask_uri", "target_uri", "anatomy_uri", "depth_uri")), strict=True)]
        self.heads = tuple(heads)
        needed = {"lesion": ("mask_uri",), "anatomy": ("anatomy_uri",),
                  "depth": ("depth_uri",)}
        unlabelled = [s for s, u in zip(self.sample_ids, self.uris, strict=True)
                      if not any(u[c] for h in self.heads for c in needed[h])]
        if unlabelled:
            raise ValueError(
                f"{manifest.uri}: {len(unlabelled)} samples have no target for the heads "
                f"{list(self.heads)} (mask_uri, anatomy_uri or depth_uri): {unlabelled[:5]}; "
                "train on a manifest with lesion masks or synth3d output")
        self.image_size = image_size
        self.augment = augment

    def __len__(self) -> int:
        return len(self.image_uris)

    def files(self, index: int) -> list[str]:
        """The files sample ``index`` reads."""
        u = self.uris[index]
        wanted = []
        if "lesion" in self.heads:
            wanted += [u["mask_uri"], u["target_uri"] if u["mask_uri"] else None]
        if "anatomy" in self.heads:
            wanted.append(u["anatomy_uri"])
        if "depth" in self.heads:
            wanted.append(u["depth_uri"])
        return [self.image_uris[index], *(w for w in wanted if w)]

    def load(self, index: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The resized image and its targets (those the row has), before augmentation."""
        full = load_image(self.image_uris[index])
        targets = _targets(self.uris[index], self.heads)
        size = self.image_size
        for key, value in targets.items():
            check_same_size(value, f"{self.sample_ids[index]} {key}", full,
                            self.image_uris[index])
        out: dict[str, np.ndarray] = {}
        if "lesion" in targets:
            out["lesion"] = resize_mask(targets["lesion"], size)
        if "seg" in targets:
            out["seg"] = resize_labels(targets["seg"], size)
        if "anatomy" in targets:
            out["anatomy"] = resize_labels(targets["anatomy"], size)
        if "depth" in targets:
            out["depth"] = resize_depth(targets["depth"], size)
        return resize_image(full, size), out

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image, targets = self.load(index)
        if self.augment is not None:
            image, targets = augment_targets(self.augment, image, targets)
        size = image.shape[:2]
        sample = {"image": image_to_tensor(image)}
        for key in TARGETS:
            value = targets.get(key)
            sample[f"has_{key}"] = torch.tensor(value is not None)
            if key in ("lesion", "depth"):
                sample[key] = torch.zeros(size) if value is None else \
                    torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
            else:
                sample[key] = torch.zeros(size, dtype=torch.int64) if value is None else \
                    torch.from_numpy(np.ascontiguousarray(value).astype(np.int64))
        return sample


def augment_targets(augment: Augmenter, image: np.ndarray, targets: dict[str, np.ndarray]
                    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One augmentation draw over the image and all its targets (depth travels as uint16 in
    0.1 mm steps, the resolution it is stored at)."""
    keys = list(targets)
    maps = [np.round(targets[k] * DEPTH_SCALE).clip(0, 65535).astype(np.uint16)
            if k == "depth" else targets[k] for k in keys]
    image, maps = augment.with_masks(image, maps)
    out = {k: (m.astype(np.float32) / DEPTH_SCALE if k == "depth" else m)
           for k, m in zip(keys, maps, strict=True)}
    return image, out


def target_counts(manifest: Manifest, rows: pd.DataFrame) -> dict[str, int]:
    """How many of ``rows`` label each head's targets (lesion masks, anatomy, depth)."""
    def count(column: str) -> int:
        return sum(u is not None for u in _uris(manifest, rows, column))

    return {"lesion": count("mask_uri"), "anatomy": count("anatomy_uri"),
            "depth": count("depth_uri")}
