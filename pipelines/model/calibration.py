"""Post-hoc calibration: a model's probabilities made to mean what they say.

A network trained with class weights and early stopping on AUROC ranks cases well but may put
every probability near 0.5 (or near 0 and 1): AUROC 1.00 with an expected calibration error of
0.3. After training, a `Calibrator` is fitted on the VALIDATION split (never the test set) and
becomes part of the model: the train stage stores it in ``models/train.json`` and in the logged
pyfunc (artifact ``calibration.json``), and the pyfunc, the service, evaluate, the drift
reference and Grad-CAM's decided class all use the calibrated probabilities.

Methods (``train.calibration``):

- ``temperature`` (default; Guo et al. 2017): one temperature T divides every logit, fitted by
  minimising the validation negative log-likelihood over log T (a bounded scalar search, so the
  same scores always give the same T). It never changes which case ranks above which, nor the
  most probable class, only how sure the model says it is. T is kept in [1/20, 20]: a
  validation split the model separates perfectly would otherwise drive T to zero (every
  probability exactly 0 or 1); there it gets T = 1/20, the most confident allowed.
- ``platt`` (Platt 1999): ``sigmoid(a * logit + b)`` per class, fitted on Platt's smoothed
  targets (`smoothed_targets`; finite a and b for a perfectly separated validation split).
- ``isotonic``: a non-decreasing step function per class (scikit-learn's isotonic regression),
  the most flexible and the hungriest for validation data.
- ``none``: the model's own probabilities.

With two classes the positive column (``classes[1]``, the sigmoid output) is calibrated and the
other is its complement; with more, each method applies per class (temperature on the log
probabilities, one softmax) and the columns are renormalised.

`Calibrator.apply` is pure NumPy, so the pyfunc and the service's batched scoring apply the very
same arithmetic. Fitting uses SciPy and scikit-learn, imported inside `fit`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from pipelines.errors import MedloopError

METHODS = ("temperature", "platt", "isotonic", "none")
FORMAT = 1
# Probabilities are clipped this far from 0 and 1 before taking logits (float32 sigmoids reach 1.0).
EPSILON = 1e-12
# The temperature is searched in [1/20, 20] (see the module docstring).
TEMPERATURE_LIMIT = 20.0
LOG_TEMPERATURE_BOUNDS = (-np.log(TEMPERATURE_LIMIT), np.log(TEMPERATURE_LIMIT))


@dataclass(frozen=True)
class Calibrator:
    """A fitted calibration map from a model's probabilities to calibrated ones.

    Attributes:
        method: one of `METHODS`.
        temperature: the fitted temperature (``temperature`` only; 1.0 otherwise).
        platt: per calibrated column, ``[a, b]`` (``platt`` only).
        isotonic: per calibrated column, ``{"x": [...], "y": [...]}``, the step function's knots
            (``isotonic`` only); between knots it is linear, beyond them flat.
        fitted_on: what it was fitted on (``{"split": "validation", "n": ..., "n_positive": ...}``).
    """

    method: str = "none"
    temperature: float = 1.0
    platt: list[list[float]] | None = None
    isotonic: list[dict[str, list[float]]] | None = None
    fitted_on: dict[str, Any] = field(default_factory=dict)

    def apply(self, probabilities: Any) -> np.ndarray:
        """Calibrated probabilities.

        Args:
            probabilities: ``(n, n_classes)`` per-class probabilities as the model gives them
                (`pipelines.model.architectures.class_columns`).

        Returns:
            float64 ``(n, n_classes)``, rows summing to 1; the input itself (as float64) for
            ``none``.
        """
        p = np.asarray(probabilities, dtype=np.float64)
        if self.method == "none" or len(p) == 0:
            return p
        if p.ndim != 2 or p.shape[1] < 2:
            raise MedloopError(f"calibration takes (n, n_classes) probabilities, got shape {p.shape}")
        binary = p.shape[1] == 2
        if self.method == "temperature":
            if binary:
                return _complement(_sigmoid(logit(p[:, 1]) / self.temperature))
            return _softmax(np.log(np.clip(p, EPSILON, 1.0)) / self.temperature)
        columns = [p[:, 1]] if binary else [p[:, k] for k in range(p.shape[1])]
        if self.method == "platt":
            mapped = [_sigmoid(a * logit(column) + b) for (a, b), column in zip(self.platt, columns)]
        elif self.method == "isotonic":
            mapped = [np.interp(column, knots["x"], knots["y"]) for knots, column in zip(self.isotonic, columns)]
        else:
            raise MedloopError(f"unknown calibration method {self.method!r} (expected one of {list(METHODS)})")
        if binary:
            return _complement(mapped[0])
        stacked = np.stack(mapped, axis=1)
        total = stacked.sum(axis=1, keepdims=True)
        # A row every column mapped to 0 (isotonic can) keeps the model's own probabilities.
        return np.where(total > 0, stacked / np.where(total > 0, total, 1.0), p)

    def describe(self) -> str:
        """One line for logs and the model card: ``temperature scaling (T = 2.31)``."""
        if self.method == "temperature":
            return f"temperature scaling (T = {self.temperature:.3g})"
        if self.method == "platt":
            return "Platt scaling (" + "; ".join(f"a = {a:.3g}, b = {b:.3g}" for a, b in self.platt) + ")"
        if self.method == "isotonic":
            return f"isotonic regression ({', '.join(str(len(k['x'])) for k in self.isotonic)} knots)"
        return "none (the model's own probabilities)"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what ``calibration.json`` and ``train.json`` hold)."""
        record: dict[str, Any] = {"format": FORMAT, "method": self.method, "fitted_on": dict(self.fitted_on)}
        if self.method == "temperature":
            record["temperature"] = float(self.temperature)
        if self.platt is not None:
            record["platt"] = [[float(a), float(b)] for a, b in self.platt]
        if self.isotonic is not None:
            record["isotonic"] = [{"x": [float(v) for v in k["x"]], "y": [float(v) for v in k["y"]]}
                                  for k in self.isotonic]
        return record

    @classmethod
    def from_dict(cls, record: dict[str, Any] | None) -> Calibrator:
        """The calibrator `to_dict` wrote; the identity (``none``) for ``None`` (a model trained
        before calibration existed).

        Raises:
            MedloopError: an unknown method, or a method without its parameters.
        """
        if not record:
            return cls()
        method = record.get("method")
        if method not in METHODS:
            raise MedloopError(f"calibration method {method!r} is not one of {list(METHODS)}; retrain")
        needed = {"temperature": "temperature", "platt": "platt", "isotonic": "isotonic"}.get(method)
        if needed and record.get(needed) is None:
            raise MedloopError(f"the {method} calibration has no {needed!r} parameters; retrain")
        return cls(method=method, temperature=float(record.get("temperature", 1.0)),
                   platt=record.get("platt"), isotonic=record.get("isotonic"),
                   fitted_on=dict(record.get("fitted_on") or {}))


def fit(method: str, probabilities: Any, label_index: Sequence[int]) -> Calibrator:
    """Fit a calibrator on held-out (validation) probabilities and their true classes.

    Deterministic: the same inputs give the same calibrator, bit for bit.

    Args:
        method: one of `METHODS` (``train.calibration``).
        probabilities: ``(n, n_classes)`` the model's probabilities on the validation split.
        label_index: ``(n,)`` the true class of each item.

    Returns:
        The fitted `Calibrator`.

    Raises:
        MedloopError: an unknown method, no items, or shapes that disagree.
    """
    p = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(label_index, dtype=np.int64).ravel()
    if method not in METHODS:
        raise MedloopError(f"train.calibration is {method!r}; expected one of {list(METHODS)}")
    if p.ndim != 2 or p.shape[1] < 2 or len(p) != len(labels):
        raise MedloopError(f"calibration needs (n, n_classes) probabilities and n labels, "
                           f"got {p.shape} and {labels.shape}")
    if len(p) == 0:
        raise MedloopError("calibration needs validation items, and the validation split is empty")
    fitted_on = {"split": "validation", "n": int(len(labels)),
                 "class_counts": [int((labels == k).sum()) for k in range(p.shape[1])]}
    if method == "none":
        return Calibrator(fitted_on=fitted_on)
    if method == "temperature":
        return Calibrator("temperature", temperature=_fit_temperature(p, labels), fitted_on=fitted_on)
    binary = p.shape[1] == 2
    targets = [labels == 1] if binary else [labels == k for k in range(p.shape[1])]
    columns = [p[:, 1]] if binary else [p[:, k] for k in range(p.shape[1])]
    if method == "platt":
        return Calibrator("platt", platt=[_fit_platt(c, t) for c, t in zip(columns, targets)], fitted_on=fitted_on)
    return Calibrator("isotonic", isotonic=[_fit_isotonic(c, t) for c, t in zip(columns, targets)],
                      fitted_on=fitted_on)


def calibrator_of(python_model: Any) -> Calibrator:
    """The calibrator a loaded `pipelines.model.pyfunc.MedloopPyfunc` carries; the identity for a
    version logged before calibration existed (its bundled code has no ``calibrator``)."""
    return getattr(python_model, "calibrator", None) or Calibrator()


def logit(p: Any) -> np.ndarray:
    """``log(p / (1 - p))`` with p clipped to [`EPSILON`, 1 - `EPSILON`]."""
    q = np.clip(np.asarray(p, dtype=np.float64), EPSILON, 1.0 - EPSILON)
    return np.log(q) - np.log1p(-q)


# ---------------------------------------------------------------------------------------------
# fitting
# ---------------------------------------------------------------------------------------------


def _fit_temperature(p: np.ndarray, labels: np.ndarray) -> float:
    from scipy.optimize import minimize_scalar

    rows = np.arange(len(labels))

    def nll(log_temperature: float) -> float:
        calibrated = Calibrator("temperature", temperature=float(np.exp(log_temperature))).apply(p)
        return float(-np.log(np.clip(calibrated[rows, labels], EPSILON, 1.0)).mean())

    found = minimize_scalar(nll, bounds=LOG_TEMPERATURE_BOUNDS, method="bounded", options={"xatol": 1e-6})
    return float(np.exp(found.x))


def smoothed_targets(labels: Sequence[int], n_classes: int) -> np.ndarray:
    """Platt's targets as ``(n, n_classes)`` rows: an item of class c counts ``(N_c + 1) /
    (N_c + 2)`` for c and shares the rest equally among the other classes (with two classes:
    ``(N+ + 1) / (N+ + 2)`` for a positive, ``1 / (N- + 2)`` for a negative). With hard 0/1
    labels a split the model separates perfectly would send Platt's slope to infinity; these
    keep it finite, and tend to the labels as the split grows."""
    labels = np.asarray(labels, dtype=np.int64).ravel()
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    own = (counts[labels] + 1.0) / (counts[labels] + 2.0)
    targets = np.repeat(((1.0 - own) / (n_classes - 1))[:, None], n_classes, axis=1)
    targets[np.arange(len(labels)), labels] = own
    return targets


def _fit_platt(column: np.ndarray, is_class: np.ndarray) -> list[float]:
    """a, b minimising the log loss of ``sigmoid(a * logit + b)`` against Platt's targets:
    ``(N+ + 1) / (N+ + 2)`` for members and ``1 / (N- + 2)`` for the rest."""
    from scipy.optimize import minimize

    x = logit(column)
    target = smoothed_targets(is_class.astype(np.int64), 2)[:, 1]

    def loss(ab: np.ndarray) -> tuple[float, np.ndarray]:
        z = ab[0] * x + ab[1]
        # log(1 + e^z) - t z, and its gradient (sigmoid(z) - t) * (x, 1)
        value = float((np.logaddexp(0.0, z) - target * z).sum())
        residual = _sigmoid(z) - target
        return value, np.array([(residual * x).sum(), residual.sum()])

    # a >= 0: calibration may change how sure the model is, never turn its ranking upside down
    # (a validation split where scores run against the labels would otherwise fit a < 0).
    found = minimize(loss, np.array([1.0, 0.0]), jac=True, method="L-BFGS-B", bounds=[(0.0, None), (None, None)])
    return [float(found.x[0]), float(found.x[1])]


def _fit_isotonic(column: np.ndarray, is_class: np.ndarray) -> dict[str, list[float]]:
    from sklearn.isotonic import IsotonicRegression

    regression = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
    regression.fit(column, is_class.astype(np.float64))
    return {"x": [float(v) for v in regression.X_thresholds_], "y": [float(v) for v in regression.y_thresholds_]}


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -z))


def _softmax(z: np.ndarray) -> np.ndarray:
    shifted = np.exp(z - z.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _complement(positive: np.ndarray) -> np.ndarray:
    positive = np.asarray(positive, dtype=np.float64)
    return np.stack([1.0 - positive, positive], axis=1)
