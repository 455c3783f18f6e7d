"""Input and prediction drift of a served model version against the reference it carries.

The reference (`pipelines.monitoring.reference`) holds, per statistic, the values of a seeded sample
of training items: raw features for tables; intensity mean and standard deviation and the
penultimate embedding's principal components for images. It also holds the validation split's
predicted probabilities of the positive class. The service stores each input's summary
(`summarize_inputs`) in its prediction's ``input_metadata["drift"]``.

`drift_report` compares the served inputs of the last ``monitoring.window_days`` with the
reference, statistic by statistic and for the predicted probability:

- the population stability index over ``monitoring.bins`` quantile bins of the reference (the
  outer bins open-ended, so served values beyond the reference's range count; an empty bin
  counts as ``PSI_EPSILON`` so the index stays finite);
- the two-sample Kolmogorov-Smirnov statistic and p-value (``scipy.stats.ks_2samp``).

A statistic drifts when its PSI is over ``monitoring.psi_threshold`` or its KS p-value is under
``monitoring.ks_pvalue``. With fewer than ``monitoring.min_inputs`` inputs in the window, drift
is not judged.

Reading the numbers: with no drift at all, sampling alone gives PSI about
``(bins - 1) * (1/n + 1/m)`` (n served inputs, m reference items), plus about 0.7 for each bin
that few served inputs leave empty. Drawn from the reference's own distribution, 30 inputs over
10 bins average 0.54 (over 0.2 four times in five), 100 inputs 0.09, 200 inputs 0.05. And each
of many statistics tested at ``ks_pvalue`` adds its own chance of a false alarm. The report gives
every statistic's numbers so a reader can weigh them.

SciPy is imported inside the functions; the store is read with SQLAlchemy only by
`recent_predictions`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable

import numpy as np

from pipelines.config import Params
from pipelines.monitoring.reference import (  # noqa: F401 - re-exported: the service's entry points
    EMBEDDING,
    FEATURE,
    INTENSITY,
    REFERENCE_FILE,
    load_reference,
    summarize_inputs,
)
from pipelines.errors import MedloopError
from pipelines.values import utc_now

PSI_EPSILON = 1e-4  # the share an empty bin counts as (keeps the logarithm finite)
PREDICTION = "prediction"


@dataclass(frozen=True)
class StatisticDrift:
    """One statistic (a feature, an image statistic, an embedding component, or the predicted
    probability) compared with the reference.

    Attributes:
        name: the statistic's key in the reference (a feature name, ``intensity_mean``,
            ``embedding_pc1``, or ``prediction``).
        kind: ``feature``, ``intensity``, ``embedding`` or ``prediction``.
        label: how reasons name it, e.g. ``feature 'mean radius'``.
        reference_count: reference values.
        served_count: served values in the window (missing values left out).
        judged: False when fewer than ``monitoring.min_inputs`` served values.
        psi: the population stability index (None when not judged).
        ks_statistic: the Kolmogorov-Smirnov statistic (None when not judged).
        ks_pvalue: its p-value (None when not judged).
        drifted: PSI over the threshold or p-value under the threshold.
    """

    name: str
    kind: str
    label: str
    reference_count: int
    served_count: int
    judged: bool
    psi: float | None = None
    ks_statistic: float | None = None
    ks_pvalue: float | None = None
    drifted: bool = False

    def reason(self, psi_threshold: float, ks_pvalue: float) -> str:
        """``feature 'mean radius': PSI 0.41 > 0.2, KS p=1e-06 < 0.01``: the failing test is
        shown against its threshold, the other one for context."""
        psi = f"PSI {self.psi:.2f}" + (f" > {psi_threshold:g}" if self.psi > psi_threshold else "")
        ks = f"KS p={self.ks_pvalue:.2g}" + (f" < {ks_pvalue:g}" if self.ks_pvalue < ks_pvalue else "")
        return f"{self.label}: {psi}, {ks}"


@dataclass(frozen=True)
class DriftReport:
    """Drift of one model version's served inputs and predictions over a window.

    Attributes:
        model_name, model_version: the version judged (from the predictions; None when there
            were none).
        window_start, window_end: the window (UTC, ISO 8601).
        inputs: predictions in the window.
        judged: False when ``inputs`` is under ``monitoring.min_inputs``.
        drifted: judged, and some input statistic or the prediction drifted.
        input_drift: some input statistic drifted.
        prediction_drift: the predicted probability of the positive class drifted.
        reasons: one line per drifted statistic, e.g.
            ``feature 'mean radius': PSI 0.41 > 0.2, KS p=1e-06 < 0.01``.
        note: the verdict in one sentence.
        statistics: every input statistic compared.
        prediction: the predicted probability compared (None when the reference has none).
        thresholds: the ``monitoring`` settings used.
    """

    model_name: str | None
    model_version: str | None
    window_start: str
    window_end: str
    inputs: int
    judged: bool
    drifted: bool
    input_drift: bool
    prediction_drift: bool
    reasons: list[str]
    note: str
    statistics: list[StatisticDrift] = field(default_factory=list)
    prediction: StatisticDrift | None = None
    thresholds: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able (for ``GET /monitoring``)."""
        return asdict(self)


def drift_report(params: Params, reference: dict, predictions: Iterable[dict], *,
                 now: datetime | None = None) -> DriftReport:
    """Compare one model version's served inputs and predictions with its reference.

    Args:
        params: the configuration (``monitoring``; ``model.positive_class`` when the reference
            does not name it).
        reference: the version's drift reference (``MedloopPyfunc.drift_reference`` or
            `load_reference`).
        predictions: rows of the store's predictions table for that version, as dicts with
            ``input_metadata`` (holding ``drift``, or for tables ``features``), ``probabilities``
            and ``created_at``; rows older than ``monitoring.window_days`` before ``now`` are
            left out.
        now: the window's end (default: now, UTC).

    Returns:
        The `DriftReport`.
    """
    spec = params.monitoring
    end = _utc(now or utc_now())
    start = end - timedelta(days=spec.window_days)
    rows = [row for row in predictions if row.get("created_at") is None or start <= _utc(row["created_at"]) <= end]
    judged = len(rows) >= spec.min_inputs
    summaries = [_summary(row, reference) for row in rows]
    statistics = [
        compare(name, entry.get("kind", FEATURE), entry["values"], [s.get(name) for s in summaries], params)
        for name, entry in reference.get("statistics", {}).items()
    ]
    prediction = None
    if reference.get("prediction"):
        positive = reference.get("positive_class") or params.model.positive_class
        served = [(row.get("probabilities") or {}).get(positive) for row in rows]
        prediction = compare(PREDICTION, PREDICTION, reference["prediction"]["values"], served, params,
                             label=f"predicted P({positive})")
    input_drift = judged and any(s.drifted for s in statistics)
    prediction_drift = judged and prediction is not None and prediction.drifted
    drifted_statistics = [s for s in [*statistics, prediction] if s is not None and s.drifted]
    reasons = [s.reason(spec.psi_threshold, spec.ks_pvalue) for s in drifted_statistics] if judged else []
    names = {row.get("model_name") for row in rows} - {None}
    versions = {str(row["model_version"]) for row in rows if row.get("model_version") is not None}
    window = f"the last {spec.window_days:g} days"
    if not judged:
        note = (f"not judged: {len(rows)} inputs in {window}, fewer than monitoring.min_inputs "
                f"({spec.min_inputs})")
    elif reasons:
        compared = len(statistics) + (prediction is not None)
        note = f"drift in {len(reasons)} of {compared} statistics over {len(rows)} inputs in {window}"
    else:
        note = f"no drift over {len(rows)} inputs in {window}"
    return DriftReport(
        model_name=names.pop() if len(names) == 1 else reference.get("model"),
        model_version=versions.pop() if len(versions) == 1 else None,
        window_start=start.isoformat(timespec="seconds"),
        window_end=end.isoformat(timespec="seconds"),
        inputs=len(rows),
        judged=judged,
        drifted=input_drift or prediction_drift,
        input_drift=input_drift,
        prediction_drift=prediction_drift,
        reasons=reasons,
        note=note,
        statistics=statistics,
        prediction=prediction,
        thresholds=spec.model_dump(),
    )


def compare(name: str, kind: str, reference_values: Iterable[Any], served_values: Iterable[Any], params: Params,
            label: str | None = None) -> StatisticDrift:
    """One statistic's PSI and KS test against its reference (missing values left out).

    Not judged (and not drifted) when fewer than ``monitoring.min_inputs`` served values, or no
    reference values, are left.
    """
    spec = params.monitoring
    expected, actual = _finite(reference_values), _finite(served_values)
    label = label or _label(name, kind)
    if len(actual) < spec.min_inputs or len(expected) == 0:
        return StatisticDrift(name, kind, label, len(expected), len(actual), judged=False)
    from scipy.stats import ks_2samp

    psi = population_stability_index(expected, actual, spec.bins)
    ks = ks_2samp(expected, actual)
    statistic, pvalue = float(ks.statistic), float(ks.pvalue)
    return StatisticDrift(name, kind, label, len(expected), len(actual), judged=True, psi=psi,
                          ks_statistic=statistic, ks_pvalue=pvalue,
                          drifted=psi > spec.psi_threshold or pvalue < spec.ks_pvalue)


def population_stability_index(reference: Any, served: Any, bins: int, epsilon: float = PSI_EPSILON) -> float:
    """PSI of ``served`` against ``reference`` over ``bins`` quantile bins of the reference.

    The bins' edges are the reference's quantiles (repeated edges, from ties, merged); the outer
    bins are open-ended. Each side's share per bin is floored at ``epsilon``, then
    ``PSI = sum((served - reference) * ln(served / reference))``.
    """
    reference = np.asarray(reference, dtype=np.float64)
    served = np.asarray(served, dtype=np.float64)
    if reference.size == 0 or served.size == 0:
        raise MedloopError("the population stability index needs reference and served values")
    cuts = np.unique(np.quantile(reference, np.linspace(0.0, 1.0, bins + 1)[1:-1]))
    expected = _shares(reference, cuts, epsilon)
    actual = _shares(served, cuts, epsilon)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def recent_predictions(store_url: str, model_name: str, model_version: str | None, *, window_days: float,
                       now: datetime | None = None) -> list[dict[str, Any]]:
    """The store's predictions of one model (version) in the last ``window_days``, oldest first.

    Args:
        store_url: the feedback store (SQLite or PostgreSQL URL; for the workspace's own, pass
            ``pipelines.workspace.database_url(layout, params.serving.store_url)``).
        model_name: ``model.name``.
        model_version: the version served; None for every version.
        window_days: how far back.
        now: the window's end (default: now).

    Returns:
        Dicts with ``id``, ``created_at``, ``model_name``, ``model_version``, ``input_metadata``
        and ``probabilities``.
    """
    from sqlalchemy import select
    from sqlalchemy.exc import SQLAlchemyError

    from pipelines.store.db import StoreError, engine_for
    from pipelines.store.models import Prediction

    end = _utc(now or utc_now())
    query = (select(Prediction.id, Prediction.created_at, Prediction.model_name, Prediction.model_version,
                    Prediction.input_metadata, Prediction.probabilities)
             .where(Prediction.model_name == model_name,
                    Prediction.created_at >= end - timedelta(days=window_days), Prediction.created_at <= end)
             .order_by(Prediction.created_at))
    if model_version is not None:
        query = query.where(Prediction.model_version == str(model_version))
    engine = engine_for(store_url)
    try:
        with engine.connect() as connection:
            return [dict(row._mapping) for row in connection.execute(query)]
    except SQLAlchemyError as exc:
        raise StoreError(f"cannot read predictions from the feedback store at {engine.url!r}: {exc}") from None
    finally:
        engine.dispose()


def report_from_store(params: Params, reference: dict, store_url: str, model_version: str | None, *,
                      now: datetime | None = None) -> DriftReport:
    """`drift_report` over the predictions `recent_predictions` reads from the store."""
    rows = recent_predictions(store_url, params.model.name, model_version,
                              window_days=params.monitoring.window_days, now=now)
    return drift_report(params, reference, rows, now=now)


def champion_report(params: Params, layout: Any, *, now: datetime | None = None) -> DriftReport | None:
    """The drift of the champion in service against its own reference, from the workspace's
    feedback store; None when there is no champion or its version carries no reference.

    The reference is read from the service's local copy of the version when there is one
    (``.medloop/serving/<model>/v<N>/model``), otherwise from the registry.
    """
    import tempfile

    from pipelines.registry.client import champion, connect
    from pipelines.workspace import database_url

    found = champion(connect(params, layout), params.model.name)
    if found is None:
        return None
    version = str(found.version)
    cached = layout.state / "serving" / params.model.name / f"v{version}" / "model"
    try:
        if (cached / "MLmodel").is_file():
            reference = load_reference(cached)
        else:
            import mlflow

            with tempfile.TemporaryDirectory() as folder:
                local = mlflow.artifacts.download_artifacts(f"models:/{params.model.name}/{version}", dst_path=folder)
                reference = load_reference(local)
    except MedloopError:
        return None  # a version logged before references existed: drift cannot be judged
    return report_from_store(params, reference, database_url(layout, params.serving.store_url), version, now=now)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _shares(values: np.ndarray, cuts: np.ndarray, epsilon: float) -> np.ndarray:
    counts = np.bincount(np.searchsorted(cuts, values, side="right"), minlength=len(cuts) + 1)
    return np.maximum(counts / values.size, epsilon)


def _summary(row: dict, reference: dict) -> dict:
    """A prediction's drift summary; for tables stored before summaries existed, its features."""
    metadata = row.get("input_metadata") or {}
    summary = metadata.get("drift")
    if summary is None and reference.get("modality") == "tabular":
        summary = metadata.get("features")
    return summary if isinstance(summary, dict) else {}


def _finite(values: Iterable[Any]) -> np.ndarray:
    numbers = []
    for value in values:
        if isinstance(value, bool) or value is None:
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            numbers.append(number)
    return np.asarray(numbers, dtype=np.float64)


def _label(name: str, kind: str) -> str:
    if kind == INTENSITY:
        return f"image {name.replace('_', ' ')}"
    if kind == EMBEDDING:
        return f"embedding {name.removeprefix('embedding_').upper()}"
    return f"feature {name!r}"


def _utc(moment: datetime | str) -> datetime:
    """Aware UTC (SQLite gives back naive datetimes of the UTC times stored)."""
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment)
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)
