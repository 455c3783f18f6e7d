"""The clinical gates a candidate model must pass to become champion (pure logic, no MLflow).

Modelled on TFX's Evaluator: absolute thresholds (floors a model must reach on the frozen test
set, overall and in every subgroup large enough to judge) plus change thresholds against the
last blessed model (the champion): AUROC on the point estimate, on its interval and per
subgroup; sensitivity and specificity on the paired difference of the two models' results on
the same frozen test cases, with the margin applied to the lower bound of its 95% interval
(Newcombe's paired score interval on the patient-clustered effective sample size), and stated
in cases as well as in proportion.

Both inputs are ``reports/metrics.json`` dicts (see the shared contract) measured on the SAME
frozen test set; when their ``frozen_test_set_sha256`` differ the comparison is refused, because
two models are only comparable on the same yardstick.

Every gate yields a `GateResult`, passed or not, so the decision can be shown in full: a gate
that does not apply (no champion yet, a subgroup too small to judge) is listed with
``passed=True`` and a detail that says why it was not gated.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from pipelines.config import PromoteSpec
from pipelines.model.metrics import paired_difference, read_case_outcomes
from pipelines.values import number

# Metrics in metrics.json are floats computed by sklearn; a threshold met "exactly" must not fail
# on the last bit (0.85 - 0.02 is 0.8300000000000001), so comparisons allow this much slack.
TOLERANCE = 1e-9

_LABELS = {"auroc": "AUROC", "sensitivity": "sensitivity", "specificity": "specificity", "ece": "ECE"}


@dataclass(frozen=True)
class GateResult:
    """One gate's verdict.

    Attributes:
        gate: the gate's name, e.g. ``min_auroc``, ``subgroup_min_sensitivity[sex=F]``,
            ``non_inferiority.auroc``.
        observed: what the candidate showed (None when not measured or not applicable).
        required: the bound it had to meet (None when not applicable).
        passed: whether the gate passed (True for gates that do not apply).
        detail: one sentence for a clinician, e.g. "AUROC 0.7800 is below the floor 0.8000".
    """

    gate: str
    observed: float | str | None
    required: float | str | None
    passed: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Decision:
    """All gates' verdicts; ``passed`` only when every gate passed."""

    passed: bool
    verdicts: list[GateResult] = field(default_factory=list)

    @property
    def failures(self) -> list[GateResult]:
        return [verdict for verdict in self.verdicts if not verdict.passed]

    def to_dict(self) -> dict[str, Any]:
        # "reasons": the key promotion/decision.json artifacts have always carried.
        return {"passed": self.passed, "reasons": [verdict.to_dict() for verdict in self.verdicts]}

    def summary(self) -> str:
        """One line per failed gate (observed vs required), or a line saying all passed."""
        if self.passed:
            return f"all {len(self.verdicts)} gates passed"
        return "\n".join(
            f"  - {failure.gate}: {failure.detail} (observed {_fmt(failure.observed)}, "
            f"required {_fmt(failure.required)})"
            for failure in self.failures
        )


def evaluate_gates(candidate: dict, champion: dict | None, spec: PromoteSpec) -> Decision:
    """Judge a candidate against the clinical floors and, when there is one, the champion.

    Args:
        candidate: the candidate's metrics.json.
        champion: the champion's metrics.json on the same frozen test set, or None for the
            first model (judged on the floors alone).
        spec: the ``promote`` section of params.yaml.

    Returns:
        The decision with every gate's result, failed or not, in a stable order: floors,
        subgroups, same frozen test set, non-inferiority.
    """
    test = candidate.get("test") or {}
    verdicts = [
        test_set_size(candidate.get("test_set"), candidate.get("positive_class")),
        _floor("min_auroc", "auroc", test.get("auroc"), spec.min_auroc),
        _floor("min_sensitivity", "sensitivity", test.get("sensitivity"), spec.min_sensitivity),
        _floor("min_specificity", "specificity", test.get("specificity"), spec.min_specificity),
        _ceiling("max_ece", "ece", test.get("ece"), spec.max_ece),
    ]
    verdicts += _subgroup_floors(candidate.get("subgroups") or {}, spec)
    if champion is None:
        verdicts.append(GateResult("non_inferiority", None, None, True, "no champion: not applicable"))
    else:
        same_set = _same_frozen_test_set(candidate, champion)
        verdicts.append(same_set)
        if same_set.passed:
            verdicts += _non_inferiority(candidate, champion, spec)
        else:
            verdicts.append(GateResult(
                "non_inferiority", None, None, True,
                "not compared: the candidate and the champion were scored on different frozen "
                "test sets",
            ))
    return Decision(passed=all(verdict.passed for verdict in verdicts), verdicts=verdicts)


# --------------------------------------------------------------------------------------------
# absolute floors
# --------------------------------------------------------------------------------------------


def _floor(
    gate: str, metric: str, observed: float | None, required: float, where: str = ""
) -> GateResult:
    label = _LABELS[metric] + where
    if observed is None:
        detail = f"{label} was not measured, so the floor {_fmt(required)} cannot be checked"
        return GateResult(gate, None, required, False, detail)
    if observed >= required - TOLERANCE:
        detail = f"{label} {_fmt(observed)} meets the floor {_fmt(required)}"
        return GateResult(gate, observed, required, True, detail)
    detail = (f"{label} {_fmt(observed)} is below the floor {_fmt(required)} "
              f"(short by {_fmt(required - observed)})")
    return GateResult(gate, observed, required, False, detail)


def test_set_size(test_set: dict | None, positive_class: str | None = None) -> GateResult:
    """The test set must be big enough to judge on (``preprocess.test_set``): until it is, it
    grows with new patients and no model is promoted on it.

    Args:
        test_set: the ``test_set`` entry of metrics.json (``status``, ``version``, ``items``,
            ``cases`` per class, ``minimum``), or None for a report made before it was recorded.
        positive_class: the class whose cases are called positives in the verdict.
    """
    if test_set is None:
        return GateResult("min_test_set", None, None, True, "test set size not recorded: not gated")
    minimum = test_set["minimum"]
    required = f"{minimum['cases_per_class']} cases of each class, {minimum['items']} items"
    observed = ", ".join(f"{name} {count}" for name, count in test_set["cases"].items())
    if test_set["status"] == "frozen":
        return GateResult("min_test_set", observed, required, True,
                          f"the frozen test set v{test_set['version']} ({test_set['items']} items) is big enough to judge on")
    need = minimum["cases_per_class"]
    short = [f"{count} of {need} {'positives' if name == positive_class else name + ' cases'}"
             for name, count in sorted(test_set["cases"].items(), key=lambda kv: kv[0] != positive_class)
             if count < need]
    if test_set["items"] < minimum["items"]:
        short.append(f"{test_set['items']} of {minimum['items']} items")
    return GateResult("min_test_set", observed, required, False,
                      f"test set too small: {', '.join(short)}; it grows with new patients until then, "
                      f"and models are trained and evaluated but not promoted")


def _ceiling(gate: str, metric: str, observed: float | None, required: float) -> GateResult:
    label = _LABELS[metric]
    if observed is None:
        detail = f"{label} was not measured, so the ceiling {_fmt(required)} cannot be checked"
        return GateResult(gate, None, required, False, detail)
    if observed <= required + TOLERANCE:
        detail = f"{label} {_fmt(observed)} is within the ceiling {_fmt(required)}"
        return GateResult(gate, observed, required, True, detail)
    detail = (f"{label} {_fmt(observed)} is above the ceiling {_fmt(required)} "
              f"(over by {_fmt(observed - required)})")
    return GateResult(gate, observed, required, False, detail)


def _subgroup_floors(subgroups: dict, spec: PromoteSpec) -> list[GateResult]:
    results = []
    for column in sorted(subgroups):
        for value in sorted(subgroups[column], key=str):
            group = subgroups[column][value]
            key = f"{column}={value}"
            n = int(group.get("n") or 0)
            for metric, floor in (("auroc", spec.subgroup_min_auroc), ("sensitivity", spec.subgroup_min_sensitivity)):
                gate = f"subgroup_min_{metric}[{key}]"
                observed = group.get(metric)
                if n < spec.subgroup_min_count:
                    results.append(GateResult(
                        gate, observed, floor, True,
                        f"not gated (n={n} < {spec.subgroup_min_count}): subgroup {key} is too small to judge",
                    ))
                elif observed is None:
                    why = "only one class present" if metric == "auroc" else "no positive cases"
                    results.append(GateResult(
                        gate, None, floor, True,
                        f"not gated: {_LABELS[metric]} is undefined in subgroup {key} (n={n}, {why})",
                    ))
                else:
                    results.append(_floor(gate, metric, observed, floor, where=f" in subgroup {key} (n={n})"))
    return results


# --------------------------------------------------------------------------------------------
# change thresholds against the champion
# --------------------------------------------------------------------------------------------


def _same_frozen_test_set(candidate: dict, champion: dict) -> GateResult:
    ours = candidate.get("frozen_test_set_sha256")
    theirs = champion.get("frozen_test_set_sha256")
    if ours and theirs and ours == theirs:
        return GateResult("same_frozen_test_set", ours, theirs, True,
                          f"both were scored on frozen test set {ours[:12]}")
    if not theirs:
        detail = ("the champion's frozen test set is not recorded, so its metrics cannot be "
                  "compared with the candidate's; re-score the champion on the current frozen test set")
    elif not ours:
        detail = "the candidate's metrics do not name their frozen test set; re-run evaluate"
    else:
        detail = (f"the candidate was scored on frozen test set {ours[:12]} but the champion on "
                  f"{theirs[:12]}; compare them on the same yardstick by re-scoring the champion "
                  "on the current frozen test set")
    return GateResult("same_frozen_test_set", ours, theirs, False, detail)


def _non_inferiority(candidate: dict, champion: dict, spec: PromoteSpec) -> list[GateResult]:
    margin = spec.non_inferiority_margin
    ours, theirs = candidate.get("test") or {}, champion.get("test") or {}
    results = [_not_worse("non_inferiority.auroc", _LABELS["auroc"], ours.get("auroc"), theirs.get("auroc"), margin)]
    results += [_paired_not_worse(metric, candidate, champion, margin) for metric in ("sensitivity", "specificity")]
    results.append(_interval_not_below(ours.get("auroc_ci"), theirs.get("auroc")))
    our_groups, their_groups = candidate.get("subgroups") or {}, champion.get("subgroups") or {}
    for column in sorted(set(our_groups) & set(their_groups)):
        for value in sorted(set(our_groups[column]) & set(their_groups[column]), key=str):
            group, reference = our_groups[column][value], their_groups[column][value]
            key = f"{column}={value}"
            n = int(group.get("n") or 0)
            if n < spec.subgroup_min_count or group.get("auroc") is None or reference.get("auroc") is None:
                continue  # not gated: too small or undefined (already listed with the floors)
            results.append(_not_worse(
                f"non_inferiority.subgroup_auroc[{key}]", f"AUROC in subgroup {key} (n={n})",
                group["auroc"], reference["auroc"], margin,
            ))
    return results


def _not_worse(
    gate: str, label: str, observed: float | None, reference: float | None, margin: float
) -> GateResult:
    if reference is None:
        detail = f"the champion's {label} is not recorded: not gated"
        return GateResult(gate, observed, None, True, detail)
    required = reference - margin
    if observed is None:
        detail = (f"{label} was not measured, so it cannot be compared with the champion's "
                  f"{_fmt(reference)}")
        return GateResult(gate, None, required, False, detail)
    if observed >= required - TOLERANCE:
        return GateResult(
            gate, observed, required, True,
            f"{label} {_fmt(observed)} is no worse than the champion's {_fmt(reference)} "
            f"by more than the margin {_fmt(margin)}",
        )
    return GateResult(
        gate, observed, required, False,
        f"{label} {_fmt(observed)} is worse than the champion's {_fmt(reference)} by "
        f"{_fmt(reference - observed)}, more than the margin {_fmt(margin)} (required at least {_fmt(required)})",
    )


# What a miss is called for each paired metric: the items judged, and a wrong answer on one.
_PAIRED = {
    "sensitivity": ("positive", "missed case", "missed cases", "caught"),
    "specificity": ("negative", "false alarm", "false alarms", "cleared"),
}


def _paired_not_worse(metric: str, candidate: dict, champion: dict, margin: float) -> GateResult:
    """Non-inferiority of sensitivity or specificity on the paired difference, case by case.

    Both models' per-case results on the same frozen test cases (``test_cases`` in
    metrics.json) are paired; the 95% interval of candidate minus champion is Newcombe's
    hybrid score interval for paired proportions on the patient-clustered effective sample
    size (`pipelines.model.metrics.paired_difference`). The candidate is refused when the whole
    interval lies below ``-margin`` (its upper bound is under it): the data show it worse than
    the champion by more than the margin. Like the AUROC interval gate, this judges "no worse
    than the champion" by what the frozen test set can tell: a case more or less on a small set
    moves the point difference, not the verdict, while a clear loss is refused at any size (and
    the test set's minimum size, ``preprocess.test_set``, bounds how wide the interval can be).
    Labels and patients are the candidate's (today's).
    """
    gate = f"non_inferiority.{metric}"
    ours, theirs = read_case_outcomes(candidate.get("test_cases")), read_case_outcomes(champion.get("test_cases"))
    if ours is None or theirs is None:
        whose = "the candidate's" if ours is None else "the champion's"
        return GateResult(
            gate, None, -margin, False,
            f"{whose} per-case results on the frozen test set are not recorded (test_cases in "
            f"metrics.json), so its {metric} cannot be compared case by case; re-run evaluate "
            "for the candidate, or re-score the champion on the current frozen test set",
        )
    y_true, flagged, patient = ours
    _, champion_flagged, _ = theirs
    if len(champion_flagged) != len(y_true):
        return GateResult(
            gate, None, -margin, False,
            f"the champion's per-case results cover {len(champion_flagged)} cases but the frozen "
            f"test set has {len(y_true)}; re-score the champion on the current frozen test set",
        )
    kind, miss, misses, right = _PAIRED[metric]
    judged = y_true == (1 if metric == "sensitivity" else 0)
    if metric == "sensitivity":
        our_hits, their_hits = flagged[judged], champion_flagged[judged]
    else:
        our_hits, their_hits = ~flagged[judged], ~champion_flagged[judged]
    paired = paired_difference(our_hits, their_hits, None if patient is None else patient[judged])
    n = paired["n"]
    if n == 0:
        return GateResult(gate, None, -margin, True,
                          f"not gated: the frozen test set has no {kind} cases, so {metric} is undefined")
    low, high = paired["interval"]
    more = paired["champion"] - paired["candidate"]  # extra wrong answers of the candidate
    if more > 0:
        change = f"{more} more {miss if more == 1 else misses} of {n}"
    elif more < 0:
        change = f"{-more} fewer {miss if more == -1 else misses} of {n}"
    else:
        change = f"the same number of {misses} ({n - paired['candidate']} of {n})"
    clustered = f", {paired['patients']} patients" if paired["patients"] < n else ""
    stated = (
        f"{_LABELS[metric]} {paired['candidate']}/{n} against the champion's {paired['champion']}/{n} "
        f"on the same {kind} cases: {change} ({_signed(paired['difference'])}; {paired['only_candidate']} "
        f"{right} by the candidate alone, {paired['only_champion']} by the champion alone); "
        f"95% interval of the difference [{_signed(low)}, {_signed(high)}] (paired score interval{clustered})"
    )
    bound = f"its upper bound {_signed(high)} is"
    if high >= -margin - TOLERANCE:
        return GateResult(gate, high, -margin, True,
                          f"{stated}; {bound} at least {_signed(-margin)} (minus the margin): "
                          "not shown worse than the champion by more than the margin")
    return GateResult(gate, high, -margin, False,
                      f"{stated}; {bound} below {_signed(-margin)} (minus the margin): the candidate "
                      "is worse than the champion by more than the margin")


def _signed(value: float) -> str:
    """A difference with its sign, 3 decimals: +0.050, -0.048, 0.000."""
    text = f"{value:+.3f}"
    return "0.000" if text in ("+0.000", "-0.000") else text


def _interval_not_below(interval: list | None, reference: float | None) -> GateResult:
    gate = "non_inferiority.auroc_ci"
    if reference is None:
        return GateResult(gate, None, None, True, "the champion's AUROC is not recorded: not gated")
    if not interval or len(interval) != 2 or interval[1] is None:
        return GateResult(gate, None, reference, True,
                          "not gated: the candidate has no AUROC interval (evaluate.bootstrap_samples is 0?)")
    low, high = interval
    shown = f"[{_fmt(low)}, {_fmt(high)}]"
    if high >= reference - TOLERANCE:
        return GateResult(gate, high, reference, True,
                          f"the AUROC 95% interval {shown} reaches the champion's AUROC {_fmt(reference)}: "
                          "the candidate is not confidently worse")
    return GateResult(gate, high, reference, False,
                      f"the AUROC 95% interval {shown} lies wholly below the champion's AUROC "
                      f"{_fmt(reference)}: the candidate is confidently worse")


def _fmt(value: Any) -> str:
    return number(value, digits=4)
