"""Decoding and encoding of images and masks, with errors that name the file."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dermml import storage


class ImageReadError(ValueError):
    """An image or mask could not be decoded; the message names the URI and the reason."""


def decode_image(data: bytes, name: str = "<bytes>", mode: str = "RGB") -> np.ndarray:
    """Decode image bytes to a uint8 array (H, W, 3 for RGB; H, W for L), EXIF-rotated."""
    if not data:
        raise ImageReadError(f"{name}: file is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            return np.asarray(img.convert(mode))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{name}: not a decodable image ({exc})") from exc


def load_image(uri: str) -> np.ndarray:
    """RGB uint8 (H, W, 3) image at ``uri``."""
    try:
        data = storage.read_bytes(uri)
    except storage.StorageError as exc:
        raise ImageReadError(str(exc)) from exc
    return decode_image(data, uri, "RGB")


MASK_THRESHOLD = 127
"""A grey mask pixel above this is lesion (masks coded 0/1 excepted, see ``binarize_mask``)."""
MASK_MAX_MID_GREY = 0.25
"""A "mask" with more mid-grey pixels than this share is no mask at all (a photo, a heat map)."""
_MID_GREY = (32, 223)
_COLOUR_TOLERANCE = 24


def binarize_mask(gray: np.ndarray) -> np.ndarray:
    """Lesion pixels (bool) of a grey uint8 mask, the one rule that training, evaluation and
    validation share: above half intensity, or 1 in a mask coded 0/1."""
    if gray.size and int(gray.max()) == 1:
        return gray > 0
    return gray > MASK_THRESHOLD


def mask_encoding(pixels: np.ndarray) -> tuple[str, str]:
    """How a decoded mask (uint8 (H, W) or (H, W, C)) stores its lesion, and why when it is no
    mask: ``binary`` (0/255, grey or RGB), ``binary_0_1``, ``soft`` (grey levels, e.g. anti-
    aliased or JPEG edges: binarised by ``binarize_mask``) or ``not_a_mask``."""
    if pixels.ndim == 3:
        colour = pixels[..., :3]
        spread = colour.max(axis=-1).astype(np.int16) - colour.min(axis=-1)
        coloured = float((spread > _COLOUR_TOLERANCE).mean())
        if coloured > 0.01:
            return "not_a_mask", (f"a colour image ({coloured:.0%} of pixels are coloured), "
                                  "not a grey lesion mask")
        pixels = colour.max(axis=-1)
    values = np.bincount(pixels.ravel(), minlength=256)
    total = max(int(pixels.size), 1)
    if values[0] + values[255] == total:
        return "binary", ""
    if values[0] + values[1] == total:
        return "binary_0_1", ""
    mid = int(values[_MID_GREY[0]:_MID_GREY[1] + 1].sum()) / total
    if mid > MASK_MAX_MID_GREY:
        return "not_a_mask", (f"{mid:.0%} of pixels are mid-grey ({_MID_GREY[0]}-{_MID_GREY[1]})"
                              ": a photo or a probability map, not a lesion mask")
    return "soft", ""


def load_mask(uri: str) -> np.ndarray:
    """Binary mask at ``uri`` as bool (H, W), binarised by ``binarize_mask``."""
    try:
        data = storage.read_bytes(uri)
    except storage.StorageError as exc:
        raise ImageReadError(str(exc)) from exc
    return binarize_mask(decode_image(data, uri, "L"))


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of a uint8 or bool array (bool masks are written as 0/255)."""
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def to_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def from_base64(text: str, name: str = "input") -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (ValueError, TypeError) as exc:
        raise ImageReadError(f"{name}: not valid base64 ({exc})") from exc
