"""Texture space: which face and point of the mesh each texel shows (the texel map) and seam
padding of the UV charts."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dermml.synth3d.bodies import Body
from dermml.synth3d.raster import rasterize_screen

SEAM_PADDING = 2
"""Texels around each UV chart that take the colour of the nearest chart texel, so bilinear
lookups at a chart's edge (a seam of the mesh) never mix in texels of another chart."""


@dataclass
class TexelMap:
    """Per texel of an (S, S) texture: the face and barycentrics of the surface point it shows.

    Texels of the seam padding carry the face and barycentrics of their nearest chart texel;
    texels outside every chart have face -1.
    """

    face: np.ndarray
    """(S, S) int64 face index, -1 outside the charts and their padding."""
    bary: np.ndarray
    """(S, S, 3) float32 barycentrics in that face."""
    in_chart: np.ndarray
    """(S, S) bool: the texel centre lies inside a UV triangle (not padding)."""

    @property
    def valid(self) -> np.ndarray:
        return self.face >= 0

    def points(self, verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
        """(N, 3) surface points of the valid texels, in row-major texel order."""
        rows, cols = np.nonzero(self.valid)
        f = self.face[rows, cols]
        b = self.bary[rows, cols]
        return (verts[faces[f]] * b[..., None]).sum(axis=1).astype(np.float32)


def texel_map(body: Body, padding: int = SEAM_PADDING) -> TexelMap:
    """Rasterize the UV atlas at the texture's resolution, then pad each chart by ``padding``.

    Texel (row r, column c) of an S x S texture is sampled at u = c / (S - 1),
    v = 1 - r / (S - 1): the ``align_corners=True`` lookup the renderer uses.
    """
    size = body.texture_size
    uv = torch.from_numpy(body.verts_uvs[body.faces_uvs]).double()  # (F, 3, 2)
    xy = torch.stack([uv[..., 0] * (size - 1), (1 - uv[..., 1]) * (size - 1)], dim=-1)
    face, bary, _ = rasterize_screen(xy, None, size, size)
    face_np, bary_np = face.numpy(), bary.numpy()
    in_chart = face_np >= 0
    if padding > 0 and in_chart.any() and not in_chart.all():
        from scipy import ndimage

        distance, (near_r, near_c) = ndimage.distance_transform_edt(~in_chart,
                                                                    return_indices=True)
        pad = (~in_chart) & (distance <= padding)
        face_np = face_np.copy()
        bary_np = bary_np.copy()
        face_np[pad] = face_np[near_r[pad], near_c[pad]]
        bary_np[pad] = bary_np[near_r[pad], near_c[pad]]
    return TexelMap(face_np, bary_np.astype(np.float32), in_chart)
