"""Reading and checking JSON configs: the one JSON-config reader and the one type checker.

:func:`read_json_config` reads a config file (a JSON object) and names the file in every error
(missing, unreadable, not UTF-8, not JSON, not an object). :func:`type_matches` says whether a
value as read from JSON fits a dataclass field's annotation; :func:`check_fields` checks a
(partial) dict of a dataclass's keys against its annotations, naming the source, the key and the
value. :class:`~seggpt_lib.engine.trainer.TrainConfig`,
:class:`~seggpt_lib.experiments.config.PipelineConfig` and the model overrides
(:class:`~seggpt_lib.model.seggpt.SegGPTConfig` fields) are all checked with them.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

__all__ = ["ConfigError", "check_fields", "field_types", "is_number", "read_json_config", "type_matches", "type_name"]


class ConfigError(ValueError):
    """A config file or value is wrong; the message names the source (file), the key and the value."""


def type_name(tp: Any) -> str:
    """An annotation as text (``int | None``, ``list[float]``)."""
    return str(tp).replace("typing.", "") if not isinstance(tp, type) else tp.__name__


def type_matches(value: Any, tp: Any) -> bool:
    """Whether ``value`` (as read from JSON) fits the annotation ``tp`` (bool is no number, an
    int is a float, a JSON list a tuple)."""
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(type_matches(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        if not isinstance(value, (list, tuple)):
            return False
        return all(type_matches(v, args[0]) for v in value) if args else True
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def is_number(v: Any) -> bool:
    """A finite int or float (no bool, no NaN, no infinity)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def field_types(cls: type) -> dict[str, Any]:
    """``{field name: annotation}`` of a dataclass (ClassVars left out)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def check_fields(values: Mapping[str, Any], cls: type, source: str = "config", prefix: str = "",
                 error: Callable[[str], Exception] = ConfigError, what: str | None = None) -> None:
    """Every key of ``values`` is a field of the dataclass ``cls`` and its value fits the field's
    annotation. Raises ``error(message)`` naming ``source``, the key (``prefix`` + key) and the
    value; an unknown key's message lists the valid keys."""
    if not isinstance(values, Mapping):
        raise error(f"{source}: {prefix.rstrip('.') or 'config'} must be an object of "
                    f"{what or cls.__name__} keys, got {values!r}")
    types_ = field_types(cls)
    unknown = sorted(set(values) - set(types_), key=str)
    if unknown:
        label = f"{what or cls.__name__} " if prefix else ""
        raise error(f"{source}: unknown {label}key {prefix}{unknown[0]!s} "
                    f"(valid keys: {', '.join(sorted(types_))})")
    for k, v in values.items():
        if not type_matches(v, types_[k]):
            raise error(f"{source}: {prefix}{k} must be {type_name(types_[k])}, got {v!r}")


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d: dict[str, Any] = {}
    for k, v in pairs:
        if k in d:
            raise _DuplicateKey(k)
        d[k] = v
    return d


def read_json_config(path: str | os.PathLike, what: str = "config", error: Callable[[str], Exception] = ConfigError,
                     drop_comments: bool = False) -> dict[str, Any]:
    """The JSON object in ``path``; every problem (missing, unreadable, not UTF-8 text, not
    JSON, a key given twice, not an object) raises ``error(message)`` naming the file (a missing file says
    ``<what> not found``). ``drop_comments``: keys starting with ``_`` are left out."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{what} not found: {p}")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{p}: unreadable {what} ({type(e).__name__}: {e})") from None
    try:
        d = json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        raise error(f"{p}: key {e.args[0]!r} is given twice") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise error(f"{p}: not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise error(f"{p}: a {what} must be a JSON object {{key: value}}, got {type(d).__name__}")
    return {k: v for k, v in d.items() if not (drop_comments and k.startswith("_"))}
