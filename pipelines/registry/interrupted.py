"""Interrupted work in MLflow: a tracking server that stops answering, and a training that dies
with its MLflow run open.

- `answering` turns MLflow's request error (a URL, urllib3's retry chain) into one paragraph that
  says which server did not answer, while doing what, and what that left.
- A training notes the run it holds open in ``.medloop/training-run.json`` (`mark_training_run`)
  and removes the note when MLflow has ended the run. A note whose process is gone names a run
  that nobody will end: `close_abandoned_training_run` marks it FAILED (and a logged model whose
  upload never finished), at the next training, the next night's start, or the failed night's hook.

Nothing here imports the registry client, so the train stage can use it without depending on
evaluate (the client's re-scoring does).
"""

from __future__ import annotations

import json
import logging
import os
import re
from contextlib import contextmanager
from typing import Iterator

from pipelines.config import Params
from pipelines.errors import MedloopError
from pipelines.registry.tracking import configure, display_uri
from pipelines.values import now_iso
from pipelines.workspace import Layout

log = logging.getLogger("medloop.registry")


class TrackingUnavailable(MedloopError):
    """The tracking server did not answer: stopped, unreachable, or gone in the middle of a request."""


# MLflow's REST client words a request that got no answer (refused, reset, timed out, the server
# gone mid-request) this way, after its own retries; an answer with an error status is worded otherwise.
_NO_ANSWER = re.compile(r"API request to \S+ failed with (timeout )?exception")
_WHY = (("Connection refused", "connection refused"), ("RemoteDisconnected", "it closed the connection mid-request"),
        ("Connection aborted", "the connection was cut mid-request"), ("Connection reset", "the connection was reset"),
        ("timeout", "it timed out"), ("timed out", "it timed out"))


def no_answer(exc: BaseException) -> bool:
    """Whether ``exc``, or an error it was raised from or while handling, says the tracking
    server did not answer at all (as opposed to answering with an error)."""
    import requests
    from mlflow.exceptions import MlflowException

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, MlflowException) and _NO_ANSWER.search(current.message):
            return True
        if isinstance(current, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
            return True
        current = current.__cause__ or current.__context__
    return False


@contextmanager
def answering(params: Params, layout: Layout, doing: str, consequence: str) -> Iterator[None]:
    """Say in one paragraph that the tracking server did not answer while ``doing``, and what that
    left (``consequence``), instead of MLflow's request error (other errors pass unchanged).

    Raises:
        TrackingUnavailable: the server did not answer (`no_answer`).
    """
    try:
        yield
    except MedloopError:
        raise
    except Exception as exc:
        if not no_answer(exc):
            raise
        text = " ".join(str(e) for e in (exc, exc.__cause__, exc.__context__) if e is not None)
        why = next((words for marker, words in _WHY if marker in text), "no answer")
        raise TrackingUnavailable(
            f"the MLflow tracking server {display_uri(params, layout)} did not answer while {doing} ({why}). "
            f"{consequence} Check that it is running (`medloop doctor -w {layout.root}`), then run again."
        ) from exc


TRAINING_RUN_FILE = "training-run.json"


def mark_training_run(layout: Layout, run_id: str) -> None:
    """Note that this process holds MLflow run ``run_id`` open (``.medloop/training-run.json``),
    so that a later night can end it if this process dies without ending it."""
    layout.state.mkdir(parents=True, exist_ok=True)
    (layout.state / TRAINING_RUN_FILE).write_text(json.dumps({"run_id": run_id, "pid": os.getpid(),
                                                               "started_at": now_iso()}))


def clear_training_run(layout: Layout) -> None:
    """The training ended its MLflow run itself: nothing is left open."""
    (layout.state / TRAINING_RUN_FILE).unlink(missing_ok=True)


def close_abandoned_training_run(params: Params, layout: Layout) -> str | None:
    """End the MLflow run of a training that died without ending it (killed, or its tracking server
    gone mid-upload): the run is marked FAILED, and a logged model it left PENDING (an upload that
    never finished) FAILED, so neither looks alive forever and no such model is ever registered.

    Returns:
        The run id, or None when no training was left open (or its process still runs).

    Raises:
        TrackingUnavailable: the tracking server did not answer; the mark is kept for next time.
    """
    from mlflow.entities import LoggedModelStatus
    from mlflow.exceptions import MlflowException

    path = layout.state / TRAINING_RUN_FILE
    if not path.is_file():
        return None
    try:
        mark = json.loads(path.read_text())
        run_id, pid = str(mark["run_id"]), int(mark["pid"])
    except (ValueError, KeyError, TypeError):
        path.unlink(missing_ok=True)  # unreadable: it names no run to end
        return None
    if pid != os.getpid() and _alive(pid):
        return None  # a training still running (started by hand?) ends its own run
    with answering(params, layout, f"ending the MLflow run {run_id} of a training that died",
                   "The run is left as it was; the next night tries again."):
        from mlflow import MlflowClient

        configure(params, layout)
        client = MlflowClient()
        try:
            run = client.get_run(run_id)
        except MlflowException as exc:
            if no_answer(exc):
                raise
            path.unlink(missing_ok=True)  # the run is gone (deleted): nothing left open
            return None
        if run.info.status == "RUNNING":
            client.set_terminated(run_id, "FAILED")
        # (MLflow's filter on status fails on PostgreSQL, where it is stored as a number.)
        logged = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
        pending = [model for model in logged if str(model.status) == "PENDING"]
        for model in pending:
            client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
    path.unlink(missing_ok=True)
    log.warning("the MLflow run %s of a training that died (started %s) is marked FAILED, with %d unfinished "
                "model upload(s)", run_id, mark.get("started_at", "?"), len(pending))
    return run_id


def _alive(pid: int) -> bool:
    """Whether process ``pid`` still runs. A zombie does not: a killed training whose parent died
    with it waits, unreaped, for an init that may never reap it (a container's PID 1)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True
