"""YAML documents that remember where each key came from, and validation errors that say so.

Owns: parsing a YAML file into plain data plus a map from key path to line number (duplicate keys are errors),
and turning pydantic validation errors into `ConfigIssue`s that name file, key path and line. Used by gateway.yaml
and the policy files alike, so every configuration error reads the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import pydantic
import yaml

from gateway.errors import ConfigError, ConfigIssue

KeyPath = tuple[str | int, ...]


def format_path(path: KeyPath) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


class YamlDoc:
    """A parsed YAML document: `data` (plain Python) and `line_of(path)`."""

    def __init__(self, source: str, data: Any, lines: dict[KeyPath, int]) -> None:
        self.source = source
        self.data = data
        self._lines = lines

    def line_of(self, path: KeyPath) -> int | None:
        """The line of `path`, or of its nearest ancestor that has one."""
        p = tuple(path)
        while p:
            if p in self._lines:
                return self._lines[p]
            p = p[:-1]
        return self._lines.get((), 1)

    def issue(self, path: KeyPath, message: str) -> ConfigIssue:
        return ConfigIssue(self.source, format_path(path), self.line_of(path), message)

    def data_path(self, loc: tuple[Any, ...], prefix: KeyPath = ()) -> KeyPath:
        """Map a pydantic `loc` (relative to `prefix`) onto the document, dropping the union tags it adds."""
        node: Any = self.data
        for part in prefix:
            node = node[part]
        out: list[str | int] = list(prefix)
        for part in loc:
            if (isinstance(node, Mapping) and part in node) or (
                isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
            ):
                out.append(part)
                node = node[part]
            elif isinstance(node, Mapping) and isinstance(part, str):
                if part == node.get("type"):
                    continue  # the tag of a discriminated union, not a key of the document
                out.append(part)  # a missing key: name it, stop descending
                node = None
        return tuple(out)


def _walk(node: yaml.Node, path: KeyPath, lines: dict[KeyPath, int], source: str) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError.single(
                    source,
                    format_path((*path, key)),
                    line,
                    f"duplicate key (first defined on line {seen[key]})",
                )
            seen[key] = line
            lines[(*path, key)] = line
            _walk(value_node, (*path, key), lines, source)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[(*path, i)] = item.start_mark.line + 1
            _walk(item, (*path, i), lines, source)


def parse_yaml(text: str, source: str) -> YamlDoc:
    """Parse one YAML document; a syntax error or duplicate key raises `ConfigError` with its line."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        raise ConfigError.single(source, "", line, f"invalid YAML: {exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError.single(source, "", None, f"invalid YAML: {exc}") from None
    lines: dict[KeyPath, int] = {}
    if node is not None:
        _walk(node, (), lines, source)
    return YamlDoc(source, data, lines)


def read_yaml(path: Path) -> YamlDoc:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError.single(str(path), "", None, f"cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError.single(str(path), "", None, f"not UTF-8 text: {exc.reason}") from None
    return parse_yaml(text, str(path))


def _message(err: Mapping[str, Any]) -> str:
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    msg = str(err.get("msg", "invalid value"))
    msg = msg.removeprefix("Value error, ")
    shown = repr(err.get("input"))
    plain = "input" in err and not isinstance(err["input"], dict | list)
    if plain and shown not in msg and str(err["input"]) not in msg:
        msg += f" (got {shown})"
    return msg


def validation_issues(doc: YamlDoc, exc: pydantic.ValidationError, prefix: KeyPath = ()) -> list[ConfigIssue]:
    issues = []
    for err in exc.errors():
        path = doc.data_path(tuple(err["loc"]), prefix)
        issues.append(doc.issue(path, _message(err)))
    return issues


M = TypeVar("M", bound=pydantic.BaseModel)


def validate(doc: YamlDoc, model: type[M], data: Any, prefix: KeyPath = (), context: dict[str, Any] | None = None) -> M:
    """Validate `data` (part of `doc` at `prefix`) as `model`; raise `ConfigError` listing every problem."""
    try:
        return model.model_validate(data, context=context)
    except pydantic.ValidationError as exc:
        raise ConfigError(validation_issues(doc, exc, prefix)) from None
