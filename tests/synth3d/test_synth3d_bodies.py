"""Bodies: procedural humanoids, anatomy labels, skin tones, OBJ / 3DBodyTex loading and the
one-line errors for unusable meshes, textures and label files."""

import numpy as np
import pytest
import trimesh
from PIL import Image

from dermml.synth3d.anatomy import ANATOMY_LABELS, SIMPLE_ANATOMY_LABELS, to_simple_anatomy
from dermml.synth3d.bodies import BodyError, find_bodies, load_body
from dermml.synth3d.procedural import procedural_body
from dermml.synth3d.skin_tone import (
    ITA_RANGES,
    fitzpatrick_from_ita,
    ita_from_lab,
    skin_colour,
    srgb_to_lab,
)


@pytest.fixture(scope="module")
def body():
    return procedural_body("p0", seed=3, texture_size=128, edge=0.07)


def test_procedural_body_is_a_watertight_humanoid_with_every_anatomy_label(body):
    mesh = trimesh.Trimesh(body.verts, body.faces, process=False)
    assert mesh.is_watertight and mesh.is_winding_consistent and mesh.volume > 0
    height = body.verts[:, 1].max() - body.verts[:, 1].min()
    assert 1.4 < height < 2.0
    assert set(np.unique(body.vertex_labels)) == set(range(1, len(ANATOMY_LABELS)))
    # Left parts are on the body's left (+x), heads on top, feet at the bottom.
    left = body.verts[body.vertex_labels == ANATOMY_LABELS.index("hand_left")]
    right = body.verts[body.vertex_labels == ANATOMY_LABELS.index("hand_right")]
    assert left[:, 0].mean() > 0 > right[:, 0].mean()
    head = body.verts[body.vertex_labels == 1][:, 1].mean()
    feet = body.verts[body.vertex_labels == ANATOMY_LABELS.index("feet_left")][:, 1].mean()
    assert head > 1.3 and feet < 0.15


def test_procedural_body_has_a_uv_atlas_a_skin_mask_and_a_recorded_skin_type(body):
    assert body.verts_uvs.min() >= 0 and body.verts_uvs.max() <= 1
    assert body.faces_uvs.shape == body.faces.shape
    assert 0.01 < body.nonskin.mean() < 0.5  # hair and briefs, mostly skin
    assert body.skin_type == body.params["target_skin_type"]
    low, high = ITA_RANGES[body.skin_type]
    assert low - 3 <= body.ita <= high + 3


def test_procedural_bodies_differ_by_seed_and_repeat_by_seed(body):
    again = procedural_body("p0", seed=3, texture_size=128, edge=0.07)
    other = procedural_body("p1", seed=4, texture_size=128, edge=0.07)
    assert np.array_equal(again.verts, body.verts) and np.array_equal(again.texture,
                                                                      body.texture)
    assert other.params["height"] != body.params["height"]


def test_simple_anatomy_merges_the_17_labels_into_8_classes():
    simple = to_simple_anatomy(np.arange(len(ANATOMY_LABELS)))
    names = [SIMPLE_ANATOMY_LABELS[i] for i in simple]
    assert names[ANATOMY_LABELS.index("lower_torso")] == "torso"
    assert names[ANATOMY_LABELS.index("upper_leg_right")] == "legs"
    assert names[ANATOMY_LABELS.index("hand_left")] == "hands"
    assert set(simple) == set(range(len(SIMPLE_ANATOMY_LABELS)))
    with pytest.raises(ValueError):
        to_simple_anatomy(np.array([17]))


@pytest.mark.parametrize("skin_type", list(ITA_RANGES))
def test_skin_colours_drawn_for_an_ita_measure_back_to_their_fitzpatrick_type(skin_type):
    rng = np.random.default_rng(0)
    low, high = ITA_RANGES[skin_type]
    ita = (low + high) / 2
    measured = ita_from_lab(srgb_to_lab(skin_colour(ita, rng)))
    assert abs(measured - ita) < 1.0
    assert fitzpatrick_from_ita(measured) == skin_type


def _write_obj(path, with_uvs=True):
    path.write_text("mtllib m.mtl\nv 0 0 0\nv 1 0 0\nv 0 1 0\nv 1 1 0\n"
                    + ("vt 0 0\nvt 1 0\nvt 0 1\nvt 1 1\nf 1/1 2/2 4/4 3/3\n" if with_uvs
                       else "f 1 2 4 3\n"))
    (path.parent / "m.mtl").write_text("newmtl texture\nmap_Kd tex.png\n")


def test_an_obj_with_texture_mask_and_labels_loads_with_quads_split(tmp_path):
    _write_obj(tmp_path / "body.obj")
    Image.new("RGB", (32, 32), (200, 150, 120)).save(tmp_path / "tex.png")
    Image.new("L", (32, 32), 0).save(tmp_path / "mask.png")
    np.save(tmp_path / "labels.npy", np.array([1, 2, 3, 4]))
    body = load_body(str(tmp_path / "body.obj"), nonskin=str(tmp_path / "mask.png"),
                     labels=str(tmp_path / "labels.npy"))
    assert body.faces.shape == (2, 3) and body.texture.shape == (32, 32, 3)
    assert list(body.vertex_labels) == [1, 2, 3, 4] and body.skin_type is not None


def test_a_mesh_without_uvs_is_a_one_line_error_naming_the_file(tmp_path):
    _write_obj(tmp_path / "body.obj", with_uvs=False)
    Image.new("RGB", (32, 32)).save(tmp_path / "tex.png")
    with pytest.raises(BodyError, match=r"body\.obj has no texture coordinates"):
        load_body(str(tmp_path / "body.obj"))


def test_a_texture_of_the_wrong_size_is_an_error_naming_the_file(tmp_path):
    _write_obj(tmp_path / "body.obj")
    Image.new("RGB", (64, 32)).save(tmp_path / "tex.png")
    with pytest.raises(BodyError, match=r"texture .*tex\.png is 64x32: textures must be square"):
        load_body(str(tmp_path / "body.obj"))
    Image.new("RGB", (32, 32)).save(tmp_path / "tex.png")
    Image.new("L", (16, 16)).save(tmp_path / "mask.png")
    with pytest.raises(BodyError, match=r"non-skin mask .*mask\.png is 16x16 but texture"):
        load_body(str(tmp_path / "body.obj"), nonskin=str(tmp_path / "mask.png"))


def test_a_label_file_of_the_wrong_length_is_an_error_naming_both_files(tmp_path):
    _write_obj(tmp_path / "body.obj")
    Image.new("RGB", (32, 32)).save(tmp_path / "tex.png")
    np.save(tmp_path / "labels.npy", np.array([1, 2, 3]))
    with pytest.raises(BodyError, match=r"labels\.npy has 3 entries but mesh .*body\.obj has 4 "
                                        r"vertices"):
        load_body(str(tmp_path / "body.obj"), labels=str(tmp_path / "labels.npy"))


def test_a_saved_body_in_the_3dbodytex_layout_is_found_and_loaded_back(tmp_path, body):
    from dermml.synth3d.generate import save_body

    save_body(str(tmp_path), body, body.texture, body.texture,
              np.zeros(body.nonskin.shape, np.uint8), {"body_id": body.body_id}, [])
    sources = find_bodies(str(tmp_path / "bodies"))
    assert [s.body_id for s in sources] == ["p0"]
    assert sources[0].nonskin and sources[0].labels  # found beside the mesh
    loaded = sources[0].load()
    assert np.allclose(loaded.verts, body.verts, atol=1e-5)
    assert np.array_equal(loaded.faces, body.faces)
    assert np.array_equal(loaded.vertex_labels, body.vertex_labels)
    assert np.array_equal(loaded.nonskin, body.nonskin)
    assert np.abs(loaded.texture - body.texture).max() <= 1 / 255
