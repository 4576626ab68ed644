"""Typed configuration: pydantic models, YAML task configs and ``--set key=value`` overrides.

Every config section forbids unknown keys, so a typo in a YAML file or a ``--set`` flag is an
error that names the key and lists the valid ones instead of a silently ignored setting.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

T = TypeVar("T", bound="Section")


class ConfigError(ValueError):
    """A config file or override is invalid; the message says which key and why."""


class Moved(NamedTuple):
    """A key that left its config section: where it lives now, and the new names of its keys."""

    to: str
    """Where the key lives now (a config file and why), as the error tells the user."""
    keys: dict[str, str] = {}
    """Old sub-key -> its key there."""

    def message(self, key: str, subs: list[str]) -> str:
        """The error for old key ``key`` (dotted), given with sub-keys ``subs`` (or whole)."""
        given = ", ".join(f"{key}.{sub}" for sub in subs) if subs else key
        pairs = [(sub, self.keys[sub]) for sub in subs if sub in self.keys] if subs else \
            list(self.keys.items())
        there = "; there: " + ", ".join(f"{key}.{old} -> {new}" for old, new in pairs) \
            if pairs else ""
        return f"{given}: moved to {self.to}{there}"


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are validated on set."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    moved: ClassVar[dict[str, Moved]] = {}
    """Keys this section no longer has -> where they went: giving one is an error saying so."""


def dermml_home() -> Path:
    """Folder for embedded state (MLflow SQLite DB, artifacts, Ray results): ``$DERMML_HOME``."""
    return Path(os.environ.get("DERMML_HOME", ".dermml")).absolute()


def configs_dirs() -> list[Path]:
    """Folders searched for shipped configs, first match wins: ``$DERMML_CONFIGS``, the
    repository checkout this package runs from, then ``./configs`` (a container's workdir: the
    images install the package into site-packages and copy ``configs/`` to ``/app``)."""
    found = [Path(os.environ["DERMML_CONFIGS"])] if os.environ.get("DERMML_CONFIGS") else []
    found += [Path(__file__).resolve().parents[1] / "configs", Path.cwd() / "configs"]
    return list(dict.fromkeys(p.absolute() for p in found))


def shipped_config(*parts: str) -> Path | None:
    """A shipped config file or folder (e.g. ``shipped_config("platform", "default.yaml")``),
    or None when no configs folder has it."""
    for folder in configs_dirs():
        candidate = folder.joinpath(*parts)
        if candidate.exists():
            return candidate
    return None


def parse_key_value(item: str, flag: str = "--set",
                    example: str = "train.epochs=5") -> tuple[str, Any]:
    """``key=value`` -> (key, value), the value parsed as YAML (numbers, lists, bools; text
    that is not YAML stays text): the one parser of ``--set``, ``--param`` and suite overrides."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"{flag} {item!r}: expected key=value, e.g. {flag} {example}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=3`` -> (["a", "b"], 3)."""
    key, value = parse_key_value(item)
    return key.split("."), value


def parse_params(items: list[str], flag: str = "--param") -> dict[str, Any]:
    """``["epochs=3", "overrides=[a=1]"]`` -> {"epochs": 3, "overrides": ["a=1"]}."""
    return dict(parse_key_value(item, flag, "name=value") for item in items)


def _valid_keys(model_cls: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, info in model_cls.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_valid_keys(ann, f"{prefix}{name}."))
        elif (item := _list_item_type(ann)) is not None:  # loss.0.weight
            keys.extend(_valid_keys(item, f"{prefix}{name}.N."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _list_item_type(annotation: Any) -> type[BaseModel] | None:
    """``X`` of a ``list[X]`` field whose items are config sections (``loss``), else None."""
    args = getattr(annotation, "__args__", ())
    if getattr(annotation, "__origin__", None) is list and len(args) == 1 and \
            isinstance(args[0], type) and issubclass(args[0], BaseModel):
        return args[0]
    return None


def _set_nested(data: dict, path: list[str], value: Any, model_cls: type[BaseModel],
                prefix: str = "", root: type[BaseModel] | None = None) -> None:
    """Set ``path`` (dotted key parts) to ``value`` in the raw config ``data`` of
    ``model_cls``. A list of sections takes an index (``loss.0.weight``): the item is taken from
    ``data``, else from the field's default, and the rest of the path is set in it."""
    root = root or model_cls
    cls: Any = model_cls
    node = data
    for i, part in enumerate(path):
        fields = cls.model_fields if isinstance(cls, type) and issubclass(cls, BaseModel) else {}
        moved = getattr(cls, "moved", {}).get(part) if fields else None
        if part not in fields and moved is not None:
            key = prefix + ".".join(path[: i + 1])
            raise ConfigError(f"--set {moved.message(key, path[i + 1:i + 2])}")
        if part not in fields:
            dotted = prefix + ".".join(path)
            valid = _valid_keys(root)
            if prefix:  # inside a list item: its keys with this item's index (loss.0.weight)
                index = prefix.rstrip(".").rpartition(".")[2]
                valid = [k.replace(".N.", f".{index}.") for k in valid]
            close = difflib.get_close_matches(dotted, valid, n=2, cutoff=0.75)
            hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
            section = (prefix + ".".join(path[:i])).rstrip(".")
            inside = [k for k in valid if section and k.startswith(f"{section}.")]
            if inside:  # the keys of the section the typo is in
                listed = f"valid keys in {section}: {', '.join(inside)}"
            elif section:
                listed = f"{section} is a setting, not a section"
            else:
                listed = f"valid top-level keys: {', '.join(root.model_fields)}"
            raise ConfigError(f"unknown config key {dotted!r}; {hint}{listed}")
        if i == len(path) - 1:
            node[part] = value
            return
        item_cls = _list_item_type(fields[part].annotation)
        if item_cls is not None:
            _set_list_item(node, part, path[i + 1:], value, fields[part], item_cls,
                           prefix + ".".join(path[: i + 1]), root)
            return
        cls = fields[part].annotation
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key {prefix}{'.'.join(path[: i + 1])!r} is not a section")


def _set_list_item(node: dict, part: str, rest: list[str], value: Any, field: Any,
                   item_cls: type[BaseModel], dotted: str, root: type[BaseModel]) -> None:
    """``rest`` = ``[index, key...]`` of the list ``node[part]`` (e.g. ``loss.0.weight``)."""
    items = node.get(part)
    if items is None:
        items = field.get_default(call_default_factory=True) or []
    items = [item.model_dump() if isinstance(item, BaseModel) else dict(item) for item in items]
    index = rest[0]
    if not index.lstrip("-").isdigit() or not -len(items) <= int(index) < len(items):
        raise ConfigError(f"config key {dotted + '.' + '.'.join(rest)!r}: {dotted} is a list of "
                          f"{len(items)} item(s); give its index, {dotted}.0 to "
                          f"{dotted}.{max(0, len(items) - 1)}")
    if len(rest) == 1:
        items[int(index)] = value
    else:
        _set_nested(items[int(index)], rest[1:], value, item_cls, f"{dotted}.{index}.", root)
    node[part] = items


def validation_problems(exc: ValidationError) -> list[str]:
    """One ``key: problem (got value)`` line per error of a pydantic validation."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(f"{loc}: unknown key")
        elif not loc:  # a model validator: its message names the keys
            lines.append(err["msg"].removeprefix("Value error, "))
        elif err["type"] == "value_error" and isinstance(err.get("input"), dict | list):
            # A section's validator (a platform pool): its message says what is wrong there.
            lines.append(f"{loc}: {err['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"{loc}: {err['msg']} (got {err.get('input')!r})")
    return lines


def _format_validation_error(exc: ValidationError, source: str) -> str:
    return "\n".join([f"invalid config ({source}):",
                      *(f"  {line}" for line in validation_problems(exc))])


def read_yaml_mapping(path: str | os.PathLike, what: str = "config file") -> dict:
    """The mapping in a YAML (or JSON) file; errors name the file and the problem."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {p} not found")
    try:
        loaded = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {p} is not valid YAML/JSON: {exc}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{what} {p} must hold a mapping at the top level")
    return loaded


def load_config(model_cls: type[T], path: str | os.PathLike | None = None,
                overrides: list[str] | None = None, base: dict | None = None) -> T:
    """Build ``model_cls`` from defaults, then ``base``, then a YAML file, then ``--set`` items."""
    data: dict = _moved_keys(model_cls, dict(base or {}), drop=True)
    source = "defaults"
    if path:
        data = _deep_merge(data, _moved_keys(model_cls, read_yaml_mapping(path), source=path))
        source = str(path)
    for item in overrides or []:
        keys, value = parse_override(item)
        _set_nested(data, keys, value, model_cls)
    try:
        return model_cls.model_validate(_keep_section_defaults(model_cls, data))
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None


def stored_config(model_cls: type[T], data: dict) -> T:
    """A config stored by an earlier DermML (a logged model's bundle, a run's config): keys
    that have since moved out of their section are left out, so old models keep loading."""
    return model_cls.model_validate(_moved_keys(model_cls, dict(data), drop=True))


def _moved_keys(model: type[BaseModel], data: dict, drop: bool = False, source: Any = "",
                prefix: str = "") -> dict:
    """``data`` checked for keys that moved out of their section (``Section.moved``): an error
    naming the new home, or with ``drop`` (a resumed run's stored config) left out."""
    out = dict(data)
    for key, value in data.items():
        moved = getattr(model, "moved", {}).get(key)
        if moved is not None and key not in model.model_fields:
            if not drop:
                subs = list(value) if isinstance(value, dict) else []
                raise ConfigError(f"{source}: {moved.message(prefix + key, subs)}")
            del out[key]
            continue
        field = model.model_fields.get(key)
        section = field.annotation if field is not None else None
        if isinstance(value, dict) and isinstance(section, type) and issubclass(section,
                                                                                BaseModel):
            out[key] = _moved_keys(section, value, drop, source, f"{prefix}{key}.")
    return out


def _keep_section_defaults(model: type[BaseModel], given: dict,
                           current: BaseModel | None = None) -> dict:
    """``given`` with each partially given section completed from the field's own default.

    Pydantic fills a section given as ``{aspp: false}`` from the section *class* defaults, so
    ``--set model.aspp=false`` would silently drop a task's model defaults (attributes'
    Inception-v3 encoder). Plain dict values (node selectors, ...) are replaced, not merged.
    """
    out = dict(given)
    for name, field in model.model_fields.items():
        value = given.get(name)
        default = getattr(current, name) if current is not None else field.default
        if not (isinstance(value, dict) and isinstance(default, BaseModel)):
            continue
        section = type(default)
        # Only what the field's default changes from the section class's own defaults: the rest
        # stays unset, so validators that look at which keys were given still see the user's.
        kept = {k: getattr(default, k) for k, f in section.model_fields.items()
                if k not in value
                and getattr(default, k) != f.get_default(call_default_factory=True)}
        out[name] = {**kept, **_keep_section_defaults(section, value, default)}
    return out


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, value in b.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def flatten(config: BaseModel | dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; for logging a config as MLflow params."""
    data = config.model_dump() if isinstance(config, BaseModel) else config
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
