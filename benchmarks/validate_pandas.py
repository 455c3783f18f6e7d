"""The data quality gate's rules in plain, vectorised pandas: the baseline Great Expectations is
measured against (``benchmarks/data_stages.py``), and a cross-check of the gate in the tests.

It evaluates the very rules `pipelines.validate.build_rules` makes, and writes entries of the same
shape as validation.json's ``expectations``; the service and the DVC stage use only the Great
Expectations path in `pipelines.validate`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipelines.config import Params
from pipelines.validate import (
    EXAMPLES,
    NEWEST_INTAKE_SUITE,
    NEWEST_SUITE,
    RECORDS_SUITE,
    Rule,
    build_rules,
    newest_batch,
    report_entry,
    summarise,
)

if TYPE_CHECKING:
    import pandas as pd


def check_with_pandas(
    params: Params, records: "pd.DataFrame", intake: "pd.DataFrame"
) -> list[dict[str, Any]]:
    """Evaluate the gate's rules with plain, vectorised pandas.

    This is the baseline that benchmarks/ compares the Great Expectations path with, and the
    tests use it to cross-check GX. It follows GX's semantics: value checks ignore missing
    values, ``mostly`` is the share of rows (with a value) that must comply, a check over no
    rows passes, and a check on a missing or unusable column fails.

    Args:
        params: the configuration the rules come from.
        records: the cleaned records (data/clean/records.parquet).
        intake: every collected item, accepted or not (data/clean/intake.parquet).

    Returns:
        The entries of validation.json's ``expectations``, in the same order.
    """
    empty = _empty_series()
    newest = newest_batch(
        intake["batch_id"] if "batch_id" in intake.columns else empty,
        records["batch_id"] if "batch_id" in records.columns else empty,
    )
    rules = build_rules(params, newest)
    tables = {RECORDS_SUITE: records, NEWEST_SUITE: records, NEWEST_INTAKE_SUITE: intake}
    return [report_entry(rule, _pandas_outcome(rule, tables[rule.suite])) for rule in rules]


def _empty_series() -> "pd.Series":
    import pandas as pd

    return pd.Series([], dtype="string")


def _pandas_outcome(rule: Rule, frame: "pd.DataFrame") -> dict[str, Any]:
    import pandas as pd

    kind = rule.expectation
    if kind == "expect_column_to_exist":
        return {"success": rule.column in frame.columns, "observed": {}}

    rows = None
    if rule.batch is not None:
        if rule.batch_column not in frame.columns:
            return _error(f"column {rule.batch_column!r} not found")
        rows = (frame[rule.batch_column] == rule.batch).fillna(False).to_numpy(dtype=bool)
    if kind == "expect_table_row_count_to_be_between":
        count = int(rows.sum()) if rows is not None else len(frame)
        low, high = rule.kwargs.get("min_value"), rule.kwargs.get("max_value")
        success = (low is None or count >= low) and (high is None or count <= high)
        return {"success": success, "observed": {"observed_value": count}}

    if rule.column not in frame.columns:
        return _error(f"column {rule.column!r} not found")
    values = frame[rule.column] if rows is None else frame.loc[rows, rule.column]

    if kind == "expect_column_values_to_be_in_type_list":
        observed = values.dtype.type.__name__
        return {"success": _dtype_in(values, rule.kwargs["type_list"]), "observed": {
            "observed_value": observed}}
    if kind == "expect_column_values_to_be_of_type":
        success = values.dtype.type is str or (
            values.dtype == object
            and pd.api.types.infer_dtype(values, skipna=True) in ("string", "empty")
        )
        return {"success": success, "observed": {"observed_value": values.dtype.type.__name__}}
    if kind == "expect_column_values_to_not_be_null":
        bad = values.isna().to_numpy(dtype=bool)
        return _map_outcome(rule, len(values), 0, bad, values[bad])

    present = values[values.notna()]
    missing = len(values) - len(present)
    if kind == "expect_column_values_to_be_between":
        if not pd.api.types.is_numeric_dtype(present.dtype) or present.dtype == bool:
            return _error(f"column {rule.column!r} is not numeric ({present.dtype})")
        low, high = rule.kwargs.get("min_value"), rule.kwargs.get("max_value")
        bad = pd.Series(False, index=present.index)
        if low is not None:
            bad |= present < low
        if high is not None:
            bad |= present > high
        bad_mask = bad.to_numpy(dtype=bool)
        return _map_outcome(rule, len(values), missing, bad_mask, present[bad_mask])
    if kind in ("expect_column_values_to_be_in_set", "expect_column_values_to_not_be_in_set"):
        inside = present.isin(rule.kwargs["value_set"]).to_numpy(dtype=bool)
        bad_mask = ~inside if kind == "expect_column_values_to_be_in_set" else inside
        return _map_outcome(rule, len(values), missing, bad_mask, present[bad_mask])
    raise ValueError(f"no pandas implementation of {kind}")


def _dtype_in(values: "pd.Series", type_list: list[str]) -> bool:
    import numpy as np

    dtype = values.dtype
    if dtype == object:
        # Like GX, an object column is judged value by value against numpy scalar types, which
        # plain Python numbers are not: only a column without values passes.
        return bool(values.isna().all())
    if isinstance(dtype, np.dtype):
        return dtype.name in type_list
    return type(dtype).__name__ in type_list


def _map_outcome(
    rule: Rule, total: int, missing: int, bad: Any, bad_values: "pd.Series"
) -> dict[str, Any]:
    considered = total - missing
    unexpected = int(bad.sum())
    mostly = rule.kwargs.get("mostly", 1.0)
    # Same arithmetic as GX, including "nothing to check passes".
    success = considered == 0 or (considered - unexpected) / considered >= mostly
    result = {
        "element_count": total,
        "unexpected_count": unexpected,
        "unexpected_percent": 100 * unexpected / considered if considered else None,
        "partial_unexpected_list": bad_values.head(EXAMPLES).tolist(),
    }
    if rule.expectation != "expect_column_values_to_not_be_null":
        result["missing_count"] = missing
    return {"success": bool(success), "observed": summarise(result)}


def _error(message: str) -> dict[str, Any]:
    return {"success": False, "observed": {"error": message}}
