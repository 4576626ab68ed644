"""Torch datasets over manifest rows: images resized to a square size, masks kept binary."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

from dermml.data.images import load_image, load_mask
from dermml.data.manifest import Manifest


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    if mask.shape[0] == size and mask.shape[1] == size:
        return mask
    img = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(img.resize((size, size), Image.NEAREST)) > 127


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float (3, H, W) in [0, 1]."""
    return torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float().div_(255.0)


class SegmentationDataset(Dataset):
    """(image, lesion_mask) pairs; ``augment`` takes and returns (image, mask) numpy arrays."""

    def __init__(self, manifest: Manifest, rows: pd.DataFrame, image_size: int,
                 augment: Callable[[np.ndarray, np.ndarray], tuple] | None = None):
        self.image_uris = [manifest.resolve(u) for u in rows["image_uri"]]
        self.mask_uris = [manifest.resolve(u) for u in rows["mask_uri"]]
        self.sample_ids = rows["sample_id"].tolist()
        missing = [s for s, m in zip(self.sample_ids, self.mask_uris, strict=True) if m is None]
        if missing:
            raise ValueError(f"{manifest.uri}: samples without mask_uri: {missing[:5]}; "
                             "run `dermml validate` and train on the clean manifest")
        self.image_size = image_size
        self.augment = augment

    def __len__(self) -> int:
        return len(self.image_uris)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The resized image and mask before augmentation."""
        image = resize_image(load_image(self.image_uris[index]), self.image_size)
        mask = resize_mask(load_mask(self.mask_uris[index]), self.image_size)
        return image, mask

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.load(index)
        if self.augment is not None:
            image, mask = self.augment(image, mask)
        return image_to_tensor(image), torch.from_numpy(np.ascontiguousarray(mask)).float()[None]
