"""One body, start to finish: build or load it, paste and blend its lesions, save it, render
its views. Plain functions over a config and an output URI (local or ``s3://``); the stage
(``dermml/synthesis/run.py``) runs them in parallel, and tests call them directly.

Everything random is seeded per body and per view, so a view's content depends only on
``(seed, body index, view index)``: views already written are skipped on a rerun, and a resumed
run writes what an uninterrupted one would have. A body is saved (3DBodyTex layout) before any
of its views is rendered, and views are always rendered from the saved files.
"""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from dermml import storage
from dermml.data.images import encode_png
from dermml.synth3d.backgrounds import Backgrounds
from dermml.synth3d.bodies import (
    BODYTEX_LABELS,
    BODYTEX_NONSKIN,
    BODYTEX_OBJ,
    Body,
    BodySource,
    load_body,
)
from dermml.synth3d.config import Synth3DConfig
from dermml.synth3d.lesions import (
    EmptyLesionMask,
    LesionCrop,
    LesionSource,
    lesions_for_split,
    load_crop,
)
from dermml.synth3d.outputs import write_view
from dermml.synth3d.paste import Placement, place_lesion
from dermml.synth3d.procedural import procedural_body
from dermml.synth3d.scene import BodyScene

BODY_DONE = "body.json"
LESION_IDS = "lesion_mask.png"
PASTED = "model_highres_0_normalized_pasted.png"
PLACEMENTS = "lesion_params.csv"


@dataclass(frozen=True)
class BodyJob:
    """A body to render: its index (seeds), id, where it comes from, its split, its views."""

    index: int
    body_id: str
    source: BodySource | None
    """Mesh files; None for a procedural body."""
    split: str | None
    views: tuple[int, ...]


@dataclass
class BodyResult:
    body_id: str
    records: list[dict] = field(default_factory=list)
    """One row per written view (its scene parameters and files)."""
    placement_rejections: Counter = field(default_factory=Counter)
    view_rejections: Counter = field(default_factory=Counter)
    views_skipped: int = 0
    """Views found already written (resume)."""
    views_failed: int = 0
    body: dict = field(default_factory=dict)
    """The body's record (id, skin type, ITA, lesions, blend losses)."""
    seconds: dict[str, float] = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def body_dir(out: str, body_id: str) -> str:
    return storage.join(out, "bodies", body_id)


def view_id(body_id: str, index: int) -> str:
    return f"{body_id}_{index:05d}"


# ----------------------------------------------------------------------- saving a body


def obj_text(body: Body, texture_name: str) -> str:
    lines = [f"mtllib {BODYTEX_OBJ[:-4]}.mtl", "usemtl texture"]
    lines += [f"v {x:.7g} {y:.7g} {z:.7g}" for x, y, z in body.verts.tolist()]
    lines += [f"vt {u:.7g} {v:.7g}" for u, v in body.verts_uvs.tolist()]
    f, t = body.faces + 1, body.faces_uvs + 1
    lines += [f"f {a}/{p} {b}/{q} {c}/{r}"
              for (a, b, c), (p, q, r) in zip(f.tolist(), t.tolist(), strict=True)]
    return "\n".join(lines) + "\n"


def save_body(out: str, body: Body, texture: np.ndarray, pasted: np.ndarray,
              lesion_ids: np.ndarray, record: dict, placements: list[dict]) -> None:
    """The body in 3DBodyTex's layout (mesh, blended texture, non-skin mask, labels) plus its
    lesion id mask, pasted texture and placements; ``body.json`` last marks it complete."""
    folder = body_dir(out, body.body_id)
    stem = BODYTEX_OBJ[:-4]

    def put(name: str, data: bytes) -> None:
        storage.write_bytes(storage.join(folder, name), data)

    put(f"{stem}.png", encode_png(_to_uint8(texture)))
    put(f"{stem}.mtl", f"newmtl texture\nKd 1 1 1\nmap_Kd {stem}.png\n".encode())
    put(BODYTEX_OBJ, obj_text(body, f"{stem}.png").encode())
    put(BODYTEX_NONSKIN, encode_png(body.nonskin))
    buf = io.BytesIO()
    np.save(buf, body.vertex_labels)
    put(BODYTEX_LABELS, buf.getvalue())
    put(PASTED, encode_png(_to_uint8(pasted)))
    put(LESION_IDS, encode_png(lesion_ids.astype(np.uint8)))
    import pandas as pd

    put(PLACEMENTS, pd.DataFrame(placements).to_csv(index=False).encode())
    put(BODY_DONE, json.dumps(record, indent=1).encode())


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def load_saved_body(out: str, body_id: str) -> tuple[Body, np.ndarray, dict]:
    """(body with its blended texture, lesion id mask, record) as ``save_body`` wrote them."""
    folder = body_dir(out, body_id)
    record = json.loads(storage.read_bytes(storage.join(folder, BODY_DONE)))
    with storage.local_copy(folder) as local:
        body = load_body(f"{local}/{BODYTEX_OBJ}", body_id, nonskin=f"{local}/{BODYTEX_NONSKIN}",
                         labels=f"{local}/{BODYTEX_LABELS}")
        from PIL import Image

        with Image.open(f"{local}/{LESION_IDS}") as img:
            lesion_ids = np.asarray(img.convert("L")).copy()
    body.skin_type, body.ita = record.get("skin_type"), record.get("ita")
    body.source = record.get("source", body.source)
    return body, lesion_ids, record


# ----------------------------------------------------------------------- preparing a body


class CropDrawer:
    """Draws lesion crops for one body: a random lesion of its split per call, decoded once."""

    def __init__(self, lesions: list[LesionSource], cfg: Synth3DConfig,
                 rng: np.random.Generator, rejected: Counter):
        self.lesions, self.cfg, self.rng, self.rejected = lesions, cfg, rng, rejected

    def __call__(self, max_side: int) -> LesionCrop:
        for _ in range(max(20, 2 * len(self.lesions))):
            source = self.lesions[int(self.rng.integers(len(self.lesions)))]
            try:
                return load_crop(source, max_side, self.cfg.paste.crop_pad,
                                 self.cfg.paste.colour_constancy_power, self.rng)
            except EmptyLesionMask:
                self.rejected["empty_mask"] += 1
        raise ValueError("the lesion manifest's masks are empty (every lesion drawn had no "
                         "lesion pixel): check its mask_uri files")


def make_body(cfg: Synth3DConfig, job: BodyJob) -> Body:
    if job.source is not None:
        return job.source.load()
    return procedural_body(job.body_id, seed=cfg.seed * 100_003 + job.index,
                           texture_size=cfg.bodies.texture_size, edge=cfg.bodies.edge,
                           skin_types=tuple(cfg.bodies.skin_types))


def prepare_body(cfg: Synth3DConfig, job: BodyJob, out: str, lesions: list[LesionSource],
                 result: BodyResult, features=None, progress=None) -> None:
    """Build the body, paste (and blend) its lesions and save it, unless already saved."""
    if storage.exists(storage.join(body_dir(out, job.body_id), BODY_DONE)):
        return
    device = resolve_device(cfg.device)
    started = time.perf_counter()
    body = make_body(cfg, job)
    scene = BodyScene(body, device, _backend(cfg, device))
    result.seconds["body"] = time.perf_counter() - started
    started = time.perf_counter()
    rng = np.random.default_rng([cfg.seed, job.index, 1])
    draw = CropDrawer(lesions_for_split(lesions, job.split), cfg, rng,
                      result.placement_rejections)
    placements: list[Placement] = []
    for lesion_id in range(1, cfg.paste.lesions_per_body + 1):
        with torch.no_grad():
            placed = place_lesion(scene, draw, lesion_id, cfg.paste, cfg.blend.method, rng,
                                  result.placement_rejections)
        if placed is not None:
            placements.append(placed)
    result.seconds["paste"] = time.perf_counter() - started
    pasted = scene.texture.detach().clone()
    losses: dict[int, tuple[float, float]] = {}
    if cfg.blend.method == "deep" and placements:
        from dermml.synth3d.blend import deep_blend
        from dermml.synth3d.features import feature_network

        started = time.perf_counter()
        features = features or feature_network(cfg.blend.vgg16_weights).to(device)
        losses = deep_blend(scene, placements, features, cfg.blend, cfg.paste.view_size,
                            np.random.default_rng([cfg.seed, job.index, 2]), progress)
        result.seconds["blend"] = time.perf_counter() - started
    rows = []
    for p in placements:
        row = p.record()
        if p.lesion_id in losses:
            row["blend_loss_first"], row["blend_loss_last"] = losses[p.lesion_id]
        rows.append(row)
    record = {"body_id": job.body_id, "source": body.source, "split": job.split,
              "skin_type": body.skin_type, "ita": body.ita, "params": body.params,
              "faces": len(body.faces), "texture_size": body.texture_size,
              "lesions": {str(p.lesion_id): p.sample_id for p in placements},
              "blend": cfg.blend.method,
              "blend_features": getattr(features, "name", None)}
    lesion_ids = scene.lesion_ids[..., 0].round().clamp(0, 255).cpu().numpy()
    save_body(out, body, scene.texture.detach().cpu().numpy(), pasted.cpu().numpy(),
              lesion_ids, record, rows)


def _backend(cfg: Synth3DConfig, device: torch.device) -> str:
    from dermml.synth3d.raster import resolve_backend

    return resolve_backend(cfg.backend, device)


# ----------------------------------------------------------------------- rendering views


def render_body_views(cfg: Synth3DConfig, job: BodyJob, out: str, result: BodyResult,
                      existing: set[str] | None = None, progress=None) -> None:
    """Render the job's views from the saved body; views in ``existing`` (ids) or already on
    storage are skipped."""
    from dermml.synth3d.views import render_view

    body, lesion_ids, record = load_saved_body(out, job.body_id)
    result.body = record
    device = resolve_device(cfg.device)
    scene = BodyScene(body, device, _backend(cfg, device))
    scene.lesion_ids = torch.from_numpy(lesion_ids.astype(np.float32))[..., None].to(device)
    ids_at_texels = lesion_ids[scene.texel_rows, scene.texel_cols]
    lesion_texels = [np.nonzero(ids_at_texels == int(k))[0] for k in record["lesions"]]
    lesion_texels = [t for t in lesion_texels if len(t)]
    backgrounds = Backgrounds(cfg.views.backgrounds)
    hopeless = not lesion_texels and cfg.views.min_lesion_pixels > 0
    started = time.perf_counter()
    for k in job.views:
        file_id = view_id(job.body_id, k)
        if (existing is not None and file_id in existing) or \
                storage.exists(storage.join(out, "params", f"{file_id}.json")):
            result.views_skipped += 1
            if progress is not None:
                progress(1)
            continue
        if hopeless:  # no lesion could be placed on this body: no view can show one
            result.views_failed += 1
            result.view_rejections["body_without_lesions"] += 1
            if progress is not None:
                progress(1)
            continue
        rng = np.random.default_rng([cfg.seed, job.index, 3, k])
        rendered = render_view(scene, cfg.views, backgrounds, rng, lesion_texels,
                               result.view_rejections)
        if rendered is None:
            result.views_failed += 1
        else:
            row = write_view(out, file_id, rendered, record)
            result.records.append(row)
        if progress is not None:
            progress(1)
    result.seconds["views"] = time.perf_counter() - started


def run_body(cfg: Synth3DConfig, job: BodyJob, out: str, lesions: list[LesionSource],
             existing: set[str] | None = None, progress=None) -> BodyResult:
    """Prepare (or reuse) one body and render its views."""
    result = BodyResult(job.body_id)
    prepare_body(cfg, job, out, lesions, result)
    render_body_views(cfg, job, out, result, existing, progress)
    return result
