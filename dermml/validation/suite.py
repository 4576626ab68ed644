"""Validation suites: YAML files of rules with thresholds, and the expectations each rule makes.

A suite file (``configs/validation/<name>.yaml``, or any path) maps rule names to their
parameters; a rule listed there is on, a rule left out is off. ``--set rule.param=value``
overrides a threshold (and turns the rule on). Every rule becomes one or more great-expectations
expectations over one of three tables: ``samples`` (manifest + per-sample facts + rule columns),
``classes`` (samples per split and label) and ``drift`` (per-feature drift statistics).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from dermml.config import ConfigError, Section, configs_dirs, load_config, read_yaml_mapping
from dermml.data.phash import NEAR_DUPLICATE_HAMMING


def suites_dirs() -> list[Path]:
    """Where shipped suites are looked up by name (``configs/validation`` of ``configs_dirs``)."""
    return [d / "validation" for d in configs_dirs()]


Severity = Literal["error", "warning"]
GX_SEVERITY = {"error": "critical", "warning": "warning"}


@dataclass(frozen=True)
class ExpectationSpec:
    """One expectation a rule makes, plus how to word its failures for people."""

    name: str
    """Unique name in the report, e.g. ``mask_binary`` or ``not_null.label``."""
    rule: str
    table: str
    """``samples``, ``classes`` or ``drift``."""
    type: str
    """great-expectations class, e.g. ``ExpectColumnValuesToBeInSet``."""
    kwargs: dict[str, Any]
    severity: Severity
    description: str
    file_column: str | None = "image_uri"
    """Column of the failing row that names the file to report (None: dataset-level)."""
    explain: Callable[[dict], str] | None = None
    """Reason for one failing row (the row of ``table`` as a dict)."""
    explain_result: Callable[[dict], list[str]] | None = None
    """Reasons for a failing table-level expectation, from its great-expectations result."""


# --------------------------------------------------------------------------- rules


class Rule(Section):
    """Common parameters of every rule."""

    enabled: bool = False
    """On when the rule is listed in the suite file (or a --set names it)."""
    severity: Severity = "error"
    """``error`` fails validation and quarantines the samples; ``warning`` only reports."""
    mostly: float = Field(1.0, ge=0.0, le=1.0)
    """Fraction of rows that must pass (per-sample rules only)."""

    table: ClassVar[str] = "samples"

    def specs(self, name: str) -> list[ExpectationSpec]:
        raise NotImplementedError

    def _spec(self, name: str, rule: str, type_: str, kwargs: dict, **extra) -> ExpectationSpec:
        per_row = type_.startswith("ExpectColumnValues") and self.table == "samples"
        if per_row and self.mostly < 1.0:
            kwargs = {**kwargs, "mostly": self.mostly}
        doc = (type(self).__doc__ or "").strip().splitlines()[0]
        return ExpectationSpec(name=name, rule=rule, table=self.table, type=type_, kwargs=kwargs,
                               severity=self.severity, description=doc, **extra)

    def _flag(self, name: str, column: str, ok: Any, explain: Callable[[dict], str],
              file_column: str | None = "image_uri") -> list[ExpectationSpec]:
        """Rows whose ``column`` is not ``ok`` fail (missing values are not judged)."""
        return [self._spec(name, name, "ExpectColumnValuesToBeInSet",
                           {"column": column, "value_set": [ok]}, explain=explain,
                           file_column=file_column)]


class RequiredColumns(Rule):
    """Columns the manifest must have."""

    columns: list[str] = ["sample_id", "image_uri", "split"]

    # Checked against the file's own columns: reading fills the schema's missing ones with nulls.
    table: ClassVar[str] = "file"

    def specs(self, name):
        return [self._spec(f"{name}.{c}", name, "ExpectColumnToExist", {"column": c},
                           file_column=None,
                           explain_result=lambda r, c=c: [f"the manifest has no column {c!r}"])
                for c in self.columns]


class NotNull(Rule):
    """Columns every row must fill."""

    columns: list[str] = ["sample_id", "image_uri", "split"]

    def specs(self, name):
        return [self._spec(f"{name}.{c}", name, "ExpectColumnValuesToNotBeNull", {"column": c},
                           explain=lambda row, c=c: f"no {c} for this sample")
                for c in self.columns]


class UniqueSampleIds(Rule):
    """No sample_id appears twice."""

    def specs(self, name):
        return [self._spec(name, name, "ExpectColumnValuesToBeUnique", {"column": "sample_id"},
                           explain=lambda row: "sample_id appears more than once in the "
                                               "manifest")]


class RowCount(Rule):
    """The manifest holds between min and max rows."""

    min: int = 1
    max: int | None = None

    def specs(self, name):
        def explain(result: dict) -> list[str]:
            return [f"the manifest has {result.get('observed_value')} rows; expected at least "
                    f"{self.min}" + (f" and at most {self.max}" if self.max else "")]

        return [self._spec(name, name, "ExpectTableRowCountToBeBetween",
                           {"min_value": self.min, "max_value": self.max}, file_column=None,
                           explain_result=explain)]


class LabelsAllowed(Rule):
    """Labels come from a known vocabulary (missing labels are left to not_null)."""

    labels: list[str] = []

    def specs(self, name):
        if not self.labels:
            return []
        shown = ", ".join(self.labels[:12]) + (", ..." if len(self.labels) > 12 else "")

        def explain(row: dict) -> str:
            return (f"label {row['label']!r} is not a known label ({shown}); fix the label or "
                    f"add it to {name}.labels in the suite")

        return [self._spec(name, name, "ExpectColumnValuesToBeInSet",
                           {"column": "label", "value_set": list(self.labels)}, explain=explain)]


class SplitsAllowed(Rule):
    """Splits come from a known list; its order ranks splits for leakage (earlier wins)."""

    splits: list[str] = ["train", "val", "test"]

    def specs(self, name):
        def explain(row: dict) -> str:
            return f"split {row['split']!r} is not one of {', '.join(self.splits)}"

        return [self._spec(name, name, "ExpectColumnValuesToBeInSet",
                           {"column": "split", "value_set": list(self.splits)}, explain=explain)]


class SplitNotEmpty(Rule):
    """Each of these splits has samples."""

    splits: list[str] = []

    def specs(self, name):
        if not self.splits:
            return []

        def explain(result: dict) -> list[str]:
            seen = set(result.get("observed_value") or [])
            return [f"split {s!r} has no samples" for s in self.splits if s not in seen]

        return [self._spec(name, name, "ExpectColumnDistinctValuesToContainSet",
                           {"column": "split", "value_set": list(self.splits)}, file_column=None,
                           explain_result=explain)]


class ImageDecodable(Rule):
    """The image file exists, is not empty and decodes completely."""

    def specs(self, name):
        return self._flag(name, "image_ok", True, lambda row: row["image_error"])


class ImageSize(Rule):
    """Image width and height are within bounds (pixels)."""

    min: int = 16
    max: int = 20000

    def specs(self, name):
        def explain(row: dict) -> str:
            return (f"image is {row['width']}x{row['height']}; width and height must be in "
                    f"[{self.min}, {self.max}]")

        return [self._spec(f"{name}.{c}", name, "ExpectColumnValuesToBeBetween",
                           {"column": c, "min_value": self.min, "max_value": self.max},
                           explain=explain) for c in ("width", "height")]


class ImageChannels(Rule):
    """Images have the expected number of channels (3 = RGB)."""

    allowed: list[int] = [3]

    def specs(self, name):
        def explain(row: dict) -> str:
            return f"image has {row['channels']} channels (mode {row['mode']}); expected " + \
                " or ".join(map(str, self.allowed))

        return [self._spec(name, name, "ExpectColumnValuesToBeInSet",
                           {"column": "channels", "value_set": list(self.allowed)},
                           explain=explain)]


class ImageFormat(Rule):
    """Images are stored in one of the expected file formats."""

    allowed: list[str] = ["PNG", "JPEG", "BMP", "TIFF"]

    def specs(self, name):
        def explain(row: dict) -> str:
            return f"image is stored as {row['format']}; expected {', '.join(self.allowed)}"

        return [self._spec(name, name, "ExpectColumnValuesToBeInSet",
                           {"column": "format", "value_set": list(self.allowed)},
                           explain=explain)]


class ExifOrientation(Rule):
    """Images are stored upright (EXIF orientation 1 or none)."""

    allowed: list[int] = [1]

    def specs(self, name):
        def explain(row: dict) -> str:
            return (f"EXIF orientation {row['exif_orientation']}: the pixels are stored rotated "
                    "and the loader turns them upright; its mask must match the upright image")

        return [self._spec(name, name, "ExpectColumnValuesToBeInSet",
                           {"column": "exif_orientation", "value_set": list(self.allowed)},
                           explain=explain)]


class MaskPresent(Rule):
    """Every sample has a lesion mask."""

    def specs(self, name):
        return [self._spec(name, name, "ExpectColumnValuesToNotBeNull", {"column": "mask_uri"},
                           explain=lambda row: "no mask_uri for this sample (missing mask file?)")]


class MaskDecodable(Rule):
    """The mask file exists, is not empty and decodes completely."""

    def specs(self, name):
        return self._flag(name, "mask_ok", True, lambda row: row["mask_error"], "mask_uri")


class MaskSizeMatchesImage(Rule):
    """The mask has the image's width and height."""

    def specs(self, name):
        def explain(row: dict) -> str:
            return (f"mask is {row['mask_width']}x{row['mask_height']} but image "
                    f"{row['image_uri']} is {row['width']}x{row['height']}")

        return self._flag(name, "mask_size_matches", True, explain, "mask_uri")


class MaskBinary(Rule):
    """Every mask is a lesion mask (an error otherwise); masks not stored as 0/255 are reported
    once, with their count (a warning), and binarised as everywhere else."""

    def specs(self, name):
        def explain(row: dict) -> str:
            return f"not a lesion mask (mode {row['mask_mode']}): {row['mask_problem']}"

        def explain_encodings(result: dict) -> list[str]:
            found = Counter(v for v in result.get("unexpected_list") or [] if v != "not_a_mask")
            if not found:
                return []
            kinds = ", ".join(f"{n} {_ENCODING_WORDS[k]}" for k, n in sorted(found.items()))
            return [f"{sum(found.values())} masks are not stored as 0/255 ({kinds}); training, "
                    "evaluation and validation binarise them alike (lesion = grey value > 127; "
                    "masks coded 0/1: value 1)"]

        is_mask = self._spec(name, name, "ExpectColumnValuesToNotBeInSet",
                             {"column": "mask_encoding", "value_set": ["not_a_mask"]},
                             explain=explain, file_column="mask_uri")
        encodings = ExpectationSpec(
            name=f"{name}.encoding", rule=name, table=self.table,
            type="ExpectColumnValuesToBeInSet",
            kwargs={"column": "mask_encoding", "value_set": ["binary", "not_a_mask"]},
            severity="warning", description="Masks are stored as 0/255.", file_column=None,
            explain_result=explain_encodings)
        return [is_mask, encodings]


_ENCODING_WORDS = {"binary_0_1": "coded 0/1", "soft": "with grey levels (soft or lossy edges)"}


class LesionFraction(Rule):
    """The lesion covers between min and max of the image (catches empty, tiny and all-lesion
    masks; close-up dermoscopy lesions may fill the frame: ISIC 2018 up to 99.96%)."""

    min: float = Field(0.001, ge=0.0, le=1.0)
    max: float = Field(0.9999, ge=0.0, le=1.0)

    def specs(self, name):
        def explain(row: dict) -> str:
            fraction = row["lesion_fraction"]
            if fraction == 0:
                return "mask is empty (no lesion pixels)"
            if fraction == 1:
                return "mask is lesion everywhere (an inverted empty mask?)"
            return (f"lesion covers {fraction:.3%} of the image, outside "
                    f"[{self.min:.3%}, {self.max:.3%}]")

        return [self._spec(name, name, "ExpectColumnValuesToBeBetween",
                           {"column": "lesion_fraction", "min_value": self.min,
                            "max_value": self.max}, explain=explain, file_column="mask_uri")]


class MaskComponents(Rule):
    """The mask holds at most max separate lesion regions (regions under 0.1% of the image,
    annotation specks, are not counted)."""

    max: int = 3

    def specs(self, name):
        def explain(row: dict) -> str:
            return f"mask has {row['mask_components']} separate lesion regions (max {self.max})"

        return [self._spec(name, name, "ExpectColumnValuesToBeBetween",
                           {"column": "mask_components", "min_value": 0,
                            "max_value": self.max}, explain=explain, file_column="mask_uri")]


class MaskTouchesBorder(Rule):
    """At most 1 - mostly of the lesions touch the image border (reported once for the dataset:
    many cut-off lesions suggest cropped images; ISIC 2018 and PH2 have about 25%)."""

    mostly: float = Field(0.6, ge=0.0, le=1.0)

    def specs(self, name):
        def explain(result: dict) -> list[str]:
            count, total = result.get("unexpected_count") or 0, result.get("element_count") or 0
            return [f"{count} of {total} lesions ({count / max(total, 1):.0%}) touch the image "
                    f"border, more than {1 - self.mostly:.0%}: cropped or cut-off images?"]

        return [self._spec(name, name, "ExpectColumnValuesToBeInSet",
                           {"column": "mask_touches_border", "value_set": [False]},
                           file_column=None, explain_result=explain)]


class AttributeMasks(Rule):
    """Dermoscopic attribute masks exist, decode, are binary and have the image's size."""

    required: list[str] = []
    """Attribute names every sample must have a mask for (empty: check those listed)."""

    def specs(self, name):
        return [self._spec(name, name, "ExpectColumnValuesToBeInSet",
                           {"column": "attribute_masks_bad", "value_set": [0]},
                           explain=lambda row: row["attribute_masks_problem"])]


class CompanionFiles(Rule):
    """Files that go with each image (anatomy labels, depth) exist and have its size."""

    columns: list[str] = ["anatomy_uri", "depth_uri"]

    def specs(self, name):
        return [self._spec(name, name, "ExpectColumnValuesToBeInSet",
                           {"column": "companions_bad", "value_set": [0]},
                           explain=lambda row: row["companions_problem"])]


def _box_specs(rule: Rule, name: str, column: str, what: str) -> list[ExpectationSpec]:
    def explain(row: dict) -> str:
        return (f"{row[column]} of {row['n_boxes']} boxes {what} (image "
                f"{row['width']}x{row['height']}): {row['box_problem']}")

    return [rule._spec(name, name, "ExpectColumnValuesToBeInSet",
                       {"column": column, "value_set": [0]}, explain=explain)]


class BoxesInsideImage(Rule):
    """Boxes lie inside their image (format: the suite's box_format)."""

    tolerance: float = 1.0
    """Pixels a box may stick out of the image (rounding of annotation tools)."""

    def specs(self, name):
        return _box_specs(self, name, "boxes_outside", "lie outside the image")


class BoxesPositiveArea(Rule):
    """Boxes have positive width and height."""

    def specs(self, name):
        return _box_specs(self, name, "boxes_degenerate", "have no area")


class NoExactDuplicatesAcrossSplits(Rule):
    """No image file is byte-identical to one in an earlier split (leakage)."""

    def specs(self, name):
        def explain(row: dict) -> str:
            return (f"same file as {row['exact_leak_partner']} in split "
                    f"{row['exact_leak_split']!r} ({row['exact_leak_file']}): leakage")

        return self._flag(name, "exact_leak", False, explain)


class NoExactDuplicatesWithinSplit(Rule):
    """No image file is byte-identical to another in the same split (counted twice)."""

    def specs(self, name):
        def explain(row: dict) -> str:
            return (f"same file as {row['exact_dup_partner']} ({row['exact_dup_file']}) in the "
                    f"same split: the image counts twice in training or in the metrics")

        return self._flag(name, "exact_dup", False, explain)


class NoNearDuplicatesAcrossSplits(Rule):
    """No image is a resized/recompressed copy of one in an earlier split (perceptual hash)."""

    max_hamming: int = Field(NEAR_DUPLICATE_HAMMING, ge=0, le=256)
    """Largest Hamming distance (of 256 bits) between hashes that counts as the same image."""

    def specs(self, name):
        def explain(row: dict) -> str:
            return (f"near-duplicate of {row['near_leak_partner']} in split "
                    f"{row['near_leak_split']!r} ({row['near_leak_file']}; perceptual-hash "
                    f"distance {row['near_leak_distance']} <= {self.max_hamming}): leakage")

        return self._flag(name, "near_leak", False, explain)


class NoGroupAcrossSplits(Rule):
    """No patient or lesion has samples in two splits (leakage)."""

    columns: list[str] = ["patient_id", "lesion_id"]

    def specs(self, name):
        return self._flag(name, "group_leak", False, lambda row: row["group_leak_detail"])


class MinSamplesPerClass(Rule):
    """Every label seen in the data has at least min samples in every split."""

    min: int = 1
    table: ClassVar[str] = "classes"

    def specs(self, name):
        def explain(row: dict) -> str:
            return (f"split {row['split']!r} has {row['count']} samples of class "
                    f"{row['label']!r} (minimum {self.min})")

        return [self._spec(name, name, "ExpectColumnValuesToBeBetween",
                           {"column": "count", "min_value": self.min}, file_column=None,
                           explain=explain)]


class ClassBalance(Rule):
    """Within a split, no class is more than max_ratio times rarer than the largest."""

    severity: Severity = "warning"
    max_ratio: float = Field(10.0, gt=1.0)
    table: ClassVar[str] = "classes"

    def specs(self, name):
        def explain(row: dict) -> str:
            where = f"split {row['split']!r}: class {row['label']!r}"
            if not row["count"]:
                return f"{where} has no samples (other splits have some)"
            return (f"{where} has {row['count']} samples, "
                    f"{1 / row['share_of_largest']:.1f}x fewer than the largest class "
                    f"(max ratio {self.max_ratio:g})")

        return [self._spec(name, name, "ExpectColumnValuesToBeBetween",
                           {"column": "share_of_largest", "min_value": 1.0 / self.max_ratio},
                           file_column=None, explain=explain)]


class Drift(Rule):
    """A batch's distributions stay close to a reference manifest's (``--drift-against``)."""

    max_ks: float = Field(0.3, gt=0.0, le=1.0)
    """Largest two-sample Kolmogorov-Smirnov statistic per numeric feature."""
    max_label_js: float = Field(0.15, gt=0.0, le=1.0)
    """Largest Jensen-Shannon distance (base 2) between label frequencies."""
    features: list[str] = ["width", "height", "mean_r", "mean_g", "mean_b", "gray_std",
                           "lesion_fraction"]
    table: ClassVar[str] = "drift"

    def limit(self, kind: str) -> float:
        """The threshold of a drift-table row of this kind (``numeric`` or ``labels``)."""
        return self.max_label_js if kind == "labels" else self.max_ks

    def specs(self, name):
        def explain(row: dict) -> str:
            return (f"{row['feature']}: {row['statistic_name']} {row['statistic']:.3f} > "
                    f"{self.limit(row['kind']):g} (reference median "
                    f"{row['reference_median']}, batch median {row['batch_median']})")

        common = {"file_column": None, "explain": explain}
        return [self._spec(f"{name}.features", name, "ExpectColumnValuesToBeBetween",
                           {"column": "ks_statistic", "max_value": self.max_ks}, **common),
                self._spec(f"{name}.labels", name, "ExpectColumnValuesToBeBetween",
                           {"column": "label_js_distance", "max_value": self.max_label_js},
                           **common)]


# --------------------------------------------------------------------------- the suite


@dataclass(frozen=True)
class FactNeeds:
    """Extra files the workers read for this suite."""

    attribute_masks: tuple[str, ...] | None
    companions: tuple[str, ...]


class SuiteConfig(Section):
    """A validation suite: rule name -> parameters. Listed rules are on."""

    name: str = "custom"
    """Suite name (shown in reports and Data Docs)."""
    task: str = ""
    """MLflow experiment (``dermml/<task>``) the validation run is logged to; default: name."""
    description: str = ""
    box_format: Literal["xywh", "xyxy"] = "xywh"
    """How ``boxes`` are written: COCO [x, y, w, h] or corners [x0, y0, x1, y1]."""
    required_columns: RequiredColumns = RequiredColumns()
    not_null: NotNull = NotNull()
    unique_sample_ids: UniqueSampleIds = UniqueSampleIds()
    row_count: RowCount = RowCount()
    labels_allowed: LabelsAllowed = LabelsAllowed()
    splits_allowed: SplitsAllowed = SplitsAllowed()
    split_not_empty: SplitNotEmpty = SplitNotEmpty()
    image_decodable: ImageDecodable = ImageDecodable()
    image_size: ImageSize = ImageSize()
    image_channels: ImageChannels = ImageChannels()
    image_format: ImageFormat = ImageFormat()
    exif_orientation: ExifOrientation = ExifOrientation()
    mask_present: MaskPresent = MaskPresent()
    mask_decodable: MaskDecodable = MaskDecodable()
    mask_size_matches_image: MaskSizeMatchesImage = MaskSizeMatchesImage()
    mask_binary: MaskBinary = MaskBinary()
    lesion_fraction: LesionFraction = LesionFraction()
    mask_components: MaskComponents = MaskComponents()
    mask_touches_border: MaskTouchesBorder = MaskTouchesBorder()
    attribute_masks: AttributeMasks = AttributeMasks()
    companion_files: CompanionFiles = CompanionFiles()
    boxes_inside_image: BoxesInsideImage = BoxesInsideImage()
    boxes_positive_area: BoxesPositiveArea = BoxesPositiveArea()
    no_exact_duplicates_across_splits: NoExactDuplicatesAcrossSplits = \
        NoExactDuplicatesAcrossSplits()
    no_exact_duplicates_within_split: NoExactDuplicatesWithinSplit = \
        NoExactDuplicatesWithinSplit()
    no_near_duplicates_across_splits: NoNearDuplicatesAcrossSplits = \
        NoNearDuplicatesAcrossSplits()
    no_group_across_splits: NoGroupAcrossSplits = NoGroupAcrossSplits()
    min_samples_per_class: MinSamplesPerClass = MinSamplesPerClass()
    class_balance: ClassBalance = ClassBalance()
    drift: Drift = Drift()

    @model_validator(mode="before")
    @classmethod
    def _listed_rules_are_on(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for key, value in data.items():
            if key in _RULE_NAMES and (value is None or isinstance(value, dict)):
                out[key] = {"enabled": True, **(value or {})}
        return out

    def rules(self) -> dict[str, Rule]:
        """The rules that are on, by name, in suite order."""
        return {name: getattr(self, name) for name in _RULE_NAMES
                if getattr(self, name).enabled}

    def specs(self) -> list[ExpectationSpec]:
        return [spec for name, rule in self.rules().items() for spec in rule.specs(name)]

    def split_order(self) -> list[str]:
        """Splits in leakage priority: a copy in a later split is the one reported."""
        return list(self.splits_allowed.splits)

    def fact_needs(self) -> FactNeeds:
        attributes = (tuple(self.attribute_masks.required) if self.attribute_masks.enabled
                      else None)
        companions = tuple(self.companion_files.columns) if self.companion_files.enabled else ()
        return FactNeeds(attributes, companions)

    @property
    def experiment_task(self) -> str:
        return self.task or self.name


_RULE_NAMES = tuple(n for n, f in SuiteConfig.model_fields.items()
                    if isinstance(f.annotation, type) and issubclass(f.annotation, Rule))


def _suite_data(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A suite file's mapping; ``extends: NAME_OR_PATH`` starts from another suite, whose rules
    this file's keys replace one by one."""
    data = read_yaml_mapping(path, "validation suite")
    # A rule listed without parameters (``mask_binary:``) is on with its defaults.
    data = {k: ({} if v is None and k in _RULE_NAMES else v) for k, v in data.items()}
    base = data.pop("extends", None)
    if not base:
        return data
    base_path = suite_path(str(base))
    if base_path.resolve() in seen:
        raise ConfigError(f"validation suite {path}: 'extends' loops back to {base_path}")
    inherited = _suite_data(base_path, (*seen, path.resolve()))
    inherited.pop("name", None)  # a suite is named after its own file unless it says otherwise
    return {**inherited, **data}


def _check_override_keys(overrides: list[str]) -> None:
    """Name the rule's own parameters when an override has a typo (not all 100 suite keys)."""
    for item in overrides:
        key = item.partition("=")[0].strip()
        rule, _, param = key.partition(".")
        if rule not in _RULE_NAMES:
            if not param and rule in SuiteConfig.model_fields:
                continue
            raise ConfigError(f"--set {item!r}: unknown rule {rule!r}; rules: "
                              f"{', '.join(_RULE_NAMES)}")
        fields = type(getattr(SuiteConfig(), rule)).model_fields
        if param not in fields:
            raise ConfigError(f"--set {item!r}: rule {rule!r} has no parameter {param!r}; its "
                              f"parameters: {', '.join(fields)}")


def shipped_suites() -> list[str]:
    return sorted({p.stem for d in suites_dirs() if d.is_dir() for p in d.glob("*.yaml")})


def suite_path(suite: str) -> Path:
    """The file of a suite given by name (shipped) or path."""
    path = Path(suite)
    if path.suffix in (".yaml", ".yml", ".json") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"validation suite file {path} not found")
        return path
    for folder in suites_dirs():
        candidate = folder / f"{suite}.yaml"
        if candidate.is_file():
            return candidate
    raise ConfigError(f"unknown validation suite {suite!r}; shipped suites: "
                      f"{', '.join(shipped_suites())} (or give a path to a suite YAML/JSON file)")


def load_suite(suite: str, overrides: list[str] | None = None,
               required_splits: tuple[str, ...] = ()) -> SuiteConfig:
    """Load a suite by name or path, apply ``rule.param=value`` overrides and required splits."""
    path = suite_path(suite)
    data = {"name": path.stem, **_suite_data(path)}
    _check_override_keys(overrides or [])
    try:
        config = load_config(SuiteConfig, None, overrides, base=data)
    except ConfigError as exc:
        raise ConfigError(f"validation suite {path}: {exc}") from None
    if required_splits:
        splits = list(dict.fromkeys([*config.split_not_empty.splits, *required_splits]))
        config.split_not_empty = SplitNotEmpty(enabled=True, severity="error", splits=splits)
    return config

