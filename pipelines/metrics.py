"""Clinical metrics of a screening model: pure functions, numpy in, plain dicts out.

Everything here is deterministic (the bootstrap takes a seed) and JSON-ready: a metric that is
undefined for the data at hand (AUROC with one class only, sensitivity without positives, PPV
when nothing is flagged) is ``None``, never NaN. Ranking and calibration metrics come from
``sklearn.metrics``; only what scikit-learn does not offer (expected calibration error, a
vectorised patient-level bootstrap, the operating threshold rule) is written here.

Conventions: ``y_true`` is 1 for the positive class (the finding screened for) and 0 otherwise;
``score`` is the model's probability of the positive class; an item is flagged positive when
``score >= threshold``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from pipelines.errors import MedloopError

CI_LEVEL = 0.95
# Keys of binary_metrics, in the order the model card shows them.
METRIC_NAMES = (
    "n", "n_positive", "auroc", "auprc", "sensitivity", "specificity", "ppv", "npv", "f1",
    "accuracy", "brier", "ece",
)


def probabilities_from_output(output: np.ndarray, n_classes: int) -> np.ndarray:
    """Per-class probabilities from a model's raw output.

    Args:
        output: what the model returned: ``(n, 1)`` or ``(n,)`` sigmoid probabilities of
            ``classes[1]`` for a binary model, or ``(n, n_classes)`` softmax probabilities.
        n_classes: ``len(model.classes)``.

    Returns:
        ``(n, n_classes)`` float64 probabilities; column i belongs to ``classes[i]``.

    Raises:
        MedloopError: the output's shape fits neither form.
    """
    array = np.asarray(output, dtype=np.float64)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2:
        raise MedloopError(f"model output has shape {array.shape}; expected (n, 1) or (n, {n_classes})")
    if array.shape[1] == 1 and n_classes == 2:
        positive = np.clip(array[:, 0], 0.0, 1.0)
        return np.stack([1.0 - positive, positive], axis=1)
    if array.shape[1] == n_classes:
        return array
    raise MedloopError(
        f"model output has {array.shape[1]} columns but the model has {n_classes} classes; "
        f"expected 1 (binary sigmoid) or {n_classes} (softmax)"
    )


def binary_metrics(y_true: Sequence, score: Sequence, threshold: float, bins: int = 10) -> dict:
    """Discrimination, operating-point and calibration metrics of one positive class.

    Args:
        y_true: 1 for the positive class, 0 otherwise.
        score: predicted probability of the positive class.
        threshold: items with ``score >= threshold`` are flagged positive.
        bins: equal-width bins of [0, 1] for the expected calibration error.

    Returns:
        ``n``, ``n_positive``, ``auroc``, ``auprc`` (average precision), ``sensitivity``,
        ``specificity``, ``ppv``, ``npv``, ``f1``, ``accuracy``, ``brier``, ``ece``; ``None``
        where undefined (one class only, nothing flagged, no items).
    """
    from sklearn.metrics import average_precision_score, brier_score_loss, confusion_matrix, roc_auc_score

    y, s = _arrays(y_true, score)
    n, n_positive = len(y), int(y.sum())
    both_classes = 0 < n_positive < n
    flagged = s >= threshold
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, flagged.astype(int), labels=[0, 1]).ravel()) if n else (0,) * 4
    return {
        "n": n,
        "n_positive": n_positive,
        "auroc": float(roc_auc_score(y, s)) if both_classes else None,
        "auprc": float(average_precision_score(y, s)) if both_classes else None,
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "accuracy": _ratio(tp + tn, n),
        "brier": float(brier_score_loss(y, s, pos_label=1)) if n else None,
        "ece": expected_calibration_error(y, s, bins),
    }


def expected_calibration_error(y_true: Sequence, score: Sequence, bins: int = 10) -> float | None:
    """Expected calibration error: the count-weighted mean gap between predicted probability and
    observed frequency of the positive class over ``bins`` equal-width bins of [0, 1].

    Bin k holds scores in ``[k/bins, (k+1)/bins)``; a score of exactly 1 goes to the last bin.
    """
    y, s = _arrays(y_true, score)
    if len(y) == 0:
        return None
    table = calibration_table(y, s, bins)
    return float(sum(abs(row["observed"] - row["predicted"]) * row["count"] for row in table) / len(y))


def calibration_table(y_true: Sequence, score: Sequence, bins: int = 10) -> list[dict]:
    """The reliability diagram: per non-empty bin, its bounds, item count, mean predicted
    probability and observed frequency of the positive class (the bins of the ECE)."""
    y, s = _arrays(y_true, score)
    index = np.minimum(np.floor(s * bins).astype(int), bins - 1).clip(0)
    rows = []
    for k in range(bins):
        members = index == k
        count = int(members.sum())
        if count:
            rows.append({
                "bin": k, "lower": k / bins, "upper": (k + 1) / bins, "count": count,
                "predicted": float(s[members].mean()), "observed": float(y[members].mean()),
            })
    return rows


def operating_threshold(y_true_val: Sequence, score_val: Sequence, target_sensitivity: float) -> float:
    """The highest threshold whose sensitivity on validation reaches the target.

    Flagging ``score >= t`` catches every positive scoring at least t, so the answer is the k-th
    highest positive score with ``k = ceil(target * n_positive)``: any higher threshold catches
    fewer than k positives. Tied scores are caught together, so the sensitivity reached may
    exceed the target. A higher threshold (fewer false alarms) that still meets the target does
    not exist; a lower one only costs specificity.

    Args:
        y_true_val: validation labels (1 = positive class).
        score_val: validation scores.
        target_sensitivity: in (0, 1].

    Returns:
        The threshold. If the target cannot be judged (no positives in validation), the lowest
        validation score, which flags everything: the safe side for a screening aid. The caller
        decides whether that is acceptable (``pipelines.evaluate`` refuses it).
    """
    y, s = _arrays(y_true_val, score_val)
    if not 0.0 < target_sensitivity <= 1.0:
        raise MedloopError(f"target sensitivity must be in (0, 1], got {target_sensitivity}")
    positives = np.sort(s[y == 1])[::-1]
    if len(positives) == 0:
        return float(s.min()) if len(s) else 0.0
    # The tolerance keeps 0.9 * 10 = 9.000000000000002 from asking for 10 positives.
    k = max(1, math.ceil(target_sensitivity * len(positives) - 1e-9))
    return float(positives[k - 1])


def bootstrap_intervals(
    y_true: Sequence,
    score: Sequence,
    threshold: float,
    samples: int,
    seed: int,
    groups: Sequence | None = None,
) -> dict:
    """95% percentile bootstrap intervals of AUROC, sensitivity and specificity.

    With ``groups`` (patient ids), whole patients are resampled with replacement, keeping all of
    a patient's items together: items of one patient are correlated, and resampling them one by
    one would make the intervals too narrow. Without it every item is its own group.

    The resamples are drawn as count weights (how often each patient was drawn), so every
    replicate is a weighted metric over the same items: one matrix product per metric, no Python
    loop over replicates. Replicates where a metric is undefined (no positives drawn) are left
    out of that metric's interval.

    Args:
        y_true: 1 for the positive class, 0 otherwise.
        score: predicted probability of the positive class.
        threshold: the operating threshold.
        samples: bootstrap replicates; 0 gives ``None`` intervals.
        seed: seed of the numpy Generator; the same seed gives the same intervals.
        groups: optional group (patient) of every item.

    Returns:
        ``{"auroc_ci": [lo, hi], "sensitivity_ci": [lo, hi], "specificity_ci": [lo, hi]}``,
        each ``None`` where no replicate defines it.
    """
    y, s = _arrays(y_true, score)
    empty = {"auroc_ci": None, "sensitivity_ci": None, "specificity_ci": None}
    if samples <= 0 or len(y) == 0:
        return empty
    weights = _bootstrap_weights(len(y), samples, seed, groups)
    flagged = (s >= threshold).astype(np.float64)
    positive, negative = y.astype(np.float64), 1.0 - y
    with np.errstate(divide="ignore", invalid="ignore"):
        sensitivity = (weights @ (positive * flagged)) / (weights @ positive)
        specificity = (weights @ (negative * (1.0 - flagged))) / (weights @ negative)
    return {
        "auroc_ci": _percentile_interval(weighted_auroc(weights, y, s)),
        "sensitivity_ci": _percentile_interval(sensitivity),
        "specificity_ci": _percentile_interval(specificity),
    }


def weighted_auroc(weights: np.ndarray, y_true: Sequence, score: Sequence) -> np.ndarray:
    """AUROC of every row of item weights (ties count one half), NaN where a class is absent.

    Equals ``roc_auc_score(y_true, score, sample_weight=row)`` for each row: the weighted share
    of (positive, negative) pairs that the score orders correctly.
    """
    from scipy import sparse

    y, s = _arrays(y_true, score)
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    levels, level_of = np.unique(s, return_inverse=True)  # ascending distinct scores
    onehot = sparse.csr_matrix(
        (np.ones(len(s)), (np.arange(len(s)), level_of)), shape=(len(s), len(levels))
    )
    # weight of positives and of negatives at each distinct score, per row: (rows, levels)
    pos = np.asarray(onehot.T @ (weights * y).T).T
    neg = np.asarray(onehot.T @ (weights * (1.0 - y)).T).T
    negatives_below = np.cumsum(neg, axis=1) - neg
    correct = (pos * (negatives_below + 0.5 * neg)).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return correct / (pos.sum(axis=1) * neg.sum(axis=1))


def subgroup_metrics(frame: pd.DataFrame, threshold: float, columns: Sequence[str]) -> dict:
    """Per-subgroup counts and metrics at the operating threshold.

    Args:
        frame: one row per item with ``y_true``, ``score`` and the subgroup columns.
        threshold: the operating threshold.
        columns: subgroup columns to report; those absent from ``frame`` are skipped. A missing
            value is reported as the subgroup ``"unknown"``.

    Returns:
        ``{column: {value: {"n", "n_positive", "auroc", "sensitivity", "specificity"}}}``.
    """
    report: dict[str, dict] = {}
    for column in columns:
        if column not in frame.columns:
            continue
        values = frame[column].astype("object").where(frame[column].notna(), "unknown").astype(str)
        report[column] = {}
        for value in sorted(values.unique()):
            members = frame[values == value]
            full = binary_metrics(members["y_true"], members["score"], threshold)
            report[column][value] = {key: full[key] for key in ("n", "n_positive", "auroc", "sensitivity", "specificity")}
    return report


def macro_auroc(label_index: Sequence, probabilities: np.ndarray) -> float | None:
    """Unweighted mean of the one-vs-rest AUROCs of every class present with both outcomes.

    Equals ``roc_auc_score(..., multi_class="ovr", average="macro")`` when every class occurs;
    classes absent from ``label_index`` are left out instead of failing.
    """
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(label_index)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    aurocs = []
    for k in range(probabilities.shape[1]):
        is_k = (labels == k).astype(int)
        if 0 < is_k.sum() < len(is_k):
            aurocs.append(float(roc_auc_score(is_k, probabilities[:, k])))
    return float(np.mean(aurocs)) if aurocs else None


def curves(y_true: Sequence, score: Sequence, bins: int = 10) -> dict[str, list[dict]]:
    """Plot data (lists of ``{"x", "y"}``): ROC (x = 1 - specificity, y = sensitivity),
    precision-recall (x = recall, y = precision) and calibration (x = mean predicted
    probability, y = observed frequency, per non-empty bin). Empty lists where undefined."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    y, s = _arrays(y_true, score)
    if 0 < y.sum() < len(y):
        fpr, tpr, _ = roc_curve(y, s)
        precision, recall, _ = precision_recall_curve(y, s)
        roc = [{"x": float(a), "y": float(b)} for a, b in zip(fpr, tpr)]
        pr = [{"x": float(a), "y": float(b)} for a, b in zip(recall[::-1], precision[::-1])]
    else:
        roc, pr = [], []
    calibration = [
        {"x": row["predicted"], "y": row["observed"], "count": row["count"]}
        for row in calibration_table(y, s, bins)
    ]
    return {"roc": roc, "pr": pr, "calibration": calibration}


def json_ready(value, digits: int = 6):
    """Round floats to ``digits`` decimals, NaN/inf to None, numpy scalars to Python (recursively)."""
    if isinstance(value, dict):
        return {str(k): json_ready(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v, digits) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if not math.isfinite(value):
            return None
        rounded = round(value, digits)
        return 0.0 if rounded == 0 else rounded  # no "-0.0"
    return value


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _arrays(y_true: Sequence, score: Sequence) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(np.int64).ravel()
    s = np.asarray(score, dtype=np.float64).ravel()
    if len(y) != len(s):
        raise MedloopError(f"{len(y)} labels but {len(s)} scores")
    if len(y) and not np.isin(y, (0, 1)).all():
        raise MedloopError("y_true must be 0 or 1 (1 = positive class)")
    if not np.isfinite(s).all():
        raise MedloopError("scores contain NaN or infinite values; the model output is broken")
    return y, s


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def _bootstrap_weights(n: int, samples: int, seed: int, groups: Sequence | None) -> np.ndarray:
    """(samples, n) item weights: how often each item's group was drawn in each replicate."""
    rng = np.random.default_rng(seed)
    if groups is None:
        group_of, n_groups = np.arange(n), n
    else:
        _, group_of = np.unique(np.asarray(groups).astype(str), return_inverse=True)
        n_groups = int(group_of.max()) + 1
    draws = rng.integers(0, n_groups, size=(samples, n_groups))
    flat = (draws + np.arange(samples)[:, None] * n_groups).ravel()
    counts = np.bincount(flat, minlength=samples * n_groups).reshape(samples, n_groups)
    return counts[:, group_of].astype(np.float64)


def _percentile_interval(values: np.ndarray) -> list[float] | None:
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return None
    tail = (1.0 - CI_LEVEL) / 2.0 * 100.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return [float(low), float(high)]
