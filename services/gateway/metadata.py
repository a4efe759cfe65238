"""The `metadata` form field: a small JSON object that Redis, Celery and Milvus all accept."""

from __future__ import annotations

import json
import math
from typing import Any

from shared.errors import InvalidInput

MAX_DEPTH = 16
INT64 = 2**63


def _refuse(detail: str) -> InvalidInput:
    return InvalidInput(detail, code="invalid_metadata")


def _constant(name: str) -> Any:
    raise _refuse(f"metadata may not hold {name}: use null or a string")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _refuse(f"metadata number {text[:40]} is out of range")
    return value


def _check(value: Any, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise _refuse(f"metadata is nested more than {MAX_DEPTH} levels deep")
    if isinstance(value, dict):
        for item in value.values():
            _check(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check(item, depth + 1)
    elif isinstance(value, int) and not isinstance(value, bool) and not -INT64 <= value < INT64:
        raise _refuse("metadata integers must fit in 64 bits")


def parse_metadata(raw: str | None, *, limit: int) -> dict[str, Any]:
    """The JSON object in `raw` ({} when absent); 422 invalid_metadata for anything else."""
    if raw is None or raw == "":
        return {}
    if len(raw.encode("utf-8", errors="replace")) > limit:
        raise _refuse(f"metadata is over {limit} bytes")
    try:
        value = json.loads(raw, parse_constant=_constant, parse_float=_float)
    except RecursionError as exc:  # "[[[[…" a few thousand deep
        raise _refuse(f"metadata is nested more than {MAX_DEPTH} levels deep") from exc
    except ValueError as exc:
        raise _refuse(f"metadata is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise _refuse("metadata must be a JSON object")
    _check(value, 1)
    return value
