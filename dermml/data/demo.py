"""Procedural dermoscopy-like demo data: images, lesion and attribute masks, labels, manifest.

Every test and demo runs on it, since no real dataset can be downloaded in CI.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw
from scipy import ndimage
from scipy.spatial import cKDTree
from tqdm import tqdm

from dermml import storage
from dermml.data.images import encode_png
from dermml.data.manifest import ATTRIBUTES, DIAGNOSES, MANIFEST_FILENAME, write_manifest
from dermml.data.splits import assign_splits

SOURCE = "demo"
SPLITS = ("train", "val", "test")
PREVIEW_FILENAME = "preview.png"
MIN_SIZE = 32

# Dermoscopic skin colour (RGB in 0..1) for Fitzpatrick types I..VI.
SKIN_TONES = np.array(
    [
        [0.94, 0.80, 0.74],
        [0.90, 0.72, 0.62],
        [0.82, 0.62, 0.50],
        [0.68, 0.49, 0.36],
        [0.50, 0.34, 0.25],
        [0.34, 0.22, 0.16],
    ],
    dtype=np.float32,
)
# Skewed towards light skin like the public dermoscopy archives, so that fairness slices of
# the demo data show the small dark-skin groups that real evaluations have to cope with.
FITZPATRICK_WEIGHTS = np.array([0.18, 0.24, 0.2, 0.16, 0.12, 0.1])

# Melanin absorbs blue most: more pigment turns skin brown, then black, on every skin tone,
# which keeps lesions segmentable on dark skin too.
MELANIN = np.array([0.75, 1.15, 1.6], dtype=np.float32)
# Seborrheic keratoses look yellowish tan: flatter absorption than melanin.
KERATIN = np.array([0.5, 0.75, 1.15], dtype=np.float32)

# Probability that a lesion of each class shows each dermoscopic attribute.
ATTRIBUTE_RATES = {
    "nevus": {"pigment_network": 0.8, "negative_network": 0.05, "streaks": 0.08,
              "milia_like_cyst": 0.1, "globules": 0.4},
    "melanoma": {"pigment_network": 0.6, "negative_network": 0.4, "streaks": 0.55,
                 "milia_like_cyst": 0.05, "globules": 0.5},
    "seborrheic_keratosis": {"pigment_network": 0.1, "negative_network": 0.02, "streaks": 0.02,
                             "milia_like_cyst": 0.9, "globules": 0.05},
}

# Stream tags keep the seeded side streams apart from the per-sample streams [seed, i].
_LABEL_STREAM = 0x1AB31
_PATIENT_STREAM = 0x9A71E


# ---------------------------------------------------------------------------- drawing basics


@dataclass(frozen=True)
class Canvas:
    """Pixel-centre coordinates of a square image, in [-1, 1] (x right, y down)."""

    size: int
    x: np.ndarray
    y: np.ndarray

    @property
    def px(self) -> float:
        """One pixel in normalised units."""
        return 2.0 / self.size


def make_canvas(size: int) -> Canvas:
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    y, x = np.meshgrid(coords, coords, indexing="ij")
    return Canvas(size, x, y)


def smoothstep(edge0: float, edge1: float, v: np.ndarray) -> np.ndarray:
    t = np.clip((v - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-variance noise with about `cells` blobs across the image."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    field = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))
    return (field - field.mean()) / (field.std() + 1e-6)


def blend(image: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> None:
    """Paint `colour` over `image` in place with per-pixel opacity `alpha`."""
    image += (colour - image) * alpha[..., None]


def absorb(image: np.ndarray, density: np.ndarray, spectrum: np.ndarray = MELANIN) -> None:
    """Darken `image` in place as if `density` units of pigment lay over it."""
    image *= np.exp(-density[..., None] * spectrum)


# ------------------------------------------------------------------------------------ scene


def border_radius(r0: float, harmonics: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Radius at angle `theta`; the exponential keeps it positive however strong the wobble."""
    k, amp, phase = (h[:, None] for h in harmonics.T)
    theta = np.asarray(theta)
    wobble = (amp * np.cos(k * theta.reshape(1, -1) + phase)).sum(axis=0)
    return (r0 * np.exp(wobble)).reshape(theta.shape)


@dataclass
class Lesion:
    """Lesion geometry: a star-shaped region whose radius is modulated by harmonics."""

    cx: float
    cy: float
    r0: float
    harmonics: np.ndarray  # rows of (k, amplitude, phase)
    edge: np.ndarray  # soft-edge half width, in units of the local radius
    theta: np.ndarray
    d: np.ndarray  # distance from the centre over the local radius: < 1 inside

    @property
    def mask(self) -> np.ndarray:
        return self.d < 1.0

    def radius_at(self, theta: np.ndarray) -> np.ndarray:
        return border_radius(self.r0, self.harmonics, theta)

    def points_inside(self, rng: np.random.Generator, count: int, rim: tuple[float, float],
                      sector: tuple[float, float] = (0.0, 2 * math.pi)) -> np.ndarray:
        """`count` (x, y) points between fractions `rim` of the local radius, within `sector`."""
        theta = rng.uniform(sector[0], sector[1], count)
        frac = np.sqrt(rng.uniform(rim[0] ** 2, rim[1] ** 2, count))
        r = self.radius_at(theta) * frac
        return np.stack([self.cx + r * np.cos(theta), self.cy + r * np.sin(theta)], axis=1)


@dataclass
class Scene:
    """One image under construction."""

    canvas: Canvas
    label: str
    skin_tone: np.ndarray
    lesion: Lesion
    image: np.ndarray  # float32 H x W x 3 in 0..1

    @property
    def luminance(self) -> float:
        """Skin brightness, used to keep painted colours darker than dark skin."""
        return float(np.clip(self.skin_tone.mean() / 0.8, 0.4, 1.0))


@dataclass
class DemoSample:
    image: np.ndarray  # uint8 H x W x 3
    mask: np.ndarray  # bool H x W
    attributes: dict[str, np.ndarray]  # bool H x W per attribute
    label: str
    fitzpatrick: int


# ------------------------------------------------------------------------------------- skin


def skin_background(rng: np.random.Generator, canvas: Canvas, tone: np.ndarray) -> np.ndarray:
    """Skin with low-frequency shading, erythema blotches and a fine pore texture."""
    size = canvas.size
    shade = 1 + 0.06 * smooth_noise(rng, size, 3)
    redness = np.clip(smooth_noise(rng, size, 5), 0, None) * rng.uniform(0.0, 0.06)
    pores = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), 0.8)
    image = tone * shade[..., None] * (1 + 0.03 * pores[..., None])
    image[..., 1:] *= 1 - redness[..., None]
    return image.astype(np.float32)


def sample_skin_tone(rng: np.random.Generator, fitzpatrick: int) -> np.ndarray:
    tone = SKIN_TONES[fitzpatrick - 1] * rng.uniform(0.94, 1.06) + rng.normal(0, 0.012, 3)
    return np.clip(tone, 0.05, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------------- lesion


def lesion_harmonics(rng: np.random.Generator, label: str) -> np.ndarray:
    """Border harmonics: nevi are near-round, keratoses oval, melanomas irregular."""
    if label == "melanoma":
        k = np.arange(2, 9)
        amp = rng.uniform(0.03, 0.11, k.size) / (k / 2) ** 0.8
    elif label == "seborrheic_keratosis":
        k = np.arange(2, 6)
        amp = np.concatenate([[rng.uniform(0.06, 0.18)], rng.uniform(0.0, 0.025, 3)])
    else:
        k = np.arange(2, 4)
        amp = np.array([rng.uniform(0.0, 0.09), rng.uniform(0.0, 0.025)])
    phase = rng.uniform(0, 2 * math.pi, k.size)
    return np.stack([k, amp, phase], axis=1).astype(np.float32)


RADIUS_RANGE = {"nevus": (0.2, 0.34), "melanoma": (0.38, 0.6),
                "seborrheic_keratosis": (0.28, 0.44)}
# Edge softness (fraction of the radius) and border roughness per class.
EDGE_RANGE = {"nevus": (0.05, 0.1), "melanoma": (0.04, 0.16),
              "seborrheic_keratosis": (0.02, 0.045)}
ROUGHNESS = {"nevus": 0.01, "melanoma": 0.03, "seborrheic_keratosis": 0.012}


def lesion_geometry(rng: np.random.Generator, canvas: Canvas, label: str) -> Lesion:
    cx, cy = (float(v) for v in rng.uniform(-0.14, 0.14, 2))
    harmonics = lesion_harmonics(rng, label)
    r0 = rng.uniform(*RADIUS_RANGE[label])
    # Shrink lesions that would leave the dermoscope's field of view.
    reach = border_radius(r0, harmonics, np.linspace(0, 2 * math.pi, 180)).max()
    r0 *= min(1.0, 0.86 / (reach + math.hypot(cx, cy)))
    dx, dy = canvas.x - cx, canvas.y - cy
    theta = np.arctan2(dy, dx)
    rough = ROUGHNESS[label] * smooth_noise(rng, canvas.size, max(6, canvas.size // 10))
    d = np.hypot(dx, dy) / border_radius(r0, harmonics, theta) + rough
    edge = rng.uniform(*EDGE_RANGE[label])
    if label == "melanoma":  # parts of a melanoma border fade out, others stop abruptly
        edge = edge * (1 + 0.8 * np.sin(theta + rng.uniform(0, 2 * math.pi)))
    edge = np.maximum(edge, 0.015) * np.ones_like(d)
    return Lesion(cx, cy, r0, harmonics, edge, theta, d)


def lesion_alpha(lesion: Lesion) -> np.ndarray:
    return smoothstep(1 + lesion.edge, 1 - lesion.edge, lesion.d)


def nevus_body(rng: np.random.Generator, scene: Scene) -> np.ndarray:
    """Fairly uniform brown, sometimes with a darker or lighter centre."""
    d = np.clip(scene.lesion.d, 0, 1)
    density = (rng.uniform(0.8, 1.25) + 0.1 * smooth_noise(rng, scene.canvas.size, 4)
               + rng.uniform(-0.2, 0.35) * (1 - d))
    body = scene.image.copy()
    absorb(body, density)
    return body


def melanoma_body(rng: np.random.Generator, scene: Scene) -> np.ndarray:
    """Variegated: brown, black, blue-grey and red zones."""
    size = scene.canvas.size
    zones = smooth_noise(rng, size, 5)
    density = rng.uniform(0.9, 1.4) + 0.4 * zones + 0.15 * smooth_noise(rng, size, 9)
    density += 1.3 * smoothstep(0.6, 1.2, zones)  # black, heavily pigmented zone
    body = scene.image.copy()
    absorb(body, density)
    lum = scene.luminance
    if rng.random() < 0.7:  # dermal melanin seen as a blue-grey veil
        veil = smoothstep(0.3, 0.9, smooth_noise(rng, size, 4)) * 0.75
        blend(body, np.array([0.36, 0.41, 0.52], np.float32) * lum, veil)
    if rng.random() < 0.5:  # vascular / inflammatory red zone
        red = smoothstep(0.7, 1.3, smooth_noise(rng, size, 4)) * 0.6
        blend(body, np.array([0.68, 0.26, 0.28], np.float32) * lum, red)
    return body


def keratosis_body(rng: np.random.Generator, scene: Scene) -> np.ndarray:
    """Waxy tan with a cerebriform 'stuck-on' surface of fissures and ridges."""
    size = scene.canvas.size
    density = rng.uniform(0.55, 0.9) + 0.15 * smooth_noise(rng, size, 6)
    body = scene.image.copy()
    absorb(body, density, KERATIN)
    ridges = smooth_noise(rng, size, max(10, size // 5))
    fissures = np.exp(-((ridges / 0.3) ** 2))  # thin lines where the noise crosses zero
    body *= (1 - 0.3 * fissures)[..., None] * (1 + 0.08 * np.tanh(ridges))[..., None]
    waxy = rng.uniform(0.15, 0.35)  # a greyish, less saturated surface
    body += (body.mean(axis=2, keepdims=True) - body) * waxy
    return body


LESION_BODIES = {"nevus": nevus_body, "melanoma": melanoma_body,
                 "seborrheic_keratosis": keratosis_body}


def paint_lesion(rng: np.random.Generator, scene: Scene) -> None:
    body = LESION_BODIES[scene.label](rng, scene)
    alpha = lesion_alpha(scene.lesion)
    scene.image += (body - scene.image) * alpha[..., None]


# ------------------------------------------------------------------------------- attributes


def reticular_lines(rng: np.random.Generator, canvas: Canvas, spacing: float, jitter: float,
                    width: float, where: np.ndarray) -> np.ndarray:
    """Soft 0..1 lines along the edges of a jittered Voronoi net (spacing, width in pixels),
    computed only `where` the pattern will be drawn."""
    size = canvas.size
    rows = np.arange(-1, size / (spacing * 0.866) + 2)
    cols = np.arange(-1, size / spacing + 2)
    gy, gx = np.meshgrid(rows * spacing * 0.866, cols * spacing, indexing="ij")
    gx = gx + (rows[:, None] % 2) * spacing / 2  # hexagonal lattice: regular cells
    seeds = np.stack([gx.ravel(), gy.ravel()], axis=1)
    seeds += rng.normal(0, jitter * spacing, seeds.shape)
    lines = np.zeros((size, size), np.float32)
    if not where.any():
        return lines
    pixels = np.stack([(canvas.x[where] + 1) / canvas.px, (canvas.y[where] + 1) / canvas.px], 1)
    dist, _ = cKDTree(seeds).query(pixels, k=2)
    gap = (dist[:, 1] - dist[:, 0]) / 2  # distance to the nearest cell edge
    lines[where] = np.clip(1 - gap / width, 0, 1)
    return lines


def lesion_patch(rng: np.random.Generator, scene: Scene, coverage: float) -> np.ndarray:
    """A random blob-shaped part of the lesion (about `coverage` of it)."""
    blobs = smooth_noise(rng, scene.canvas.size, 4)
    inside = scene.lesion.mask & (scene.lesion.d < 0.95)
    if not inside.any():
        return inside
    cut = np.quantile(blobs[inside], 1 - coverage)
    return inside & (blobs >= cut)


def network_region(rng: np.random.Generator, scene: Scene) -> np.ndarray:
    """Nevi: whole lesion or its periphery; others: irregular patches."""
    lesion = scene.lesion
    if scene.label == "nevus":
        inner = 0.0 if rng.random() < 0.5 else rng.uniform(0.3, 0.55)
        return lesion.mask & (lesion.d > inner) & (lesion.d < 0.95)
    return lesion_patch(rng, scene, rng.uniform(0.35, 0.75))


def draw_pigment_network(rng: np.random.Generator, scene: Scene) -> np.ndarray:
    """Dark reticular lines; regular in nevi, thick and irregular in melanoma."""
    region = network_region(rng, scene)
    atypical = scene.label != "nevus"
    spacing = scene.canvas.size / rng.uniform(8, 12) if atypical else scene.canvas.size / 12
    jitter = 0.4 if atypical else 0.15
    width = spacing * (rng.uniform(0.16, 0.26) if atypical else 0.13)
    lines = reticular_lines(rng, scene.canvas, spacing, jitter, max(width, 0.9), region)
    fade = smoothstep(1.0, 0.8, scene.lesion.d)  # networks thin out at the border
    absorb(scene.image, rng.uniform(0.8, 1.3) * lines * fade * region)
    return region


def draw_negative_network(rng: np.random.Generator, scene: Scene) -> np.ndarray:
    """Light serpiginous lines around dark holes."""
    region = lesion_patch(rng, scene, rng.uniform(0.25, 0.55))
    spacing = scene.canvas.size / rng.uniform(7, 10)
    lines = reticular_lines(rng, scene.canvas, spacing, 0.3, max(spacing * 0.18, 1.0), region)
    absorb(scene.image, 0.3 * (1 - lines) * region)
    light = np.minimum(scene.skin_tone * 1.05, 1.0)
    blend(scene.image, light, 0.5 * lines * region)
    return region


def draw_streaks(rng: np.random.Generator, scene: Scene) -> np.ndarray:
    """Radial dark lines crossing the border in one or two sectors."""
    lesion, canvas = scene.lesion, scene.canvas
    mask = np.zeros_like(lesion.mask)
    for _ in range(rng.integers(1, 3)):
        centre, half = rng.uniform(0, 2 * math.pi), rng.uniform(0.4, 1.1)
        rays = centre + rng.uniform(-half, half, rng.integers(5, 11))
        reach = rng.uniform(0.1, 0.2, rays.size)
        rho = lesion.d * lesion.radius_at(lesion.theta)
        offset = lesion.theta[None] - rays[:, None, None]
        across = np.abs(rho[None] * np.sin(offset)) / canvas.px  # pixels from each ray
        along = np.cos(offset) > 0
        ray_len = smoothstep(1 + reach[:, None, None], 1.0, lesion.d[None])
        lines = (np.clip(1.2 - across / 0.8, 0, 1) * along * ray_len).max(axis=0)
        lines *= lesion.d > 0.75
        absorb(scene.image, rng.uniform(1.0, 1.6) * lines)
        wrapped = np.angle(np.exp(1j * (lesion.theta - centre)))
        sector = np.abs(wrapped) < half + 0.1
        mask |= sector & (lesion.d > 0.75) & (lesion.d < 1 + reach.max())
    return mask


def disc_distance(canvas: Canvas, centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Distance in pixels from each pixel to the nearest of several discs (< 0 inside)."""
    dx = canvas.x[None] - centres[:, 0, None, None]
    dy = canvas.y[None] - centres[:, 1, None, None]
    return (np.hypot(dx, dy) / canvas.px - radii[:, None, None]).min(axis=0)


def dot_radius(rng: np.random.Generator, canvas: Canvas, low: float, high: float,
               count: int) -> np.ndarray:
    return rng.uniform(low, high, count) * (canvas.size / 64) ** 0.75


def dot_budget(scene: Scene, count: int) -> int:
    """Cap the number of dots so that they never crowd out a small lesion's own colour."""
    radius_px = scene.lesion.r0 / scene.canvas.px
    return int(min(count, max(1, (radius_px / 4) ** 2)))


def draw_milia_cysts(rng: np.random.Generator, scene: Scene) -> np.ndarray:
    """Bright, small, round white-yellow dots."""
    count = rng.integers(4, 13) if scene.label == "seborrheic_keratosis" else rng.integers(1, 4)
    count = dot_budget(scene, count)
    centres = scene.lesion.points_inside(rng, count, (0.0, 0.8))
    dist = disc_distance(scene.canvas, centres, dot_radius(rng, scene.canvas, 0.8, 1.4, count))
    blend(scene.image, np.array([0.97, 0.95, 0.84], np.float32), 0.9 * smoothstep(0.7, -0.7, dist))
    return (dist < 1.0) & scene.lesion.mask


def draw_globules(rng: np.random.Generator, scene: Scene) -> np.ndarray:
    """Dark round dots: evenly spread in nevi, peripheral and uneven in melanoma."""
    canvas = scene.canvas
    if scene.label == "melanoma":
        start = rng.uniform(0, 2 * math.pi)
        count = dot_budget(scene, rng.integers(5, 14))
        centres = scene.lesion.points_inside(rng, count, (0.55, 0.9), (start, start + 3.0))
        radii = dot_radius(rng, canvas, 0.8, 2.2, count)
    else:
        count = dot_budget(scene, rng.integers(6, 16))
        centres = scene.lesion.points_inside(rng, count, (0.0, 0.85))
        radii = np.full(count, dot_radius(rng, canvas, 1.1, 1.6, 1)[0])
    dist = disc_distance(canvas, centres, radii)
    absorb(scene.image, rng.uniform(1.0, 1.5) * smoothstep(0.7, -0.7, dist))
    return (dist < 1.0) & scene.lesion.mask


ATTRIBUTE_DRAWERS = {
    "pigment_network": draw_pigment_network,
    "negative_network": draw_negative_network,
    "streaks": draw_streaks,
    "milia_like_cyst": draw_milia_cysts,
    "globules": draw_globules,
}


# ---------------------------------------------------------------------- artefacts and optics


def draw_hair(rng: np.random.Generator, scene: Scene) -> None:
    """Thin dark curves across the field; they are not part of any mask."""
    size = scene.canvas.size
    count = min(rng.poisson(2.2), 7)
    if count == 0:
        return
    scale = 4 if size <= 96 else 2  # draw large, then downsample for anti-aliasing
    layer = Image.new("L", (size * scale, size * scale), 0)
    pen = ImageDraw.Draw(layer)
    t = np.linspace(0, 1, 24)[:, None]
    for _ in range(count):
        start = rng.uniform(-0.1, 1.1, 2) * size * scale
        angle = rng.uniform(0, 2 * math.pi)
        run = np.array([math.cos(angle), math.sin(angle)]) * rng.uniform(0.5, 1.4) * size * scale
        bend = rng.normal(0, 0.25, 2) * size * scale
        points = start + t * run + t * t * bend
        width = max(1, round(rng.uniform(0.6, 1.2) * max(1.0, size / 128) * scale))
        pen.line([tuple(p) for p in points], fill=int(rng.integers(170, 256)), width=width)
    alpha = np.asarray(layer.resize((size, size), Image.Resampling.BOX), np.float32) / 255
    hair = np.array([0.09, 0.06, 0.05], np.float32) * rng.uniform(0.6, 1.4)
    blend(scene.image, hair, 0.95 * alpha)


def add_glare(rng: np.random.Generator, scene: Scene) -> None:
    """One or two specular highlights from the dermoscope's light source."""
    canvas = scene.canvas
    for _ in range(rng.integers(1, 3)):
        cx, cy = rng.uniform(-0.55, 0.55, 2)
        sx, sy = rng.uniform(0.02, 0.05, 2)
        spot = np.exp(-(((canvas.x - cx) / sx) ** 2 + ((canvas.y - cy) / sy) ** 2) / 2)
        blend(scene.image, np.ones(3, np.float32), rng.uniform(0.5, 0.85) * spot)


def dermoscope_optics(rng: np.random.Generator, scene: Scene) -> np.ndarray:
    """Circular field of view with dark corners, light fall-off, slight blur and sensor noise."""
    canvas = scene.canvas
    cx, cy = rng.normal(0, 0.03, 2)
    r = np.hypot(canvas.x - cx, canvas.y - cy)
    radius = rng.uniform(0.98, 1.25)
    field = smoothstep(radius + 0.05, radius - 0.08, r) * (1 - 0.18 * r**2)
    image = scene.image * field[..., None] + 0.02 * (1 - field[..., None])
    image = ndimage.gaussian_filter(image, sigma=(0.5, 0.5, 0))
    image += rng.normal(0, 0.01, image.shape).astype(np.float32)
    return np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------- sample


def render_sample(rng: np.random.Generator, size: int, label: str,
                  fitzpatrick: int) -> DemoSample:
    """Draw one dermoscopy-like image with its lesion and attribute masks."""
    canvas = make_canvas(size)
    tone = sample_skin_tone(rng, fitzpatrick)
    skin = skin_background(rng, canvas, tone)
    scene = Scene(canvas, label, tone, lesion_geometry(rng, canvas, label), skin)
    paint_lesion(rng, scene)
    attributes = {}
    for name in ATTRIBUTES:
        if rng.random() < ATTRIBUTE_RATES[label][name]:
            attributes[name] = ATTRIBUTE_DRAWERS[name](rng, scene)
        else:
            attributes[name] = np.zeros((size, size), bool)
    draw_hair(rng, scene)
    add_glare(rng, scene)
    image = dermoscope_optics(rng, scene)
    return DemoSample(image, scene.lesion.mask.copy(), attributes, label, fitzpatrick)


def sample_label(seed: int, index: int) -> str:
    """Classes come in shuffled blocks of three, so every prefix of the data is balanced."""
    order = np.random.default_rng([seed, _LABEL_STREAM, index // 3]).permutation(len(DIAGNOSES))
    return DIAGNOSES[order[index % len(DIAGNOSES)]]


def patient_groups(seed: int, n: int) -> np.ndarray:
    """Patient index per sample: 70% one lesion, 20% two, 10% three (consecutive samples)."""
    u = np.random.default_rng([seed, _PATIENT_STREAM, 1]).random(n)
    lesions = 1 + (u > 0.7) + (u > 0.9)
    return np.repeat(np.arange(n), lesions)[:n]


def patient_fitzpatrick(seed: int, patient: int) -> int:
    rng = np.random.default_rng([seed, _PATIENT_STREAM, 2, patient])
    return int(rng.choice(6, p=FITZPATRICK_WEIGHTS)) + 1


# ----------------------------------------------------------------------------------- output


def write_sample(out: str, sample_id: str, sample: DemoSample) -> dict:
    """Write the sample's PNGs under `out` and return its manifest row (relative URIs)."""
    image_bytes = encode_png(sample.image)
    files = {f"images/{sample_id}.png": image_bytes,
             f"masks/{sample_id}.png": encode_png(sample.mask.astype(bool))}
    attribute_uris = {}
    for name in ATTRIBUTES:
        attribute_uris[name] = f"attributes/{name}/{sample_id}.png"
        files[attribute_uris[name]] = encode_png(sample.attributes[name].astype(bool))
    for rel, data in files.items():
        storage.write_bytes(storage.join(out, *rel.split("/")), data)
    rows, cols = np.nonzero(sample.mask)
    # COCO-style [x, y, width, height], as the manifest contract says.
    box = [float(cols.min()), float(rows.min()), float(cols.max() + 1 - cols.min()),
           float(rows.max() + 1 - rows.min())]
    height, width = sample.mask.shape
    return {
        "sample_id": sample_id, "image_uri": f"images/{sample_id}.png",
        "mask_uri": f"masks/{sample_id}.png", "label": sample.label, "source": SOURCE,
        "width": width, "height": height, "sha256": hashlib.sha256(image_bytes).hexdigest(),
        "attribute_mask_uris": attribute_uris, "boxes": [box], "box_labels": [sample.label],
        "fitzpatrick": sample.fitzpatrick,
    }


SHORT_LABELS = {"nevus": "NV", "melanoma": "MEL", "seborrheic_keratosis": "SK"}


def preview_png(samples: list[DemoSample], tile: int = 128) -> bytes:
    """A grid of up to 16 images with lesion contours and labels, for humans and MLflow."""
    tile = max(tile, samples[0].mask.shape[0])
    cols = min(4, len(samples))
    rows = math.ceil(len(samples) / cols)
    sheet = Image.new("RGB", (cols * tile, rows * tile))
    for k, sample in enumerate(samples):
        image = np.array(Image.fromarray(sample.image).resize((tile, tile),
                                                               Image.Resampling.BILINEAR))
        big = Image.fromarray(sample.mask.astype(np.uint8) * 255)
        mask = np.asarray(big.resize((tile, tile), Image.Resampling.NEAREST)) > 127
        image[mask & ~ndimage.binary_erosion(mask, iterations=2)] = (40, 255, 120)
        tile_image = Image.fromarray(image)
        ImageDraw.Draw(tile_image).text((4, 2), SHORT_LABELS[sample.label], fill=(255, 255, 0))
        sheet.paste(tile_image, ((k % cols) * tile, (k // cols) * tile))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()


def _check_arguments(n: int, size: int, seed: int, split_fractions: tuple[float, ...]) -> None:
    if n < 1:
        raise ValueError(f"n must be at least 1 (got {n})")
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} pixels (got {size})")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer (got {seed})")
    fractions = np.asarray(split_fractions, dtype=float)
    if fractions.shape != (3,) or (fractions < 0).any() or abs(fractions.sum() - 1) > 1e-6:
        raise ValueError("split_fractions must be three non-negative numbers (train, val, "
                         f"test) that sum to 1 (got {split_fractions})")


def generate_demo(out: str, n: int = 200, size: int = 64, seed: int = 0,
                  split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
                  progress: bool = False) -> str:
    """Write n samples under `out` (local dir or s3:// prefix) and return the manifest URI
    (`<out>/manifest.parquet`)."""
    _check_arguments(n, size, seed, split_fractions)
    manifest_uri = storage.join(out, MANIFEST_FILENAME)
    if storage.exists(manifest_uri):
        raise FileExistsError(f"{manifest_uri} already exists; choose another --out or delete "
                              "that dataset first")
    labels = [sample_label(seed, i) for i in range(n)]
    patients = patient_groups(seed, n)
    skin = {int(p): patient_fitzpatrick(seed, int(p)) for p in np.unique(patients)}
    rows, preview = [], []
    for i in tqdm(range(n), desc="demo data", unit="img",
                  disable=None if progress else True):
        rng = np.random.default_rng([seed, i])
        sample = render_sample(rng, size, labels[i], skin[int(patients[i])])
        row = write_sample(out, f"demo_{i + 1:05d}", sample)
        row.update(patient_id=f"demo_patient_{patients[i] + 1:05d}",
                   lesion_id=f"demo_lesion_{i + 1:05d}")
        rows.append(row)
        if len(preview) < 16:
            preview.append(sample)
    storage.write_bytes(storage.join(out, PREVIEW_FILENAME), preview_png(preview))
    df = pd.DataFrame(rows)
    # The importers' split assignment: stratified by diagnosis, one patient in one split.
    fractions = {split: f for split, f in zip(SPLITS, split_fractions, strict=True) if f > 0}
    df["split"] = assign_splits(df.assign(label=labels), fractions, seed=seed,
                                stratify="label", group="patient_id").to_numpy()
    write_manifest(df, manifest_uri)  # last, so a half-written dataset never looks complete
    return manifest_uri
