"""De-identification of tabular rows, following the HIPAA Safe Harbor method.

Only declared columns survive: a column must be a feature, the label, a subgroup, or an
identifier listed under ``deid.columns`` with an action. An undeclared column is refused as a
whole (it might carry an identifier nobody meant to keep), with a message that names it.
"""

from __future__ import annotations

import re

import pandas as pd

from pipelines.config import DeidSpec, TabularSchema
from pipelines.deid.keys import pseudonym
from pipelines.deid.safe_harbor import age_band, cap_age
from pipelines.errors import DeidentificationError, SourceError

# Column names that look like direct identifiers (used only to word the error better).
IDENTIFIER_HINT = re.compile(
    r"name|mrn|ssn|social|phone|fax|mail|address|street|zip|postcode|birth|dob|"
    r"account|licen[cs]e|passport|url|ip_?addr|device_?id|plate|record_?(no|num)",
    re.IGNORECASE,
)

PATIENT_ID = "patient_id"
STUDY_YEAR = "study_year"
AGE_BAND = "age_band"


def check_columns(frame: pd.DataFrame, schema: TabularSchema, deid: DeidSpec, origin: str) -> None:
    """Refuse a table whose columns do not match the declaration.

    Raises:
        SourceError: a feature or the label column is missing.
        DeidentificationError: a column is not declared anywhere.
    """
    columns = [str(c) for c in frame.columns]
    # A subgroup is a column of the source, or age_band made by an age_band rule from its column.
    banded = [column for column, action in deid.columns.items() if action == "age_band"]
    subgroup_sources = [name for name in schema.subgroups if name != AGE_BAND] + (
        banded if AGE_BAND in schema.subgroups else [])
    required = [*schema.features, schema.label, *subgroup_sources]
    missing = [name for name in required if name not in columns]
    if missing:
        raise SourceError(
            f"{origin}: missing column(s) {', '.join(repr(m) for m in missing)} "
            f"(declared in tabular.features / tabular.label / tabular.subgroups, or the source of "
            f"the age_band subgroup); found {columns}"
        )
    declared = set(required) | set(schema.subgroups) | set(deid.columns)
    undeclared = [name for name in columns if name not in declared]
    if undeclared:
        hints = [name for name in undeclared if IDENTIFIER_HINT.search(name)]
        hint = (
            f" {', '.join(repr(h) for h in hints)} look(s) like an identifier: declare it under "
            f"deid.columns (e.g. '{hints[0]}: drop')."
            if hints
            else " Declare each under tabular.features, tabular.subgroups or deid.columns."
        )
        raise DeidentificationError(
            f"{origin}: column(s) {', '.join(repr(u) for u in undeclared)} not declared in "
            f"params; nothing from this source was stored, because an undeclared column may "
            f"carry identifiers.{hint}"
        )


def deidentify_table(
    frame: pd.DataFrame, schema: TabularSchema, deid: DeidSpec, salt: bytes
) -> pd.DataFrame:
    """Apply the identifier actions and keep only declared columns.

    Returns:
        A frame with ``patient_id`` (pseudonym, or missing when no column is pseudonymised),
        ``study_year`` (from ``tabular.study_date`` when declared), the features, the label and
        the subgroups (``age_band`` among them when an ``age_band`` action made it).
    """
    out = pd.DataFrame(index=frame.index)
    out[PATIENT_ID] = pd.Series(pd.NA, index=frame.index, dtype="string")
    for column, action in deid.columns.items():
        if column not in frame.columns:
            continue
        values = frame[column]
        if action == "pseudonymize":
            out[PATIENT_ID] = _pseudonyms(values, salt)
        elif action == "year":
            out[column] = _years(values, column)
        elif action == "age_band":
            out[AGE_BAND] = _age_bands(values, column)
        elif action == "age":
            out[column] = _capped_ages(values, column)
        # "drop": nothing is copied
    study = schema.study_date
    out[STUDY_YEAR] = out[study] if study and study in out.columns else pd.array([pd.NA] * len(out), dtype="Int64")
    for column in [*schema.features, schema.label, *schema.subgroups]:
        if column in frame.columns and column not in out.columns:
            out[column] = frame[column]
    if study and study in out.columns and study not in schema.subgroups:
        out = out.drop(columns=[study])
    return out.reset_index(drop=True)


def _pseudonyms(values: pd.Series, salt: bytes) -> pd.Series:
    cache: dict[str, str] = {}
    result = []
    for value in values.astype("string"):
        if value is pd.NA or not str(value).strip():
            result.append(pd.NA)
            continue
        if value not in cache:
            cache[value] = pseudonym(salt, str(value))
        result.append(cache[value])
    return pd.Series(result, index=values.index, dtype="string")


def _years(values: pd.Series, column: str) -> pd.Series:
    dates = pd.to_datetime(values, errors="coerce", utc=True)
    return pd.Series(dates.dt.year, index=values.index).astype("Int64")


def _age_bands(values: pd.Series, column: str) -> pd.Series:
    ages = pd.to_numeric(values, errors="coerce")
    return ages.map(age_band).astype("string")


def _capped_ages(values: pd.Series, column: str) -> pd.Series:
    ages = pd.to_numeric(values, errors="coerce")
    return ages.map(cap_age).astype("Int64")
