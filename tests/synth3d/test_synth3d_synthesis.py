"""Lesion placement, blending, views and outputs on a tiny procedural body and demo lesions."""

from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch

from dermml.data.manifest import ManifestError, read_manifest, write_manifest
from dermml.synth3d.blend import deep_blend_lesion
from dermml.synth3d.config import Synth3DConfig
from dermml.synth3d.features import FALLBACK_NAME, feature_network
from dermml.synth3d.generate import BodyJob, CropDrawer, run_body
from dermml.synth3d.lesions import lesion_sources
from dermml.synth3d.paste import PLACEMENT_FOV, centred_masks, place_lesion
from dermml.synth3d.procedural import procedural_body
from dermml.synth3d.scene import BodyScene
from dermml.synth3d.views import LESION, NONSKIN, SKIN, render_view

PASTE_VIEW = 96


@pytest.fixture(scope="module")
def lesions_uri(tmp_path_factory):
    from dermml.data.demo import generate_demo

    return generate_demo(str(tmp_path_factory.mktemp("lesions") / "demo"), n=8, size=64, seed=0)


def tiny_config(lesions_uri, **sections) -> Synth3DConfig:
    data = {"lesions": lesions_uri, "device": "cpu", "backend": "torch",
            "bodies": {"texture_size": 128, "edge": 0.07},
            "paste": {"lesions_per_body": 3, "view_size": PASTE_VIEW},
            "blend": {"method": "paste", "steps": 8, "distance_jitter": 0.0},
            "views": {"per_body": 3, "size": 48, "backgrounds": ""}}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return Synth3DConfig.model_validate(data)


@pytest.fixture(scope="module")
def body():
    # 384 texels: about 1 pixel of the placement view per texel.
    return procedural_body("p0", seed=11, texture_size=384, edge=0.07)


def _placed(body, lesions_uri, seed=0, n=1, method="paste"):
    cfg = tiny_config(lesions_uri)
    scene = BodyScene(body, "cpu", "torch")
    rng = np.random.default_rng(seed)
    rejected = Counter()
    draw = CropDrawer(lesion_sources(lesions_uri), cfg, rng, rejected)
    placements = []
    for lesion_id in range(1, n + 1):
        with torch.no_grad():
            p = place_lesion(scene, draw, lesion_id, cfg.paste, method, rng, rejected)
        assert p is not None, rejected
        placements.append(p)
    return scene, placements, cfg, rejected


def test_lesion_channel_covers_the_projection_of_its_pasted_lesion_and_nothing_else(
        body, lesions_uri):
    scene, (placement,), cfg, _ = _placed(body, lesions_uri)
    # Render from the placement camera: the lesion must appear where its crop was put.
    at = np.array(placement.look_at)
    eye = at + np.array(placement.normal) * placement.distance + 1e-4
    view = scene.view(eye, at, PASTE_VIEW, PLACEMENT_FOV)
    rendered = (scene.lesion_id_map(view) == placement.lesion_id).numpy()
    # Recreate the crop mask that was placed (same rng draw as in _placed).
    rng = np.random.default_rng(0)
    for _ in range(placement.attempts):
        scene.sample_skin_point(rng)
        rng.uniform(*cfg.paste.distance)
        crop = CropDrawer(lesion_sources(lesions_uri), cfg, rng, Counter())(
            int(PASTE_VIEW * cfg.paste.max_size_fraction))
    placed, _, _ = centred_masks(crop, PASTE_VIEW, cfg.paste.dilation)
    from scipy import ndimage

    # Texels are coarser than pixels: allow one texel of slack at the border, nothing beyond.
    slack = ndimage.binary_dilation(placed, iterations=2)
    core = ndimage.binary_erosion(placed, iterations=2)
    assert rendered.sum() > 0.6 * placed.sum()
    assert not (rendered & ~slack).any()
    assert rendered[core].mean() > 0.97
    assert set(np.unique(scene.lesion_id_map(view).numpy())) <= {0, placement.lesion_id}


def test_overlapping_placements_are_rejected(body, lesions_uri):
    scene, (first,), cfg, _ = _placed(body, lesions_uri)
    # The same random draws put the next lesion on the same spot: it must be refused.
    rng = np.random.default_rng(0)
    rejected = Counter()
    draw = CropDrawer(lesion_sources(lesions_uri), cfg, rng, rejected)
    cfg.paste.attempts_per_lesion = first.attempts
    with torch.no_grad():
        second = place_lesion(scene, draw, 2, cfg.paste, "paste", rng, rejected)
    assert second is None and rejected["overlap"] == 1


def test_placements_on_curved_skin_beyond_the_depth_limit_are_rejected(body, lesions_uri):
    cfg = tiny_config(lesions_uri, paste={"max_depth_change": 1e-5, "attempts_per_lesion": 6})
    scene = BodyScene(body, "cpu", "torch")
    rng = np.random.default_rng(1)
    rejected = Counter()
    draw = CropDrawer(lesion_sources(lesions_uri), cfg, rng, rejected)
    with torch.no_grad():
        assert place_lesion(scene, draw, 1, cfg.paste, "paste", rng, rejected) is None
    assert rejected["depth_change"] + rejected["not_skin"] == 6 and rejected["depth_change"]


def test_anatomy_labels_of_rendered_pixels_are_those_of_the_hit_faces(body):
    scene = BodyScene(body, "cpu", "torch")
    view = scene.view(np.array([0.5, 1.1, 1.4]), np.array([0.0, 1.0, 0.0]), 64)
    anatomy = scene.anatomy_map(view).numpy()
    face = view.fragments.face.numpy()
    hit = face >= 0
    assert np.array_equal(anatomy[hit], body.face_labels()[face[hit]])
    assert (anatomy[~hit] == 0).all() and len(np.unique(anatomy[hit])) >= 3


def test_deep_blending_lowers_its_loss_and_changes_only_the_dilated_lesion(body, lesions_uri):
    scene, (placement,), cfg, _ = _placed(body, lesions_uri)
    before = scene.texture.clone()
    pasted = scene.texture.clone()
    losses = deep_blend_lesion(scene, placement, pasted, feature_network(), cfg.blend,
                               PASTE_VIEW, np.random.default_rng(0))
    assert len(losses) == cfg.blend.steps and losses[-1] < losses[0]
    changed = (scene.texture != before).any(dim=-1).numpy()
    allowed = np.zeros_like(changed)
    allowed[scene.texel_rows[placement.dilated_texels],
            scene.texel_cols[placement.dilated_texels]] = True
    assert changed.any() and not (changed & ~allowed).any()


def test_fallback_feature_network_is_fixed_and_named():
    a, b = feature_network(), feature_network()
    x = torch.rand(1, 3, 32, 32)
    assert a.name == FALLBACK_NAME
    assert all(torch.equal(u, v) for u, v in zip(a(x), b(x), strict=True))
    assert [f.shape[1] for f in a(x)] == [16, 32, 64, 64]


def test_poisson_blending_writes_the_lesion_region_only(body, lesions_uri):
    scene, (placement,), _, _ = _placed(body, lesions_uri, method="poisson")
    changed = (scene.texture != scene.original).any(dim=-1).numpy()
    allowed = np.zeros_like(changed)
    allowed[scene.texel_rows[placement.dilated_texels],
            scene.texel_cols[placement.dilated_texels]] = True
    assert changed.any() and not (changed & ~allowed).any()


def test_a_rejected_view_is_really_below_the_skin_threshold(body, lesions_uri):
    scene, placements, cfg, _ = _placed(body, lesions_uri)
    cfg.views.min_skin_fraction = 0.9
    cfg.views.attempts_per_view = 8
    cfg.views.look_at = "skin"
    cfg.views.min_lesion_pixels = 0
    from dermml.synth3d.backgrounds import Backgrounds

    log: list[dict] = []
    rejected = Counter()
    rng = np.random.default_rng(5)
    for _ in range(3):
        render_view(scene, cfg.views, Backgrounds(), rng, [], rejected, log)
    low = [entry for entry in log if entry["reason"] == "low_skin"]
    assert low, rejected
    for entry in low:
        view = scene.view(entry["camera_pos"], entry["look_at"], cfg.views.size)
        fraction = float(scene.skin_mask(view).float().mean())
        assert fraction == pytest.approx(entry["skin_fraction"]) and fraction < 0.9


def test_a_view_has_dermsynth3d_targets_and_consistent_masks(tmp_path, lesions_uri):
    cfg = tiny_config(lesions_uri)
    result = run_body(cfg, BodyJob(0, "p0000", None, "train", (0, 1)), str(tmp_path),
                      lesion_sources(lesions_uri))
    assert len(result.records) == 2
    row = result.records[0]
    target = np.load(tmp_path / row["target_uri"])["masks"]
    assert target.shape == (48, 48, 5) and target.dtype == np.float32
    lesion, skin, nonskin = (target[..., c] > 0.5 for c in (LESION, SKIN, NONSKIN))
    assert lesion.any() and not (lesion & skin).any() and np.array_equal(nonskin, ~(skin | lesion))
    assert np.array_equal(target[..., 4] < 0, target[..., 3] == 0)  # background: no anatomy
    from PIL import Image

    depth = np.asarray(Image.open(tmp_path / row["depth_uri"]))
    assert depth.dtype == np.uint16 and np.array_equal(depth == 0, target[..., 4] < 0)
    mask = np.asarray(Image.open(tmp_path / row["mask_uri"]))
    assert np.array_equal(mask > 0, lesion)
    x, y, w, h = row["boxes"][0]
    assert lesion[int(y):int(y + h), int(x):int(x + w)].any()
    for key in ("look_at", "camera_pos", "light_pos", "ambient", "diffuse", "specular",
                "shininess", "normal_weight", "background_id", "background_blur_radius"):
        assert key in row


def test_a_killed_run_resumes_without_rendering_a_finished_view_twice(tmp_path, lesions_uri,
                                                                        monkeypatch):
    import dermml.synth3d.views as views

    cfg = tiny_config(lesions_uri)
    job = BodyJob(0, "p0000", None, "train", (0, 1, 2))
    rendered: list[int] = []
    original = views.render_view

    def counting(*args, **kwargs):
        rendered.append(1)
        return original(*args, **kwargs)

    class Killed(Exception):
        pass

    def kill_after_two(n):
        if sum(rendered) == 2:
            raise Killed

    monkeypatch.setattr(views, "render_view", counting)
    out = str(tmp_path / "run")
    with pytest.raises(Killed):
        run_body(cfg, job, out, lesion_sources(lesions_uri), progress=kill_after_two)
    first = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run" / "images").iterdir()}
    assert len(first) == 2
    resumed = run_body(cfg, job, out, lesion_sources(lesions_uri))
    assert resumed.views_skipped == 2 and len(resumed.records) == 1 and sum(rendered) == 3
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run" / "images").iterdir()}
    assert all(after[name] == mtime for name, mtime in first.items()) and len(after) == 3
    # What the resumed run wrote is what an uninterrupted run writes.
    fresh = run_body(cfg, job, str(tmp_path / "fresh"), lesion_sources(lesions_uri))
    last = resumed.records[0]
    assert last["sha256"] == next(r for r in fresh.records
                                  if r["file_id"] == last["file_id"])["sha256"]


def test_a_lesion_manifest_without_masks_is_an_error_naming_it(tmp_path):
    uri = str(tmp_path / "nomasks.parquet")
    write_manifest(pd.DataFrame([{"sample_id": "a", "image_uri": "a.png"}]), uri)
    with pytest.raises(ManifestError, match=r"nomasks\.parquet: none of its 1 rows has a "
                                            r"mask_uri"):
        lesion_sources(uri)
    assert read_manifest(uri).df["mask_uri"].isna().all()


def test_embree_and_numpy_ray_tests_agree(body):
    scene = BodyScene(body, "cpu", "torch")
    rng = np.random.default_rng(2)
    hits = 0
    for _ in range(12):
        origin = rng.uniform([-1, 0, -1], [1, 2, 1])
        direction = body.verts[rng.integers(len(body.verts))] - origin + rng.normal(0, 0.01, 3)
        direction /= np.linalg.norm(direction)
        embree = scene.first_hit(origin, direction)
        numpy_hit = scene._first_hit_numpy(origin, direction, np.inf)
        assert (embree is None) == (numpy_hit is None)
        if embree is not None:
            hits += 1
            assert embree[1] == numpy_hit[1] and embree[0] == pytest.approx(numpy_hit[0],
                                                                           abs=1e-4)
    assert hits >= 9


def test_vgg16_features_load_from_a_local_torchvision_state_dict(tmp_path):
    from torch import nn

    from dermml.synth3d.features import _vgg_blocks, vgg16_features

    # torchvision's vgg16().features numbering: convolutions at these indices (up to conv4_3).
    convs = [m for b in _vgg_blocks((64, 128, 256, 512), (2, 2, 3, 3)) for m in b
             if isinstance(m, nn.Conv2d)]
    indices = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21]
    state = {}
    for conv, index in zip(convs, indices, strict=True):
        state[f"features.{index}.weight"] = torch.randn_like(conv.weight)
        state[f"features.{index}.bias"] = torch.randn_like(conv.bias)
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)
    net = vgg16_features(str(path))
    assert net.name.startswith("vgg16:")
    assert torch.equal(net.blocks[0][0].weight, state["features.0.weight"])
    assert torch.equal(net.blocks[3][1].weight, state["features.17.weight"])  # after the pool
    assert [f.shape[1] for f in net(torch.rand(1, 3, 32, 32))] == [64, 128, 256, 512]


def test_a_body_where_no_lesion_fits_reports_its_views_as_given_up(tmp_path, lesions_uri):
    cfg = tiny_config(lesions_uri, paste={"max_depth_change": 1e-6, "attempts_per_lesion": 2})
    result = run_body(cfg, BodyJob(0, "p0000", None, "train", (0, 1)), str(tmp_path),
                      lesion_sources(lesions_uri))
    assert not result.records and result.views_failed == 2
    assert result.view_rejections["body_without_lesions"] == 2
    assert result.placement_rejections["gave_up"] == cfg.paste.lesions_per_body
