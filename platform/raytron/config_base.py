"""What every config shares: the strict base class, the error it raises, reading a YAML mapping
with ``--set`` overrides, and the rows of ``--schema``.

Its own module so that sections defined beside config.py (tune_config.py), the serve config and
config.py itself use it without importing each other.
"""

from __future__ import annotations

from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A config that cannot run; the message names every offending field."""


class Section(BaseModel):
    """Base for every config class: strict keys, field docstrings become descriptions."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one ``a.b=c`` override in place; the value is parsed as YAML (so 2, true, [1,2] work)."""
    path, sep, value = assignment.partition("=")
    if not sep or not path:
        raise ConfigError(f"--set {assignment!r}: expected KEY.PATH=VALUE")
    *parents, leaf = path.split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment!r}: {part} is not a section")
        node = child
    node[leaf] = yaml.safe_load(value)


def read_yaml_mapping(path: str | Path, kind: str = "config", overrides: list[str] = ()) -> dict[str, Any]:
    """A YAML file's top-level mapping with ``--set a.b=c`` overrides applied; errors name the file."""
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise ConfigError(f"cannot read {kind} {path}: {error.strerror}") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{kind} {path} is not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{kind} {path}: top level must be a mapping, got {type(raw).__name__}")
    for assignment in overrides:
        apply_override(raw, assignment)
    return raw


def section_schema_rows(section: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted path, type, default, doc) for every leaf field, depth first."""
    rows = []
    for name, field in section.model_fields.items():
        path = f"{prefix}{name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows.extend(section_schema_rows(annotation, f"{path}."))
            continue
        rows.append((path, _type_name(annotation), repr(field.default), field.description or ""))
    return rows


def _type_name(annotation: Any) -> str:
    """Readable type for --schema: Literal choices and Optional's inner type stay visible."""
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type):
        return annotation.__name__
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " | ".join(repr(choice) for choice in args)
    if origin is Annotated:  # PositiveInt and friends: the constraint is in the doc
        return _type_name(args[0])
    if origin is None or not args:
        return str(annotation).replace("typing.", "")
    inner = [_type_name(arg) for arg in args]
    if origin in (Union, UnionType):
        return " | ".join(inner)
    return f"{origin.__name__}[{', '.join(inner)}]"
