"""Intervals of proportions and of paired differences, table-driven: honest at 0 and 1, wider
when a patient contributes several cases, reference values from the literature, deterministic."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.model import metrics


@pytest.mark.parametrize(
    "successes, n, low, high",
    [
        (8, 10, 0.4902, 0.9433),   # Wilson score interval, the textbook example
        (13, 13, 0.7719, 1.0),     # all caught: the lower bound stays below 1
        (0, 13, 0.0, 0.2281),      # none caught: the upper bound stays above 0
        (1, 1, 0.2065, 1.0),
    ],
)
def test_wilson_interval_matches_reference_values_and_never_collapses(successes, n, low, high):
    interval = metrics.wilson_interval(successes, n)
    assert interval == pytest.approx([low, high], abs=1e-4)
    assert metrics.wilson_interval(0, 0) is None


@pytest.mark.parametrize(
    "hits, patients, expected",
    [
        # 13 of 13 as independent patients: [0.772, 1.0], not the bootstrap's [1.0, 1.0].
        ([1] * 13, None, metrics.wilson_interval(13, 13)),
        # 12 of 12 images from 4 patients (3 each): as honest as 4 of 4 patients.
        ([1] * 12, [k // 3 for k in range(12)], metrics.wilson_interval(4, 4)),
        # 15 of 30 images, a patient's 3 images alike: the interval of 5 of 10 patients.
        ([1] * 15 + [0] * 15, [k // 3 for k in range(30)], metrics.wilson_interval(5, 10)),
        # 15 of 30 images, each patient's 3 images half caught: no narrower than 30 independent images.
        ([1, 0, 1, 0, 1, 0] * 5, [k // 3 for k in range(30)], metrics.wilson_interval(15, 30)),
    ],
)
def test_clustered_interval_counts_patients_where_their_cases_are_alike(hits, patients, expected):
    assert metrics.clustered_wilson_interval(hits, patients) == pytest.approx(expected, abs=1e-9)


def test_patient_clustering_widens_the_interval():
    hits = [1] * 15 + [0] * 15
    alone = metrics.clustered_wilson_interval(hits)
    clustered = metrics.clustered_wilson_interval(hits, [k // 3 for k in range(30)])
    assert clustered[0] < alone[0] and clustered[1] > alone[1]
    assert metrics.effective_sample_size(hits, [k // 3 for k in range(30)]) == pytest.approx(10.0)
    assert metrics.effective_sample_size(hits) == 30.0


@pytest.mark.parametrize(
    "both, only_first, only_second, neither, low, high",
    [
        (14, 5, 0, 22, 0.0115, 0.2265),   # Altman et al., Statistics with Confidence (2000), table 6.2
        (19, 0, 1, 1, -0.2332, 0.1233),   # one more missed case of 21
        (13, 0, 0, 0, -0.2281, 0.2281),   # no disagreement: not collapsed to [0, 0]
    ],
)
def test_paired_difference_matches_newcombe(both, only_first, only_second, neither, low, high):
    first = [1] * (both + only_first) + [0] * (only_second + neither)
    second = [1] * both + [0] * only_first + [1] * only_second + [0] * neither
    paired = metrics.paired_difference(first, second)
    assert paired["interval"] == pytest.approx([low, high], abs=1e-4)
    assert (paired["only_candidate"], paired["only_champion"]) == (only_first, only_second)
    assert paired["difference"] == pytest.approx((only_first - only_second) / len(first))


def test_patient_clustering_widens_the_paired_interval():
    first, second = [1] * 27 + [0] * 3, [1] * 30
    alone = metrics.paired_difference(first, second)["interval"]
    clustered = metrics.paired_difference(first, second, [k // 3 for k in range(30)])
    assert clustered["interval"][0] < alone[0] and clustered["n_effective"] < 30
    assert clustered["patients"] == 10


def test_test_set_intervals_are_deterministic_and_bracket_the_estimate():
    rng = np.random.default_rng(0)
    y = (rng.random(1000) < 0.4).astype(int)
    score = np.clip(0.3 * y + rng.random(1000) * 0.7, 0, 1)
    patients = np.arange(1000) // 2
    point = metrics.binary_metrics(y, score, 0.5)
    first = metrics.intervals(y, score, 0.5, samples=200, seed=7, groups=patients)
    assert first == metrics.intervals(y, score, 0.5, samples=200, seed=7, groups=patients)
    for name in ("auroc", "sensitivity", "specificity"):
        low, high = first[f"{name}_ci"]
        assert low < point[name] < high, name
    assert metrics.intervals(y, score, 0.5, samples=0, seed=7)["auroc_ci"] is None
    assert metrics.intervals(y, score, 0.5, samples=0, seed=7)["sensitivity_ci"] is not None


def test_case_outcomes_carry_no_identifiers_and_read_back():
    cases = metrics.case_outcomes([1, 0, 1], [0.9, 0.2, 0.1], 0.5, ["p-77", "p-12", "p-77"])
    assert cases == {"y_true": [1, 0, 1], "flagged": [1, 0, 0], "patient": [0, 1, 0]}
    y, flagged, patient = metrics.read_case_outcomes(cases)
    assert y.tolist() == [1, 0, 1] and flagged.tolist() == [True, False, False] and patient.tolist() == [0, 1, 0]
    assert metrics.read_case_outcomes({"y_true": [1, 0], "flagged": [1]}) is None
    assert metrics.read_case_outcomes({"y_true": [2], "flagged": [1]}) is None
    assert metrics.read_case_outcomes({"y_true": "10", "flagged": "10"}) is None
    assert metrics.read_case_outcomes(None) is None
