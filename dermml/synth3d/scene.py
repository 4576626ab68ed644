"""One body ready to render: the mesh on a device, its texel map, the textures being edited
(pasted lesions, lesion ids), surface sampling and ray tests."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dermml.synth3d.bodies import Body
from dermml.synth3d.raster import MeshRasterizer, ndc_to_pixel
from dermml.synth3d.renderer import (
    FoVPerspectiveCameras,
    Fragments,
    RasterizationSettings,
    TexturesUV,
    look_at_view_transform,
    pixel_uvs,
    sample_uv,
)
from dermml.synth3d.texture import texel_map


@dataclass
class View:
    """A camera and the fragments it sees."""

    cameras: FoVPerspectiveCameras
    fragments: Fragments
    eye: np.ndarray
    at: np.ndarray
    uv: torch.Tensor | None = None
    """Pixel UVs, computed on first use and shared by every texture sampled in this view."""
    foreground: torch.Tensor | None = None

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.fragments.face.shape)


class BodyScene:
    """A body, its texel map and its editable textures on ``device``."""

    def __init__(self, body: Body, device: str | torch.device = "cpu", backend: str = "torch"):
        self.body = body
        self.device = torch.device(device)
        self.backend = backend
        self.meshes = body.meshes(self.device)
        self.texels = texel_map(body)
        rows, cols = np.nonzero(self.texels.valid)
        self.texel_rows, self.texel_cols = rows, cols
        self.texel_faces = self.texels.face[rows, cols]
        self.texel_points = self.texels.points(body.verts, body.faces)
        self.face_normals = self.meshes.face_normals().cpu().numpy()
        self.face_labels = torch.from_numpy(body.face_labels().astype(np.int64)).to(self.device)
        self.original = torch.from_numpy(body.texture).to(self.device)
        self.texture = self.original.clone()
        """The texture being edited (pasted, then blended lesions)."""
        self.dilated = self.original.clone()
        """Lesion images including their dilated surroundings (deep blending's gradient
        target)."""
        self.nonskin = torch.from_numpy(body.nonskin.astype(np.float32))[..., None] \
            .to(self.device)
        size = body.texture_size
        self.lesion_ids = torch.zeros(size, size, 1, device=self.device)
        """Lesion id per texel (0: none), float for sampling; ids 1..n."""
        self.dilated_ids = torch.zeros(size, size, 1, device=self.device)
        self._skin_faces, self._skin_cdf = self._skin_face_sampler()
        self._tri = body.verts[body.faces].astype(np.float64)
        self._embree = None

    # ------------------------------------------------------------------ textures and views

    def textures(self, image: torch.Tensor) -> TexturesUV:
        return self.meshes.textures.with_maps(image)

    def view(self, eye, at, size: int, fov: float = 30.0, znear: float = 0.01) -> View:
        eye, at = np.asarray(eye, dtype=np.float64), np.asarray(at, dtype=np.float64)
        rotation, translation = look_at_view_transform(eye, at)
        cameras = FoVPerspectiveCameras(rotation.to(self.device), translation.to(self.device),
                                        fov=fov, znear=znear)
        rasterizer = MeshRasterizer(cameras, RasterizationSettings(size), self.backend)
        return View(cameras, rasterizer(self.meshes), eye, at)

    def sample(self, view: View, image: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
        """(H, W, C) texture values seen at each pixel, unlit (how masks are rendered)."""
        if view.uv is None:
            view.uv = pixel_uvs(view.fragments, self.meshes.textures)
            view.foreground = view.fragments.foreground
        return sample_uv(view.uv, image, view.foreground, mode)

    def skin_mask(self, view: View) -> torch.Tensor:
        """(H, W) bool: body pixels whose texel is skin."""
        return view.fragments.foreground & (self.sample(view, self.nonskin)[..., 0] <= 0.5)

    def lesion_id_map(self, view: View, ids: torch.Tensor | None = None) -> torch.Tensor:
        """(H, W) long lesion id at each pixel (nearest texel; 0: none)."""
        ids = self.lesion_ids if ids is None else ids
        return self.sample(view, ids, mode="nearest")[..., 0].round().long()

    def anatomy_map(self, view: View) -> torch.Tensor:
        """(H, W) anatomy label of the face hit at each pixel (0 on background)."""
        face = view.fragments.face
        return torch.where(face >= 0, self.face_labels[face.clamp(min=0)], 0)

    # ------------------------------------------------------------------ surface sampling

    def _skin_face_sampler(self) -> tuple[np.ndarray, np.ndarray]:
        body = self.body
        uv = body.verts_uvs[body.faces_uvs].mean(axis=1)
        size = body.texture_size
        cols = np.clip(np.round(uv[:, 0] * (size - 1)).astype(int), 0, size - 1)
        rows = np.clip(np.round((1 - uv[:, 1]) * (size - 1)).astype(int), 0, size - 1)
        skin = ~body.nonskin[rows, cols]
        tri = body.verts[body.faces].astype(np.float64)
        area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]),
                                    axis=1)
        faces = np.nonzero(skin & (area > 0))[0]
        if not len(faces):
            raise ValueError(f"body {body.body_id}: its non-skin mask covers every face; "
                             "there is no skin to paste lesions on")
        cdf = np.cumsum(area[faces])
        return faces, cdf / cdf[-1]

    def sample_skin_point(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
        """(point, unit face normal, face) uniform over the skin surface area."""
        face = int(self._skin_faces[np.searchsorted(self._skin_cdf, rng.random())])
        r1, r2 = rng.random(), rng.random()
        s = np.sqrt(r1)
        bary = np.array([1 - s, s * (1 - r2), s * r2])
        point = bary @ self._tri[face]
        return point, self.face_normals[face].astype(np.float64), face

    def sample_texel_point(self, texel_index: int) -> tuple[np.ndarray, np.ndarray, int]:
        face = int(self.texel_faces[texel_index])
        return (self.texel_points[texel_index].astype(np.float64),
                self.face_normals[face].astype(np.float64), face)

    # ------------------------------------------------------------------ ray tests

    def first_hit(self, origin: np.ndarray, direction: np.ndarray, max_t: float = np.inf
                  ) -> tuple[float, int] | None:
        """(distance, face) of the nearest face a ray hits before ``max_t``: Embree through
        trimesh when installed, else Moller-Trumbore over every face in numpy."""
        direction = direction / np.linalg.norm(direction)
        if self._embree is None:
            self._embree = _embree_intersector(self.body) or False
        if self._embree:
            locations, _, faces = self._embree.intersects_location(
                origin[None], direction[None], multiple_hits=False)
            if not len(faces):
                return None
            t = float(np.linalg.norm(locations[0] - origin))
            return (t, int(faces[0])) if 1e-9 < t < max_t else None
        return self._first_hit_numpy(origin, direction, max_t)

    def _first_hit_numpy(self, origin: np.ndarray, direction: np.ndarray, max_t: float
                         ) -> tuple[float, int] | None:
        v0, e1, e2 = self._tri[:, 0], self._tri[:, 1] - self._tri[:, 0], \
            self._tri[:, 2] - self._tri[:, 0]
        p = np.cross(direction, e2)
        det = (e1 * p).sum(1)
        ok = np.abs(det) > 1e-12
        inv = np.where(ok, 1.0 / np.where(ok, det, 1.0), 0.0)
        s = origin - v0
        u = (s * p).sum(1) * inv
        q = np.cross(s, e1)
        v = (q @ direction) * inv
        t = (e2 * q).sum(1) * inv
        hit = ok & (u >= 0) & (v >= 0) & (u + v <= 1) & (t > 1e-9) & (t < max_t)
        if not hit.any():
            return None
        faces = np.nonzero(hit)[0]
        k = faces[np.argmin(t[faces])]
        return float(t[k]), int(k)

    def camera_inside(self, eye: np.ndarray, at: np.ndarray) -> bool:
        """True when the camera sits inside the body: the ray from it towards the point it looks
        at first meets the inside of a face (a face turned away from the camera)."""
        direction = at - eye
        hit = self.first_hit(eye, direction, np.linalg.norm(direction) * 1.001 + 1e-6)
        if hit is None:
            return False
        return float(self.face_normals[hit[1]] @ direction) > 0

    def segment_blocked(self, start: np.ndarray, end: np.ndarray) -> bool:
        """True when the body lies between two points."""
        direction = end - start
        length = float(np.linalg.norm(direction))
        return length > 0 and self.first_hit(start, direction, length) is not None

    # ------------------------------------------------------------------ texels in a view

    def visible_texels(self, view: View, radius: float, tolerance: float
                       ) -> tuple[np.ndarray, torch.Tensor]:
        """Texels within ``radius`` of the looked-at point that the camera sees: (indices into
        the texel arrays, (N, 2) pixel coordinates (column, row))."""
        near = np.nonzero(np.linalg.norm(self.texel_points - view.at[None].astype(np.float32),
                                         axis=1) < radius)[0]
        points = torch.from_numpy(self.texel_points[near]).to(self.device)
        cameras = view.cameras
        points_view = cameras.world_to_view(points)
        height, width = view.size
        xy = ndc_to_pixel(cameras.view_to_ndc(points_view), height, width)
        col = xy[:, 0].round().long()
        row = xy[:, 1].round().long()
        inside = (col >= 0) & (col < width) & (row >= 0) & (row < height) & \
            (points_view[:, 2] > 0)
        depth = torch.full_like(points_view[:, 2], -1.0)
        depth[inside] = view.fragments.depth[row[inside], col[inside]]
        seen = inside & (depth > 0) & ((depth - points_view[:, 2]).abs() < tolerance)
        keep = seen.cpu().numpy()
        return near[keep], xy[seen]

    def write_texels(self, target: torch.Tensor, indices: np.ndarray, values: torch.Tensor
                     ) -> None:
        rows = torch.from_numpy(self.texel_rows[indices]).to(self.device)
        cols = torch.from_numpy(self.texel_cols[indices]).to(self.device)
        target[rows, cols] = values.to(target)

    def read_texels(self, source: torch.Tensor, indices: np.ndarray) -> torch.Tensor:
        rows = torch.from_numpy(self.texel_rows[indices]).to(self.device)
        cols = torch.from_numpy(self.texel_cols[indices]).to(self.device)
        return source[rows, cols]


def _embree_intersector(body: Body):
    try:
        import trimesh
        from trimesh.ray.ray_pyembree import RayMeshIntersector
    except ImportError:
        return None
    return RayMeshIntersector(trimesh.Trimesh(body.verts, body.faces, process=False))


def sample_image(image: torch.Tensor, xy: torch.Tensor, origin: tuple[float, float] = (0, 0),
                 mode: str = "bilinear") -> torch.Tensor:
    """(N, C) values of an (h, w, C) image at pixel coordinates ``xy`` (column, row) shifted by
    ``origin``; pixel centres at integers, zero outside."""
    h, w = image.shape[:2]
    col = xy[:, 0] - origin[0]
    row = xy[:, 1] - origin[1]
    grid = torch.stack([(2 * col + 1) / w - 1, (2 * row + 1) / h - 1], dim=-1)
    out = F.grid_sample(image.permute(2, 0, 1)[None].to(grid), grid[None, None], mode=mode,
                        align_corners=False, padding_mode="zeros")
    return out[0, :, 0].T
