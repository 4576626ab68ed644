"""A renderer shaped like pytorch3d's: meshes with UV textures, cameras, rasterization settings,
fragments (face index, barycentrics, depth) and a Phong shader with point lights.

A render is a rasterizer (geometry -> ``Fragments``) followed by a shader (fragments -> colours).
The rasterizer has interchangeable backends that all return the same fragments (see
``raster.py``); texture lookup and shading are torch, so a texture can be optimised through any
of them. Conventions are pytorch3d's, so its rasterizer drops in: world -> view is
``X @ R + T`` (row vectors), the camera looks along +Z, +X is left and +Y up in NDC, pixel (0, 0)
is the top-left one, ``zbuf`` is view-space Z (-1 on background), UV v = 0 is the texture's
bottom row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class TexturesUV:
    """A texture image per mesh with per-face UV indices (pytorch3d's ``TexturesUV``)."""

    maps: torch.Tensor
    """(H, W, C) float texture in [0, 1]."""
    faces_uvs: torch.Tensor
    """(F, 3) long: indices into ``verts_uvs`` per face corner."""
    verts_uvs: torch.Tensor
    """(T, 2) float UVs in [0, 1]."""

    def with_maps(self, maps: torch.Tensor) -> TexturesUV:
        """The same UV layout with another image (a mask, a blended texture)."""
        return TexturesUV(maps, self.faces_uvs, self.verts_uvs)


@dataclass
class Meshes:
    """One triangle mesh with a UV texture (pytorch3d's ``Meshes`` for a batch of one)."""

    verts: torch.Tensor
    """(V, 3) float world coordinates."""
    faces: torch.Tensor
    """(F, 3) long vertex indices."""
    textures: TexturesUV | None = None
    """UV layout and image; None for geometry-only rendering."""
    _normals: torch.Tensor | None = field(default=None, repr=False)

    def face_normals(self) -> torch.Tensor:
        """(F, 3) unit normals (right-hand rule over the face's vertex order)."""
        v = self.verts[self.faces]
        return F.normalize(torch.linalg.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0]), dim=1)

    def verts_normals(self) -> torch.Tensor:
        """(V, 3) unit normals: area-weighted mean of the adjacent face normals."""
        if self._normals is None or self._normals.device != self.verts.device:
            v = self.verts[self.faces]
            area_normals = torch.linalg.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])
            normals = torch.zeros_like(self.verts)
            for k in range(3):
                normals.index_add_(0, self.faces[:, k], area_normals)
            self._normals = F.normalize(normals, dim=1)
        return self._normals

    def with_textures(self, textures: TexturesUV) -> Meshes:
        return Meshes(self.verts, self.faces, textures, self._normals)


def look_at_view_transform(eye, at, up=(0.0, 1.0, 0.0)) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, T) of a camera at ``eye`` looking at ``at`` (pytorch3d's convention); an ``up``
    parallel to the viewing direction is replaced by another axis."""
    eye = torch.as_tensor(eye, dtype=torch.float64).reshape(3)
    at = torch.as_tensor(at, dtype=torch.float64).reshape(3)
    up = torch.as_tensor(up, dtype=torch.float64).reshape(3)
    z_axis = F.normalize(at - eye, dim=0)
    x_axis = torch.linalg.cross(up, z_axis)
    if x_axis.norm() < 1e-6:
        other = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
        if abs(float(z_axis @ other)) > 0.9:
            other = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
        x_axis = torch.linalg.cross(other, z_axis)
    x_axis = F.normalize(x_axis, dim=0)
    y_axis = F.normalize(torch.linalg.cross(z_axis, x_axis), dim=0)
    rotation = torch.stack([x_axis, y_axis, z_axis], dim=1)  # columns are the camera axes
    translation = -(rotation.T @ eye)
    return rotation.float(), translation.float()


@dataclass
class FoVPerspectiveCameras:
    """A pinhole camera with a vertical field of view (pytorch3d's ``FoVPerspectiveCameras``,
    aspect ratio 1: pixels are square and the shorter image side spans the field of view)."""

    R: torch.Tensor
    """(3, 3) rotation, world -> view as ``X @ R``."""
    T: torch.Tensor
    """(3,) translation."""
    fov: float = 30.0
    """Field of view in degrees (DermSynth3D: 30)."""
    znear: float = 0.01
    """Points closer than this are not drawn."""

    def to(self, device) -> FoVPerspectiveCameras:
        return FoVPerspectiveCameras(self.R.to(device), self.T.to(device), self.fov, self.znear)

    def camera_center(self) -> torch.Tensor:
        """(3,) world position of the camera."""
        return -(self.R @ self.T)

    def world_to_view(self, points: torch.Tensor) -> torch.Tensor:
        return points @ self.R.to(points) + self.T.to(points)

    def view_to_ndc(self, points_view: torch.Tensor) -> torch.Tensor:
        """(..., 2) NDC x, y of view-space points (x right-to-left, y bottom-to-top)."""
        scale = 1.0 / math.tan(math.radians(self.fov) / 2)
        z = points_view[..., 2:3]
        return points_view[..., :2] * scale / z


@dataclass
class RasterizationSettings:
    """What the rasterizer draws (pytorch3d's ``RasterizationSettings``)."""

    image_size: int | tuple[int, int] = 256
    """Output size: an int for a square image or (height, width)."""
    faces_per_pixel: int = 1
    """Only 1 is supported: the nearest face per pixel."""
    perspective_correct: bool = True
    """Barycentrics corrected for perspective (exact depth and texture on each triangle)."""
    cull_backfaces: bool = False
    """Skip faces whose front side points away from the camera."""

    def size(self) -> tuple[int, int]:
        if isinstance(self.image_size, int):
            return self.image_size, self.image_size
        return int(self.image_size[0]), int(self.image_size[1])


@dataclass
class Fragments:
    """The rasterizer's output, shaped as pytorch3d's (N = 1 image, K = 1 face per pixel)."""

    pix_to_face: torch.Tensor
    """(1, H, W, 1) long: the face seen at each pixel, -1 on background."""
    bary_coords: torch.Tensor
    """(1, H, W, 1, 3) float barycentrics of the pixel centre in that face."""
    zbuf: torch.Tensor
    """(1, H, W, 1) float view-space depth, -1 on background."""

    @property
    def face(self) -> torch.Tensor:
        """(H, W) face index, -1 on background."""
        return self.pix_to_face[0, ..., 0]

    @property
    def depth(self) -> torch.Tensor:
        """(H, W) depth, -1 on background."""
        return self.zbuf[0, ..., 0]

    @property
    def foreground(self) -> torch.Tensor:
        """(H, W) bool: a face was hit."""
        return self.face >= 0


@dataclass
class PointLights:
    """One point light (pytorch3d's ``PointLights``)."""

    location: tuple[float, float, float] = (0.0, 1.0, 0.0)
    ambient_color: tuple[float, float, float] = (0.5, 0.5, 0.5)
    diffuse_color: tuple[float, float, float] = (0.3, 0.3, 0.3)
    specular_color: tuple[float, float, float] = (0.2, 0.2, 0.2)


@dataclass
class Materials:
    """Surface reflectance (pytorch3d's ``Materials`` defaults)."""

    ambient_color: tuple[float, float, float] = (1.0, 1.0, 1.0)
    diffuse_color: tuple[float, float, float] = (1.0, 1.0, 1.0)
    specular_color: tuple[float, float, float] = (1.0, 1.0, 1.0)
    shininess: float = 64.0


UNLIT_LIGHTS = PointLights(ambient_color=(1.0, 1.0, 1.0), diffuse_color=(0.0, 0.0, 0.0),
                           specular_color=(0.0, 0.0, 0.0))
"""Lights that show a texture as it is: how masks are rendered."""


def interpolate_face_attributes(fragments: Fragments, face_values: torch.Tensor) -> torch.Tensor:
    """(H, W, D) per-pixel values from (F, 3, D) per-corner values; 0 on background."""
    face = fragments.face
    hit = face >= 0
    bary = fragments.bary_coords[0, :, :, 0]  # (H, W, 3)
    values = face_values.index_select(0, face.clamp(min=0).reshape(-1))
    values = values.view(*face.shape, 3, -1)  # (H, W, 3, D)
    out = torch.einsum("hwk,hwkd->hwd", bary.to(values), values)
    return out * hit.unsqueeze(-1).to(out)


def pixel_uvs(fragments: Fragments, textures: TexturesUV) -> torch.Tensor:
    """(H, W, 2) UV of each pixel (0 on background); shared by every map of one UV layout."""
    return interpolate_face_attributes(fragments, textures.verts_uvs[textures.faces_uvs])


def sample_uv(uv: torch.Tensor, maps: torch.Tensor, foreground: torch.Tensor,
              mode: str = "bilinear") -> torch.Tensor:
    """(H, W, C) values of an (S, S, C) map at pixel UVs (pytorch3d's convention: v = 0 is the
    bottom row, align_corners, border padding); 0 where ``foreground`` is False."""
    grid = torch.stack([uv[..., 0] * 2 - 1, 1 - uv[..., 1] * 2], dim=-1)
    texels = F.grid_sample(maps.permute(2, 0, 1).unsqueeze(0), grid.unsqueeze(0).to(maps),
                           mode=mode, align_corners=True, padding_mode="border")
    out = texels[0].permute(1, 2, 0)
    return out * foreground.unsqueeze(-1).to(out)


def sample_texture(fragments: Fragments, textures: TexturesUV, mode: str = "bilinear"
                   ) -> torch.Tensor:
    """(H, W, C) texture colour at each pixel."""
    return sample_uv(pixel_uvs(fragments, textures), textures.maps, fragments.foreground, mode)


def phong_shading(fragments: Fragments, meshes: Meshes, cameras: FoVPerspectiveCameras,
                  lights: PointLights, materials: Materials, texels: torch.Tensor
                  ) -> torch.Tensor:
    """(H, W, 3) Phong colour: texel * (ambient + diffuse) + specular (pytorch3d's formula)."""
    verts, faces = meshes.verts, meshes.faces
    points = interpolate_face_attributes(fragments, verts[faces])
    normals = F.normalize(interpolate_face_attributes(fragments, meshes.verts_normals()[faces]),
                          dim=-1, eps=1e-8)
    def colour(c):
        return torch.tensor(c, dtype=points.dtype, device=points.device)

    light_dir = F.normalize(colour(lights.location) - points, dim=-1, eps=1e-8)
    cos = (normals * light_dir).sum(-1)
    diffuse = colour(materials.diffuse_color) * colour(lights.diffuse_color) * \
        F.relu(cos).unsqueeze(-1)
    view_dir = F.normalize(cameras.camera_center().to(points) - points, dim=-1, eps=1e-8)
    reflect = -light_dir + 2 * cos.unsqueeze(-1) * normals
    alpha = F.relu((view_dir * reflect).sum(-1)) * (cos > 0).to(points)
    specular = colour(materials.specular_color) * colour(lights.specular_color) * \
        alpha.pow(materials.shininess).unsqueeze(-1)
    ambient = colour(materials.ambient_color) * colour(lights.ambient_color)
    rgb = texels[..., :3] * (ambient + diffuse) + specular
    return rgb * fragments.foreground.unsqueeze(-1).to(rgb)


class HardPhongShader:
    """Fragments -> RGB with Phong lighting (nearest face per pixel, no soft blending)."""

    def __init__(self, cameras: FoVPerspectiveCameras, lights: PointLights | None = None,
                 materials: Materials | None = None):
        self.cameras = cameras
        self.lights = lights or PointLights()
        self.materials = materials or Materials()

    def __call__(self, fragments: Fragments, meshes: Meshes) -> torch.Tensor:
        texels = sample_texture(fragments, meshes.textures)
        return phong_shading(fragments, meshes, self.cameras, self.lights, self.materials, texels)


class MeshRenderer:
    """A rasterizer followed by a shader; returns (H, W, 3) colours and the fragments."""

    def __init__(self, rasterizer, shader):
        self.rasterizer = rasterizer
        self.shader = shader

    def __call__(self, meshes: Meshes) -> tuple[torch.Tensor, Fragments]:
        fragments = self.rasterizer(meshes)
        return self.shader(fragments, meshes), fragments
