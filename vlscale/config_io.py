"""Reading and writing run configs: recipes (JSON / TOML), ``section.key=value`` overrides, the
resolved ``config.json`` of a run.

Values are coerced to each field's type (:func:`config_from_dict`); unknown keys are rejected with
the closest known names. The dataclasses themselves live in :mod:`vlscale.config`, which re-exports
everything here.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal

from vlscale.config import RECIPE_DIR, Config, model_config_class


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    out = {f.name: hints[f.name] for f in dataclasses.fields(Config) if f.name not in ("recipe",)}
    out["model"] = model_config_class()
    return out


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Turn ``value`` (from JSON/TOML, or a raw override string) into type ``tp``, or raise."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(" / ".join(errors) + (" (or none)" if type(None) in args else ""))
    if origin is Literal:
        if value not in args:
            raise ValueError(f"config: {key}={value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = _parse_scalar(value) if value.startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config: {key}={value!r} must be a list")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict or tp is dict:
        value = _parse_scalar(value) if isinstance(value, str) else value
        if not isinstance(value, dict):
            raise ValueError(f"config: {key}={value!r} must be a mapping (JSON object)")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ValueError(f"config: {key}={value!r} must be a boolean (true/false)")
    if tp in (int, float):
        if isinstance(value, str):
            value = _parse_scalar(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"config: {key}={value!r} must be {tp.__name__}")
        if tp is int and float(value) != int(value):
            raise ValueError(f"config: {key}={value!r} must be an integer")
        return tp(value)
    if tp is str and not isinstance(value, str):
        raise ValueError(f"config: {key}={value!r} must be a string")
    return value


def _parse_scalar(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _unknown(key: str, known: list[str]) -> ValueError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(sorted(known))}"
    return ValueError(f"config: unknown key {key!r}{hint}")


def _build_section(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for name, value in values.items():
        if name not in names:
            raise _unknown(f"{prefix}.{name}", names)
        kwargs[name] = _coerce(value, hints[name], f"{prefix}.{name}")
    return cls(**kwargs)


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from a nested mapping (a recipe or a saved config)."""
    sections = _section_types()
    kwargs: dict[str, Any] = {}
    for name, values in raw.items():
        if name in ("recipe", "description", "sources"):
            if name == "recipe":
                kwargs["recipe"] = str(values)
            if name == "sources":  # a recipe's provenance: "section.field" -> where the value comes from
                _check_sources(values, sections)
            continue
        if name not in sections:
            raise _unknown(name, [*sections, "recipe", "description", "sources"])
        if not isinstance(values, dict):
            raise ValueError(f"config: section {name!r} must be a mapping, got {type(values).__name__}")
        kwargs[name] = _build_section(sections[name], values, name)
    return Config(**kwargs)


def _check_sources(sources: Any, sections: dict[str, type]) -> None:
    """A recipe's ``sources`` must name real fields (a stale citation is an error, not a comment)."""
    if not isinstance(sources, dict):
        raise ValueError("config: 'sources' must map 'section.field' to where its value comes from")
    for key in sources:
        section, _, name = str(key).partition(".")
        if section not in sections or name not in {f.name for f in dataclasses.fields(sections[section])}:
            raise ValueError(f"config: sources names {key!r}, which is not a config field")


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain JSON-able data (what :func:`save_config` writes)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings to a nested mapping (values are coerced later, by type)."""
    raw = json.loads(json.dumps(raw))
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"config: override {item!r} must look like section.key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2:
            raise ValueError(f"config: override key {key!r} must be section.key (e.g. train.lr)")
        section, name = parts  # unknown names are reported by config_from_dict, like a recipe's
        if not isinstance(raw.setdefault(section, {}), dict):
            raise ValueError(f"config: {section!r} is not a section")
        raw[section][name] = value
    return raw


def recipe_path(name_or_path: str) -> Path:
    """``launch/recipes/<name>.json|.toml``, or the given file path."""
    path = Path(name_or_path)
    if path.suffix in (".json", ".toml") and path.is_file():
        return path
    for suffix in (".json", ".toml"):
        candidate = RECIPE_DIR / f"{name_or_path}{suffix}"
        if candidate.is_file():
            return candidate
    names = sorted(p.stem for p in RECIPE_DIR.glob("*.*") if p.suffix in (".json", ".toml"))
    raise ValueError(f"config: no recipe {name_or_path!r} (named recipes: {', '.join(names)}; or a .json/.toml path)")


def load_recipe(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A named recipe (or a JSON / TOML recipe file) plus ``section.key=value`` overrides, validated."""
    path = recipe_path(name_or_path)
    if path.suffix == ".toml":
        import tomllib

        raw = tomllib.loads(path.read_text())
    else:
        raw = json.loads(path.read_text())
    raw = apply_overrides(raw, list(overrides))
    raw["recipe"] = name_or_path
    return config_from_dict(raw)


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config as JSON (atomically: temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(config_to_dict(cfg), indent=2) + "\n")
    tmp.replace(path)
    return path


def load_config(path: str | Path) -> Config:
    """Read a config written by :func:`save_config`."""
    return config_from_dict(json.loads(Path(path).read_text()))


def model_config_from_dict(values: dict[str, Any]) -> Any:
    """A validated ModelConfig from a mapping (a saved config's ``model`` section) on its own: the
    run-level cross-checks against ``techniques`` (e.g. concept tokens ↔ concept_mode) do not apply."""
    return _build_section(model_config_class(), values, "model")
