"""Post-hoc calibration (`pipelines.model.calibration`) on synthetic scores whose true probabilities
are known: pure functions, no model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import tabular_params
from pipelines.model import calibration
from pipelines.model import metrics
from pipelines.model.calibration import Calibrator
from pipelines.config import ConfigError, parse_params
from pipelines.errors import MedloopError


def scores(scale: float, n: int = 20_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (n, 2), labels) of a model whose logits are ``scale`` times the true ones:
    over-confident for scale > 1, under-confident (hugging 0.5) for scale < 1. The temperature
    that undoes it is ``scale``."""
    rng = np.random.default_rng(seed)
    true_logit = rng.normal(0.0, 2.0, n)
    labels = (rng.random(n) < 1.0 / (1.0 + np.exp(-true_logit))).astype(np.int64)
    positive = 1.0 / (1.0 + np.exp(-scale * true_logit))
    return np.stack([1.0 - positive, positive], axis=1), labels


def ece(labels, probabilities) -> float:
    return metrics.expected_calibration_error(labels, probabilities[:, 1], bins=10)


@pytest.mark.parametrize("scale", [0.25, 0.5, 2.0, 4.0])
def test_temperature_scaling_recovers_a_known_temperature(scale):
    probabilities, labels = scores(scale)
    fitted = calibration.fit("temperature", probabilities, labels)
    assert fitted.method == "temperature"
    assert fitted.temperature == pytest.approx(scale, rel=0.05)
    assert fitted.fitted_on == {"split": "validation", "n": 20_000, "class_counts": np.bincount(labels).tolist()}


@pytest.mark.parametrize("method", ["temperature", "platt", "isotonic"])
@pytest.mark.parametrize("scale", [0.3, 3.0], ids=["under-confident", "over-confident"])
def test_every_method_brings_the_ece_down_on_unseen_scores(method, scale):
    fit_on, fit_labels = scores(scale, n=4000, seed=1)
    probabilities, labels = scores(scale, n=4000, seed=2)  # held out, as the test set is
    before = ece(labels, probabilities)
    fitted = calibration.fit(method, fit_on, fit_labels)
    after = fitted.apply(probabilities)
    assert before > 0.1
    assert ece(labels, after) < 0.03, (method, before, ece(labels, after))
    np.testing.assert_allclose(after.sum(axis=1), 1.0, rtol=1e-12)
    assert ((after >= 0.0) & (after <= 1.0)).all()


def test_none_leaves_the_scores_unchanged():
    probabilities, labels = scores(3.0, n=500)
    fitted = calibration.fit("none", probabilities, labels)
    assert fitted.method == "none" and fitted.describe().startswith("none")
    assert np.array_equal(fitted.apply(probabilities), probabilities)
    assert np.array_equal(Calibrator.from_dict(None).apply(probabilities), probabilities)  # older models


def test_temperature_and_platt_keep_the_ranking():
    probabilities, labels = scores(0.3, n=2000)
    for method in ("temperature", "platt"):
        after = calibration.fit(method, probabilities, labels).apply(probabilities)
        assert np.array_equal(np.argsort(after[:, 1], kind="stable"), np.argsort(probabilities[:, 1], kind="stable"))


def test_a_perfectly_separated_small_split_gives_finite_probabilities():
    # Every case right but every probability near 0.5: the demo's nights. The likelihood grows
    # without end as the temperature falls, so it stops at the smallest allowed; Platt's targets
    # keep its slope finite.
    positive = np.r_[np.full(10, 0.45), np.full(10, 0.55)]
    probabilities, labels = np.stack([1 - positive, positive], axis=1), np.r_[np.zeros(10), np.ones(10)]
    fitted = calibration.fit("temperature", probabilities, labels)
    assert fitted.temperature == pytest.approx(1 / calibration.TEMPERATURE_LIMIT, rel=1e-4)
    after = fitted.apply(probabilities)[:, 1]
    assert 0.0 < after[0] < 0.02 and 0.98 < after[-1] < 1.0
    platt = calibration.fit("platt", probabilities, labels).apply(probabilities)[:, 1]
    np.testing.assert_allclose(platt[[0, -1]], [1 / 12, 11 / 12], rtol=1e-4)  # 1/(N+2), (N+1)/(N+2)


def test_fitting_is_deterministic_and_survives_json():
    probabilities, labels = scores(2.0, n=3000)
    for method in calibration.METHODS:
        first = calibration.fit(method, probabilities, labels)
        assert first == calibration.fit(method, probabilities, labels)
        again = Calibrator.from_dict(json.loads(json.dumps(first.to_dict())))
        assert np.array_equal(again.apply(probabilities), first.apply(probabilities)), method


def test_more_than_two_classes_stay_distributions():
    rng = np.random.default_rng(4)
    true_logits = rng.normal(size=(3000, 3)) * 2.0
    true = np.exp(true_logits) / np.exp(true_logits).sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(3, p=row) for row in true])
    model = np.exp(2.5 * true_logits)
    model /= model.sum(axis=1, keepdims=True)
    fitted = calibration.fit("temperature", model, labels)
    assert fitted.temperature == pytest.approx(2.5, rel=0.1)
    np.testing.assert_allclose(fitted.apply(model), true, atol=0.03)
    for method in calibration.METHODS:
        after = calibration.fit(method, model, labels).apply(model)
        np.testing.assert_allclose(after.sum(axis=1), 1.0, rtol=1e-12)
        if method in ("temperature", "none"):
            assert np.array_equal(after.argmax(axis=1), model.argmax(axis=1))


@pytest.mark.parametrize("method", ["temperature", "platt", "isotonic", "none"])
def test_the_method_is_chosen_in_params(method):
    raw = tabular_params()
    raw["train"]["calibration"] = method
    assert parse_params(raw).train.calibration == method


@pytest.mark.parametrize(("change", "message"), [
    (lambda train: train.update(calibration="beta"), "train.calibration: Input should be 'temperature', 'platt', "
                                                     "'isotonic' or 'none'"),
    (lambda train: train.pop("calibration"), "train.calibration: missing key"),
])
def test_a_wrong_or_missing_method_names_the_key(change, message):
    raw = tabular_params()
    change(raw["train"])
    with pytest.raises(ConfigError, match=message):
        parse_params(raw)


@pytest.mark.parametrize(("record", "message"), [
    ({"method": "beta"}, "calibration method 'beta' is not one of"),
    ({"method": "platt"}, "the platt calibration has no 'platt' parameters; retrain"),
])
def test_a_broken_stored_calibrator_is_refused(record, message):
    with pytest.raises(MedloopError, match=message):
        Calibrator.from_dict(record)


def test_fit_refuses_what_it_cannot_fit():
    with pytest.raises(MedloopError, match="expected one of"):
        calibration.fit("beta", np.full((2, 2), 0.5), [0, 1])
    with pytest.raises(MedloopError, match="validation split is empty"):
        calibration.fit("temperature", np.zeros((0, 2)), [])
    with pytest.raises(MedloopError, match="n labels"):
        calibration.fit("temperature", np.full((3, 2), 0.5), [0, 1])


def test_a_calibrator_pickled_under_the_flat_module_names_still_loads():
    # Versions registered before pipelines/ was grouped by concern pickled their classes as
    # pipelines.calibration.*; loading them goes through pyfunc.register_flat_module_names.
    import pickle
    import subprocess
    import sys

    from conftest import ROOT

    calibrator = calibration.Calibrator(method="temperature", temperature=1.7)
    flat = pickle.dumps(calibrator, protocol=0).replace(b"pipelines.model.calibration", b"pipelines.calibration")
    assert b"pipelines.calibration\n" in flat
    script = ("import pickle, sys; from pipelines.model import pyfunc; pyfunc.register_flat_module_names(); "
              "print(pickle.loads(sys.stdin.buffer.read()).apply([[0.3, 0.7]]).round(6).tolist())")
    loaded = subprocess.run([sys.executable, "-c", script], input=flat, capture_output=True, cwd=ROOT, check=True)
    assert loaded.stdout.decode().strip() == str(calibrator.apply([[0.3, 0.7]]).round(6).tolist())
