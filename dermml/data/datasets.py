"""Torch datasets over manifest rows: images resized to a square size, masks kept binary or as
integer label maps, labels as class indices."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset, Subset

from dermml.data.images import ImageReadError, load_image, load_mask
from dermml.data.manifest import ATTRIBUTES, Manifest

Augment = Callable[[np.ndarray, np.ndarray | None], tuple[np.ndarray, np.ndarray | None]]
"""``augment(image, mask) -> (image, mask)``; mask None, bool (H, W) or an integer label map."""


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    if mask.shape[0] == size and mask.shape[1] == size:
        return mask
    img = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(img.resize((size, size), Image.NEAREST)) > 127


def check_same_size(mask: np.ndarray, mask_uri: str, image: np.ndarray, image_uri: str) -> None:
    """A mask that is not pixel-aligned with its image is an error, not something to resize."""
    if mask.shape[:2] != image.shape[:2]:
        raise ImageReadError(
            f"{mask_uri}: mask is {mask.shape[1]}x{mask.shape[0]} but its image {image_uri} is "
            f"{image.shape[1]}x{image.shape[0]}; fix the mask or run `dermml validate` and train "
            "on the clean manifest (--write-clean)")


def dataset_files(dataset: Dataset, indices: Iterable[int] | None = None) -> list[str]:
    """Every file samples ``indices`` (default: all) of a dataset read, through any nesting of
    ``Subset`` / ``ConcatDataset`` around datasets with a ``files(index)`` method."""
    indices = range(len(dataset)) if indices is None else indices
    if isinstance(dataset, Subset):
        return dataset_files(dataset.dataset, [dataset.indices[i] for i in indices])
    if isinstance(dataset, ConcatDataset):
        starts = [0, *dataset.cumulative_sizes]
        return [f for i in indices
                for part in [bisect.bisect_right(dataset.cumulative_sizes, i)]
                for f in dataset_files(dataset.datasets[part], [i - starts[part]])]
    return [f for i in indices for f in dataset.files(i)]


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float (3, H, W) in [0, 1]."""
    return torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float().div_(255.0)


class SegmentationDataset(Dataset):
    """(image, lesion_mask) pairs; ``augment`` takes and returns (image, mask) numpy arrays."""

    def __init__(self, manifest: Manifest, rows: pd.DataFrame, image_size: int,
                 augment: Augment | None = None):
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

    def files(self, index: int) -> list[str]:
        """The files sample ``index`` reads."""
        return [self.image_uris[index], self.mask_uris[index]]

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The resized image and mask before augmentation."""
        image = load_image(self.image_uris[index])
        mask = load_mask(self.mask_uris[index])
        check_same_size(mask, self.mask_uris[index], image, self.image_uris[index])
        return resize_image(image, self.image_size), resize_mask(mask, self.image_size)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.load(index)
        if self.augment is not None:
            image, mask = self.augment(image, mask)
        return image_to_tensor(image), torch.from_numpy(np.ascontiguousarray(mask)).float()[None]


class ClassificationDataset(Dataset):
    """(image, class index) pairs; ``labels`` holds every sample's class index for samplers."""

    def __init__(self, manifest: Manifest, rows: pd.DataFrame, image_size: int,
                 class_names: list[str], augment: Augment | None = None):
        self.image_uris = [manifest.resolve(u) for u in rows["image_uri"]]
        self.sample_ids = rows["sample_id"].tolist()
        self.class_names = list(class_names)
        index = {name: i for i, name in enumerate(self.class_names)}
        unknown = [(s, label) for s, label in zip(self.sample_ids, rows["label"], strict=True)
                   if not isinstance(label, str) or label not in index]
        if unknown:
            listed = ", ".join(f"{s} ({label!r})" for s, label in unknown[:5])
            raise ValueError(f"{manifest.uri}: {len(unknown)} samples have labels outside the "
                             f"classes {self.class_names}: {listed}; add the labels to the "
                             "classes or train on a manifest without them")
        self.labels = [index[label] for label in rows["label"]]
        self.image_size = image_size
        self.augment = augment

    def __len__(self) -> int:
        return len(self.image_uris)

    def files(self, index: int) -> list[str]:
        """The files sample ``index`` reads."""
        return [self.image_uris[index]]

    def load(self, index: int) -> tuple[np.ndarray, int]:
        """The resized image and its class index, before augmentation."""
        return resize_image(load_image(self.image_uris[index]), self.image_size), \
            self.labels[index]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.load(index)
        if self.augment is not None:
            image, _ = self.augment(image, None)
        return image_to_tensor(image), torch.tensor(label, dtype=torch.int64)


class AttributeDataset(Dataset):
    """(image, attribute label map) pairs: 0 is background, k is ``attributes[k - 1]``.

    Attribute masks may overlap (a globule inside a pigment network); one label per pixel
    keeps the later attribute in ``attributes`` order. A row without a mask for some attribute
    has none of it; a row without any ``attribute_mask_uris`` is an error.
    """

    def __init__(self, manifest: Manifest, rows: pd.DataFrame, image_size: int,
                 attributes: tuple[str, ...] = ATTRIBUTES, augment: Augment | None = None):
        self.image_uris = [manifest.resolve(u) for u in rows["image_uri"]]
        self.sample_ids = rows["sample_id"].tolist()
        self.attributes = tuple(attributes)
        # read_manifest gives dicts; rows built in memory may still hold (name, uri) pairs.
        uri_maps = [dict(v) if isinstance(v, dict | list) else None
                    for v in rows["attribute_mask_uris"]]
        missing = [s for s, v in zip(self.sample_ids, uri_maps, strict=True) if not v]
        if missing:
            raise ValueError(f"{manifest.uri}: {len(missing)} samples have no "
                             f"attribute_mask_uris: {missing[:5]}; train the attributes task "
                             "on a manifest with attribute masks (e.g. ISIC 2018 task 2)")
        self.attribute_uris = [[manifest.resolve(v.get(name)) for name in self.attributes]
                               for v in uri_maps]
        self.image_size = image_size
        self.augment = augment

    def __len__(self) -> int:
        return len(self.image_uris)

    def files(self, index: int) -> list[str]:
        """The files sample ``index`` reads."""
        return [self.image_uris[index], *(u for u in self.attribute_uris[index] if u)]

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The resized image and int64 label map (H, W), before augmentation."""
        full = load_image(self.image_uris[index])
        image = resize_image(full, self.image_size)
        label_map = np.zeros((self.image_size, self.image_size), np.int64)
        for k, uri in enumerate(self.attribute_uris[index], start=1):
            if uri is not None:
                mask = load_mask(uri)
                check_same_size(mask, uri, full, self.image_uris[index])
                label_map[resize_mask(mask, self.image_size)] = k
        return image, label_map

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label_map = self.load(index)
        if self.augment is not None:
            image, label_map = self.augment(image, label_map)
        return image_to_tensor(image), torch.from_numpy(np.ascontiguousarray(label_map)).long()


def class_pixel_counts(dataset: AttributeDataset, max_samples: int | None = None) -> np.ndarray:
    """Pixels per class 0..K over (un-augmented) label maps, for inverse-frequency weights.

    ``max_samples`` caps the work on large sets with evenly spaced samples.
    """
    n = len(dataset)
    indices = range(n)
    if max_samples is not None and max_samples < n:
        indices = np.linspace(0, n - 1, max_samples).round().astype(int).tolist()
    counts = np.zeros(len(dataset.attributes) + 1, np.int64)
    for i in indices:
        counts += np.bincount(dataset.load(i)[1].ravel(), minlength=counts.size)
    return counts


class DetectionDataset(Dataset):
    """(image, target) pairs for torchvision detectors: ``target`` holds ``boxes`` (N, 4) as
    [x0, y0, x1, y1] at ``image_size`` and ``labels`` (N,) as class index + 1 (0 is the
    background). Boxes come from the manifest's ``boxes`` column or from the connected
    components of the row's mask (``dermml.data.boxes``), in full-size pixels, and are scaled
    with the image; ``augment`` (a ``BoxAugmenter``) moves them with the image."""

    def __init__(self, manifest: Manifest, rows: pd.DataFrame, image_size: int,
                 class_names: list[str], settings, augment=None):
        from dermml.data.boxes import box_labels, box_sources, column_boxes, valid_boxes

        self.image_uris = [manifest.resolve(u) for u in rows["image_uri"]]
        self.sample_ids = rows["sample_id"].tolist()
        self.class_names = list(class_names)
        self.settings = settings
        self.sources = box_sources(rows, settings.source, manifest.uri)
        self.mask_uris = [manifest.resolve(u) if s == "mask" else None
                          for u, s in zip(rows["mask_uri"], self.sources, strict=True)]
        # Column boxes are read now; mask boxes on first load (the mask is read then anyway).
        self._boxes: list[tuple[list, list] | None] = []
        self._mask_labels: list[str | None] = []
        for (_, row), source in zip(rows.iterrows(), self.sources, strict=True):
            if source == "column":
                boxes = column_boxes(row.get("boxes"))
                self._boxes.append(valid_boxes(boxes, box_labels(row, len(boxes), source,
                                                                 settings.labels)))
                self._mask_labels.append(None)
            else:
                self._boxes.append(None)
                self._mask_labels.append(box_labels(row, 1, source, settings.labels)[0])
        index = {name: i for i, name in enumerate(self.class_names)}
        unknown = sorted({label for entry, mask_label in zip(self._boxes, self._mask_labels,
                                                             strict=True)
                          for label in (entry[1] if entry else [mask_label])
                          if label not in index})
        if unknown:
            raise ValueError(f"{manifest.uri}: box labels {unknown} are not in the classes "
                             f"{self.class_names}; add them to classes or set "
                             "boxes.labels=lesion")
        self.index = index
        self.image_size = image_size
        self.augment = augment

    def __len__(self) -> int:
        return len(self.image_uris)

    def files(self, index: int) -> list[str]:
        """The files sample ``index`` reads."""
        mask = self.mask_uris[index]
        return [self.image_uris[index], *([mask] if mask else [])]

    def full_size_boxes(self, index: int, image: np.ndarray | None = None
                        ) -> tuple[list[list[float]], list[str]]:
        """Boxes [x, y, w, h] (full-size pixels) and classes of sample ``index``."""
        from dermml.data.boxes import mask_boxes

        if self._boxes[index] is None:
            mask = load_mask(self.mask_uris[index])
            if image is not None:
                check_same_size(mask, self.mask_uris[index], image, self.image_uris[index])
            boxes = mask_boxes(mask, self.settings.min_area)
            self._boxes[index] = (boxes, [self._mask_labels[index]] * len(boxes))
        return self._boxes[index]

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The resized image, its boxes [x, y, w, h] (N, 4) at ``image_size`` and their class
        indices (N,), before augmentation."""
        from dermml.data.boxes import scale_boxes

        image = load_image(self.image_uris[index])
        boxes, labels = self.full_size_boxes(index, image)
        h, w = image.shape[:2]
        size = self.image_size
        scaled = scale_boxes(boxes, size / w, size / h)
        return (resize_image(image, size), scaled,
                np.array([self.index[label] for label in labels], np.int64))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from dermml.data.boxes import xywh_to_xyxy

        image, boxes, labels = self.load(index)
        if self.augment is not None:
            image, boxes, labels = self.augment(image, boxes, labels)
        xyxy = xywh_to_xyxy(boxes)
        keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
        return image_to_tensor(image), {"boxes": torch.from_numpy(xyxy[keep]),
                                        "labels": torch.from_numpy(labels[keep] + 1)}
