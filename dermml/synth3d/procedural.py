"""Built-in procedural bodies: a watertight parametric humanoid with a UV atlas (xatlas), the
17 anatomy labels, a skin texture of a drawn Fitzpatrick type and a non-skin mask, so synthesis
runs with no body scans at all.

Each body part is a tapered capsule (flattened for the torso, hands and feet); the surface is the
level set of the smooth union of their distance fields (manifold3d's marching tetrahedra), closed
and manifold by construction. A vertex
is labelled with the part whose skeleton it is nearest to, relative to that part's radius.
Sizes are metres, +Y up, the body faces +Z.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dermml.synth3d.anatomy import ANATOMY_ID
from dermml.synth3d.bodies import Body
from dermml.synth3d.skin_tone import (
    FITZPATRICK_TYPES,
    draw_skin_tone,
    measure_skin_tone,
    skin_colour,
)
from dermml.synth3d.texture import texel_map


@dataclass(frozen=True)
class Part:
    """A tapered capsule from ``a`` (radius ``ra``) to ``b`` (radius ``rb``), squashed along z
    by ``depth`` (1: round), labelled ``label``."""

    label: str
    a: tuple[float, float, float]
    b: tuple[float, float, float]
    ra: float
    rb: float
    depth: float = 1.0


def draw_shape(rng: np.random.Generator) -> dict[str, float]:
    """Shape parameters of one body."""
    return {"height": float(rng.uniform(1.50, 1.95)), "girth": float(rng.uniform(0.85, 1.3)),
            "shoulders": float(rng.uniform(0.9, 1.15)), "hips": float(rng.uniform(0.9, 1.2)),
            "arm_abduction_deg": float(rng.uniform(8.0, 40.0)),
            "leg_spread": float(rng.uniform(0.9, 1.4)), "head": float(rng.uniform(0.93, 1.07))}


def skeleton(shape: dict[str, float]) -> list[Part]:
    """The body parts of a shape (left = +X, the body's own left)."""
    h, g = shape["height"], shape["girth"]
    sw, hw, head = shape["shoulders"], shape["hips"], shape["head"]
    abd = math.radians(shape["arm_abduction_deg"])
    spread = shape["leg_spread"]

    def p(x, y, z=0.0):
        return (x * h, y * h, z * h)

    parts = [
        Part("head", p(0, 0.925), p(0, 0.945, 0.005), 0.062 * head * h, 0.058 * head * h, 0.95),
        Part("head", p(0, 0.80), p(0, 0.88), 0.028 * g * h, 0.026 * g * h),  # neck
        Part("upper_torso", p(0, 0.735), p(0, 0.64), 0.105 * sw * g * h, 0.092 * g * h, 0.62),
        Part("lower_torso", p(0, 0.64), p(0, 0.555), 0.092 * g * h, 0.090 * g * hw * h, 0.66),
        Part("hips", p(0, 0.555), p(0, 0.48), 0.092 * g * hw * h, 0.094 * g * hw * h, 0.70),
    ]
    for side, x in (("left", 1.0), ("right", -1.0)):
        hip = p(x * 0.052 * hw, 0.475)
        knee = p(x * 0.055 * hw * spread, 0.275, 0.004)
        ankle = p(x * 0.06 * hw * spread, 0.05)
        toe = p(x * 0.065 * hw * spread, 0.02, 0.10)
        shoulder = p(x * 0.118 * sw, 0.79)
        upper_len, lower_len, hand_len = 0.17 * h, 0.15 * h, 0.085 * h
        direction = np.array([x * math.sin(abd), -math.cos(abd), 0.02])
        elbow = tuple(np.array(shoulder) + upper_len * direction)
        wrist = tuple(np.array(elbow) + lower_len * direction)
        tip = tuple(np.array(wrist) + hand_len * direction)
        parts += [
            Part(f"upper_leg_{side}", hip, knee, 0.064 * g * hw * h, 0.036 * g * h),
            Part(f"lower_leg_{side}", knee, ankle, 0.035 * g * h, 0.022 * g * h),
            Part(f"feet_{side}", ankle, toe, 0.024 * h, 0.018 * h, 0.8),
            Part(f"upper_arm_{side}", shoulder, elbow, 0.030 * g * h, 0.025 * g * h),
            Part(f"lower_arm_{side}", elbow, wrist, 0.024 * g * h, 0.018 * g * h),
            Part(f"hand_{side}", wrist, tip, 0.019 * h, 0.014 * h, 0.55),
        ]
    return parts


def part_distances(points: np.ndarray, parts: list[Part]) -> np.ndarray:
    """(N, P) approximate signed distance of each point to each part (negative inside), and
    the part's radius-relative distance is ``distance / radius``; squashed parts are measured
    in their own unsquashed frame."""
    out = np.empty((len(points), len(parts)))
    for k, part in enumerate(parts):
        a, b = np.array(part.a), np.array(part.b)
        q = points.copy()
        q[:, 2] = a[2] + (q[:, 2] - a[2]) / part.depth
        ab = b - a
        t = np.clip(((q - a) @ ab) / max(float(ab @ ab), 1e-12), 0, 1)
        radius = part.ra + t * (part.rb - part.ra)
        out[:, k] = (np.linalg.norm(q - (a + t[:, None] * ab), axis=1) - radius) * \
            min(1.0, part.depth)
    return out


def _smooth_union(distances: np.ndarray, blend: float) -> np.ndarray:
    """Smooth minimum over parts (exponential), so joints blend instead of creasing."""
    low = distances.min(axis=1)
    return low - blend * np.log(np.exp(-(distances - low[:, None]) / blend).sum(axis=1))


def _body_surface(parts: list[Part], edge: float, blend: float
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Watertight surface of the smooth union of the parts (manifold3d's level set of the
    signed distance sampled on a grid and interpolated trilinearly)."""
    import manifold3d as m3

    lo = np.min([np.minimum(p.a, p.b) - max(p.ra, p.rb) for p in parts], axis=0) - 2 * edge
    hi = np.max([np.maximum(p.a, p.b) + max(p.ra, p.rb) for p in parts], axis=0) + 2 * edge
    step = edge / 1.5
    shape = np.ceil((hi - lo) / step).astype(int) + 1
    axes = [lo[k] + step * np.arange(shape[k]) for k in range(3)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    sdf = _smooth_union(part_distances(grid, parts), blend).reshape(shape)
    flat = (-sdf).ravel().tolist()  # manifold3d: positive inside
    nx, ny, nz = (int(v) for v in shape)
    x0, y0, z0 = (float(v) for v in lo)
    inv = 1.0 / step

    def inside(x: float, y: float, z: float) -> float:
        fx, fy, fz = (x - x0) * inv, (y - y0) * inv, (z - z0) * inv
        i = min(max(int(fx), 0), nx - 2)
        j = min(max(int(fy), 0), ny - 2)
        k = min(max(int(fz), 0), nz - 2)
        u, v, w = fx - i, fy - j, fz - k
        base = (i * ny + j) * nz + k
        c00 = flat[base] * (1 - w) + flat[base + 1] * w
        c01 = flat[base + nz] * (1 - w) + flat[base + nz + 1] * w
        c10 = flat[base + ny * nz] * (1 - w) + flat[base + ny * nz + 1] * w
        c11 = flat[base + ny * nz + nz] * (1 - w) + flat[base + ny * nz + nz + 1] * w
        return (c00 * (1 - v) + c01 * v) * (1 - u) + (c10 * (1 - v) + c11 * v) * u

    bounds = [*(lo + edge).tolist(), *(hi - edge).tolist()]
    mesh = m3.Manifold.level_set(inside, bounds, edge).to_mesh()
    verts = np.asarray(mesh.vert_properties, dtype=np.float64)[:, :3]
    faces = np.asarray(mesh.tri_verts, dtype=np.int64)
    return verts, faces


def label_vertices(verts: np.ndarray, parts: list[Part]) -> np.ndarray:
    """Anatomy id per vertex: the part nearest to it relative to that part's radius."""
    radii = np.array([max(p.ra, p.rb) for p in parts])
    nearest = (part_distances(verts, parts) / radii).argmin(axis=1)
    ids = np.array([ANATOMY_ID[p.label] for p in parts], dtype=np.uint8)
    return ids[nearest]


def _uv_atlas(verts: np.ndarray, faces: np.ndarray, texture_size: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """(verts_uvs, faces_uvs) from xatlas, charts packed with a gutter of several texels."""
    import xatlas

    atlas = xatlas.Atlas()
    atlas.add_mesh(verts.astype(np.float32), faces.astype(np.uint32))
    pack = xatlas.PackOptions()
    pack.padding = max(4, texture_size // 128)
    pack.bilinear = True
    pack.resolution = texture_size
    pack.bruteForce = False
    atlas.generate(pack_options=pack)
    if atlas.atlas_count != 1:
        raise RuntimeError(f"xatlas packed the body into {atlas.atlas_count} atlases")
    _, indices, uvs = atlas[0]
    return uvs.astype(np.float32), indices.astype(np.int64)


def _smooth_noise(points: np.ndarray, rng: np.random.Generator, scales: tuple[float, ...],
                  waves: int = 6) -> np.ndarray:
    """Smooth 3D noise in about [-1, 1]: sums of random plane waves at the given wavelengths.
    Evaluated on surface points, it is continuous across UV seams."""
    out = np.zeros(len(points))
    for scale in scales:
        dirs = rng.normal(size=(waves, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        phase = rng.uniform(0, 2 * math.pi, waves)
        out += np.sin(points @ dirs.T * (2 * math.pi / scale) + phase).sum(axis=1) / waves
    return out / len(scales)


def paint_texture(body_points: np.ndarray, point_labels: np.ndarray, base_rgb: np.ndarray,
                  parts: list[Part], rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(colours (N, 3), non-skin (N,)) for texel surface points: skin with blotches and
    freckles, hair on the back and top of the head, briefs over the hips, shoes on some feet."""
    noise = _smooth_noise(body_points, rng, (0.25, 0.06, 0.015))
    shade = 1.0 + 0.05 * noise
    colour = np.clip(base_rgb[None, :] * shade[:, None], 0, 1)
    freckles = _smooth_noise(body_points, rng, (0.008,), waves=8) > 0.55
    colour[freckles] *= 0.88
    head = next(p for p in parts if p.label == "head")
    centre, radius = np.array(head.a), head.ra
    rel = body_points - centre
    is_head = point_labels == ANATOMY_ID["head"]
    hair = is_head & ((rel[:, 1] > 0.25 * radius) | ((rel[:, 1] > -0.7 * radius)
                                                     & (rel[:, 2] < -0.2 * radius)))
    hips = point_labels == ANATOMY_ID["hips"]
    feet = np.isin(point_labels, [ANATOMY_ID["feet_left"], ANATOMY_ID["feet_right"]])
    shoes = feet if rng.random() < 0.5 else np.zeros_like(feet)
    hair_rgb = rng.choice([[0.08, 0.06, 0.05], [0.25, 0.15, 0.08], [0.55, 0.4, 0.2]])
    colour[hair] = np.clip(np.array(hair_rgb) * (1 + 0.3 * noise[hair, None]), 0, 1)
    cloth_rgb = rng.uniform(0.05, 0.9, 3)
    stripes = (np.sin(body_points[:, 1] * 2 * math.pi / 0.02) > 0.6)[:, None]
    colour[hips] = np.where(stripes[hips], cloth_rgb * 0.7, cloth_rgb)
    colour[shoes] = rng.uniform(0.05, 0.4, 3)
    nonskin = hair | hips | shoes
    return colour.astype(np.float32), nonskin


def procedural_skin_tone(seed: int, skin_types: tuple[str, ...] = FITZPATRICK_TYPES
                         ) -> tuple[str, float]:
    """(Fitzpatrick type, target ITA) of procedural body ``seed``, known before it is built
    (synthesis stratifies its splits by it)."""
    return draw_skin_tone(np.random.default_rng([seed, 0x70E]), tuple(skin_types))


def procedural_body(body_id: str, seed: int, texture_size: int = 1024,
                    edge: float = 0.025,
                    skin_types: tuple[str, ...] = FITZPATRICK_TYPES) -> Body:
    """A procedural humanoid: shape, skin type (uniform over ``skin_types``, ITA uniform in the
    type's range) and clothing drawn from ``seed``. ``edge`` (metres) is the triangle size:
    0.025 gives ~20k faces, 0.06 a ~3k-face body for tests."""
    rng = np.random.default_rng([seed, 0x5B0D1])
    shape = draw_shape(rng)
    parts = skeleton(shape)
    verts, faces = _body_surface(parts, edge, blend=0.012 * shape["height"])
    vertex_labels = label_vertices(verts, parts)
    verts_uvs, faces_uvs = _uv_atlas(verts, faces, texture_size)
    skin_type, target_ita = procedural_skin_tone(seed, tuple(skin_types))
    base = skin_colour(target_ita, rng)
    texture = np.tile(base.astype(np.float32), (texture_size, texture_size, 1))
    nonskin = np.zeros((texture_size, texture_size), dtype=bool)
    body = Body(body_id, verts.astype(np.float32), faces, verts_uvs, faces_uvs, texture,
                nonskin, vertex_labels, source="procedural",
                params={**shape, "seed": seed, "target_ita": round(target_ita, 2),
                        "target_skin_type": skin_type})
    texels = texel_map(body)
    rows, cols = np.nonzero(texels.valid)
    points = texels.points(body.verts, body.faces)
    labels = body.face_labels()[texels.face[rows, cols]]
    colours, texel_nonskin = paint_texture(points, labels, base, parts, rng)
    body.texture[rows, cols] = colours
    body.nonskin[rows, cols] = texel_nonskin
    body.skin_type, body.ita = measure_skin_tone(body.texture, body.nonskin)
    body.check()
    return body
