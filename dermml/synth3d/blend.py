"""Deep blending of pasted lesions: texture pixels optimised through the differentiable
renderer with DermSynth3D's loss (after Zhang et al.'s deep image blending).

Per lesion, only the texels of its dilated region are parameters. Each step renders the
lesion's placement view (the camera moved along the normal by U(-0.025, 0.025) m), composites the
rendered lesion over the original skin, crops the lesion box + 32 px and minimises

    1e5 * MSE(Laplacian(composite), Laplacian target) + 2 * content + 1e6 * style + 1e-4 * TV

where the Laplacian target is the dilated lesion image's inside the lesion and the original
skin's outside, content compares layer-2 features of the composite's and the pasted lesion's
lesion region, and style compares Gram matrices of all four feature layers of the composite and
the original skin. Adam, lr 0.005, 400 steps; texels are clamped to [0, 1] at every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dermml.synth3d.config import BlendConfig
from dermml.synth3d.features import CONTENT_LAYER, FeatureNet
from dermml.synth3d.paste import PLACEMENT_FOV, Placement
from dermml.synth3d.renderer import Fragments
from dermml.synth3d.scene import BodyScene, View

_LAPLACIAN = torch.tensor([[0.0, -1.0, 0.0], [-1.0, 4.0, -1.0], [0.0, -1.0, 0.0]])


def laplacian(image: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) per-channel 4-neighbour Laplacian, zero padding."""
    kernel = _LAPLACIAN.to(image).view(1, 1, 3, 3).repeat(image.shape[1], 1, 1, 1)
    return F.conv2d(image, kernel, padding=1, groups=image.shape[1])


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    b, c, h, w = features.shape
    flat = features.reshape(b, c, h * w)
    return flat @ flat.transpose(1, 2) / (c * h * w)


def total_variation(image: torch.Tensor) -> torch.Tensor:
    return (image[..., :, 1:] - image[..., :, :-1]).abs().sum() + \
        (image[..., 1:, :] - image[..., :-1, :]).abs().sum()


@dataclass
class BlendTerms:
    grad: torch.Tensor
    content: torch.Tensor
    style: torch.Tensor
    tv: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        return self.grad + self.content + self.style + self.tv


def blend_loss(composite: torch.Tensor, original: torch.Tensor, pasted: torch.Tensor,
               dilated: torch.Tensor, mask: torch.Tensor, features: FeatureNet,
               cfg: BlendConfig) -> BlendTerms:
    """The reference loss on (1, 3, h, w) crops; ``mask`` (1, 1, h, w) is the lesion."""
    target_grad = laplacian(dilated) * mask + laplacian(original) * (1 - mask)
    grad = F.mse_loss(laplacian(composite), target_grad) * cfg.grad_weight
    content = F.mse_loss(features(composite * mask)[CONTENT_LAYER],
                         features(pasted * mask)[CONTENT_LAYER]) * cfg.content_weight
    blend_feats, original_feats = features(composite), features(original)
    style = sum(F.mse_loss(gram_matrix(b), gram_matrix(o))
                for b, o in zip(blend_feats, original_feats, strict=True))
    style = style / len(blend_feats) * cfg.style_weight
    tv = total_variation(composite) * cfg.tv_weight
    return BlendTerms(grad, content, style, tv)


def _crop_box(mask: torch.Tensor, pad: int) -> tuple[int, int, int, int]:
    rows = torch.nonzero(mask.any(dim=1)).squeeze(1)
    cols = torch.nonzero(mask.any(dim=0)).squeeze(1)
    h, w = mask.shape
    return (max(int(rows.min()) - pad, 0), min(int(rows.max()) + pad + 1, h),
            max(int(cols.min()) - pad, 0), min(int(cols.max()) + pad + 1, w))


def _nchw(image: torch.Tensor, box: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    if box is not None:
        r0, r1, c0, c1 = box
        image = image[r0:r1, c0:c1]
    return image.permute(2, 0, 1).unsqueeze(0)


def _cropped(view: View, box: tuple[int, int, int, int]) -> View:
    """The view's fragments inside ``box`` (rows r0:r1, columns c0:c1)."""
    r0, r1, c0, c1 = box
    frags = view.fragments
    return View(view.cameras, Fragments(frags.pix_to_face[:, r0:r1, c0:c1],
                                        frags.bary_coords[:, r0:r1, c0:c1],
                                        frags.zbuf[:, r0:r1, c0:c1]), view.eye, view.at)


def deep_blend_lesion(scene: BodyScene, placement: Placement, pasted: torch.Tensor,
                      features: FeatureNet, cfg: BlendConfig, view_size: int,
                      rng: np.random.Generator) -> list[float]:
    """Optimise one lesion's dilated texels in ``scene.texture``; returns the loss per step."""
    texels = placement.dilated_texels
    params = scene.read_texels(scene.texture, texels).detach().clone().requires_grad_(True)
    rows = torch.from_numpy(scene.texel_rows[texels]).to(scene.device)
    cols = torch.from_numpy(scene.texel_cols[texels]).to(scene.device)
    base = scene.texture.detach()
    optimizer = torch.optim.Adam([params], lr=cfg.lr)
    at = np.asarray(placement.look_at)
    normal = np.asarray(placement.normal)
    losses: list[float] = []
    for _ in range(cfg.steps):
        with torch.no_grad():
            params.clamp_(0, 1)
        jitter = rng.uniform(-cfg.distance_jitter, cfg.distance_jitter)
        view = scene.view(at + normal * (placement.distance + jitter) + 1e-4, at, view_size,
                          PLACEMENT_FOV)
        mask = scene.lesion_id_map(view) == placement.lesion_id
        if not bool(mask.any()):
            continue
        box = _crop_box(mask, cfg.crop_pad)
        crop = _cropped(view, box)  # only the loss's crop is textured (and back-propagated)
        texture = base.index_put((rows, cols), params)
        blended = _nchw(scene.sample(crop, texture))
        with torch.no_grad():
            original = _nchw(scene.sample(crop, scene.original))
            pasted_view = _nchw(scene.sample(crop, pasted))
            dilated = _nchw(scene.sample(crop, scene.dilated))
            mask_crop = _nchw(mask[..., None].float(), box)
        composite = blended * mask_crop + original * (1 - mask_crop)
        loss = blend_loss(composite, original, pasted_view, dilated, mask_crop, features, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.total.backward()
        optimizer.step()
        losses.append(float(loss.total.detach()))
    with torch.no_grad():
        scene.texture[rows, cols] = params.clamp(0, 1)
    return losses


def deep_blend(scene: BodyScene, placements: list[Placement], features: FeatureNet,
               cfg: BlendConfig, view_size: int, rng: np.random.Generator,
               progress=None) -> dict[int, tuple[float, float]]:
    """Blend every placed lesion in turn; returns {lesion id: (first loss, last loss)}."""
    pasted = scene.texture.detach().clone()
    out = {}
    for placement in placements:
        losses = deep_blend_lesion(scene, placement, pasted, features, cfg, view_size, rng)
        if losses:
            out[placement.lesion_id] = (losses[0], losses[-1])
        if progress is not None:
            progress(1)
    return out
