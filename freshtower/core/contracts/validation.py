"""Reading a contract off disk: the schema version first, then every field
with its type, so a file that does not fit fails at load with the file and
the field named (``ContractError``), never as a ``KeyError`` later.

A contract is a frozen dataclass; pydantic validates a file's fields
against its annotations (``extra="forbid"``: a renamed field is both
missing and unknown, and both are reported). Writers serialise with
``as_json_bytes`` (sorted keys, so files diff cleanly).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ConfigDict, TypeAdapter, ValidationError
from pydantic_core import ErrorDetails

# Every contract dataclass carries this: unknown fields are errors, and
# tensors (the online checkpoint) are checked with isinstance.
CONTRACT_CONFIG = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

T = TypeVar("T")


class ContractError(ValueError):
    """A file that does not hold the contract it should, naming the file and the field.

    >>> str(ContractError("models/full/2026-11-21.1/manifest.json", "data_end_ms", "is missing"))
    "models/full/2026-11-21.1/manifest.json: field 'data_end_ms' is missing"
    """

    def __init__(self, where: Path | str, field: str | None, message: str):
        self.where = str(where)
        self.field = field
        super().__init__(f"{where}: {message}" if field is None else f"{where}: field {field!r} {message}")


def check_schema_version(data: object, contract: str, expected: int, where: Path | str) -> Mapping:
    """``data`` if it is a mapping whose ``format`` is ``expected``, else a ``ContractError``."""
    if not isinstance(data, Mapping):
        raise ContractError(where, None, f"not a {contract}: expected an object, found {type(data).__name__}")
    if "format" not in data:
        raise ContractError(where, "format", f"is missing: not a {contract} (schema version {expected} expected)")
    if data["format"] != expected:
        raise ContractError(
            where, "format", f"is {data['format']!r}: this freshtower reads {contract} schema version {expected} only"
        )
    return data


def decode(cls: type[T], data: Mapping, where: Path | str, *, strict: bool = False) -> T:
    """Validate ``data`` (one contract's fields, nested contracts as
    mappings) into ``cls``; the first few problems go into one message."""
    try:
        return _adapter(cls).validate_python(data, strict=strict)
    except ValidationError as error:
        raise _contract_error(error, where) from None


def decode_json(cls: type[T], raw: bytes, contract: str, expected: int, where: Path | str) -> T:
    """Parse a JSON file's bytes, check its schema version, validate it into ``cls``."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ContractError(where, None, f"not JSON: {error}") from None
    check_schema_version(data, contract, expected, where)
    try:
        return _adapter(cls).validate_json(raw, strict=True)  # JSON strict: no "3" for 3, no 3.0 for an int
    except ValidationError as error:
        raise _contract_error(error, where) from None


def as_dict(contract: Any) -> dict:
    """A contract (and the contracts nested in it) as plain dicts and lists, shallowly:
    values that are not contracts (tensors, free-form dicts) are not copied."""
    if dataclasses.is_dataclass(contract) and not isinstance(contract, type):
        return {f.name: _plain(getattr(contract, f.name)) for f in dataclasses.fields(contract)}
    raise TypeError(f"{type(contract).__name__} is not a contract dataclass")


def as_json_bytes(contract: Any) -> bytes:
    return json.dumps(as_dict(contract), indent=2, sort_keys=True).encode()


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return as_dict(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value] if value and dataclasses.is_dataclass(value[0]) else value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()} if any(dataclasses.is_dataclass(v) for v in value.values()) else value
    return value


_ADAPTERS: dict[type, TypeAdapter] = {}


def _adapter(cls: type) -> TypeAdapter:
    """Built once per contract (building one compiles its validator)."""
    if cls not in _ADAPTERS:
        _ADAPTERS[cls] = TypeAdapter(cls)
    return _ADAPTERS[cls]


def _contract_error(error: ValidationError, where: Path | str) -> ContractError:
    problems = error.errors(include_url=False)
    first = problems[0]
    field = ".".join(str(part) for part in first["loc"]) or None
    message = _describe(first)
    if len(problems) > 1:
        others = "; ".join(f"{'.'.join(str(p) for p in e['loc'])!r} {_describe(e)}" for e in problems[1:4])
        message += f" (also: {others}{'; ...' if len(problems) > 4 else ''})"
    return ContractError(where, field, message)


def _describe(problem: ErrorDetails) -> str:
    kind = problem["type"]
    if kind == "missing":
        return "is missing"
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        return "is not part of this schema version (renamed, or written by another version?)"
    found = repr(problem.get("input"))
    return f"is {found[:60]}{'...' if len(found) > 60 else ''}: {problem['msg'].lower()}"
