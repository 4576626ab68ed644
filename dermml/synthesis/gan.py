"""Images from a registered generator: ``dermml generate gan``, ``dermml project gan`` and the
style-mixing grid, and the synthetic training data of ``--synthetic-per-class``.

Generation writes PNGs and a manifest (label = class, split = train, with the seed, truncation
and the model version in extra columns) that any task trains on through ``mix:``; rerunning on
the same folder skips the images already written.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
from tqdm import tqdm

from dermml import storage
from dermml.config import ConfigError
from dermml.data.images import encode_png, load_image
from dermml.data.manifest import MANIFEST_FILENAME, write_manifest
from dermml.orchestration import tracking

TASK = "gan"


@dataclass
class Generated:
    manifest_uri: str
    version: str
    n_images: int
    counts: dict[str, int]


def parse_seeds(text: str) -> list[int]:
    """``0-99``, ``1,5,9`` or ``0-3,10`` -> seeds; errors name the bad part."""
    seeds: list[int] = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        try:
            if "-" in part:
                low, high = (int(x) for x in part.split("-", 1))
                if high < low:
                    raise ValueError
                seeds.extend(range(low, high + 1))
            else:
                seeds.append(int(part))
        except ValueError:
            raise ConfigError(f"--seeds: {part!r} is not a seed or a range like 0-99") from None
    if not seeds:
        raise ConfigError("--seeds: no seeds given (e.g. 0-99 or 1,5,9)")
    return seeds


def parse_per_class(text: str) -> dict[str, int]:
    """``benign=100,melanoma=300`` -> {class: count}."""
    counts: dict[str, int] = {}
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        name, sep, value = part.partition("=")
        try:
            counts[name.strip()] = int(value)
            if not sep or counts[name.strip()] < 0:
                raise ValueError
        except ValueError:
            raise ConfigError(f"--synthetic-per-class: {part!r} is not CLASS=COUNT "
                              "(e.g. benign=100,melanoma=300)") from None
    return counts


def model_version(model_uri: str) -> str:
    """``name/version`` of a registered model URI (aliases resolved), else the URI itself."""
    from dermml.registry.gate import parse_model_uri

    parsed = parse_model_uri(model_uri)
    return f"{parsed[0]}/{parsed[1]}" if parsed else model_uri


def load_generator(model_uri: str):
    """The pyfunc model behind ``model_uri``; a model of another task is an error."""
    model = tracking.load_python_model(model_uri)
    if model.task.name != TASK:
        raise ConfigError(f"{model_uri} is a {model.task.name!r} model, not a GAN (task 'gan')")
    return model


def _class_names(model, classes: list[str] | None) -> list[str]:
    known = model.cfg.classes
    if not classes:
        return list(known)
    unknown = [c for c in classes if c not in known]
    if unknown:
        raise ConfigError(f"--class: {unknown} are not classes of this generator ({known})")
    return classes


def generate_dataset(model_uri: str, out: str, seeds: list[int] | None = None,
                     classes: list[str] | None = None, per_class: dict[str, int] | None = None,
                     truncation: float | None = None, first_seed: int = 0,
                     progress: bool = True) -> Generated:
    """Write images of ``model_uri`` under ``out`` and their manifest.

    Either ``seeds`` for each of ``classes`` (default: all classes), or ``per_class`` counts
    (seeds ``first_seed`` onwards, one range per class)."""
    model = load_generator(model_uri)
    version = model_version(model_uri)
    psi = model.cfg.serving.truncation if truncation is None else float(truncation)
    if per_class:
        _class_names(model, list(per_class))
        plan = [(c, first_seed + i) for c, n in per_class.items() for i in range(n)]
    else:
        plan = [(c, s) for c in _class_names(model, classes) for s in (seeds or [0])]
    rows, todo = [], []
    for name, seed in plan:
        relative = f"images/{_safe(name)}/seed{seed:08d}.png"
        mask = relative.replace("images/", "masks/") if model.cfg.gan.with_masks else None
        rows.append({"sample_id": f"gan-{_safe(name)}-{seed}", "image_uri": relative,
                     "mask_uri": mask,
                     "label": name, "split": "train", "source": f"gan:{version}",
                     "width": model.cfg.data.image_size, "height": model.cfg.data.image_size,
                     "seed": int(seed), "truncation": psi, "model_version": version})
        if not storage.exists(storage.join(out, relative)):
            todo.append((name, seed, relative, mask))
    batch = 16
    bar = tqdm(total=len(todo), desc="generating", unit="img", disable=not progress or None)
    for start in range(0, len(todo), batch):
        chunk = todo[start:start + batch]
        requests = [{"class": c, "seed": s, "truncation": psi} for c, s, _, _ in chunk]
        for (_, _, relative, mask), prediction in zip(chunk, model.task.predict(
                model.model, requests, model.cfg), strict=True):
            if mask is not None:  # before the image: an image on disk means "done"
                storage.write_bytes(storage.join(out, mask),
                                    encode_png(prediction["mask"].astype(np.uint8) * 255))
            storage.write_bytes(storage.join(out, relative), encode_png(prediction["image"]))
        bar.update(len(chunk))
    bar.close()
    df = pd.DataFrame(rows)
    manifest_uri = storage.join(out, MANIFEST_FILENAME)
    version_hash = write_manifest(df, manifest_uri)
    counts = df["label"].value_counts().to_dict()
    storage.write_bytes(storage.join(out, "generation.json"), json.dumps(
        {"model_uri": model_uri, "model_version": version, "truncation": psi,
         "counts": counts}, indent=2).encode())
    return Generated(manifest_uri, version_hash, len(df), counts)


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in str(name))


def style_mixing_grid(model_uri: str, row_seeds: list[int], col_seeds: list[int],
                      class_name: str | None = None, styles: list[int] | None = None,
                      truncation: float = 1.0) -> np.ndarray:
    """The reference's style-mixing figure (see ``models.gan_sampling.style_mix``)."""
    from dermml.models.gan_sampling import style_mix
    from dermml.visualization import image_grid

    model = load_generator(model_uri)
    name = class_name or model.cfg.classes[0]
    _class_names(model, [name])
    rows = style_mix(model.model.G_ema, row_seeds, col_seeds, model.cfg.classes.index(name),
                     styles, truncation)
    return image_grid([tile for row in rows for tile in row], columns=len(col_seeds) + 1)


def project_image(model_uri: str, image_uri: str, out: str, class_name: str | None = None,
                  steps: int = 1000, seed: int = 0, progress: bool = True) -> dict:
    """Project a real image into W; writes ``projected.png``, ``target.png``,
    ``projected_w.npy`` (num_ws x w_dim) and ``projection.json`` under ``out``."""
    from dermml.data.datasets import resize_image
    from dermml.models.gan_sampling import project

    model = load_generator(model_uri)
    name = class_name or model.cfg.classes[0]
    _class_names(model, [name])
    G = model.model.G_ema
    target = resize_image(load_image(image_uri), G.img_resolution)
    bar = tqdm(total=steps, desc="projecting", disable=not progress or None)

    def report(step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(dist=f"{loss:.4f}")

    try:
        w, image, losses = project(G, target, model.cfg.classes.index(name), steps, seed=seed,
                                   progress=report)
    finally:
        bar.close()
    buf = io.BytesIO()
    np.save(buf, w.numpy())
    storage.write_bytes(storage.join(out, "projected_w.npy"), buf.getvalue())
    storage.write_bytes(storage.join(out, "projected.png"), encode_png(image))
    storage.write_bytes(storage.join(out, "target.png"), encode_png(target))
    mse = float(np.mean((image.astype(float) - target.astype(float)) ** 2))
    summary = {"model_uri": model_uri, "image": image_uri, "class": name, "steps": steps,
               "final_distance": losses[-1] if losses else None, "pixel_mse": mse,
               "w_shape": list(w.shape)}
    storage.write_bytes(storage.join(out, "projection.json"),
                        json.dumps(summary, indent=2).encode())
    return summary


def synthetic_training_set(generator_uri: str, per_class: dict[str, int],
                           root: str = "", truncation: float | None = None) -> str:
    """The manifest of ``per_class`` images of ``generator_uri`` for training on real +
    synthetic (``--synthetic-per-class``): written once under
    ``root`` (default ``$DERMML_HOME/synthetic``) per model version and request, and reused."""
    import hashlib

    from dermml.config import dermml_home

    version = model_version(generator_uri)
    key = json.dumps({"v": version, "n": per_class, "psi": truncation}, sort_keys=True)
    folder = storage.join(root or str(dermml_home() / "synthetic"), "gan",
                          f"{_safe(version)}-{hashlib.sha256(key.encode()).hexdigest()[:10]}")
    return generate_dataset(generator_uri, folder, per_class=per_class,
                            truncation=truncation).manifest_uri


def per_class_like(manifest_uri: str, split: str = "train", column: str = "label"
                   ) -> dict[str, int]:
    """As many synthetic images per class as ``split`` of ``manifest_uri`` has real ones."""
    from dermml.data.manifest import read_manifest

    rows = read_manifest(manifest_uri).split(*split.split(","))
    counts = rows[column].dropna().astype(str).value_counts().sort_index()
    if counts.empty:
        raise ConfigError(f"{manifest_uri}: split {split} has no {column!r} values to match")
    return {str(k): int(v) for k, v in counts.items()}
