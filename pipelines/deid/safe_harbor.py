"""Small HIPAA Safe Harbor rules shared by the tabular and DICOM de-identifiers: the one age rule."""

from __future__ import annotations

import math
from datetime import date

OLDEST_EXACT_AGE = 89  # Safe Harbor: ages over 89 are aggregated into "90 or older"


def age_band(age: float | int | None) -> str | None:
    """Ten-year band such as ``"40-49"``; every age over 89 is ``"90+"``."""
    if age is None or (isinstance(age, float) and math.isnan(age)) or age < 0:
        return None
    if age > OLDEST_EXACT_AGE:
        return "90+"
    low = int(age) // 10 * 10
    return f"{low}-{low + 9}"


def cap_age(age: float | int | None) -> int | None:
    """Completed years, with every age over 89 reported as 90 ("90 or older")."""
    if age is None or (isinstance(age, float) and math.isnan(age)):
        return None
    return min(math.floor(age), OLDEST_EXACT_AGE + 1)


def years_between(born: date, on: date) -> int:
    """Completed years from ``born`` to ``on``."""
    return on.year - born.year - ((on.month, on.day) < (born.month, born.day))
