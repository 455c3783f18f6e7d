"""Shadow scoring: every input the champion scores is also scored by the shadow candidate
(``serving.shadow``, loaded by `serving.model.ModelManager`), off the response path, and the
candidate's answers are stored beside the champion's (table ``shadow_predictions``), never
returned.

The response path only hands the new prediction ids to `ShadowScorer.submit`: a non-blocking put
into a bounded queue. One background thread takes them, reads each prediction's de-identified
input back (tables: the feature values kept in the prediction's ``input_metadata``; images: the
de-identified file the service kept in its inputs folder), so the candidate sees exactly what
the champion saw, scores them, decides at the candidate's own operating threshold, and stores
the answers. When the queue is full the scorings are dropped, counted in
``medloop_shadow_dropped_total`` and logged; a candidate that fails is counted in
``medloop_shadow_failures_total`` and logged. Neither ever changes nor delays the champion's
answer.
"""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path
from typing import Any

from pipelines.config import Params

log = logging.getLogger("medloop.serving.shadow")

QUEUE_REQUESTS = 256  # requests waiting for the shadow; beyond this their scorings are dropped
BATCH_INPUTS = 64  # the worker scores up to this many waiting inputs together


class ShadowScorer:
    """Scores served inputs with the shadow candidate in a background thread (module docstring).

    Args:
        manager: the service's `serving.model.ModelManager` (its ``shadow`` is the candidate).
        store: the `pipelines.store.feedback.FeedbackStore` holding the predictions.
        params: the configuration (modality, features).
        inputs_dir: where the service keeps de-identified uploaded images.
        registry: the Prometheus registry of the service.
        queue_size: how many requests may wait for the shadow.
    """

    def __init__(self, manager: Any, store: Any, params: Params, inputs_dir: Path, registry: Any,
                 queue_size: int = QUEUE_REQUESTS):
        from prometheus_client import Counter

        self.manager = manager
        self.store = store
        self.params = params
        self.inputs_dir = inputs_dir
        self.queue: queue.Queue[list[str]] = queue.Queue(maxsize=queue_size)
        self.scored = Counter("medloop_shadow_predictions_total", "inputs scored by the shadow candidate",
                              ["candidate"], registry=registry)
        self.dropped = Counter("medloop_shadow_dropped_total",
                               "inputs not scored by the shadow candidate because its queue was full",
                               registry=registry)
        self.failures = Counter("medloop_shadow_failures_total",
                                "inputs the shadow candidate failed to score or store", registry=registry)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the worker thread when a shadow candidate is configured."""
        if not self.manager.shadow_reference or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._work, name="medloop-shadow", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Let the worker finish the batch in hand; scorings still waiting are dropped (counted)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        left = 0
        while True:
            try:
                left += len(self.queue.get_nowait())
            except queue.Empty:
                break
        if left:
            self.dropped.inc(left)
            log.warning("service stopping: %d input(s) were not shadow-scored", left)

    def submit(self, prediction_ids: list[str]) -> bool:
        """Hand new predictions to the shadow; never blocks. True when they were queued."""
        if not prediction_ids or self.manager.shadow is None or self._thread is None:
            return False  # no candidate (or it did not load: /readyz says why)
        try:
            self.queue.put_nowait(list(prediction_ids))
        except queue.Full:
            self.dropped.inc(len(prediction_ids))
            log.warning("shadow queue full (%d requests waiting): %d input(s) not scored by candidate %s",
                        self.queue.qsize(), len(prediction_ids), self.manager.shadow_reference)
            return False
        return True

    def score(self, prediction_ids: list[str]) -> int:
        """Score stored predictions with the candidate and store its answers; how many were stored.

        Raises:
            Exception: whatever reading, scoring or storing raised (the worker counts and logs it).
        """
        candidate = self.manager.shadow
        if candidate is None or not prediction_ids:
            return 0
        served = candidate.served
        predictions = [self.store.prediction(prediction_id) for prediction_id in prediction_ids]
        scored = served.model.predict(self._frame(predictions))
        answers = []
        for prediction_id, (_, row) in zip(prediction_ids, scored.iterrows()):
            probabilities = {label: round(float(row[label]), 6) for label in served.classes}
            answers.append({"prediction_id": prediction_id, "probabilities": probabilities,
                            "decision": served.decide(probabilities)})
        stored = self.store.record_shadow_predictions(
            candidate=candidate.reference, model_name=served.name, model_version=candidate.version,
            run_id=candidate.run_id, operating_threshold=served.operating_threshold, answers=answers)
        self.scored.labels(candidate.reference).inc(len(answers))
        return stored

    # ---------------------------------------------------------------------------------------

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                batch = self.queue.get(timeout=0.2)
            except queue.Empty:
                continue
            while len(batch) < BATCH_INPUTS:  # take what else is waiting, up to one batch
                try:
                    batch += self.queue.get_nowait()
                except queue.Empty:
                    break
            try:
                self.score(batch)
            except Exception as exc:  # noqa: BLE001 - the shadow must never take the service down
                self.failures.inc(len(batch))
                log.error("shadow candidate %s failed on %d input(s): %s: %s", self.manager.shadow_reference,
                          len(batch), type(exc).__name__, exc)

    def _frame(self, predictions: list[dict[str, Any]]):
        """The model input of stored predictions, built as the service builds the champion's."""
        import pandas as pd

        if self.params.model.modality == "image":
            return pd.DataFrame({"image": [(self.inputs_dir / p["input_metadata"]["file"]).read_bytes()
                                           for p in predictions]})
        features = list(self.params.tabular.features)
        rows = [p["input_metadata"].get("features", {}) for p in predictions]
        return pd.DataFrame([{name: row.get(name) for name in features} for row in rows], columns=features)
