"""Validate: the data quality gate between clean and preprocess.

Nothing reaches training unless the cleaned data passes the checks declared in the ``validate``
section of params.yaml. The checks are Great Expectations suites built in code from params:

* ``records``: the whole cleaned table: the expected columns exist with the expected types,
  every record has a known label and a patient, measurements are mostly present and within
  their plausible ranges (for images: the metadata of each radiograph, never the pixels), no
  class is too rare or too dominant, and there are enough records in total.
* ``newest_batch``: the records of the newest collect batch: enough new items arrived.
* ``newest_batch_intake``: everything collected in the newest batch, accepted or quarantined:
  clean quarantined no more than the allowed share of it.

One checkpoint runs the suites against data/clean and renders Data Docs into
``reports/data_docs``; ``reports/validation.json`` lists every expectation with what was observed
(deterministic, so DVC can compare it between runs). When anything fails the stage raises
`GateError` naming each failed expectation, its column, and observed against expected values.

The same rules evaluated with plain pandas (the baseline the benchmarks compare Great Expectations
with, and a cross-check in the tests) live in ``benchmarks/validate_pandas.py``.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from pipelines.config import Bounds, Params
from pipelines.errors import GateError, WorkspaceError
from pipelines.stage import stage_main
from pipelines.values import json_ready
from pipelines.workspace import Layout

if TYPE_CHECKING:
    import pandas as pd

RECORDS_SUITE = "records"
NEWEST_SUITE = "newest_batch"
NEWEST_INTAKE_SUITE = "newest_batch_intake"

DOCS_SITE = "medloop"

# dtype names as Great Expectations' type-list check understands them for pandas.
FLOAT_TYPES = ["float64", "float32", "Float64Dtype", "Float32Dtype"]
INT_TYPES = [
    "int64", "int32", "int16", "int8",
    "uint64", "uint32", "uint16", "uint8",
    "Int64Dtype", "Int32Dtype",
]  # fmt: skip
# An integer measurement that may be missing is stored as float64 (NaN marks the gap), so an
# ``int`` feature accepts float columns too.
INT_FEATURE_TYPES = INT_TYPES + FLOAT_TYPES

# Identifier and label columns every cleaned record carries, whatever the modality.
RECORD_STRING_COLUMNS = ("record_id", "batch_id", "patient_id", "label")
IMAGE_SUBGROUPS = ("sex", "age_band", "view", "site")

# Enough failing values to recognise the problem (a unit error, a sentinel value) at a glance.
EXAMPLES = 5


def run(params: Params, layout: Layout) -> ValidationResult:
    """Check the cleaned records and the newest batch against the quality gate.

    Args:
        params: the resolved configuration (``validate``, ``model``, ``tabular``, ``clean``).
        layout: the workspace.

    Returns:
        The result, when every expectation is met.

    Raises:
        WorkspaceError: the outputs of clean are missing.
        GateError: an expectation failed; the message lists each one, observed against
            expected, and ends with the path of the Data Docs. validation.json and the Data Docs
            are written before this is raised.
    """
    for path in (layout.clean_records, layout.clean_intake):
        if not path.is_file():
            raise WorkspaceError(f"{path} is missing; run the clean stage first")

    newest = _newest_batch_in_files(layout)
    rules = build_rules(params, newest)
    outcomes = _validate_with_gx(rules, layout)

    expectations = [report_entry(rule, outcome) for rule, outcome in zip(rules, outcomes)]
    index = layout.data_docs / "index.html"
    result = ValidationResult(
        success=all(entry["success"] for entry in expectations),
        expectations=expectations,
        report=layout.validation_json,
        data_docs=index,
    )
    _write_report(result, layout)
    if not result.success:
        raise GateError(_failure_message(rules, outcomes, index))
    return result


@dataclass(frozen=True)
class ValidationResult:
    """What the gate found.

    Attributes:
        success: every expectation was met.
        expectations: one entry per expectation, as written to validation.json.
        report: the validation.json file.
        data_docs: the index page of the Data Docs.
    """

    success: bool
    expectations: list[dict[str, Any]]
    report: Path
    data_docs: Path

    @property
    def evaluated(self) -> int:
        return len(self.expectations)

    @property
    def failed(self) -> int:
        return sum(not entry["success"] for entry in self.expectations)

    def summary(self) -> str:
        """One line for the terminal."""
        verdict = "passed" if self.success else "failed"
        return (
            f"validate: gate {verdict}: {self.evaluated - self.failed} of {self.evaluated} "
            f"expectations met; Data Docs at {self.data_docs}"
        )


# --------------------------------------------------------------------------------------------
# the rules, built from params
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One expectation, independent of the engine that evaluates it.

    Attributes:
        suite: the suite it belongs to.
        expectation: the Great Expectations type, snake_case.
        column: the column it looks at (None for table-level expectations).
        kwargs: the remaining arguments of the expectation (json-safe).
        subject: what is checked, for people (``values of 'mean radius'``).
        expected: the requirement, for people (``between 0 and 50``).
        observed_as: how to phrase the observation: ``outside``/``missing`` (rows breaking it),
            ``share``/``share_unexpected`` (fraction of rows matching / breaking the value set),
            ``value`` (a single observed value) or ``presence``.
        batch: only rows of this batch count (the newest batch suites).
        batch_column: the column that names a row's batch: ``batch_id``, or for records
            ``label_batch_id`` (a record relabelled by a clinician counts for the batch that
            brought the label).
    """

    suite: str
    expectation: str
    column: str | None
    kwargs: dict[str, Any]
    subject: str
    expected: str
    observed_as: str
    batch: str | None = None
    batch_column: str = "batch_id"


def build_rules(params: Params, newest_batch: str) -> list[Rule]:
    """The gate's expectations, in report order.

    Args:
        params: the configuration the rules come from.
        newest_batch: the batch_id of the newest collect batch.
    """
    spec = params.validate_spec
    measurements = _measurements(params)
    strings = list(RECORD_STRING_COLUMNS)
    if params.model.modality == "image":
        strings.append("image_path")
        others = list(IMAGE_SUBGROUPS)
    else:
        assert params.tabular is not None  # guaranteed by Params for tabular models
        others = list(params.tabular.subgroups)

    required = _unique(strings + [m.column for m in measurements] + others)
    rules = [_exists(column) for column in required]
    rules += [_is_string(column) for column in strings]
    rules += [_has_type(m) for m in measurements]
    rules += _label_rules(params)
    rules.append(_complete("patient_id", 1.0))
    rules += [_complete(m.column, 1.0 - spec.max_null_fraction) for m in measurements]
    rules += [_within(m.column, m.bounds) for m in measurements if _bounded(m.bounds)]
    if params.model.modality == "image":
        assert params.clean.image is not None  # guaranteed by Params for image models
        rules.append(_one_of(RECORDS_SUITE, "channels", [params.clean.image.channels]))
    rules += _balance_rules(params)
    rules.append(
        Rule(
            RECORDS_SUITE, "expect_table_row_count_to_be_between", None,
            {"min_value": spec.min_total_items, "max_value": None},
            "records in total", f"at least {spec.min_total_items}", "value",
        )
    )  # fmt: skip
    rules += _newest_batch_rules(params, newest_batch)
    return rules


@dataclass(frozen=True)
class _Measurement:
    column: str
    kind: str  # "float", "int" or "int or float", for people
    types: list[str]
    bounds: Bounds | None


def _measurements(params: Params) -> list[_Measurement]:
    """The numeric columns: tabular features, or the metadata of each radiograph."""
    if params.model.modality == "tabular":
        assert params.tabular is not None
        measurements = []
        for name, feature in params.tabular.features.items():
            bounds = Bounds(min=feature.min, max=feature.max)
            if feature.dtype == "float":
                measurements.append(_Measurement(name, "float", FLOAT_TYPES, bounds))
            else:
                measurements.append(_Measurement(name, "int or float", INT_FEATURE_TYPES, bounds))
        return measurements
    image = params.validate_spec.image
    assert image is not None  # guaranteed by Params for image models
    return [
        _Measurement("width", "int", INT_TYPES, image.width),
        _Measurement("height", "int", INT_TYPES, image.height),
        _Measurement("channels", "int", INT_TYPES, None),
        _Measurement("mean_intensity", "float", FLOAT_TYPES, image.mean_intensity),
        _Measurement("std_intensity", "float", FLOAT_TYPES, image.std_intensity),
        _Measurement("min_intensity", "float", FLOAT_TYPES, None),
        _Measurement("max_intensity", "float", FLOAT_TYPES, None),
    ]


def _label_rules(params: Params) -> list[Rule]:
    """Every record is labelled, and only with one of the model's classes."""
    return [_complete("label", 1.0), _one_of(RECORDS_SUITE, "label", params.model.classes)]


def _balance_rules(params: Params) -> list[Rule]:
    """No class is rarer or more dominant than class_fraction allows.

    A share of at least ``min`` is "label in {c} for at least min of rows"; a share of at most
    ``max`` is "label not in {c} for at least 1 - max of rows".
    """
    bounds = params.validate_spec.class_fraction
    rules = []
    for name in params.model.classes:
        if bounds.min is not None:
            rules.append(
                Rule(
                    RECORDS_SUITE, "expect_column_values_to_be_in_set", "label",
                    {"value_set": [name], "mostly": _fraction(bounds.min)},
                    f"share of label {name!r}", f"at least {_percent(bounds.min)} of rows",
                    "share",
                )
            )  # fmt: skip
        if bounds.max is not None:
            rules.append(
                Rule(
                    RECORDS_SUITE, "expect_column_values_to_not_be_in_set", "label",
                    {"value_set": [name], "mostly": _fraction(1.0 - bounds.max)},
                    f"share of label {name!r}", f"at most {_percent(bounds.max)} of rows",
                    "share_unexpected",
                )
            )  # fmt: skip
    return rules


def _newest_batch_rules(params: Params, newest_batch: str) -> list[Rule]:
    """Enough new records arrived, and clean did not quarantine too much of them."""
    spec = params.validate_spec
    accepted = 1.0 - spec.max_quarantined_fraction
    batch = repr(newest_batch) if newest_batch else "(none collected yet)"
    return [
        Rule(
            NEWEST_SUITE, "expect_table_row_count_to_be_between", None,
            {"min_value": spec.min_new_items, "max_value": None},
            f"records of batch {batch} (new or newly labelled)", f"at least {spec.min_new_items}", "value",
            batch=newest_batch, batch_column="label_batch_id",
        ),
        Rule(
            NEWEST_INTAKE_SUITE, "expect_column_values_to_be_in_set", "accepted",
            {"value_set": [True], "mostly": _fraction(accepted)},
            f"accepted items of batch {batch}", f"at least {_percent(accepted)} of items",
            "share", batch=newest_batch,
        ),
    ]  # fmt: skip


def _exists(column: str) -> Rule:
    return Rule(
        RECORDS_SUITE, "expect_column_to_exist", column, {}, f"column {column!r}", "present",
        "presence",
    )


def _is_string(column: str) -> Rule:
    # "of type str" compares the dtype's scalar type, so it accepts both of pandas' string
    # dtypes ("string" and the default "str"), which a type list of dtype names cannot.
    return Rule(
        RECORDS_SUITE, "expect_column_values_to_be_of_type", column, {"type_": "str"},
        f"type of {column!r}", "str", "value",
    )


def _has_type(measurement: _Measurement) -> Rule:
    return Rule(
        RECORDS_SUITE, "expect_column_values_to_be_in_type_list", measurement.column,
        {"type_list": measurement.types}, f"type of {measurement.column!r}", measurement.kind,
        "value",
    )


def _complete(column: str, mostly: float) -> Rule:
    mostly = _fraction(mostly)
    expected = "none" if mostly >= 1.0 else f"at most {_percent(1.0 - mostly)} of rows"
    kwargs = {} if mostly >= 1.0 else {"mostly": mostly}
    return Rule(
        RECORDS_SUITE, "expect_column_values_to_not_be_null", column, kwargs,
        f"missing values of {column!r}", expected, "missing",
    )


def _within(column: str, bounds: Bounds | None) -> Rule:
    assert bounds is not None
    return Rule(
        RECORDS_SUITE, "expect_column_values_to_be_between", column,
        {"min_value": bounds.min, "max_value": bounds.max},
        f"values of {column!r}", bounds.describe(), "outside",
    )


def _one_of(suite: str, column: str, values: list[Any]) -> Rule:
    shown = ", ".join(str(value) for value in values)
    return Rule(
        suite, "expect_column_values_to_be_in_set", column, {"value_set": list(values)},
        f"values of {column!r}", f"in {{{shown}}}", "outside",
    )


def _bounded(bounds: Bounds | None) -> bool:
    return bounds is not None and (bounds.min is not None or bounds.max is not None)


def _fraction(value: float) -> float:
    # 1 - 0.8 is 0.19999999999999996; rounding keeps reports readable and both engines equal.
    return round(value, 12)


def _percent(fraction: float) -> str:
    return f"{100 * fraction:g}%"


def _unique(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))


def newest_batch(intake_batches: "pd.Series", record_batches: "pd.Series") -> str:
    """The newest batch: the largest batch_id clean saw.

    The intake decides, because a batch clean quarantined entirely has no records at all and
    must still be the one judged.
    """
    for batches in (intake_batches, record_batches):
        batches = batches.dropna()
        if len(batches):
            return str(batches.max())
    return ""


def _newest_batch_in_files(layout: Layout) -> str:
    import pandas as pd

    def batch_ids(path: Path) -> pd.Series:
        if "batch_id" not in _parquet_columns(path):
            return pd.Series([], dtype="string")
        return pd.read_parquet(path, columns=["batch_id"])["batch_id"]

    return newest_batch(batch_ids(layout.clean_intake), batch_ids(layout.clean_records))


def _parquet_columns(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    # The schema lives in the footer: reading it costs nothing, whatever the size of the table.
    return [name for name in pq.read_schema(path).names if name != "__index_level_0__"]


# --------------------------------------------------------------------------------------------
# Great Expectations
# --------------------------------------------------------------------------------------------


def _validate_with_gx(rules: list[Rule], layout: Layout) -> list[dict[str, Any]]:
    """Run the rules as suites of one checkpoint over data/clean; render the Data Docs.

    The data sources read the parquet files of clean directly: a checkpoint hands the same
    batch parameters to every validation definition, so in-memory dataframe assets could not
    give the records and the intake suites their different tables in one run.

    Returns:
        One outcome per rule, in rule order: ``{"success": bool, "observed": {...}}``.
    """
    with _quiet_gx():
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        # Ephemeral: the suites are rebuilt from params on every run, so nothing needs to
        # persist, and nothing GX-internal lands in the workspace.
        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(
            globally=False, metric_calculations=False
        )
        _use_docs_site(context, layout.data_docs)

        source = context.data_sources.add_pandas("clean")
        record_columns = _parquet_columns(layout.clean_records)
        intake_columns = _parquet_columns(layout.clean_intake)
        tables = {
            RECORDS_SUITE: source.add_parquet_asset(
                "records",
                path=layout.clean_records,
                # Only the columns the rules read: every expectation filters whole rows, so
                # unused columns would be copied again and again.
                columns=_columns_for(rules, RECORDS_SUITE, record_columns),
            ),
            NEWEST_SUITE: source.add_parquet_asset(
                "newest_batch_records",
                path=layout.clean_records,
                columns=_columns_for(rules, NEWEST_SUITE, record_columns),
            ),
            NEWEST_INTAKE_SUITE: source.add_parquet_asset(
                "intake",
                path=layout.clean_intake,
                columns=_columns_for(rules, NEWEST_INTAKE_SUITE, intake_columns),
            ),
        }

        definitions = []
        for suite_name, asset in tables.items():
            # Handing the expectations to the constructor skips add_expectation's pairwise
            # duplicate search, which is quadratic in the size of the suite.
            suite = gx.ExpectationSuite(
                name=suite_name,
                expectations=[
                    _gx_expectation(rule, index)
                    for index, rule in enumerate(rules)
                    if rule.suite == suite_name
                ],
            )
            suite = context.suites.add(suite)
            definition = gx.ValidationDefinition(
                name=suite_name,
                data=asset.add_batch_definition_whole_dataframe("whole table"),
                suite=suite,
            )
            definitions.append(context.validation_definitions.add(definition))

        checkpoint = context.checkpoints.add(
            gx.Checkpoint(
                name="quality_gate",
                validation_definitions=definitions,
                actions=[gx.checkpoint.UpdateDataDocsAction(name="docs", site_names=[DOCS_SITE])],
                # BASIC carries the counts and a few failing values; SUMMARY would also count
                # every distinct failing value, which costs time on large tables.
                result_format={"result_format": "BASIC", "partial_unexpected_count": EXAMPLES},
            )
        )
        # The docs show this run only: pages of earlier runs would be stale.
        shutil.rmtree(layout.data_docs, ignore_errors=True)
        result = checkpoint.run()

    outcomes: list[dict[str, Any] | None] = [None] * len(rules)
    for suite_result in result.run_results.values():
        for expectation_result in suite_result.results:
            index = expectation_result.expectation_config.meta["medloop_rule"]
            outcomes[index] = _gx_outcome(expectation_result)
    missing = [rules[i] for i, outcome in enumerate(outcomes) if outcome is None]
    if missing:
        raise RuntimeError(f"Great Expectations returned no result for {missing}")
    return outcomes  # type: ignore[return-value]


def _use_docs_site(context: Any, folder: Path) -> None:
    """Point the context's Data Docs at the workspace's reports/data_docs (and nowhere else)."""
    for name in list(context.list_data_docs_sites()):
        # The ephemeral context's default site would write into a temporary folder.
        context.delete_data_docs_site(name)
    context.add_data_docs_site(
        DOCS_SITE,
        {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(folder),
            },
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        },
    )


def _columns_for(rules: list[Rule], suite: str, present: list[str]) -> list[str]:
    wanted = {rule.column for rule in rules if rule.suite == suite and rule.column}
    wanted.update(rule.batch_column for rule in rules if rule.suite == suite and rule.batch is not None)
    # Reading a column the file lacks would fail the whole suite; the expectations on it
    # report the missing column instead.
    return [name for name in present if name in wanted]


def _gx_expectation(rule: Rule, index: int) -> Any:
    import great_expectations as gx
    from great_expectations.expectations.row_conditions import Column

    cls = getattr(gx.expectations, "".join(p.capitalize() for p in rule.expectation.split("_")))
    kwargs = dict(rule.kwargs)
    if rule.column is not None:
        kwargs["column"] = rule.column
    if rule.batch is not None:
        kwargs["row_condition"] = Column(name=rule.batch_column) == rule.batch
    # Results come back grouped by suite and not in suite order; the index finds the rule.
    return cls(**kwargs, meta={"medloop_rule": index})


def _gx_outcome(result: Any) -> dict[str, Any]:
    error = _gx_error(result.exception_info or {})
    if error is not None:
        return {"success": False, "observed": {"error": error}}
    return {"success": bool(result.success), "observed": summarise(result.result or {})}


def _gx_error(info: dict[str, Any]) -> str | None:
    # One exception comes as {"raised_exception": ...}; failed metrics come keyed by metric.
    candidates = [info] if "raised_exception" in info else list(info.values())
    for candidate in candidates:
        if isinstance(candidate, dict) and candidate.get("raised_exception"):
            message = str(candidate.get("exception_message") or "error").strip()
            return message.splitlines()[0][:200] if message else "error"
    return None


@contextmanager
def _quiet_gx() -> Iterator[None]:
    """Keep Great Expectations' own logging and warnings out of the stage's output."""
    logger = logging.getLogger("great_expectations")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


# --------------------------------------------------------------------------------------------
# the report and the failure message
# --------------------------------------------------------------------------------------------

_SUMMARY_KEYS = (
    "observed_value",
    "element_count",
    "missing_count",
    "unexpected_count",
    "unexpected_percent",
)


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    """A short json-safe summary of an expectation's result (Great Expectations' or the pandas
    baseline's in benchmarks/), as validation.json's ``observed``."""
    summary = {key: _plain(result[key]) for key in _SUMMARY_KEYS if key in result}
    if "unexpected_percent" in summary and summary["unexpected_percent"] is not None:
        summary["unexpected_percent"] = round(float(summary["unexpected_percent"]), 4)
    if result.get("unexpected_count"):
        examples = list(result.get("partial_unexpected_list") or [])[:EXAMPLES]
        summary["partial_unexpected_list"] = [_plain(value) for value in examples]
    return summary


def _plain(value: Any) -> Any:
    # An infinity stays as text ("inf"): a person reading a failing example must see it.
    return json_ready(value, None, keep_infinity=True)


def report_entry(rule: Rule, outcome: dict[str, Any]) -> dict[str, Any]:
    """One entry of validation.json's ``expectations``: the rule and its outcome."""
    kwargs = dict(rule.kwargs)
    if rule.batch is not None:
        kwargs["row_condition"] = f"{rule.batch_column} == {rule.batch!r}"
    return {
        "suite": rule.suite,
        "expectation": rule.expectation,
        "column": rule.column,
        "kwargs": _plain(kwargs),
        "success": bool(outcome["success"]),
        "observed": outcome["observed"],
        "expected": rule.expected,
    }


def _write_report(result: ValidationResult, layout: Layout) -> None:
    layout.reports.mkdir(parents=True, exist_ok=True)
    payload = {
        "success": result.success,
        "evaluated": result.evaluated,
        "failed": result.failed,
        "expectations": result.expectations,
        "data_docs": result.data_docs.relative_to(layout.root).as_posix(),
    }
    # No timestamps or run ids: the same data gives the same bytes, so DVC sees no change.
    temporary = layout.validation_json.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(payload, indent=2) + "\n")
    temporary.replace(layout.validation_json)


def _failure_message(rules: list[Rule], outcomes: list[dict[str, Any]], index: Path) -> str:
    """Every failed expectation on its own line, observed against expected."""
    failed = [(rule, outcome) for rule, outcome in zip(rules, outcomes) if not outcome["success"]]
    # A missing or mistyped column makes the other checks on it fail with an error; those are
    # counted on the column's own line instead of repeating the same cause.
    causes: dict[tuple[str, str | None], Rule] = {}
    for rule, outcome in failed:
        is_cause = rule.observed_as == "presence" or (
            rule.expectation in _TYPE_EXPECTATIONS and "error" not in outcome["observed"]
        )
        if is_cause:
            causes.setdefault((rule.suite, rule.column), rule)
    knock_on: dict[int, int] = {}
    shown = []
    for rule, outcome in failed:
        cause = causes.get((rule.suite, rule.column))
        if cause is not None and cause is not rule and "error" in outcome["observed"]:
            knock_on[id(cause)] = knock_on.get(id(cause), 0) + 1
        else:
            shown.append((rule, outcome))

    lines = [f"Data quality gate failed: {len(failed)} of {len(rules)} expectations not met."]
    for rule, outcome in shown:
        line = f"- {rule.suite}: {rule.subject} {rule.expected}: {_observed_text(rule, outcome)}"
        skipped = knock_on.get(id(rule), 0)
        if skipped:
            line += f" ({skipped} more {'check' if skipped == 1 else 'checks'} on it could not run)"
        lines.append(line)
    lines.append(f"Data Docs: {index}")
    return "\n".join(lines)


_TYPE_EXPECTATIONS = (
    "expect_column_values_to_be_in_type_list",
    "expect_column_values_to_be_of_type",
)


def _observed_text(rule: Rule, outcome: dict[str, Any]) -> str:
    observed = outcome["observed"]
    if "error" in observed:
        return f"could not be evaluated ({observed['error']})"
    if rule.observed_as == "presence":
        return "missing"
    if rule.observed_as == "value" and "observed_value" in observed:
        return f"found {observed['observed_value']}"
    unexpected = int(observed.get("unexpected_count") or 0)
    total = int(observed.get("element_count") or 0)
    if rule.observed_as != "missing":
        # Missing values are not judged by value checks: count the rows that have a value.
        total -= int(observed.get("missing_count") or 0)
    if rule.observed_as in ("share", "share_unexpected"):
        matching = total - unexpected if rule.observed_as == "share" else unexpected
        share = matching / total if total else 0.0
        return f"found {_share(share)} ({matching} of {total})"
    text = f"{unexpected} of {total} rows ({_share(unexpected / total if total else 0.0)})"
    if rule.observed_as == "missing":
        return f"{text} missing"
    # A type check on an object column counts the values of another type.
    verdict = "of another type" if rule.observed_as == "value" else "outside"
    examples = observed.get("partial_unexpected_list") or []
    return f"{text} {verdict}" + (f", e.g. {examples}" if examples else "")


def _share(fraction: float) -> str:
    percent = 100 * fraction
    if percent == 0 or percent >= 0.1:
        return f"{percent:.1f}%"
    return f"{percent:.2g}%"


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``python -m pipelines.validate [--params params.yaml]``, run from the workspace root."""
    return stage_main("validate", run, lambda result: result.summary(), argv)


if __name__ == "__main__":
    sys.exit(main())
