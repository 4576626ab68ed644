"""DermSynth3D output folders (the reference tool's, or ``dermml synth3d``'s): images/<id>.png
with targets/<id>.npz (``masks``: H x W x 5 = lesion, skin, non-skin, anatomy, depth) and
data.csv (scene parameters, ``bodytex_id`` per ``file_id``).

Images are referenced, not copied. The lesion mask, anatomy map and depth map are channels of
the .npz, so they are written once as PNGs (``masks/``, ``anatomy/``, ``depth/`` as
``dermml synth3d`` writes them) into ``derived_root``: the folder of the manifest being written,
never the source. A folder of ``gen_*`` subfolders (one per mesh, as DermSynth3D's
``gen_data.py`` writes them) is read whole.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
from tqdm import tqdm

from dermml import storage
from dermml.data.images import encode_png
from dermml.data.importers.common import (
    READ_WORKERS,
    DatasetImportError,
    finish_rows,
    list_source,
    sample_row,
)
from dermml.synth3d.boxes import lesion_boxes

LAYOUT = ("images/<id>.png + targets/<id>.npz (+ data.csv), or gen_*/ folders holding them, "
          "as DermSynth3D's gen_data.py writes them")
DERIVED = "dermsynth3d"
DEPTH_SCALE = 10_000.0
"""Depth PNG units per scene unit (as dermml synth3d: 0.1 mm, 0 on background)."""


def _bodies(tree_files: set[str], root: str, folder: str) -> dict[str, str]:
    """file_id -> body id from ``folder``/data.csv, where it has one."""
    rel = f"{folder}/data.csv" if folder else "data.csv"
    if rel not in tree_files:
        return {}
    table = pd.read_csv(io.BytesIO(storage.read_bytes(storage.join(root, rel))), dtype=str)
    if "file_id" not in table or "bodytex_id" not in table:
        return {}
    return dict(zip(table["file_id"], table["bodytex_id"], strict=True))


def import_dermsynth3d(src: str, derived_root: str = "", progress: bool = False
                       ) -> pd.DataFrame:
    """One row per rendered view, with lesion mask, anatomy and depth PNGs, COCO lesion boxes
    and the body (``bodytex_id``; else the gen_* folder) as ``patient_id``."""
    tree = list_source("dermsynth3d", src, LAYOUT)
    if not derived_root:
        raise DatasetImportError("dermsynth3d: derived_root (the folder for the extracted "
                                 "masks) is required; `dermml data import` sets it")
    files = set(tree.files)
    targets = [rel for rel in tree.files if rel.endswith(".npz")
               and rel.rsplit("/", 2)[-2:-1] == ["targets"]]
    if not targets:
        raise DatasetImportError(f"dermsynth3d: no targets/*.npz under {tree.root} "
                                 f"(expected {LAYOUT})")
    bodies: dict[str, dict[str, str]] = {}
    jobs = []
    for rel in targets:
        folder = rel.rsplit("/", 2)[0] if rel.count("/") >= 2 else ""
        file_id = rel.rsplit("/", 1)[-1][:-4]
        image = f"{folder}/images/{file_id}.png" if folder else f"images/{file_id}.png"
        if folder not in bodies:
            bodies[folder] = _bodies(files, tree.root, folder)
        jobs.append((rel, folder, file_id, image if image in files else None))
    out_dir = storage.join(derived_root, DERIVED)

    def one(job):
        rel, folder, file_id, image = job
        sample_id = f"{folder}/{file_id}" if folder else file_id
        safe = sample_id.replace("/", "__")
        try:
            with np.load(io.BytesIO(storage.read_bytes(tree.uri(rel)))) as data:
                masks = np.asarray(data["masks"], dtype=np.float32)
        except Exception as exc:  # a truncated or foreign .npz: reported, not fatal
            return sample_row(sample_id, tree.uri(image) if image else tree.uri(rel),
                              source="dermsynth3d"), f"{tree.uri(rel)}: {exc}"
        if masks.ndim != 3 or masks.shape[-1] < 5:
            return sample_row(sample_id, tree.uri(image) if image else tree.uri(rel),
                              source="dermsynth3d"), \
                f"{tree.uri(rel)}: masks are {masks.shape}, expected H x W x 5"
        lesion = masks[..., 0] > 0.5
        depth = masks[..., 4]
        depth_png = np.where(depth > 0, np.clip(np.round(depth * DEPTH_SCALE), 1, 65535), 0)
        uris = {name: storage.join(out_dir, name, f"{safe}.png")
                for name in ("masks", "anatomy", "depth")}
        storage.write_bytes(uris["masks"], encode_png(lesion))
        storage.write_bytes(uris["anatomy"], encode_png(np.clip(masks[..., 3], 0, 255)
                                                        .astype(np.uint8)))
        storage.write_bytes(uris["depth"], encode_png(depth_png.astype(np.uint16)))
        boxes = lesion_boxes(lesion)
        body = bodies[folder].get(file_id) or folder or None
        row = sample_row(sample_id, tree.uri(image) if image else None,
                         mask_uri=uris["masks"], anatomy_uri=uris["anatomy"],
                         depth_uri=uris["depth"], patient_id=body, boxes=boxes,
                         box_labels=["lesion"] * len(boxes), source="dermsynth3d")
        return row, None

    with ThreadPoolExecutor(max_workers=READ_WORKERS) as pool:
        results = list(tqdm(pool.map(one, jobs), total=len(jobs), disable=not progress,
                            desc="dermsynth3d: extracting masks", unit="view"))
    problems = [p for _, p in results if p]
    rows = [r for r, p in results if not p]
    if not rows:
        raise DatasetImportError(f"dermsynth3d: no readable target under {tree.root}; "
                                 f"e.g. {problems[0]}")
    missing = [r["sample_id"] for r in rows if r["image_uri"] is None]
    if missing:
        raise DatasetImportError(f"dermsynth3d: {len(missing)} targets have no image "
                                 f"images/<id>.png beside them, e.g. {missing[0]}")
    if problems:
        import warnings

        warnings.warn(f"dermsynth3d: {len(problems)} unreadable targets left out, e.g. "
                      f"{problems[0]}", stacklevel=2)
    return finish_rows(rows, tree, "dermsynth3d", progress)
