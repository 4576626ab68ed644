"""Backgrounds behind the body: images from a folder (DermSynth3D uses indoor scenes) or
procedural rooms, resized to the view and blurred with a drawn radius."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageFilter

from dermml.synth3d.bodies import BodyError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


class Backgrounds:
    """Draws a background image by name: a file of ``folder``, or ``procedural-<k>``."""

    def __init__(self, folder: str = ""):
        self.folder = folder
        self.files: list[str] = []
        if folder:
            if not os.path.isdir(folder):
                raise BodyError(f"backgrounds folder {folder} not found")
            self.files = sorted(f for f in os.listdir(folder)
                                if f.lower().endswith(IMAGE_SUFFIXES))
            if not self.files:
                raise BodyError(f"backgrounds folder {folder} holds no .png/.jpg images")

    def draw(self, rng: np.random.Generator) -> str:
        if self.files:
            return self.files[int(rng.integers(len(self.files)))]
        return f"procedural-{int(rng.integers(1_000_000))}"

    def image(self, name: str, size: int, blur_radius: int) -> np.ndarray:
        """(size, size, 3) float32 in [0, 1]."""
        if name.startswith("procedural-"):
            img = procedural_room(int(name.split("-", 1)[1]), size)
        else:
            path = os.path.join(self.folder, name)
            try:
                with Image.open(path) as src:
                    img = src.convert("RGB").resize((size, size), Image.BILINEAR)
            except Exception as exc:  # PIL raises several types for corrupt files
                raise BodyError(f"background {path}: not a readable image ({exc})") from None
        if blur_radius > 0:
            img = img.filter(ImageFilter.GaussianBlur(blur_radius))
        return np.asarray(img, dtype=np.float32) / 255.0


def procedural_room(seed: int, size: int) -> Image.Image:
    """A wall and a floor in random colours with shading and grain."""
    rng = np.random.default_rng([seed, 0xBAC6])
    wall, floor = rng.uniform(0.25, 0.95, 3), rng.uniform(0.1, 0.7, 3)
    horizon = rng.uniform(0.45, 0.85)
    rows = np.linspace(0, 1, size)[:, None, None]
    cols = np.linspace(0, 1, size)[None, :, None]
    light = 0.75 + 0.25 * np.cos((cols - rng.uniform(0, 1)) * np.pi)
    img = np.where(rows < horizon, wall * light * (0.85 + 0.15 * rows / horizon),
                   floor * (0.7 + 0.3 * (rows - horizon) / max(1 - horizon, 1e-3)))
    img = img + rng.normal(0, 0.02, (size, size, 3))
    return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))
