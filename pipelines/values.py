"""Plain values every part writes: data made ready for JSON, the time now, and numbers as people
read them. One rule each, so a report, a tag and a message never disagree on them."""

from __future__ import annotations

import math
import numbers
from datetime import datetime, timezone
from typing import Any


def json_ready(value: Any, digits: int | None = 6, *, keep_infinity: bool = False) -> Any:
    """``value`` as plain JSON values, recursively: numpy scalars and arrays to Python, NaN and
    pandas' missing markers to None, anything else that JSON cannot hold to its text.

    Args:
        value: a dict, list, tuple, array or scalar.
        digits: floats are rounded to this many decimals (None: kept whole); a rounded zero is
            ``0.0``, never ``-0.0``.
        keep_infinity: infinities become ``"inf"``/``"-inf"`` (for values a person must see,
            such as failing examples) rather than None.
    """
    if isinstance(value, dict):
        return {str(key): json_ready(item, digits, keep_infinity=keep_infinity) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item, digits, keep_infinity=keep_infinity) for item in value]
    if value is None or isinstance(value, str):
        return value
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        return json_ready(value.tolist(), digits, keep_infinity=keep_infinity)  # scalars and arrays
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        value = float(value)
        if math.isnan(value):
            return None
        if math.isinf(value):
            return str(value) if keep_infinity else None
        if digits is None:
            return value
        rounded = round(value, digits)
        return 0.0 if rounded == 0 else rounded
    if type(value).__name__ in ("NAType", "NaTType"):
        return None
    return str(value)


def utc_now() -> datetime:
    """Now, as an aware UTC datetime."""
    return datetime.now(timezone.utc)


def now_iso() -> str:
    """Now, UTC, ISO 8601 to the second: the time records and tags carry."""
    return utc_now().isoformat(timespec="seconds")


def number(value: Any, digits: int = 3, missing: str = "n/a") -> str:
    """A number for a table or a message: ``digits`` decimals; a value too small to show in them
    (but not zero) in scientific notation; ``missing`` for None; anything else as its text."""
    if value is None:
        return missing
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        value = float(value)
        if value != 0 and abs(value) < 10**-digits:
            return f"{value:.1e}"
        return f"{value:.{digits}f}"
    return str(value)
