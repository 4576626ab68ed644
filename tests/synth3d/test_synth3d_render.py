"""The renderer: analytic depth and silhouettes, exact barycentric lookup, backends agreeing."""

import math

import numpy as np
import pytest
import torch
import trimesh

from dermml.synth3d.raster import MeshRasterizer, pytorch3d_available, rasterize_screen
from dermml.synth3d.renderer import (
    FoVPerspectiveCameras,
    Fragments,
    Meshes,
    RasterizationSettings,
    TexturesUV,
    look_at_view_transform,
    sample_texture,
)

SIZE = 64
FOV = 30.0


def _meshes(mesh: trimesh.Trimesh) -> Meshes:
    return Meshes(torch.tensor(mesh.vertices, dtype=torch.float32),
                  torch.tensor(mesh.faces, dtype=torch.long))


def _camera(eye, at=(0.0, 0.0, 0.0)) -> FoVPerspectiveCameras:
    rotation, translation = look_at_view_transform(eye, at)
    return FoVPerspectiveCameras(rotation, translation, fov=FOV)


def _pixel_rays(cameras: FoVPerspectiveCameras, size: int) -> np.ndarray:
    """World directions through pixel centres (pytorch3d's NDC: +x left, +y up)."""
    idx = np.arange(size)
    x = 1 - (2 * idx + 1) / size
    xx, yy = np.meshgrid(x, x)  # row i <-> y = 1 - (2i+1)/size, column j <-> x
    t = math.tan(math.radians(FOV) / 2)
    dirs_view = np.stack([xx * t, yy * t, np.ones_like(xx)], -1)
    return dirs_view @ cameras.R.double().numpy().T


def test_sphere_depth_and_silhouette_match_the_analytic_sphere():
    radius, eye = 0.5, np.array([0.013, 0.021, 2.0])
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=radius)
    cameras = _camera(eye)
    frags = MeshRasterizer(cameras, RasterizationSettings(SIZE))(_meshes(sphere))
    dirs = _pixel_rays(cameras, SIZE)
    dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
    # |eye + s d| = r  ->  s^2 + 2 s (eye.d) + |eye|^2 - r^2 = 0
    b = dirs @ eye
    disc = b ** 2 - (eye @ eye - radius ** 2)
    hit = disc > 0
    s = -b - np.sqrt(np.where(hit, disc, 0))
    z_axis = cameras.R[:, 2].double().numpy()
    depth = s * (dirs @ z_axis)
    rendered = frags.foreground.numpy()
    assert (rendered ^ hit).sum() <= 0.02 * hit.sum()  # only a ring at the polygonal rim
    both = rendered & hit
    err = np.abs(frags.depth.numpy()[both] - depth[both])
    # The icosphere's flat faces lie up to ~1 mm inside the sphere; steeper near the rim.
    assert np.median(err) < 0.002 * radius and np.percentile(err, 95) < 0.005 * radius
    assert err.max() < 0.03 * radius


def test_cube_face_depth_is_exact_and_silhouette_is_the_projected_square():
    distance = 2.0
    cube = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    cameras = _camera((0.0, 0.0, distance))
    frags = MeshRasterizer(cameras, RasterizationSettings(SIZE))(_meshes(cube))
    # The front face z = 0.5 sits at depth distance - 0.5; it spans |ndc| < half / depth / t.
    t = math.tan(math.radians(FOV) / 2)
    limit = 0.5 / (distance - 0.5) / t
    ndc = 1 - (2 * np.arange(SIZE) + 1) / SIZE
    inside_1d = np.abs(ndc) < limit
    expected = inside_1d[:, None] & inside_1d[None, :]
    assert np.array_equal(frags.foreground.numpy(), expected)
    assert np.allclose(frags.depth.numpy()[expected], distance - 0.5, atol=1e-5)


def test_depth_is_negative_exactly_on_background():
    sphere = trimesh.creation.icosphere(subdivisions=2, radius=0.5)
    frags = MeshRasterizer(_camera((0.3, 0.2, 1.5)), RasterizationSettings(SIZE))(_meshes(sphere))
    background = frags.face.numpy() < 0
    assert background.any() and (~background).any()
    assert np.array_equal(frags.depth.numpy() < 0, background)
    assert np.all(frags.depth.numpy()[background] == -1)


def test_barycentric_texture_lookup_is_exact_at_vertices():
    size = 8
    rng = np.random.default_rng(0)
    image = torch.tensor(rng.random((size, size, 3)), dtype=torch.float32)
    # One triangle whose UV corners sit on texel centres (align_corners: u = c / (S - 1)).
    texels = [(1, 2), (6, 5), (3, 7)]  # (row, col)
    uvs = torch.tensor([[c / (size - 1), 1 - r / (size - 1)] for r, c in texels])
    textures = TexturesUV(image, torch.tensor([[0, 1, 2]]), uvs)
    for k, (r, c) in enumerate(texels):
        bary = torch.zeros(1, 1, 1, 1, 3)
        bary[..., k] = 1.0
        frags = Fragments(torch.zeros(1, 1, 1, 1, dtype=torch.long), bary,
                          torch.ones(1, 1, 1, 1))
        assert torch.allclose(sample_texture(frags, textures)[0, 0], image[r, c], atol=1e-6)


def test_rasterized_barycentrics_are_one_hot_where_a_vertex_sits_on_a_pixel_centre():
    # Triangle corners on pixel centres (pixel coordinates): the corner pixel gets (1, 0, 0).
    xy = torch.tensor([[[10.0, 10.0], [50.0, 12.0], [20.0, 55.0]]], dtype=torch.float64)
    face, bary, _ = rasterize_screen(xy, None, SIZE, SIZE)
    assert face[10, 10] == 0
    assert torch.allclose(bary[10, 10], torch.tensor([1.0, 0.0, 0.0]), atol=1e-6)
    assert torch.allclose(bary[12, 50], torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)


def _agreement(a: Fragments, b: Fragments) -> tuple[float, float, float]:
    same = (a.face == b.face).float().mean().item()
    both = (a.face >= 0) & (a.face == b.face)
    depth_err = (a.depth[both] - b.depth[both]).abs().max().item()
    bary_err = (a.bary_coords[0, :, :, 0][both] - b.bary_coords[0, :, :, 0][both]).abs().max()
    return same, depth_err, float(bary_err)


@pytest.fixture(scope="module")
def body_meshes():
    from dermml.synth3d.procedural import procedural_body

    body = procedural_body("t", seed=1, texture_size=64, edge=0.07)
    return body.meshes()


@pytest.mark.parametrize("perspective_correct", [True, False])
def test_builtin_and_embree_backends_give_the_same_fragments(body_meshes, perspective_correct):
    cameras = _camera((0.4, 1.1, 1.2), (0.0, 1.0, 0.0))
    settings = RasterizationSettings(SIZE, perspective_correct=perspective_correct)
    builtin = MeshRasterizer(cameras, settings, "torch")(body_meshes)
    embree = MeshRasterizer(cameras, settings, "embree")(body_meshes)
    same, depth_err, bary_err = _agreement(builtin, embree)
    assert builtin.foreground.sum() > 200
    assert same > 0.995 and depth_err < 1e-4 and bary_err < 1e-3


@pytest.mark.skipif(not pytorch3d_available(), reason="pytorch3d is not installed here "
                    "(the GPU image builds it); the built-in backend is tested above")
def test_builtin_and_pytorch3d_backends_give_the_same_fragments(body_meshes):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cameras = _camera((0.4, 1.1, 1.2), (0.0, 1.0, 0.0)).to(device)
    meshes = Meshes(body_meshes.verts.to(device), body_meshes.faces.to(device))
    settings = RasterizationSettings(SIZE)
    builtin = MeshRasterizer(cameras, settings, "torch")(meshes)
    reference = MeshRasterizer(cameras, settings, "pytorch3d")(meshes)
    same, depth_err, bary_err = _agreement(builtin, reference)
    assert same > 0.995 and depth_err < 1e-4 and bary_err < 1e-3


def test_backface_culling_keeps_the_faces_turned_to_the_camera():
    sphere = _meshes(trimesh.creation.icosphere(subdivisions=2, radius=0.5))
    cameras = _camera((0.0, 0.0, 2.0))
    culled = MeshRasterizer(cameras, RasterizationSettings(SIZE, cull_backfaces=True))(sphere)
    plain = MeshRasterizer(cameras, RasterizationSettings(SIZE))(sphere)
    assert torch.equal(culled.face, plain.face)
