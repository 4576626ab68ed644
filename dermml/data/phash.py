"""Perceptual hashes of images and the near-duplicate groups they imply.

One implementation serves the importer (near-duplicates share a split) and validation (a
near-duplicate across splits is leakage), so the two can never disagree on what is "the same".
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps

PHASH_SIZE = 16
"""Side of the perceptual hash (256 bits): 64-bit hashes collide on look-alike lesion photos."""
_PHASH_IMAGE = PHASH_SIZE * 4
# Type-II DCT rows (unnormalised, as scipy.fftpack.dct): the low frequencies of a 64x64 image.
_DCT = (2 * np.cos(np.pi * np.arange(PHASH_SIZE)[:, None] * (2 * np.arange(_PHASH_IMAGE)[None] + 1)
                   / (2 * _PHASH_IMAGE))).astype(np.float32)


def perceptual_hash(img: Image.Image) -> str:
    """256-bit DCT perceptual hash as hex; equal to ``imagehash.phash(img, hash_size=16)`` for
    images up to 64 px (larger ones are box-reduced before the Lanczos filter, which is faster)."""
    gray, _ = hash_thumbnail(img)
    return hashes_and_contrast(np.frombuffer(gray, np.uint8)[None])[0][0]


def hash_thumbnail(img: Image.Image) -> tuple[bytes, tuple[float, float, float]]:
    """The 64x64 grey thumbnail the hash is computed on (bytes), and the mean colour."""
    source = img if img.mode in ("RGB", "L") else img.convert("RGB")
    if max(source.size) > _PHASH_IMAGE:
        # An integer box reduction first, then Lanczos for the rest: several times faster than
        # Lanczos alone on large images, and the hash stays as robust to resizing.
        thumb = source.resize((_PHASH_IMAGE, _PHASH_IMAGE), Image.Resampling.LANCZOS,
                              reducing_gap=1.0)
        gray = thumb.convert("L")
    else:  # imagehash's order: grey first, then resize
        thumb, gray = source, source.convert("L")
        if gray.size != (_PHASH_IMAGE, _PHASH_IMAGE):
            gray = gray.resize((_PHASH_IMAGE, _PHASH_IMAGE), Image.Resampling.LANCZOS)
    rgb = thumb if thumb.mode == "RGB" else thumb.convert("RGB")
    colour = rgb.resize((1, 1), Image.Resampling.BOX).getpixel((0, 0))
    return gray.tobytes(), (float(colour[0]), float(colour[1]), float(colour[2]))


def hashes_and_contrast(grays: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Hashes (hex) and grey-level standard deviations of (N, 4096) uint8 thumbnails, all at
    once: per-image numpy calls would cost more than the arithmetic."""
    pixels = grays.astype(np.float32)  # exact for uint8 sums up to 2**24; halves the memory
    low = (_DCT @ pixels.reshape(-1, _PHASH_IMAGE, _PHASH_IMAGE) @ _DCT.T).reshape(len(grays), -1)
    middle = np.sort(low, axis=1)
    half = low.shape[1] // 2
    bits = np.packbits(low > ((middle[:, half - 1] + middle[:, half]) / 2)[:, None], axis=1)
    mean = pixels.mean(axis=1, dtype=np.float64)
    squares = np.einsum("ij,ij->i", pixels, pixels, dtype=np.float64) / pixels.shape[1]
    contrast = np.sqrt(np.maximum(squares - mean * mean, 0.0))
    return [row.tobytes().hex() for row in bits], contrast


def hash_bits(hexes: Sequence[str]) -> np.ndarray:
    """Perceptual hashes (hex) as rows of +1/-1, so that a dot product counts equal bits."""
    raw = b"".join(bytes.fromhex(h) for h in hexes)
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8)).reshape(len(hexes), -1)
    return bits.astype(np.float32) * 2 - 1


def image_hash(data: bytes) -> str | None:
    """Perceptual hash of encoded image bytes, decoded EXIF-upright as validation decodes them;
    None when the bytes are not an image (validation reports those)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return perceptual_hash(ImageOps.exif_transpose(img))
    except Exception:  # PIL raises many exception types for corrupt or unknown files
        return None


NEAR_DUPLICATE_HAMMING = 20
"""Largest Hamming distance (of 256 bits) between two hashes that counts as the same image:
resized and recompressed copies of one photograph stay far below it, different lesions far above."""

_BLOCK = 2048  # rows compared at once: a 2048 x N float32 block stays small


def near_duplicate_groups(hashes: Sequence[str | None], max_hamming: int) -> np.ndarray:
    """Group number per row: rows whose hashes are within ``max_hamming`` bits of each other
    (directly or through a chain of such rows) share a group; a row without a hash is alone."""
    n = len(hashes)
    parent = np.arange(n)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    rows = np.array([i for i, h in enumerate(hashes) if h], dtype=np.int64)
    if rows.size > 1:
        signs = hash_bits([hashes[i] for i in rows])
        min_agree = signs.shape[1] - 2 * max_hamming  # agree = n_bits - 2 * hamming
        for start in range(0, rows.size, _BLOCK):
            agree = signs[start:start + _BLOCK] @ signs[start:].T
            for a, b in zip(*np.nonzero(agree >= min_agree), strict=True):
                if b > a:  # upper triangle of the block: each pair once, never a row with itself
                    ra, rb = root(int(rows[start + a])), root(int(rows[start + b]))
                    if ra != rb:
                        parent[max(ra, rb)] = min(ra, rb)
    return np.array([root(i) for i in range(n)])
