"""Per-sample facts and the checks over them: which file is bad, and why.

Facts are computed in parallel processes and streamed, so memory stays bounded by the number of
rows, not by image sizes.
"""

from __future__ import annotations

import hashlib
import io
import json
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dermml import storage
from dermml.data.manifest import Manifest


@dataclass
class SampleFacts:
    sample_id: str
    split: str | None
    label: str | None
    image_uri: str
    mask_uri: str | None
    image_ok: bool = False
    image_error: str = ""
    width: int | None = None
    height: int | None = None
    mode: str | None = None
    format: str | None = None
    sha256: str | None = None
    mask_ok: bool | None = None
    mask_error: str = ""
    mask_width: int | None = None
    mask_height: int | None = None
    mask_binary: bool | None = None
    lesion_fraction: float | None = None


def _open(uri: str) -> tuple[Image.Image, bytes]:
    data = storage.read_bytes(uri)
    if not data:
        raise ValueError("file is empty (0 bytes)")
    img = Image.open(io.BytesIO(data))
    img.load()  # a truncated file fails here, not at open()
    return ImageOps.exif_transpose(img), data


def sample_facts(row: dict) -> SampleFacts:
    """Facts of one manifest row (URIs already resolved)."""
    facts = SampleFacts(row["sample_id"], row.get("split"), row.get("label"), row["image_uri"],
                        row.get("mask_uri"))
    try:
        img, data = _open(row["image_uri"])
        facts.image_ok = True
        facts.width, facts.height = img.size
        facts.mode, facts.format = img.mode, img.format
        facts.sha256 = hashlib.sha256(data).hexdigest()
    except (storage.StorageError, UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        facts.image_error = _reason(exc)
    if row.get("mask_uri"):
        try:
            mask, _ = _open(row["mask_uri"])
            facts.mask_ok = True
            facts.mask_width, facts.mask_height = mask.size
            values = np.asarray(mask.convert("L"))
            facts.mask_binary = bool(np.isin(values, (0, 255)).all()) and mask.mode in ("L", "1",
                                                                                         "P")
            facts.lesion_fraction = float((values > 127).mean())
        except (storage.StorageError, UnidentifiedImageError, OSError, ValueError,
                SyntaxError) as exc:
            facts.mask_ok = False
            facts.mask_error = _reason(exc)
    return facts


def _reason(exc: Exception) -> str:
    text = str(exc)
    if isinstance(exc, UnidentifiedImageError):
        return "not a decodable image"
    if "truncated" in text.lower():
        return "truncated image file"
    return text


@dataclass
class Problem:
    sample_id: str
    file: str
    check: str
    reason: str


@dataclass
class ValidationReport:
    manifest_uri: str
    dataset_version: str
    n_samples: int
    problems: list[Problem] = field(default_factory=list)
    split_counts: dict[str, int] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.problems

    @property
    def quarantine(self) -> list[str]:
        return sorted({p.sample_id for p in self.problems if p.sample_id})

    def to_json(self) -> str:
        data = asdict(self)
        data["passed"] = self.passed
        data["quarantine"] = self.quarantine
        return json.dumps(data, indent=2)

    def summary(self, limit: int = 20) -> str:
        head = (f"{self.manifest_uri}: {self.n_samples} samples, "
                f"{'PASSED' if self.passed else f'FAILED ({len(self.problems)} problems)'}")
        lines = [head] + [f"  {p.sample_id or '-'} [{p.check}] {p.file}: {p.reason}"
                          for p in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"  ... and {len(self.problems) - limit} more (see the JSON report)")
        return "\n".join(lines)


def check_sample(facts: SampleFacts, require_mask: bool) -> list[Problem]:
    out = []
    if not facts.image_ok:
        out.append(Problem(facts.sample_id, facts.image_uri, "image_decodable", facts.image_error))
    if require_mask and not facts.mask_uri:
        out.append(Problem(facts.sample_id, facts.image_uri, "mask_present",
                           "no mask_uri for this sample (missing mask file?)"))
    elif facts.mask_ok is False:
        out.append(Problem(facts.sample_id, facts.mask_uri or "", "mask_decodable",
                           facts.mask_error))
    elif facts.mask_ok and facts.image_ok:
        if (facts.mask_width, facts.mask_height) != (facts.width, facts.height):
            out.append(Problem(facts.sample_id, facts.mask_uri or "", "mask_size_matches_image",
                               f"mask is {facts.mask_width}x{facts.mask_height} but image "
                               f"{facts.image_uri} is {facts.width}x{facts.height}"))
        if not facts.mask_binary:
            out.append(Problem(facts.sample_id, facts.mask_uri or "", "mask_binary",
                               "mask has values other than 0 and 255 (soft or RGB mask)"))
    return out


def collect_facts(manifest: Manifest, processes: int = 2, progress: bool = False):
    """Facts of every row, computed in ``processes`` worker processes, in manifest order."""
    rows = [{"sample_id": r.sample_id, "split": r.split, "label": r.label,
             "image_uri": manifest.resolve(r.image_uri), "mask_uri": manifest.resolve(r.mask_uri)}
            for r in manifest.df.itertuples()]
    if processes <= 1 or len(rows) < 64:
        iterator = map(sample_facts, rows)
        yield from _with_progress(iterator, len(rows), progress)
        return
    with ProcessPoolExecutor(processes) as pool:
        iterator = pool.map(sample_facts, rows, chunksize=32)
        yield from _with_progress(iterator, len(rows), progress)


def _with_progress(iterator, total: int, enabled: bool):
    if not enabled:
        return iterator
    from tqdm.auto import tqdm

    return tqdm(iterator, total=total, desc="validating", unit="img")


def validate_manifest(manifest: Manifest, require_mask: bool = True,
                      required_splits: tuple[str, ...] = (), processes: int = 2,
                      progress: bool = False) -> tuple[ValidationReport, list[SampleFacts]]:
    report = ValidationReport(manifest.uri, manifest.version, len(manifest.df))
    report.split_counts = {str(k): int(v) for k, v in
                           manifest.df["split"].fillna("-").value_counts().items()}
    facts = []
    for f in collect_facts(manifest, processes, progress):
        facts.append(f)
        report.problems.extend(check_sample(f, require_mask))
    for split in required_splits:
        if report.split_counts.get(split, 0) == 0:
            report.problems.append(Problem("", manifest.uri, "split_not_empty",
                                           f"split {split!r} has no samples"))
    return report, facts
