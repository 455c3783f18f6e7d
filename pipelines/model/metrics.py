"""Clinical metrics of a screening model: pure functions, numpy in, plain dicts out.

Everything here is deterministic (the bootstrap takes a seed) and JSON-ready: a metric that is
undefined for the data at hand (AUROC with one class only, sensitivity without positives, PPV
when nothing is flagged) is ``None``, never NaN. Ranking and calibration metrics come from
``sklearn.metrics``; only what scikit-learn does not offer (expected calibration error, a
vectorised patient-level bootstrap, patient-clustered score intervals of proportions and of
paired differences, the operating threshold rule) is written here.

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
    from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

    y, s = _arrays(y_true, score)
    n, n_positive = len(y), int(y.sum())
    both_classes = 0 < n_positive < n
    point = operating_point(y, s >= threshold)
    return {
        "n": n,
        "n_positive": n_positive,
        "auroc": float(roc_auc_score(y, s)) if both_classes else None,
        "auprc": float(average_precision_score(y, s)) if both_classes else None,
        **{key: point[key] for key in ("sensitivity", "specificity", "ppv", "npv", "f1", "accuracy")},
        "brier": float(brier_score_loss(y, s, pos_label=1)) if n else None,
        "ece": expected_calibration_error(y, s, bins),
    }


def operating_point(y_true: Sequence, flagged: Sequence) -> dict:
    """The confusion counts and rates of decisions already made (a model's, or a served
    version's against clinicians' confirmed labels).

    Args:
        y_true: 1 for the positive class, 0 otherwise.
        flagged: True (or 1) where the decision was the positive class.

    Returns:
        ``confusion`` (``tp``, ``fn``, ``tn``, ``fp``), ``sensitivity``, ``specificity``, ``ppv``,
        ``npv``, ``f1``, ``accuracy``; ``None`` where undefined (no positives, nothing flagged,
        no items).
    """
    from sklearn.metrics import confusion_matrix

    y, said = np.asarray(y_true, dtype=int), np.asarray(flagged, dtype=int)
    n = len(y)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, said, labels=[0, 1]).ravel()) if n else (0,) * 4
    return {
        "confusion": {"tp": tp, "fn": fn, "tn": tn, "fp": fp},
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "accuracy": _ratio(tp + tn, n),
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


def intervals(
    y_true: Sequence,
    score: Sequence,
    threshold: float,
    samples: int,
    seed: int,
    groups: Sequence | None = None,
) -> dict:
    """95% intervals of AUROC, sensitivity and specificity on the frozen test set.

    - AUROC: percentile bootstrap over patients (see `bootstrap_auroc_interval`); AUROC is a
      rank statistic with no closed-form interval that scikit-learn or scipy offers.
    - Sensitivity and specificity: Wilson score intervals on the patient-clustered effective
      sample size (see `clustered_wilson_interval`). A bootstrap of a proportion collapses at 0
      and 1 (13 caught of 13 resamples to 13 of 13 every time: [1.0, 1.0]); the score interval
      does not (13 of 13 gives about [0.77, 1.0]).

    Args:
        y_true: 1 for the positive class, 0 otherwise.
        score: predicted probability of the positive class.
        threshold: the operating threshold.
        samples: bootstrap replicates for the AUROC interval; 0 gives a ``None`` AUROC interval.
        seed: seed of the bootstrap; the same seed gives the same intervals.
        groups: optional group (patient) of every item; without it every item is its own patient.

    Returns:
        ``{"auroc_ci": [lo, hi], "sensitivity_ci": [lo, hi], "specificity_ci": [lo, hi]}``,
        each ``None`` where undefined (one class only, no items).
    """
    y, s = _arrays(y_true, score)
    flagged = s >= threshold
    patients = _group_index(len(y), groups)
    return {
        "auroc_ci": bootstrap_auroc_interval(y, s, samples, seed, groups),
        "sensitivity_ci": clustered_wilson_interval(flagged[y == 1], patients[y == 1]),
        "specificity_ci": clustered_wilson_interval(~flagged[y == 0], patients[y == 0]),
    }


# Named in metrics.json (``intervals``), the model card and the promotion verdicts.
PROPORTION_INTERVAL_METHOD = "Wilson score interval on the patient-clustered effective sample size"
PAIRED_INTERVAL_METHOD = (
    "Newcombe hybrid score interval for paired proportions (method 10) on the patient-clustered "
    "effective sample size"
)


# Short names of the methods in metrics.json (``dvc metrics show`` prints them as columns).
INTERVAL_METHOD_NAMES = {
    PROPORTION_INTERVAL_METHOD: "wilson-patient-clustered",
    PAIRED_INTERVAL_METHOD: "newcombe-paired-patient-clustered",
}


def interval_methods(samples: int, seed: int) -> dict:
    """How every interval in metrics.json was computed (the report names its methods): the
    level, and per interval a short name of its method (see `INTERVAL_METHOD_NAMES`)."""
    return {
        "level": CI_LEVEL,
        "auroc_ci": f"bootstrap-patients-{samples}-seed-{seed}",
        "sensitivity_ci": INTERVAL_METHOD_NAMES[PROPORTION_INTERVAL_METHOD],
        "specificity_ci": INTERVAL_METHOD_NAMES[PROPORTION_INTERVAL_METHOD],
        "non_inferiority": INTERVAL_METHOD_NAMES[PAIRED_INTERVAL_METHOD],
    }


def bootstrap_auroc_interval(
    y_true: Sequence, score: Sequence, samples: int, seed: int, groups: Sequence | None = None
) -> list[float] | None:
    """95% percentile bootstrap interval of AUROC, resampling whole patients.

    With ``groups`` (patient ids), whole patients are resampled with replacement, keeping all of
    a patient's items together: items of one patient are correlated, and resampling them one by
    one would make the interval too narrow. Without it every item is its own group.

    The resamples are drawn as count weights (how often each patient was drawn), so every
    replicate is a weighted AUROC over the same items: no Python loop over replicates.
    Replicates with one class only are left out.

    Returns:
        ``[lo, hi]``, or ``None`` when ``samples`` is 0 or no replicate defines AUROC.
    """
    y, s = _arrays(y_true, score)
    if samples <= 0 or len(y) == 0:
        return None
    weights = _bootstrap_weights(len(y), samples, seed, groups)
    return _percentile_interval(weighted_auroc(weights, y, s))


def effective_sample_size(values: Sequence, groups: Sequence | None = None) -> float:
    """How many independent items ``values`` (one number per item) are worth for their mean,
    given that items of one patient (``groups``) are correlated: n divided by the design effect.

    The design effect is the ratio of the patient-clustered variance of the mean (the
    linearised ratio estimator over patients, with the ``k/(k-1)`` small-sample factor for k
    patients) to the variance if every item were independent. It is kept between 1 (items as
    good as independent: never narrower than the unclustered interval) and the value it takes
    when a patient's items are all alike, which leaves Kish's ``n**2 / sum(m_i**2)`` items for
    patients with ``m_i`` items each (the number of patients when they have equally many).

    When the data cannot estimate it (every value alike, e.g. 13 caught of 13, or one patient)
    the conservative end is used: Kish's size. An interval at 0 or 1 then counts patients, not
    images, which is what a collapsed bootstrap would hide.

    Args:
        values: one number per item (1/0 hits, or a paired difference -1/0/1).
        groups: the patient of every item; without it every item is its own patient.

    Returns:
        The effective sample size, between Kish's size and ``len(values)`` (0.0 when empty).
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    n = len(x)
    if n == 0:
        return 0.0
    patients = _group_index(n, groups)
    sizes = np.bincount(patients).astype(np.float64)
    sizes = sizes[sizes > 0]
    smallest = float(n * n / np.sum(sizes**2))
    k = len(sizes)
    iid_variance = float(x.var()) / n
    if k < 2 or iid_variance <= 1e-15:
        return smallest
    mean = float(x.mean())
    totals = np.bincount(patients, weights=x)[np.bincount(patients) > 0]
    clustered_variance = k / (k - 1) * float(np.sum((totals - mean * sizes) ** 2)) / n**2
    design_effect = clustered_variance / iid_variance
    return float(min(n, max(smallest, n / design_effect))) if design_effect > 0 else float(n)


def wilson_interval(successes: float, n: float) -> list[float] | None:
    """Wilson score 95% interval of a proportion (``successes`` of ``n``, both may be fractional
    when ``n`` is an effective sample size). Honest at 0 and 1: 13 of 13 gives [0.772, 1.0].
    ``None`` when ``n`` is 0."""
    from scipy.stats import norm

    if n <= 0:
        return None
    z = float(norm.ppf(0.5 + CI_LEVEL / 2.0))
    p = min(1.0, max(0.0, successes / n))
    denominator = 1.0 + z * z / n
    centre = (p + z * z / (2.0 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n))
    # At p = 0 or 1 the bound on that side is exactly 0 or 1 (not 0.9999999999999999).
    return [0.0 if p == 0.0 else max(0.0, centre - half), 1.0 if p == 1.0 else min(1.0, centre + half)]


def clustered_wilson_interval(hits: Sequence, groups: Sequence | None = None) -> list[float] | None:
    """95% interval of a proportion of items (e.g. positives caught) whose items cluster in
    patients: the Wilson score interval on the effective sample size.

    Why this and not a bootstrap or Clopper-Pearson: a bootstrap of a proportion collapses to a
    point at 0 and 1 (13 of 13 is [1.0, 1.0]), exactly where a small test set most needs an
    interval; the Wilson interval never collapses and keeps close to its nominal coverage for
    small n, where Clopper-Pearson is needlessly wide. Patients with several items are accounted
    for by shrinking n to the effective sample size of the patient-clustered design effect
    (`effective_sample_size`, in the manner of Korn and Graubard, 1998), keeping the observed
    proportion: with a patient's items alike, the interval is that of counting patients.

    Args:
        hits: 1 (or True) per item that counts as a success, 0 otherwise.
        groups: the patient of every item; without it every item is its own patient.

    Returns:
        ``[lo, hi]``, or ``None`` when there are no items.
    """
    x = np.asarray(hits, dtype=np.float64).ravel()
    if len(x) == 0:
        return None
    n_effective = effective_sample_size(x, groups)
    return wilson_interval(float(x.mean()) * n_effective, n_effective)


def paired_difference(
    candidate_hits: Sequence, champion_hits: Sequence, groups: Sequence | None = None
) -> dict:
    """The difference of two models' proportions on the SAME items (candidate minus champion),
    with its 95% interval, in cases and in proportion.

    The interval is Newcombe's hybrid score interval for paired proportions (method 10 of
    Newcombe, Statistics in Medicine 1998;17:2635), built from the two Wilson intervals and the
    correlation of the paired outcomes. It is used rather than a paired bootstrap because a
    bootstrap collapses to [0, 0] when the models disagree on no case, although a few
    disagreements in a small set would be unsurprising. Patients with several items are
    accounted for by scaling the four paired counts to the effective sample size of the
    per-item difference (`effective_sample_size`); the difference itself is unchanged.
    Closed form: no seed, the same input always gives the same interval.

    Args:
        candidate_hits: 1 per item the candidate got right (a positive caught, a negative
            cleared), 0 otherwise.
        champion_hits: the same for the champion, item for item.
        groups: the patient of every item; without it every item is its own patient.

    Returns:
        ``n`` items, ``candidate`` and ``champion`` hits, ``only_candidate`` and
        ``only_champion`` (the discordant items), ``difference`` (proportion), ``interval``
        ``[lo, hi]`` (None without items), ``n_effective``, ``patients``.
    """
    first = np.asarray(candidate_hits, dtype=np.float64).ravel()
    second = np.asarray(champion_hits, dtype=np.float64).ravel()
    if len(first) != len(second):
        raise MedloopError(f"{len(first)} candidate results but {len(second)} champion results")
    n = len(first)
    both = int(np.sum((first == 1) & (second == 1)))
    only_candidate = int(np.sum((first == 1) & (second == 0)))
    only_champion = int(np.sum((first == 0) & (second == 1)))
    neither = n - both - only_candidate - only_champion
    patients = _group_index(n, groups)
    result = {
        "n": n, "candidate": both + only_candidate, "champion": both + only_champion,
        "only_candidate": only_candidate, "only_champion": only_champion,
        "difference": (only_candidate - only_champion) / n if n else None,
        "interval": None, "n_effective": 0.0, "patients": int(len(np.unique(patients))),
    }
    if n == 0:
        return result
    n_effective = effective_sample_size(first - second, groups)
    scale = n_effective / n
    result["interval"] = _newcombe_paired(
        both * scale, only_candidate * scale, only_champion * scale, neither * scale
    )
    result["n_effective"] = n_effective
    return result


def case_outcomes(y_true: Sequence, score: Sequence, threshold: float, groups: Sequence | None = None) -> dict:
    """Per-case results on the frozen test set, in record-id order, without any identifier.

    Promote pairs two models' results case by case (`paired_difference`); the order is that of
    the sorted record ids, which ``frozen_test_set_sha256`` fingerprints, so two reports with the
    same fingerprint list the same cases in the same order.

    Returns:
        ``{"y_true": [0, 1, ...], "flagged": [1, 0, ...], "patient": [0, 0, 1, ...]}``: labels
        and flags as 0/1, and each case's patient as the index of that patient's first
        appearance (``None`` when every case is its own patient). Lists, not strings, so that
        ``dvc metrics show`` leaves them out of its table.
    """
    y, s = _arrays(y_true, score)
    return {
        "y_true": y.tolist(),
        "flagged": (s >= threshold).astype(np.int64).tolist(),
        "patient": None if groups is None else _first_appearance(groups).tolist(),
    }


def read_case_outcomes(cases: dict | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
    """(y_true, flagged, patient or None) arrays from `case_outcomes`' dict; ``None`` when
    absent or malformed (not lists, different lengths, values other than 0 and 1)."""
    if not isinstance(cases, dict):
        return None
    y, flagged, patient = cases.get("y_true"), cases.get("flagged"), cases.get("patient")
    if not isinstance(y, list) or not isinstance(flagged, list) or len(y) != len(flagged):
        return None
    if patient is not None and (not isinstance(patient, list) or len(patient) != len(y)):
        return None
    if not set(y) <= {0, 1} or not set(flagged) <= {0, 1}:
        return None
    return (np.asarray(y, dtype=np.int64), np.asarray(flagged, dtype=bool),
            None if patient is None else np.asarray(patient))


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


def _group_index(n: int, groups: Sequence | None) -> np.ndarray:
    """Each item's group as 0..k-1 (every item its own group without ``groups``)."""
    if groups is None:
        return np.arange(n)
    labels = np.asarray(groups).astype(str).ravel()
    if len(labels) != n:
        raise MedloopError(f"{n} items but {len(labels)} patient ids")
    return np.unique(labels, return_inverse=True)[1].ravel()


def _first_appearance(groups: Sequence) -> np.ndarray:
    """Each item's group numbered by the order in which groups first appear."""
    _, first, inverse = np.unique(np.asarray(groups).astype(str), return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse.ravel()]


def _newcombe_paired(both: float, only_first: float, only_second: float, neither: float) -> list[float]:
    """Newcombe's method 10 interval of p1 - p2 for paired proportions from the 2x2 counts
    (p1 = share of items the first got right, p2 the second's)."""
    n = both + only_first + only_second + neither
    p1, p2 = (both + only_first) / n, (both + only_second) / n
    low1, high1 = wilson_interval(both + only_first, n)
    low2, high2 = wilson_interval(both + only_second, n)
    denominator = (both + only_first) * (only_second + neither) * (both + only_second) * (only_first + neither)
    # The correlation of the paired outcomes, with Newcombe's adjustment: a positive one is
    # reduced by n/2 (and never below 0), which keeps the interval from being too narrow.
    association = both * neither - only_first * only_second
    if association > 0:
        association = max(0.0, association - n / 2.0)
    phi = association / math.sqrt(denominator) if denominator > 0 else 0.0
    difference = p1 - p2
    below = (p1 - low1) ** 2 - 2.0 * phi * (p1 - low1) * (high2 - p2) + (high2 - p2) ** 2
    above = (high1 - p1) ** 2 - 2.0 * phi * (high1 - p1) * (p2 - low2) + (p2 - low2) ** 2
    return [max(-1.0, difference - math.sqrt(max(below, 0.0))), min(1.0, difference + math.sqrt(max(above, 0.0)))]


def _bootstrap_weights(n: int, samples: int, seed: int, groups: Sequence | None) -> np.ndarray:
    """(samples, n) item weights: how often each item's group was drawn in each replicate."""
    rng = np.random.default_rng(seed)
    group_of = _group_index(n, groups)
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
