"""Random 2D views of a body with dense labels (DermSynth3D's Generate2DViews).

A view looks at a sampled point (of a lesion, or of any skin) from U(0.1, 1.3) m along its
normal with a 30 degree field of view. Cameras inside the body are rejected
(``camera_inside``). The point light sits at the camera plus U(0, +-2) m per axis (away from
the surface), or at the camera when the body blocks it. Light and material strengths are drawn
from the reference ranges. Views with less than 10 % skin are rejected (``low_skin``), and views
with fewer lesion pixels than asked (``no_lesion``). Masks are rendered without lighting; the
image is Phong-shaded and soft-composited over a blurred background.

Targets (H x W x 5, DermSynth3D's channels): lesion, skin (skin that is not lesion), non-skin
(everything else, background included), anatomy id (0 on background), depth (view-space, -1
on background).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dermml.synth3d.backgrounds import Backgrounds
from dermml.synth3d.config import ViewsConfig
from dermml.synth3d.renderer import Materials, PointLights, phong_shading
from dermml.synth3d.scene import BodyScene

LESION, SKIN, NONSKIN, ANATOMY, DEPTH = range(5)
"""Target channels (DermSynth3D's ``Target``)."""


@dataclass
class RenderedView:
    image: np.ndarray
    """(H, W, 3) uint8."""
    target: np.ndarray
    """(H, W, 5) float32: lesion, skin, non-skin, anatomy, depth."""
    lesion_ids: np.ndarray
    """(H, W) int: which pasted lesion each pixel shows (0: none)."""
    params: dict
    """Every scene parameter of the view."""


def light_position(eye: np.ndarray, at: np.ndarray, offset: float,
                   rng: np.random.Generator) -> np.ndarray:
    """The camera plus U(0, +-offset) per axis, on the camera's side of the looked-at point."""
    signs = np.sign(eye - at) * offset
    return eye + signs * rng.random(3)


def _uniform(rng: np.random.Generator, bounds) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def _soft_composite(fore: torch.Tensor, back: torch.Tensor, body: torch.Tensor,
                    soft: bool) -> torch.Tensor:
    mask = body.float()[..., None]
    out = fore * mask + back * (1 - mask)
    if not soft:
        return out
    # The reference blurs the body mask with a 5x5 Gaussian (OpenCV's sigma for size 5: 1.1).
    x = torch.arange(5, dtype=torch.float32, device=fore.device) - 2
    g = torch.exp(-x ** 2 / (2 * 1.1 ** 2))
    g = g / g.sum()
    blurred = F.conv2d(F.pad(body.float()[None, None], (2, 2, 2, 2), mode="reflect"),
                       (g[:, None] * g[None, :])[None, None])[0, 0]
    blurred = torch.where(blurred > 0.999, torch.ones_like(blurred), blurred)[..., None]
    return out * blurred + back * (1 - blurred)


def sample_view_params(scene: BodyScene, cfg: ViewsConfig, rng: np.random.Generator,
                       lesion_texels: list[np.ndarray]) -> dict:
    """Camera, light and material of one draw (before any rejection test)."""
    if cfg.look_at == "lesion" and lesion_texels:
        texels = lesion_texels[int(rng.integers(len(lesion_texels)))]
        point, normal, face = scene.sample_texel_point(int(texels[rng.integers(len(texels))]))
    else:
        point, normal, face = scene.sample_skin_point(rng)
    distance = _uniform(rng, cfg.distance)
    eye = point + normal * distance + 1e-4
    return {"face_idx": face, "look_at": point, "normal": normal, "normal_weight": distance,
            "camera_pos": eye,
            "light_pos": light_position(eye, point, cfg.light_offset, rng),
            "ambient": round(_uniform(rng, cfg.ambient), 2),
            "diffuse": round(_uniform(rng, cfg.diffuse), 2),
            "specular": round(_uniform(rng, cfg.specular), 2),
            "mat_specular": round(_uniform(rng, cfg.material_specular), 2),
            "shininess": round(_uniform(rng, cfg.shininess), 2),
            "background_blur_radius": int(rng.integers(cfg.background_blur[0],
                                                       cfg.background_blur[1] + 1))}


def render_view(scene: BodyScene, cfg: ViewsConfig, backgrounds: Backgrounds,
                rng: np.random.Generator, lesion_texels: list[np.ndarray],
                rejected: Counter, log: list[dict] | None = None) -> RenderedView | None:
    """Draw views until one passes every test (at most ``cfg.attempts_per_view`` draws).
    Rejections are counted by reason in ``rejected`` and, with ``log``, described there."""

    def reject(reason: str, **facts) -> None:
        rejected[reason] += 1
        if log is not None:
            log.append({"reason": reason, "camera_pos": eye, "look_at": at, **facts})

    for attempt in range(1, cfg.attempts_per_view + 1):
        p = sample_view_params(scene, cfg, rng, lesion_texels)
        background_id = backgrounds.draw(rng)
        eye, at = p["camera_pos"], p["look_at"]
        if scene.camera_inside(eye, at):
            reject("camera_inside")
            continue
        toward = (eye - at) / np.linalg.norm(eye - at)
        if scene.segment_blocked(eye + toward * 0.01, p["light_pos"]):
            p["light_pos"] = eye.copy()
            p["light_moved_to_camera"] = True
        view = scene.view(eye, at, cfg.size, cfg.fov, cfg.znear)
        skin = scene.skin_mask(view)
        skin_fraction = float(skin.float().mean())
        if skin_fraction < cfg.min_skin_fraction:
            reject("low_skin", skin_fraction=skin_fraction)
            continue
        ids = scene.lesion_id_map(view) * view.fragments.foreground
        lesion = ids > 0
        if int(lesion.sum()) < cfg.min_lesion_pixels:
            reject("no_lesion", lesion_pixels=int(lesion.sum()))
            continue
        return _finish(scene, cfg, backgrounds, view, p, background_id, skin, ids,
                       skin_fraction, attempt)
    rejected["gave_up"] += 1
    return None


def _finish(scene, cfg, backgrounds, view, p, background_id, skin, ids, skin_fraction,
            attempt) -> RenderedView:
    lights = PointLights(location=tuple(p["light_pos"]), ambient_color=(p["ambient"],) * 3,
                         diffuse_color=(p["diffuse"],) * 3,
                         specular_color=(p["specular"],) * 3)
    # DermSynth3D hands pytorch3d's Materials only specular colour and shininess; ambient and
    # diffuse reflectance stay 1, as here.
    materials = Materials(specular_color=(p["mat_specular"],) * 3, shininess=p["shininess"])
    with torch.no_grad():
        texels = scene.sample(view, scene.texture)
        rgb = phong_shading(view.fragments, scene.meshes, view.cameras, lights, materials,
                            texels).clamp(0, 1)
        back = torch.from_numpy(backgrounds.image(background_id, cfg.size,
                                                  p["background_blur_radius"])).to(rgb)
        image = _soft_composite(rgb, back, view.fragments.foreground, cfg.soft_composite)
    lesion = ids > 0
    target = torch.stack([lesion.float(), (skin & ~lesion).float(), (~skin).float(),
                          scene.anatomy_map(view).float(), view.fragments.depth], dim=-1)
    visible = sorted(int(i) for i in torch.unique(ids) if int(i) > 0)
    params = {**{k: (v.round(5).tolist() if isinstance(v, np.ndarray) else v)
                 for k, v in p.items()},
              "view_size": [cfg.size, cfg.size], "fov": cfg.fov, "znear": cfg.znear,
              "background_id": background_id, "skin_fraction": round(skin_fraction, 4),
              "lesion_fraction": round(float(lesion.float().mean()), 5),
              "lesion_mask_ids": visible, "attempts": attempt}
    params.setdefault("light_moved_to_camera", False)
    return RenderedView((image.cpu().numpy() * 255 + 0.5).astype(np.uint8),
                        target.cpu().numpy().astype(np.float32), ids.cpu().numpy(), params)
