"""Class-conditional StyleGAN2-ADA (the ``gan`` task): trained on any labelled manifest,
measured by FID / KID / precision-recall, served as class + seed (+ truncation) -> PNG.

The networks (``models/stylegan2.py``), the loss (``losses/gan.py``), ADA (``data/ada.py``) and
the kimg-scheduled loop (``training/gan_loop.py``) are plain PyTorch; this module fills the
data-dependent settings (classes, the reference's ``auto`` values), builds the metric closure
(real features computed once, fakes per snapshot), and speaks the serving contract.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field
from torch import nn
from torch.utils.data import Dataset

from dermml.config import ConfigError, Section
from dermml.data.datasets import ClassificationDataset, SegmentationDataset
from dermml.data.images import encode_png, to_base64
from dermml.data.manifest import Manifest
from dermml.metrics.gan import GanMetricsConfig
from dermml.models.gan_sampling import generate
from dermml.models.stylegan2 import StyleGAN2, StyleGAN2Config
from dermml.tasks.base import Task, TaskConfig, register_task
from dermml.training.gan_loop import GanTrainConfig, auto_spec, fit_gan
from dermml.training.loop import FitResult, Hooks
from dermml.visualization import image_grid

UNCONDITIONAL = "all"
"""The one class name of an unconditional GAN's training set."""


class GanServingConfig(Section):
    """Generation settings of a request (defaults for rows that do not name their own)."""

    truncation: float = Field(1.0, ge=0.0, le=2.0)
    """Truncation psi: 1 = no truncation, smaller trades variety for typicality."""
    noise_mode: Literal["const", "random", "none"] = "const"
    """Per-layer noise: const (deterministic by seed), random, or none."""


class GanConfig(TaskConfig):
    task: str = "gan"
    model: StyleGAN2Config = StyleGAN2Config()
    gan: GanTrainConfig = GanTrainConfig()
    metrics: GanMetricsConfig = GanMetricsConfig()
    classes: list[str] = []
    """Class names in conditioning order; empty: the sorted classes of the training split."""
    class_probs: list[float] = []
    """Frequency of each class in the training split (generated classes are drawn from it)."""
    serving: GanServingConfig = GanServingConfig()


class ImageMaskDataset(Dataset):
    """(RGB + mask as a fourth channel, class index) of a segmentation dataset's rows."""

    def __init__(self, pairs: SegmentationDataset, labels: list[int]):
        self.pairs, self.labels = pairs, list(labels)

    def __len__(self) -> int:
        return len(self.pairs)

    def files(self, index: int) -> list[str]:
        return self.pairs.files(index)

    def load(self, index: int):
        image, mask = self.pairs.load(index)
        return np.concatenate([image, (mask[..., None] * 255).astype(np.uint8)], -1), \
            self.labels[index]

    def __getitem__(self, index: int):
        image, mask = self.pairs[index]
        return torch.cat([image, mask], 0), torch.tensor(self.labels[index])


def rgb_and_mask(images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Generated NHWC uint8 images split into RGB and (4-channel models) binary masks."""
    if images.shape[-1] == 4:
        return np.ascontiguousarray(images[..., :3]), images[..., 3] > 127
    return images, None


class Mirrored(Dataset):
    """``dataset`` followed by its horizontally flipped copy (the reference's --mirror)."""

    def __init__(self, dataset: ClassificationDataset):
        self.dataset = dataset
        self.labels = list(dataset.labels) * 2

    def __len__(self) -> int:
        return 2 * len(self.dataset)

    def files(self, index: int) -> list[str]:
        return self.dataset.files(index % len(self.dataset))

    def load(self, index: int):
        return self.dataset.load(index % len(self.dataset))

    def __getitem__(self, index: int):
        image, label = self.dataset[index % len(self.dataset)]
        return (image.flip(-1) if index >= len(self.dataset) else image), label


class GanTask(Task):
    name = "gan"
    config_cls = GanConfig
    gate_metric = "fid"
    gate_mode = "min"
    wrap_for_data_parallel = False
    scores_per_sample = False
    request_columns: ClassVar[list[tuple[str, str]]] = [("class", "string"), ("seed", "long"),
                                                         ("truncation", "double")]

    def __init__(self) -> None:
        self._extractors: dict[tuple, Any] = {}

    # --- data and settings ---------------------------------------------------------------
    def prepare(self, cfg: GanConfig, manifest: Manifest) -> GanConfig:
        resolution = cfg.data.image_size
        if resolution < 8 or resolution > 1024 or resolution & (resolution - 1):
            raise ConfigError(f"data.image_size: {resolution} px is not a power of two in "
                              "8..1024; StyleGAN2 doubles its resolution block by block "
                              "(e.g. 32, 64, 256)")
        train = manifest.split(*cfg.data.train_split.split(","))
        column = cfg.gan.class_column
        if cfg.gan.conditional:
            if column not in train or train[column].isna().all():
                raise ConfigError(f"gan.class_column: {manifest.uri} has no {column!r} values "
                                  f"in split {cfg.data.train_split}; name the column holding "
                                  "the class, or set gan.conditional=false")
            labels = train[column].dropna().astype(str)
            classes = cfg.classes or sorted(labels.unique().tolist())
            if len(classes) < 2:
                raise ConfigError(f"gan.conditional: {manifest.uri} split "
                                  f"{cfg.data.train_split} has one class ({classes}); a "
                                  "class-conditional GAN needs two or more: set "
                                  "gan.conditional=false, or train on more classes")
            unknown = sorted(set(labels) - set(classes))
            if unknown:
                raise ConfigError(f"classes: labels {unknown} of {manifest.uri} are not in "
                                  f"{classes}")
            probs = [float((labels == c).sum()) / len(labels) for c in classes]
        else:
            classes, probs = [UNCONDITIONAL], [1.0]
        update: dict[str, Any] = {"classes": classes, "class_probs": probs}
        gan, model, data = cfg.gan, cfg.model, cfg.data
        if gan.auto:
            spec = auto_spec(resolution, cfg.ray.num_workers)
            gan = gan.model_copy(update={"lr_g": spec["lr"], "lr_d": spec["lr"],
                                         "r1_gamma": spec["r1_gamma"],
                                         "ema_kimg": spec["ema_kimg"],
                                         "ema_rampup": spec["ema_rampup"]})
            model = model.model_copy(update={"channel_base": spec["channel_base"],
                                             "mapping_layers": spec["mapping_layers"],
                                             "mbstd_group": spec["mbstd_group"]})
            data = data.model_copy(update={"batch_size": spec["batch_per_worker"]})
        if not gan.r1_gamma:
            gan = gan.model_copy(update={"r1_gamma": 0.0002 * resolution ** 2
                                         / (data.batch_size * cfg.ray.num_workers)})
        ticks = max(1, math.ceil(gan.kimg / gan.tick_kimg))
        update.update({"gan": gan, "model": model, "data": data,
                       "train": cfg.train.model_copy(update={"epochs": ticks})})
        return cfg.model_copy(update=update)

    def num_classes(self, cfg: GanConfig) -> int:
        return len(cfg.classes) if cfg.gan.conditional else 0

    def build_model(self, cfg: GanConfig) -> nn.Module:
        if not cfg.classes:
            raise ValueError("classes are unknown: call prepare() with the training manifest")
        return StyleGAN2(cfg.model, cfg.data.image_size, self.num_classes(cfg),
                         img_channels=4 if cfg.gan.with_masks else 3)

    def check_input_size(self, model: nn.Module, cfg: TaskConfig) -> None:
        return None  # prepare() checked the resolution

    def dataset(self, cfg: GanConfig, manifest: Manifest, rows: pd.DataFrame, train: bool):
        rows = rows.copy()
        if cfg.gan.conditional:
            rows["label"] = rows[cfg.gan.class_column].astype(str)
        else:
            rows["label"] = UNCONDITIONAL
        ds = ClassificationDataset(manifest, rows, cfg.data.image_size, cfg.classes)
        if cfg.gan.with_masks:
            ds = ImageMaskDataset(SegmentationDataset(manifest, rows, cfg.data.image_size),
                                  ds.labels)
        return Mirrored(ds) if train and cfg.gan.mirror else ds

    def loss_step(self, cfg: GanConfig):
        raise NotImplementedError("the GAN trains in its own loop (GanTask.fit)")

    def validate(self, model, loader, device, cfg=None) -> dict[str, float]:
        return {}

    # --- training --------------------------------------------------------------------------
    def fit(self, cfg: GanConfig, model: nn.Module, train_loader: Iterable,
            val_loader: Iterable, device: torch.device, hooks: Hooks, checkpointer: Any,
            progress: bool = False) -> FitResult:
        model = model.module if hasattr(model, "module") else model
        meter = self.meter(cfg, train_loader.dataset, device)
        if hooks is not None and hooks.on_tags is not None:  # every FID names its extractor
            hooks.on_tags({"dermml.gan.extractor": meter.extractor.name,
                           "dermml.gan.extractor_digest": meter.extractor.digest})
        return fit_gan(model, train_loader, cfg.gan, self.num_classes(cfg), cfg.class_probs,
                       device, seed=cfg.train.seed, evaluate=meter,
                       grid=lambda G: self.grid(G, cfg), gate_metric=self.gate_metric,
                       gate_mode=self.gate_mode, snapshot_ticks=cfg.metrics.every_ticks,
                       hooks=hooks, checkpointer=checkpointer, progress=progress)

    def extractor(self, cfg: GanConfig):
        """The feature extractor of ``cfg.metrics`` (a registry model is loaded here), built
        once per process and settings."""
        key = (cfg.metrics.extractor, cfg.metrics.inception_weights,
               cfg.metrics.extractor_model)
        if key not in self._extractors:
            self._extractors[key] = self._build_extractor(cfg)
        return self._extractors[key]

    def evaluation_tags(self, cfg: GanConfig) -> dict[str, str]:
        extractor = self.extractor(cfg)
        return {"dermml.gan.extractor": extractor.name,
                "dermml.gan.extractor_digest": extractor.digest}

    def _build_extractor(self, cfg: GanConfig):
        from dermml.metrics.gan import build_extractor

        model = None
        if cfg.metrics.extractor == "model":
            if not cfg.metrics.extractor_model:
                raise ConfigError("metrics.extractor_model: give the model URI whose features "
                                  "the metrics use (e.g. models:/dermml-classification@champion)")
            from dermml.orchestration import tracking  # the registry, only when asked for

            model = tracking.load_python_model(cfg.metrics.extractor_model).model
        return build_extractor(cfg.metrics.extractor, weights=cfg.metrics.inception_weights,
                               model=model)

    def meter(self, cfg: GanConfig, reals: Dataset, device: torch.device):
        """``f(G, device) -> {fid, kid, precision, recall}`` against up to
        ``metrics.num_real`` images of ``reals`` (their features computed once)."""
        extractor = self.extractor(cfg)
        cache: dict[str, np.ndarray] = {}

        def measure(G: nn.Module, device: torch.device) -> dict[str, float]:
            from dermml.metrics.gan import extract_features

            if "real" not in cache:
                n = len(reals) if not cfg.metrics.num_real else min(len(reals),
                                                                     cfg.metrics.num_real)
                picked = np.random.default_rng(cfg.metrics.seed).permutation(len(reals))[:n]
                images = ((reals[int(i)][0][:3] * 255).round().to(torch.uint8)
                          for i in picked)
                cache["real"] = extract_features(extractor, images, cfg.metrics.batch_size,
                                                 device)
            return self.compare(G, cache["real"], cfg, device, truncation=1.0,
                                noise_mode="random")

        measure.extractor = extractor
        return measure

    def compare(self, G: nn.Module, real: np.ndarray, cfg: GanConfig, device: torch.device,
                truncation: float, noise_mode: str) -> dict[str, float]:
        """Metrics of ``metrics.num_fake`` images of ``G`` (classes drawn as in training)
        against the ``real`` features."""
        from dermml.metrics.gan import extract_features, gan_metrics

        extractor = self.extractor(cfg)
        n = cfg.metrics.num_fake or len(real)
        rng = np.random.default_rng(cfg.metrics.seed + 1)
        probs = np.asarray(cfg.class_probs, dtype=float)
        classes = rng.choice(len(probs), size=n, p=probs / probs.sum()).tolist()
        seeds = rng.integers(0, 2**31 - 1, size=n).tolist()
        step = cfg.metrics.batch_size

        def fakes():
            for start in range(0, n, step):
                yield rgb_and_mask(generate(G, classes[start:start + step] if G.c_dim else
                                            [0] * len(seeds[start:start + step]),
                                            seeds[start:start + step], truncation,
                                            noise_mode))[0]

        fake = extract_features(extractor, fakes(), step, device)
        return gan_metrics(real, fake, kid_subsets=cfg.metrics.kid_subsets,
                           kid_subset_size=cfg.metrics.kid_subset_size, pr_k=cfg.metrics.pr_k,
                           seed=cfg.metrics.seed, device=device)

    def grid(self, G: nn.Module, cfg: GanConfig, seeds: list[int] | None = None,
             truncation: float = 1.0) -> np.ndarray:
        """Fixed seeds, one row per class: the same grid at every snapshot."""
        seeds = seeds or list(range(cfg.gan.grid_seeds))
        rows = range(len(cfg.classes)) if G.c_dim else [0]
        classes = [c for c in rows for _ in seeds]
        rgb, masks = rgb_and_mask(generate(G, classes, seeds * len(rows), truncation, "const"))
        tiles = list(rgb)
        if masks is not None:  # each row of images followed by its row of masks
            tiles = [t for r in range(len(rows)) for t in (
                list(rgb[r * len(seeds):(r + 1) * len(seeds)])
                + list(masks[r * len(seeds):(r + 1) * len(seeds)]))]
        return image_grid(tiles, columns=len(seeds))

    # --- serving ---------------------------------------------------------------------------
    def serving_state(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """The logged model keeps G_ema only (what generates); D and G stay in checkpoints."""
        return {k: v for k, v in state_dict.items() if k.startswith("G_ema.")}

    def load_serving_state(self, model: nn.Module, state_dict: dict[str, Any]) -> None:
        missing = model.load_state_dict(state_dict, strict=False).missing_keys
        lacking = [k for k in missing if k.startswith("G_ema.")]
        if lacking:
            raise ValueError(f"the model bundle lacks G_ema weights {lacking[:3]}")

    def decode_request(self, frame: pd.DataFrame, cfg: GanConfig) -> list[dict[str, Any]]:
        """Request rows -> generation requests; ValueError names the row and what is wrong."""
        if "class" not in frame or "seed" not in frame:
            raise ValueError("input must have columns 'class' (one of the model's classes: "
                             f"{cfg.classes}) and 'seed' (an integer); 'truncation' optional")
        rows = []
        for i, record in enumerate(frame.to_dict(orient="records")):
            name = record["class"]
            name = cfg.classes[0] if (name is None or name == "") and not cfg.gan.conditional \
                else str(name)
            if name not in cfg.classes:
                raise ValueError(f"row {i}: class {name!r} is not one of {cfg.classes}")
            try:
                seed = int(record["seed"])
            except (TypeError, ValueError):
                raise ValueError(f"row {i}: seed {record['seed']!r} is not an integer") from None
            if not 0 <= seed < 2**32:
                raise ValueError(f"row {i}: seed {seed} is outside [0, 2^32)")
            psi = record.get("truncation")
            if psi is not None and not (isinstance(psi, float) and math.isnan(psi)):
                psi = float(psi)
                if not 0.0 <= psi <= 2.0:
                    raise ValueError(f"row {i}: truncation {psi} is outside [0, 2]")
            else:
                psi = None
            rows.append({"class": name, "seed": seed, "truncation": psi})
        return rows

    def request_example(self, cfg: GanConfig) -> pd.DataFrame:
        return pd.DataFrame({"class": [cfg.classes[0]], "seed": [0], "truncation": [1.0]})

    @torch.no_grad()
    def predict(self, model, inputs: list[dict[str, Any]], cfg: GanConfig) -> list[dict]:
        G = model.G_ema.eval()
        index = {c: i for i, c in enumerate(cfg.classes)}
        psis = [r["truncation"] if r["truncation"] is not None else cfg.serving.truncation
                for r in inputs]
        images = generate(G, [index[r["class"]] for r in inputs], [r["seed"] for r in inputs],
                          psis, cfg.serving.noise_mode)
        rgb, masks = rgb_and_mask(images)
        return [{"image": img, "mask": None if masks is None else masks[i], "class": r["class"],
                 "seed": r["seed"], "truncation": psi}
                for i, (img, r, psi) in enumerate(zip(rgb, inputs, psis, strict=True))]

    def encode_predictions(self, predictions: list[dict]) -> pd.DataFrame:
        return pd.DataFrame({"image": [to_base64(encode_png(p["image"])) for p in predictions],
                             "mask": [to_base64(encode_png(p["mask"].astype(np.uint8) * 255))
                                      if p.get("mask") is not None else ""
                                      for p in predictions],
                             "class": [p["class"] for p in predictions],
                             "seed": [int(p["seed"]) for p in predictions],
                             "truncation": [float(p["truncation"]) for p in predictions]})

    def response_schema(self) -> list[tuple[str, str]]:
        return [("image", "string"), ("mask", "string"), ("class", "string"),
                ("seed", "long"), ("truncation", "double")]

    # --- evaluation ------------------------------------------------------------------------
    def evaluate_set(self, model, images: list[np.ndarray], cfg: GanConfig,
                     device: torch.device) -> dict[str, float]:
        """FID, KID, precision and recall of ``model``'s G_ema against ``images`` (resized to
        the generator's resolution), generated with the serving settings."""
        from dermml.data.datasets import resize_image
        from dermml.metrics.gan import extract_features

        extractor = self.extractor(cfg)
        real = extract_features(extractor, (resize_image(img, cfg.data.image_size)
                                            for img in images), cfg.metrics.batch_size, device)
        G = model.G_ema.eval()
        values = self.compare(G, real, cfg, device, cfg.serving.truncation,
                              cfg.serving.noise_mode)
        return {**values, "num_real": float(len(images)),
                "num_fake": float(cfg.metrics.num_fake or len(images))}

    def score(self, predictions, rows: pd.DataFrame, manifest: Manifest) -> pd.DataFrame:
        raise NotImplementedError("a GAN is scored as a set (GanTask.evaluate_set)")

    def aggregate(self, per_sample: pd.DataFrame) -> dict[str, float]:
        raise NotImplementedError("a GAN is scored as a set (GanTask.evaluate_set)")

    def preview(self, model: nn.Module, dataset: Dataset, cfg: GanConfig,
                n: int = 8) -> np.ndarray:
        return self.grid(model.G_ema.eval(), cfg, list(range(n)))


register_task(GanTask())
