"""Per-sample facts: what one manifest row's image and mask are (which file is bad, and why),
from one decode of each file. The worker pool that computes them for a manifest is ``pool``."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, fields

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from dermml import storage
from dermml.data.images import binarize_mask, mask_encoding
from dermml.data.phash import hash_thumbnail, hashes_and_contrast

_EXIF_ORIENTATION = 0x0112
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
              6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}
MIN_REGION_FRACTION = 0.001
"""Smallest lesion region counted by mask_components: 0.1% of the image. Official ISIC 2018
masks hold up to 90 specks below it (331 of 2,594 masks have more than 3 regions) but at most
2 regions above it."""


@dataclass
class SampleFacts:
    """What one manifest row's files are, measured from one decode of each file."""

    sample_id: str
    split: str | None
    label: str | None
    image_uri: str
    mask_uri: str | None
    image_ok: bool = False
    image_error: str = ""
    file_size: int | None = None
    format: str | None = None
    mode: str | None = None
    channels: int | None = None
    width: int | None = None
    height: int | None = None
    exif_orientation: int | None = None
    sha256: str | None = None
    phash: str | None = None
    """256-bit DCT perceptual hash (hex), see ``dermml.data.phash.perceptual_hash``."""
    mean_r: float | None = None
    mean_g: float | None = None
    mean_b: float | None = None
    gray_std: float | None = None
    """Contrast: standard deviation of the grey levels of the 64x64 thumbnail the hash uses."""
    mask_ok: bool | None = None
    mask_error: str = ""
    mask_mode: str | None = None
    mask_width: int | None = None
    mask_height: int | None = None
    mask_binary: bool | None = None
    """Stored as 0/255 exactly (grey or RGB)."""
    mask_encoding: str | None = None
    """binary, binary_0_1, soft or not_a_mask (``dermml.data.images.mask_encoding``)."""
    mask_problem: str = ""
    """Why a not_a_mask mask is none."""
    lesion_fraction: float | None = None
    mask_components: int | None = None
    """Lesion regions of at least MIN_REGION_FRACTION of the image (specks are not counted)."""
    mask_touches_border: bool | None = None
    attribute_masks_bad: int | None = None
    attribute_masks_problem: str = ""
    companions_bad: int | None = None
    companions_problem: str = ""


FACT_COLUMNS = tuple(f.name for f in fields(SampleFacts))


# --------------------------------------------------------------------------- decoding


def _decode(data: bytes) -> tuple[Image.Image, int | None, str | None]:
    """Decoded, EXIF-upright image (as the training loader sees it), EXIF orientation, format."""
    if not data:
        raise ValueError("file is empty (0 bytes)")
    img = Image.open(io.BytesIO(data))
    img.load()  # a truncated file fails here, not at open()
    orientation, file_format = img.getexif().get(_EXIF_ORIENTATION), img.format
    if orientation in _TRANSPOSE:
        img = img.transpose(_TRANSPOSE[orientation])
    return img, orientation, file_format


def _reason(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, UnidentifiedImageError):
        return "not a decodable image"
    if "truncated" in text.lower():
        return "truncated image file"
    if isinstance(exc, storage.StorageError | ValueError):
        return text.split(": ", 1)[-1] if text.startswith(("/", "s3://")) else text
    return f"not a decodable image ({type(exc).__name__}: {text})"


def _pixels(img: Image.Image) -> np.ndarray:
    """uint8 (H, W[, C]) array of a decoded 8-bit image."""
    bands = len(img.getbands())
    shape = (img.size[1], img.size[0]) + ((bands,) if bands > 1 else ())
    return np.frombuffer(img.tobytes(), np.uint8).reshape(shape)


def _image_facts(facts: SampleFacts) -> tuple[Image.Image | None, bytes | None]:
    """Facts of the image file; the decoded image and its grey thumbnail (for the hash)."""
    if not facts.image_uri:
        facts.image_error = "no image_uri for this sample"
        return None, None
    try:
        data = storage.read_bytes(facts.image_uri)
    except storage.StorageError as exc:
        facts.image_error = _reason(exc)
        return None, None
    facts.file_size = len(data)
    facts.sha256 = hashlib.sha256(data).hexdigest()
    try:
        img, facts.exif_orientation, facts.format = _decode(data)
    except Exception as exc:  # any decoder failure is a finding about this file, not a crash
        facts.image_error = _reason(exc)
        return None, None
    facts.image_ok = True
    facts.width, facts.height = img.size
    facts.mode = img.mode
    facts.channels = len(img.getbands())
    try:
        gray, (facts.mean_r, facts.mean_g, facts.mean_b) = hash_thumbnail(img)
    except (ValueError, OSError):  # modes Pillow cannot convert (e.g. 32-bit float): no hash
        gray = None
    return img, gray


def _mask_pixels(mask: Image.Image) -> np.ndarray:
    """uint8 pixels of a decoded mask: grey for one-band masks, RGB for the rest."""
    if mask.mode not in ("L", "RGB"):
        mask = mask.convert("L" if len(mask.getbands()) == 1 or mask.mode == "LA" else "RGB")
    return _pixels(mask)


def _mask_facts(facts: SampleFacts, min_region: float = MIN_REGION_FRACTION) -> None:
    try:
        mask = _decode(storage.read_bytes(facts.mask_uri or ""))[0]
        pixels = _mask_pixels(mask)
    except Exception as exc:
        facts.mask_ok, facts.mask_error = False, _reason(exc)
        return
    facts.mask_mode = mask.mode
    facts.mask_width, facts.mask_height = mask.size
    facts.mask_ok = True
    facts.mask_encoding, facts.mask_problem = mask_encoding(pixels)
    facts.mask_binary = facts.mask_encoding == "binary"
    gray = pixels if pixels.ndim == 2 else _pixels(mask.convert("L"))
    lesion = binarize_mask(gray).view(np.uint8)
    n_lesion = int(lesion.sum())
    facts.lesion_fraction = n_lesion / lesion.size if lesion.size else 0.0
    if not n_lesion:
        facts.mask_components, facts.mask_touches_border = 0, False
        return
    facts.mask_components = _count_components(lesion, int(min_region * lesion.size))
    facts.mask_touches_border = bool(lesion[[0, -1]].any() or lesion[:, [0, -1]].any())


def _count_components(lesion: np.ndarray, min_area: int = 0) -> int:
    """8-connected lesion regions of at least ``min_area`` pixels, counted by OpenCV on this
    thread only: its worker threads would not survive a later fork (a DataLoader, a pool)."""
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        stats = cv2.connectedComponentsWithStats(lesion, connectivity=8)[2]
        return int((stats[1:, cv2.CC_STAT_AREA] >= max(min_area, 1)).sum())
    finally:
        cv2.setNumThreads(threads)


def companion_problems(uris: dict[str, str | None], size: tuple[int, int] | None,
                       binary: bool) -> list[str]:
    """Problems of the files that go with an image (attribute masks, anatomy, depth maps)."""
    out = []
    for name, uri in sorted(uris.items()):
        if not uri:
            out.append(f"no {name} file")
            continue
        try:
            img = _decode(storage.read_bytes(uri))[0]
        except Exception as exc:
            out.append(f"{name} {uri}: {_reason(exc)}")
            continue
        if size and img.size != size:
            out.append(f"{name} {uri} is {img.size[0]}x{img.size[1]} but the image is "
                       f"{size[0]}x{size[1]}")
        elif binary:
            kind, why = mask_encoding(_mask_pixels(img))
            if kind == "not_a_mask":
                out.append(f"{name} {uri}: {why}")
    return out


def sample_facts(row: dict) -> SampleFacts:
    """Facts of one manifest row (URIs already resolved).

    Optional row keys: ``attribute_mask_uris`` (checked as binary masks of the image's size) and
    ``companions`` (other files that must decode at the image's size).
    """
    return batch_facts([row])[0]


def batch_facts(rows: list[dict]) -> list[SampleFacts]:
    """Facts of several rows; the hashes of all their thumbnails are computed together."""
    out, thumbs = [], {}
    for i, row in enumerate(rows):
        facts = SampleFacts(row["sample_id"], row.get("split"), row.get("label"),
                            row["image_uri"], row.get("mask_uri"))
        img, gray = _image_facts(facts)
        if gray is not None:
            thumbs[i] = gray
        if facts.mask_uri:
            _mask_facts(facts)
        _companion_facts(facts, row, img.size if img is not None else None)
        out.append(facts)
    if thumbs:
        grays = np.frombuffer(b"".join(thumbs.values()), np.uint8).reshape(len(thumbs), -1)
        hashes, contrast = hashes_and_contrast(grays)
        for k, i in enumerate(thumbs):
            out[i].phash, out[i].gray_std = hashes[k], float(contrast[k])
    return out


def _companion_facts(facts: SampleFacts, row: dict, size: tuple[int, int] | None) -> None:
    for key, binary, bad, problem in (("attribute_mask_uris", True, "attribute_masks_bad",
                                       "attribute_masks_problem"),
                                      ("companions", False, "companions_bad",
                                       "companions_problem")):
        if key in row:
            found = companion_problems(row[key] or {}, size, binary)
            setattr(facts, bad, len(found))
            setattr(facts, problem, "; ".join(found))
