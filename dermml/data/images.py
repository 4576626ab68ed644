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


def load_mask(uri: str) -> np.ndarray:
    """Binary mask at ``uri`` as bool (H, W): any pixel above half intensity is lesion."""
    try:
        data = storage.read_bytes(uri)
    except storage.StorageError as exc:
        raise ImageReadError(str(exc)) from exc
    return decode_image(data, uri, "L") > 127


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
