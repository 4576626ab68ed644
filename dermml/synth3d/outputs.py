"""What a synthesis run writes: DermSynth3D's folders plus a DermML manifest.

Per view ``<id>``: ``images/<id>.png``; ``targets/<id>.npz`` (``masks``: H x W x 5 float32 —
lesion, skin, non-skin, anatomy id, depth with -1 on background), as DermSynth3D writes them; and
for DermML ``masks/<id>.png`` (lesion, 0/255), ``anatomy/<id>.png`` (uint8 label ids 0..16) and
``depth/<id>.png`` (uint16, depth x 10,000, i.e. 0.1 mm units; 0 on background).
``params/<id>.json`` holds the view's scene parameters and is written last: a view is complete
exactly when it exists. At the end ``data.csv`` (every scene parameter, one row per view) and
``manifest.parquet`` are written from the params files.
"""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pandas as pd

from dermml import storage
from dermml.data.images import encode_png
from dermml.data.manifest import MANIFEST_FILENAME, write_manifest
from dermml.synth3d.boxes import lesion_boxes
from dermml.synth3d.views import ANATOMY, DEPTH, LESION, RenderedView

DEPTH_SCALE = 10_000.0
"""depth PNG value per scene unit (metre): 0.1 mm steps, up to 6.5 m."""
SOURCE = "synth3d"


def depth_png(depth: np.ndarray) -> bytes:
    scaled = np.where(depth > 0, np.clip(np.round(depth * DEPTH_SCALE), 1, 65535), 0)
    return encode_png(scaled.astype(np.uint16))


def write_view(out: str, file_id: str, view: RenderedView, body: dict) -> dict:
    """Write one view's files (params last) and return its row."""
    target = view.target
    image_png = encode_png(view.image)
    buf = io.BytesIO()
    np.savez_compressed(buf, masks=target)
    lesion = target[..., LESION] > 0.5
    files = {"image_uri": f"images/{file_id}.png", "target_uri": f"targets/{file_id}.npz",
             "mask_uri": f"masks/{file_id}.png", "anatomy_uri": f"anatomy/{file_id}.png",
             "depth_uri": f"depth/{file_id}.png"}
    storage.write_bytes(storage.join(out, files["image_uri"]), image_png)
    storage.write_bytes(storage.join(out, files["target_uri"]), buf.getvalue())
    storage.write_bytes(storage.join(out, files["mask_uri"]), encode_png(lesion))
    storage.write_bytes(storage.join(out, files["anatomy_uri"]),
                        encode_png(target[..., ANATOMY].astype(np.uint8)))
    storage.write_bytes(storage.join(out, files["depth_uri"]), depth_png(target[..., DEPTH]))
    lesions = body.get("lesions", {})
    row = {"file_id": file_id, "bodytex_id": body["body_id"], "split": body.get("split"),
           "skin_type": body.get("skin_type"), "ita": body.get("ita"), **view.params,
           "paste_lesion_id": None,
           "source_lesions": [lesions.get(str(i)) for i in view.params["lesion_mask_ids"]],
           "boxes": lesion_boxes(lesion), "width": int(view.image.shape[1]),
           "height": int(view.image.shape[0]),
           "sha256": hashlib.sha256(image_png).hexdigest(), **files}
    storage.write_bytes(storage.join(out, "params", f"{file_id}.json"),
                        json.dumps(row).encode())
    return row


def read_records(out: str) -> list[dict]:
    """Rows of every complete view under ``out`` (sorted by id)."""
    uris = storage.list_files(storage.join(out, "params"), (".json",))
    return [json.loads(storage.read_bytes(u)) for u in uris]


def manifest_frame(records: list[dict]) -> pd.DataFrame:
    """Manifest rows: lesion mask, anatomy and depth files, COCO boxes, the body as
    ``patient_id`` (the group that stays in one split) and its skin type as ``skin_type``."""
    rows = []
    for r in records:
        rows.append({"sample_id": r["file_id"], "image_uri": r["image_uri"],
                     "mask_uri": r["mask_uri"], "anatomy_uri": r["anatomy_uri"],
                     "depth_uri": r["depth_uri"], "split": r.get("split"),
                     "patient_id": r["bodytex_id"], "source": SOURCE, "width": r["width"],
                     "height": r["height"], "sha256": r["sha256"], "boxes": r["boxes"],
                     "box_labels": ["lesion"] * len(r["boxes"]), "body_id": r["bodytex_id"],
                     "skin_type": r.get("skin_type") or "",
                     "ita": float(r["ita"]) if r.get("ita") is not None else float("nan"),
                     "target_uri": r["target_uri"],
                     "source_lesions": ",".join(s for s in r["source_lesions"] if s)})
    return pd.DataFrame(rows)


def scene_table(records: list[dict]) -> pd.DataFrame:
    """data.csv: DermSynth3D's scene parameters (and ours), one row per view."""
    drop = ("image_uri", "target_uri", "mask_uri", "anatomy_uri", "depth_uri", "boxes", "sha256")
    table = pd.DataFrame([{k: v for k, v in r.items() if k not in drop} for r in records])
    for column in table.columns:
        if table[column].map(lambda v: isinstance(v, list)).any():
            table[column] = table[column].map(json.dumps)
    return table


def write_dataset(out: str) -> tuple[str, str, int]:
    """data.csv and manifest.parquet from every complete view; (manifest URI, version, n)."""
    records = read_records(out)
    if not records:
        raise ValueError(f"{out}: no complete view to list (every view was rejected?)")
    storage.write_bytes(storage.join(out, "data.csv"),
                        scene_table(records).to_csv(index=False).encode())
    uri = storage.join(out, MANIFEST_FILENAME)
    version = write_manifest(manifest_frame(records), uri)
    return uri, version, len(records)
