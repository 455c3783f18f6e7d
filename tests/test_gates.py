"""The promotion gates, table-driven: floors, subgroups, non-inferiority, intervals, yardstick."""

from __future__ import annotations

import copy

import pytest

from pipelines.config import PromoteSpec
from pipelines.registry.gates import evaluate_gates
from pipelines.model.metrics import case_outcomes

SPEC = PromoteSpec(
    min_auroc=0.80, min_sensitivity=0.85, min_specificity=0.50, max_ece=0.15,
    subgroup_min_count=20, subgroup_min_auroc=0.70, subgroup_min_sensitivity=0.70,
    non_inferiority_margin=0.02,
)
FROZEN = "a" * 64


def cases(positives: int, caught: int, negatives: int, cleared: int, patient=None) -> dict:
    """Per-case results (metrics.json ``test_cases``): the first ``caught`` positives flagged,
    the first ``cleared`` negatives not flagged."""
    y = [1] * positives + [0] * negatives
    flagged = [1] * caught + [0] * (positives - caught) + [0] * cleared + [1] * (negatives - cleared)
    return case_outcomes(y, flagged, 0.5, patient)


def metrics(test_cases=None, **test) -> dict:
    """A metrics.json that passes every floor, with ``test`` values overridden.

    Its per-case results are those of a test set large enough (800 positives, 1200 negatives)
    for two models with the same results to be shown non-inferior within the margin 0.02.
    """
    values = {"n": 2000, "n_positive": 800, "auroc": 0.90, "sensitivity": 0.90, "specificity": 0.80,
              "ece": 0.05, "auroc_ci": [0.86, 0.94]}
    values.update(test)
    return {
        "test_cases": test_cases or cases(800, 720, 1200, 960),
        "positive_class": "malignant", "classes": ["benign", "malignant"],
        "operating_threshold": 0.4, "threshold_source": "validation",
        "test": values,
        "subgroups": {
            "site": {
                "A": {"n": 120, "n_positive": 50, "auroc": 0.91, "sensitivity": 0.90, "specificity": 0.8},
                "B": {"n": 80, "n_positive": 30, "auroc": 0.88, "sensitivity": 0.87, "specificity": 0.8},
            },
            "age_band": {
                "90+": {"n": 5, "n_positive": 3, "auroc": 0.40, "sensitivity": 0.33, "specificity": 0.5},
            },
        },
        "frozen_test_set_sha256": FROZEN, "weights_sha256": "w", "run_id": "r",
    }


def with_subgroup(base: dict, column: str, value: str, **group) -> dict:
    out = copy.deepcopy(base)
    out["subgroups"].setdefault(column, {}).setdefault(value, {}).update(group)
    return out


def gate(decision, name):
    (found,) = [reason for reason in decision.verdicts if reason.gate == name]
    return found


def test_first_model_is_judged_on_the_floors_alone():
    decision = evaluate_gates(metrics(), None, SPEC)
    assert decision.passed and not decision.failures
    assert gate(decision, "non_inferiority").detail == "no champion: not applicable"
    assert not any(r.gate.startswith("non_inferiority.") for r in decision.verdicts)
    assert gate(decision, "min_auroc").observed == 0.90
    assert gate(decision, "min_auroc").required == 0.80


@pytest.mark.parametrize(
    "name, test, observed, required, words",
    [
        ("min_auroc", {"auroc": 0.799}, 0.799, 0.80, "AUROC 0.7990 is below the floor 0.8000"),
        ("min_sensitivity", {"sensitivity": 0.849}, 0.849, 0.85, "sensitivity 0.8490 is below the floor 0.8500"),
        ("min_specificity", {"specificity": 0.499}, 0.499, 0.50, "specificity 0.4990 is below the floor 0.5000"),
        ("max_ece", {"ece": 0.151}, 0.151, 0.15, "ECE 0.1510 is above the ceiling 0.1500"),
        ("min_auroc", {"auroc": None}, None, 0.80, "AUROC was not measured"),
    ],
)
def test_each_floor_fails_by_a_small_amount_with_observed_and_required(name, test, observed, required, words):
    decision = evaluate_gates(metrics(**test), None, SPEC)
    assert not decision.passed
    assert [f.gate for f in decision.failures] == [name]
    failure = decision.failures[0]
    assert (failure.observed, failure.required) == (observed, required)
    assert words in failure.detail
    assert name in decision.summary()


def test_a_floor_met_exactly_passes():
    assert evaluate_gates(metrics(auroc=0.80, sensitivity=0.85, specificity=0.50, ece=0.15), None, SPEC).passed


@pytest.mark.parametrize(
    "n, sensitivity, passed, words",
    [
        (20, 0.69, False, "sensitivity in subgroup sex=F (n=20) 0.6900 is below the floor 0.7000"),
        (19, 0.10, True, "not gated (n=19 < 20)"),
        (20, 0.70, True, "meets the floor"),
        (40, None, True, "not gated: sensitivity is undefined"),
    ],
)
def test_subgroup_sensitivity_is_gated_only_from_min_count(n, sensitivity, passed, words):
    candidate = with_subgroup(metrics(), "sex", "F", n=n, n_positive=10, auroc=0.9, sensitivity=sensitivity)
    decision = evaluate_gates(candidate, None, SPEC)
    result = gate(decision, "subgroup_min_sensitivity[sex=F]")
    assert result.passed is passed and decision.passed is passed
    assert words in result.detail


def test_subgroup_auroc_failure_and_small_subgroups_listed_as_not_gated():
    candidate = with_subgroup(metrics(), "site", "B", auroc=0.65)
    decision = evaluate_gates(candidate, None, SPEC)
    assert [f.gate for f in decision.failures] == ["subgroup_min_auroc[site=B]"]
    small = gate(decision, "subgroup_min_auroc[age_band=90+]")
    assert small.passed and "not gated (n=5" in small.detail


@pytest.mark.parametrize(
    "metric, champion_value, candidate_value, passed",
    [
        ("auroc", 0.92, 0.90, True),          # exactly at the margin
        ("auroc", 0.93, 0.90, False),         # 0.03 worse, margin 0.02
    ],
)
def test_non_inferiority_against_the_champion(metric, champion_value, candidate_value, passed):
    candidate = metrics(**{metric: candidate_value})
    champion = metrics(**{metric: champion_value})
    decision = evaluate_gates(candidate, champion, SPEC)
    result = gate(decision, f"non_inferiority.{metric}")
    assert result.passed is passed and decision.passed is passed
    assert result.required == pytest.approx(champion_value - 0.02)
    if not passed:
        assert "more than the margin 0.0200" in result.detail


def test_interval_rule_fails_when_the_candidate_is_confidently_worse():
    champion = metrics(auroc=0.90)
    # Within the point-estimate margin (0.885 >= 0.88), but the whole interval lies below 0.90.
    decision = evaluate_gates(metrics(auroc=0.885, auroc_ci=[0.87, 0.895]), champion, SPEC)
    assert [f.gate for f in decision.failures] == ["non_inferiority.auroc_ci"]
    failure = decision.failures[0]
    assert (failure.observed, failure.required) == (0.895, 0.90)
    assert "confidently worse" in failure.detail
    assert evaluate_gates(metrics(auroc=0.885, auroc_ci=[0.86, 0.91]), champion, SPEC).passed


def test_subgroup_non_inferiority_for_gated_subgroups_present_in_both():
    champion = with_subgroup(metrics(), "site", "B", auroc=0.95)
    candidate = with_subgroup(metrics(), "site", "B", auroc=0.90)
    decision = evaluate_gates(candidate, champion, SPEC)
    assert [f.gate for f in decision.failures] == ["non_inferiority.subgroup_auroc[site=B]"]
    # Too small to judge: no comparison even when much worse.
    champion = with_subgroup(metrics(), "age_band", "90+", auroc=0.99)
    assert evaluate_gates(metrics(), champion, SPEC).passed


def test_different_frozen_test_sets_are_not_compared():
    champion = metrics()
    champion["frozen_test_set_sha256"] = "b" * 64
    decision = evaluate_gates(metrics(), champion, SPEC)
    assert [f.gate for f in decision.failures] == ["same_frozen_test_set"]
    assert "different" in gate(decision, "non_inferiority").detail
    assert "re-scoring the champion" in decision.failures[0].detail
    # A champion without recorded metrics cannot be compared either.
    decision = evaluate_gates(metrics(), {}, SPEC)
    assert [f.gate for f in decision.failures] == ["same_frozen_test_set"]
    assert "not recorded" in decision.failures[0].detail


def judged(metric: str, champion_cases: dict, candidate_cases: dict, margin: float):
    """The paired non-inferiority verdict on ``metric`` under ``margin``."""
    spec = SPEC.model_copy(update={"non_inferiority_margin": margin})
    decision = evaluate_gates(metrics(test_cases=candidate_cases), metrics(test_cases=champion_cases), spec)
    return gate(decision, f"non_inferiority.{metric}")


@pytest.mark.parametrize(
    "positives, champion_caught, candidate_caught, margin, passed, detail",
    [
        # The example: one more missed case of 21 is not "worse": the interval cannot tell.
        (21, 20, 19, 0.02, True,
         "sensitivity 19/21 against the champion's 20/21 on the same positive cases: 1 more missed case of 21 "
         "(-0.048; 0 caught by the candidate alone, 1 by the champion alone); 95% interval of the difference "
         "[-0.233, +0.123] (paired score interval); its upper bound +0.123 is at least -0.020 (minus the "
         "margin): not shown worse than the champion by more than the margin"),
        # A clearly worse candidate: 10 more missed cases of 21, worse at any margin the set can tell.
        (21, 20, 10, 0.02, False,
         "sensitivity 10/21 against the champion's 20/21 on the same positive cases: 10 more missed cases of 21 "
         "(-0.476; 0 caught by the candidate alone, 10 by the champion alone); 95% interval of the difference "
         "[-0.673, -0.208] (paired score interval); its upper bound -0.208 is below -0.020 (minus the margin): "
         "the candidate is worse than the champion by more than the margin"),
        # No disagreement on 13 of 13 does not collapse the interval to [0, 0].
        (13, 13, 13, 0.02, True,
         "sensitivity 13/13 against the champion's 13/13 on the same positive cases: the same number of missed "
         "cases (0 of 13) (0.000; 0 caught by the candidate alone, 0 by the champion alone); 95% interval of the "
         "difference [-0.228, +0.228] (paired score interval); its upper bound +0.228 is at least -0.020 (minus "
         "the margin): not shown worse than the champion by more than the margin"),
        # A large set tells: one missed case of 800 is fine, 40 more (-0.05) are worse than the margin.
        (800, 720, 719, 0.02, True, None),
        (800, 720, 680, 0.02, False, None),
    ],
)
def test_sensitivity_is_judged_on_the_paired_difference_in_cases(
    positives, champion_caught, candidate_caught, margin, passed, detail
):
    result = judged("sensitivity", cases(positives, champion_caught, 30, 25),
                    cases(positives, candidate_caught, 30, 25), margin)
    assert result.passed is passed
    assert result.required == -margin
    if detail is not None:
        assert result.detail == detail
    high = float(result.detail.split("95% interval of the difference [")[1].split(",")[1].split("]")[0])
    assert result.observed == pytest.approx(high, abs=5e-4)  # the upper bound is what is judged


def test_specificity_is_judged_on_false_alarms_of_the_same_negatives():
    result = judged("specificity", cases(40, 36, 39, 39), cases(40, 36, 39, 38), 0.25)
    assert result.passed
    assert result.detail.startswith(
        "specificity 38/39 against the champion's 39/39 on the same negative cases: 1 more false alarm of 39 "
        "(-0.026; 0 cleared by the candidate alone, 1 by the champion alone)"
    )
    better = judged("specificity", cases(40, 36, 39, 30), cases(40, 36, 39, 38), 0.02)
    assert "8 fewer false alarms of 39 (+0.205" in better.detail


def test_patients_with_several_cases_widen_the_paired_interval():
    # 10 patients with 3 positives each; the candidate misses all 3 of one patient.
    patient = [k // 3 for k in range(30)] + list(range(10, 40))
    champion, candidate = cases(30, 30, 30, 30, patient), cases(30, 27, 30, 30, patient)
    alone = judged("sensitivity", cases(30, 30, 30, 30), cases(30, 27, 30, 30), 0.5)
    clustered = judged("sensitivity", champion, candidate, 0.5)
    assert "3 more missed cases of 30 (-0.100" in clustered.detail
    assert "(paired score interval, 10 patients)" in clustered.detail
    assert clustered.observed > alone.observed  # the upper bound is further from 0


def test_paired_gates_need_both_models_results_case_by_case():
    champion = metrics()
    del champion["test_cases"]
    decision = evaluate_gates(metrics(), champion, SPEC)
    assert [f.gate for f in decision.failures] == ["non_inferiority.sensitivity", "non_inferiority.specificity"]
    assert decision.failures[0].detail == (
        "the champion's per-case results on the frozen test set are not recorded (test_cases in metrics.json), "
        "so its sensitivity cannot be compared case by case; re-run evaluate for the candidate, or re-score "
        "the champion on the current frozen test set"
    )
    shorter = metrics(test_cases=cases(799, 720, 1200, 960))
    decision = evaluate_gates(metrics(), shorter, SPEC)
    assert "the champion's per-case results cover 1999 cases but the frozen test set has 2000" in (
        gate(decision, "non_inferiority.sensitivity").detail)


def test_a_test_set_too_small_to_judge_on_refuses_a_model_that_passes_everything_else():
    growing = {"status": "growing", "version": 0, "items": 32, "cases": {"benign": 18, "malignant": 14},
               "minimum": {"items": 50, "cases_per_class": 22}}
    candidate = {**metrics(), "test_set": growing}
    decision = evaluate_gates(candidate, None, SPEC)
    assert not decision.passed and [f.gate for f in decision.failures] == ["min_test_set"]
    assert gate(decision, "min_test_set").detail == (
        "test set too small: 14 of 22 positives, 18 of 22 benign cases, 32 of 50 items; it grows with new "
        "patients until then, and models are trained and evaluated but not promoted")
    frozen = {**growing, "status": "frozen", "version": 2, "items": 60, "cases": {"benign": 33, "malignant": 27}}
    passed = gate(evaluate_gates({**metrics(), "test_set": frozen}, None, SPEC), "min_test_set")
    assert passed.passed and passed.detail == "the frozen test set v2 (60 items) is big enough to judge on"
    assert gate(evaluate_gates(metrics(), None, SPEC), "min_test_set").passed  # a report from before sizing
