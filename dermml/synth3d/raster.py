"""Rasterizer backends: geometry -> ``Fragments`` (face index, barycentrics, depth per pixel).

``torch`` (the built-in default) is a vectorised z-buffer rasterizer: every face's screen bounding
box is expanded into candidate pixels, edge functions decide coverage, and a scatter-min keeps the
nearest face per pixel. It runs wherever torch does (CPU or GPU) and was faster than ray casting
on the CPU (see docs/synth3d.md). ``embree`` casts one ray per pixel through trimesh + embreex.
``pytorch3d`` calls pytorch3d's ``MeshRasterizer`` when it is importable (the GPU image builds
it). All three return the same fragments up to pixels whose centre lies exactly on an edge.
"""

from __future__ import annotations

import math

import torch

from dermml.synth3d.renderer import (
    FoVPerspectiveCameras,
    Fragments,
    Meshes,
    RasterizationSettings,
)

BACKENDS = ("torch", "embree", "pytorch3d")
MAX_CANDIDATES = 4_000_000
"""Candidate (face, pixel) pairs tested at once; bounds the rasterizer's memory."""


def pytorch3d_available() -> bool:
    try:
        import pytorch3d.renderer  # noqa: F401
    except Exception:  # ImportError, or a build that fails to load its extension
        return False
    return True


def embree_available() -> bool:
    try:
        import embreex  # noqa: F401
        import trimesh  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(name: str, device: str | torch.device | None = None) -> str:
    """``auto`` -> pytorch3d where importable and rendering on a GPU, else the built-in torch
    rasterizer (faster than pytorch3d's CPU kernels and always there)."""
    if name == "auto":
        on_gpu = device is None or torch.device(device).type == "cuda"
        return "pytorch3d" if on_gpu and pytorch3d_available() else "torch"
    if name not in BACKENDS:
        raise ValueError(f"unknown rasterizer backend {name!r}; choose auto, "
                         f"{', '.join(BACKENDS)}")
    if name == "pytorch3d" and not pytorch3d_available():
        raise ValueError("rasterizer backend 'pytorch3d' is not importable here; use "
                         "backend=torch (built-in) or install pytorch3d (the GPU image has it)")
    if name == "embree" and not embree_available():
        raise ValueError("rasterizer backend 'embree' needs trimesh and embreex installed")
    return name


# --------------------------------------------------------------------- screen-space core


def ndc_to_pixel(ndc: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(..., 2) NDC -> continuous (column, row) where pixel centres are integers (pytorch3d's
    non-square NDC: the shorter side spans [-1, 1])."""
    off_x = width / height if width > height else 1.0
    off_y = height / width if height > width else 1.0
    col = ((1 - ndc[..., 0] / off_x) * width - 1) / 2
    row = ((1 - ndc[..., 1] / off_y) * height - 1) / 2
    return torch.stack([col, row], dim=-1)


def pixel_to_ndc(col: torch.Tensor, row: torch.Tensor, height: int, width: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    off_x = width / height if width > height else 1.0
    off_y = height / width if height > width else 1.0
    return off_x * (1 - (2 * col + 1) / width), off_y * (1 - (2 * row + 1) / height)


def _candidates(face_xy: torch.Tensor, height: int, width: int):
    """Faces whose bounding box covers pixel centres, with the box per face."""
    lo = face_xy.amin(dim=1)
    hi = face_xy.amax(dim=1)
    x0 = torch.ceil(lo[:, 0]).clamp(min=0)
    y0 = torch.ceil(lo[:, 1]).clamp(min=0)
    x1 = torch.floor(hi[:, 0]).clamp(max=width - 1)
    y1 = torch.floor(hi[:, 1]).clamp(max=height - 1)
    bw = (x1 - x0 + 1).clamp(min=0).long()
    bh = (y1 - y0 + 1).clamp(min=0).long()
    return x0.long(), y0.long(), bw, bh


def _edge_coefficients(face_xy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(F, 3, 3) coefficients (a, b, c) with bary_k = a*x + b*y + c, and (F,) signed area."""
    x, y = face_xy[..., 0].double(), face_xy[..., 1].double()
    # bary_0 is the edge function of edge (1, 2), and so on, divided by the signed area.
    i = torch.tensor([1, 2, 0], device=face_xy.device)
    j = torch.tensor([2, 0, 1], device=face_xy.device)
    a = y[:, i] - y[:, j]
    b = x[:, j] - x[:, i]
    c = x[:, i] * y[:, j] - x[:, j] * y[:, i]
    area = c.sum(dim=1)
    safe = torch.where(area.abs() > 1e-12, area, torch.ones_like(area))
    coef = torch.stack([a, b, c], dim=-1) / safe[:, None, None]
    return coef, area


def rasterize_screen(face_xy: torch.Tensor, face_z: torch.Tensor | None, height: int,
                     width: int, perspective_correct: bool = True, znear: float = 0.0,
                     cull_backfaces: bool = False, face_ids: torch.Tensor | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest face per pixel of triangles given in pixel coordinates.

    ``face_xy``: (F, 3, 2) corners as (column, row), pixel centres at integers; ``face_z``:
    (F, 3) view depth (None: flat 2D, e.g. a UV atlas; the lowest face index wins). Returns
    ``(face (H, W) long, bary (H, W, 3), depth (H, W))`` with -1 where nothing was hit;
    ``face_ids`` renumbers the faces (their index in the full mesh).
    """
    device = face_xy.device
    ids = face_ids if face_ids is not None else torch.arange(face_xy.shape[0], device=device)
    coef, area = _edge_coefficients(face_xy)
    keep = area.abs() > 1e-12
    if cull_backfaces:
        # Front faces are counter-clockwise seen from the camera, clockwise in (column, row).
        keep &= area < 0
    face_xy, coef, ids = face_xy[keep], coef[keep], ids[keep]
    z = face_z[keep].float() if face_z is not None else None
    x0, y0, bw, bh = _candidates(face_xy, height, width)
    counts = bw * bh
    # Per face, the box origin and width and the first two barycentric planes (the third is
    # 1 - b0 - b1), gathered per candidate pixel with one index_select each.
    boxes = torch.stack([x0, y0, bw], dim=1)
    planes = coef[:, :2, :].reshape(-1, 6).float()
    keys = []
    cumulative = torch.cumsum(counts, 0)
    start = 0
    while start < len(counts):
        # A chunk of faces with at most MAX_CANDIDATES pixels (one huge face still goes alone).
        base = int(cumulative[start - 1]) if start else 0
        end = max(int(torch.searchsorted(cumulative, base + MAX_CANDIDATES, right=True)),
                  start + 1)
        n = counts[start:end]
        total = int(cumulative[end - 1]) - base
        chunk_start, start = start, end
        if total == 0:
            continue
        local = torch.repeat_interleave(torch.arange(chunk_start, end, device=device), n,
                                        output_size=total)
        first = torch.repeat_interleave(cumulative[chunk_start:end] - n - base, n,
                                        output_size=total)
        k = torch.arange(total, device=device) - first
        box = boxes.index_select(0, local)
        px = box[:, 0] + k % box[:, 2]
        py = box[:, 1] + torch.div(k, box[:, 2], rounding_mode="floor")
        pl = planes.index_select(0, local)
        pxf, pyf = px.float(), py.float()
        b0 = pl[:, 0] * pxf + pl[:, 1] * pyf + pl[:, 2]
        b1 = pl[:, 3] * pxf + pl[:, 4] * pyf + pl[:, 5]
        inside = (b0 >= -1e-6) & (b1 >= -1e-6) & (b0 + b1 <= 1 + 1e-6)
        idx = inside.nonzero().squeeze(1)
        faces = local.index_select(0, idx)
        pixel = py.index_select(0, idx) * width + px.index_select(0, idx)
        if z is None:
            keys.append(torch.stack([pixel, faces], 1))  # flat: the lowest face index wins
            continue
        b0, b1 = b0.index_select(0, idx), b1.index_select(0, idx)
        zc = z.index_select(0, faces)
        b2 = 1 - b0 - b1
        if perspective_correct:
            depth = 1.0 / (b0 / zc[:, 0] + b1 / zc[:, 1] + b2 / zc[:, 2])
        else:
            depth = b0 * zc[:, 0] + b1 * zc[:, 1] + b2 * zc[:, 2]
        front = depth > znear
        # One int64 key per hit: the float bits of a positive depth order like the depth, so
        # a single scatter-min keeps the nearest face (and the lowest index on a tie).
        key = (depth[front].view(torch.int32).long() << 32) | faces[front]
        keys.append(torch.stack([pixel[front], key], 1))
    face = torch.full((height * width,), -1, dtype=torch.long, device=device)
    bary_out = torch.zeros(height * width, 3, dtype=torch.float32, device=device)
    depth_out = torch.full((height * width,), -1.0, dtype=torch.float32, device=device)
    if keys:
        hits = torch.cat(keys)
        best = torch.full((height * width,), torch.iinfo(torch.long).max, dtype=torch.long,
                          device=device)
        best.scatter_reduce_(0, hits[:, 0], hits[:, 1], reduce="amin")
        pixels = (best != torch.iinfo(torch.long).max).nonzero().squeeze(1)
        f = best[pixels] & 0xFFFFFFFF
        # Barycentrics and depth of the winners, recomputed in double precision.
        px = (pixels % width).double()
        py = torch.div(pixels, width, rounding_mode="floor").double()
        c = coef[f]
        bary = c[..., 0] * px[:, None] + c[..., 1] * py[:, None] + c[..., 2]
        if z is not None:
            zc = z[f].double()
            if perspective_correct:
                weighted = bary / zc
                d = 1.0 / weighted.sum(1)
                bary = weighted * d[:, None]
            else:
                d = (bary * zc).sum(1)
            depth_out[pixels] = d.float()
        else:
            depth_out[pixels] = 0.0
        face[pixels] = ids[f]
        bary_out[pixels] = bary.float()
    return face.view(height, width), bary_out.view(height, width, 3), depth_out.view(height, width)


# --------------------------------------------------------------------------- backends


def _rasterize_torch(meshes: Meshes, cameras: FoVPerspectiveCameras,
                     settings: RasterizationSettings) -> Fragments:
    height, width = settings.size()
    verts_view = cameras.world_to_view(meshes.verts.detach().float())
    faces = meshes.faces
    z = verts_view[:, 2][faces]
    # Faces reaching behind the camera have no valid projection; the rest are clipped per pixel.
    in_front = (z > 1e-6).all(dim=1)
    face_ids = in_front.nonzero().squeeze(1)
    ndc = cameras.view_to_ndc(verts_view)
    xy = ndc_to_pixel(ndc, height, width)[faces[face_ids]]
    margin_x = (xy[..., 0].amax(1) >= -0.5) & (xy[..., 0].amin(1) <= width - 0.5)
    margin_y = (xy[..., 1].amax(1) >= -0.5) & (xy[..., 1].amin(1) <= height - 0.5)
    on_screen = margin_x & margin_y
    face_ids = face_ids[on_screen]
    face, bary, depth = rasterize_screen(xy[on_screen].double(), z[face_ids], height, width,
                                         settings.perspective_correct, cameras.znear,
                                         settings.cull_backfaces, face_ids)
    return Fragments(face[None, ..., None], bary[None, :, :, None, :], depth[None, ..., None])


class _EmbreeScene:
    """An Embree scene per mesh, reused while the same vertices are rendered."""

    def __init__(self, meshes: Meshes):
        import trimesh
        from trimesh.ray.ray_pyembree import RayMeshIntersector

        self.verts = meshes.verts
        self.mesh = trimesh.Trimesh(meshes.verts.detach().cpu().numpy(),
                                    meshes.faces.cpu().numpy(), process=False)
        self.intersector = RayMeshIntersector(self.mesh)


_EMBREE_CACHE: dict[int, _EmbreeScene] = {}


def _embree_scene(meshes: Meshes) -> _EmbreeScene:
    key = id(meshes.verts)
    scene = _EMBREE_CACHE.get(key)
    if scene is None or scene.verts is not meshes.verts:
        _EMBREE_CACHE.clear()
        scene = _EMBREE_CACHE[key] = _EmbreeScene(meshes)
    return scene


def _rasterize_embree(meshes: Meshes, cameras: FoVPerspectiveCameras,
                      settings: RasterizationSettings) -> Fragments:
    import numpy as np
    from trimesh.triangles import points_to_barycentric

    height, width = settings.size()
    scene = _embree_scene(meshes)
    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float64),
                                torch.arange(width, dtype=torch.float64), indexing="ij")
    x_ndc, y_ndc = pixel_to_ndc(cols, rows, height, width)
    tan_half = math.tan(math.radians(cameras.fov) / 2)
    dirs_view = torch.stack([x_ndc * tan_half, y_ndc * tan_half, torch.ones_like(x_ndc)], -1)
    rotation = cameras.R.double().cpu()
    dirs = (dirs_view.reshape(-1, 3) @ rotation.T).numpy()
    origin = cameras.camera_center().double().cpu().numpy()
    origins = np.broadcast_to(origin, dirs.shape).copy()
    tri, ray, loc = scene.intersector.intersects_id(origins, dirs, multiple_hits=False,
                                                    return_locations=True)
    face = torch.full((height * width,), -1, dtype=torch.long)
    bary = torch.zeros(height * width, 3)
    depth = torch.full((height * width,), -1.0)
    if len(tri):
        z = (torch.from_numpy(loc) @ rotation + cameras.T.double().cpu())[:, 2]
        ok = (z > cameras.znear).numpy()
        tri, ray, loc, z = tri[ok], ray[ok], loc[ok], z[ok]
        corners = scene.mesh.vertices[scene.mesh.faces[tri]]
        b = points_to_barycentric(corners, loc)
        if not settings.perspective_correct:
            # Screen-space barycentrics: undo the perspective weighting.
            zc = (torch.from_numpy(corners) @ rotation + cameras.T.double().cpu())[..., 2]
            screen = torch.from_numpy(b) * zc
            screen = screen / screen.sum(1, keepdim=True)
            z = (screen * zc).sum(1)  # depth interpolated in screen space, as pytorch3d's
            b = screen.numpy()
        face[ray] = torch.from_numpy(tri).long()
        bary[ray] = torch.from_numpy(b).float()
        depth[ray] = z.float()
    device = meshes.verts.device
    return Fragments(face.view(1, height, width, 1).to(device),
                     bary.view(1, height, width, 1, 3).to(device),
                     depth.view(1, height, width, 1).to(device))


def _rasterize_pytorch3d(meshes: Meshes, cameras: FoVPerspectiveCameras,
                         settings: RasterizationSettings) -> Fragments:
    from pytorch3d.renderer import FoVPerspectiveCameras as P3Cameras
    from pytorch3d.renderer import MeshRasterizer as P3Rasterizer
    from pytorch3d.renderer import RasterizationSettings as P3Settings
    from pytorch3d.structures import Meshes as P3Meshes

    device = meshes.verts.device
    p3_cameras = P3Cameras(device=device, R=cameras.R[None].to(device),
                           T=cameras.T[None].to(device), znear=cameras.znear, fov=cameras.fov)
    p3_settings = P3Settings(image_size=settings.size(), blur_radius=0.0,
                             faces_per_pixel=settings.faces_per_pixel,
                             perspective_correct=settings.perspective_correct,
                             cull_backfaces=settings.cull_backfaces)
    mesh = P3Meshes(verts=[meshes.verts.detach()], faces=[meshes.faces])
    frags = P3Rasterizer(cameras=p3_cameras, raster_settings=p3_settings)(mesh)
    return Fragments(frags.pix_to_face.long(), frags.bary_coords, frags.zbuf)


_BACKEND_FNS = {"torch": _rasterize_torch, "embree": _rasterize_embree,
                "pytorch3d": _rasterize_pytorch3d}


class MeshRasterizer:
    """Meshes -> fragments with the chosen backend (pytorch3d's ``MeshRasterizer`` call shape)."""

    def __init__(self, cameras: FoVPerspectiveCameras,
                 raster_settings: RasterizationSettings | None = None, backend: str = "torch"):
        self.cameras = cameras
        self.raster_settings = raster_settings or RasterizationSettings()
        self.backend = resolve_backend(backend)
        if self.raster_settings.faces_per_pixel != 1:
            raise ValueError("only faces_per_pixel=1 is supported")

    def __call__(self, meshes: Meshes) -> Fragments:
        return _BACKEND_FNS[self.backend](meshes, self.cameras, self.raster_settings)
