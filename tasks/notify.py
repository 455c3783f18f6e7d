"""Telling people: a log line always, and an Apprise notification when a URL is configured.

The Apprise URL (``mailto://``, ``slack://``, ``msteams://``, ``json://host/path`` ...) is a
secret, so params only name the environment variable that holds it (``schedule.notify_url_env``).
A notification that cannot be delivered is logged; it never changes how the run ended.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from pipelines.config import load_params
from pipelines.errors import mask_credentials
from pipelines.values import now_iso
from pipelines.workspace import Layout

log = logging.getLogger("medloop.notify")


def notify(params_file: str, title: str, body: str, *, failure: bool = True) -> bool:
    """Log the message, and send it through Apprise when ``schedule.notify_url_env`` is set.

    Returns:
        True when a notification was delivered.
    """
    (log.error if failure else log.warning)("%s\n%s", title, body)
    try:
        params = load_params(params_file)
    except Exception as exc:  # noqa: BLE001 - the params file may be the very thing that failed
        log.error("cannot read %s to find the notification URL: %s", params_file, exc)
        return False
    variable = params.schedule.notify_url_env
    url = os.environ.get(variable) if variable else None
    if not url:
        return False
    import apprise

    sender = apprise.Apprise()
    if not sender.add(url):
        log.error("%s holds an Apprise URL that Apprise does not understand: %s", variable, mask_credentials(url))
        return False
    delivered = bool(sender.notify(title=title, body=body,
                                   notify_type=apprise.NotifyType.FAILURE if failure else apprise.NotifyType.WARNING))
    if not delivered:
        log.error("the notification to %s could not be delivered", mask_credentials(url))
    return delivered


def on_retrain_failure(flow: Any, flow_run: Any, state: Any) -> None:
    """Prefect hook (failed or crashed retrain run): log the reason, notify, end the MLflow run of a
    training that died (`pipelines.registry.interrupted.close_abandoned_training_run`), record it
    (an MLflow record and the run log, `pipelines.ops.runs.record`) so ``medloop status`` shows it."""
    from pipelines.ops import report, runs

    params_file = str((flow_run.parameters or {}).get("params_file", "params.yaml"))
    reason = mask_credentials(_reason(state))  # a driver error may echo a connection URL
    title = f"medloop retrain run {flow_run.name} {state.name.lower()}"
    notify(params_file, title, reason)
    try:
        layout = Layout.at(os.path.dirname(os.path.abspath(params_file)))
        params = load_params(params_file)
        summary = {
            "model": params.model.name, "outcome": state.name.lower(), "reason": reason,
            "flow_run_id": str(flow_run.id), "flow_run_name": flow_run.name,
            "finished_at": now_iso(),
        }
        if getattr(flow_run, "start_time", None):  # a failed run started too: the cooldown counts it
            summary["started_at"] = flow_run.start_time.isoformat(timespec="seconds")
    except Exception as exc:  # noqa: BLE001 - a hook must not raise
        log.error("could not record the failed run: %s", exc)
        return
    try:
        from pipelines.registry.interrupted import close_abandoned_training_run

        close_abandoned_training_run(params, layout)  # a killed training's MLflow run, ended now
        runs.record(params, layout, summary)
    except Exception as exc:  # noqa: BLE001 - MLflow may be what failed: the run log still says so
        log.error("could not record the failed run in MLflow: %s", exc)
        report.append_run(layout, summary)


def _reason(state: Any) -> str:
    try:
        error = state.result(raise_on_failure=False)
    except Exception as exc:  # noqa: BLE001 - the result itself may be unavailable
        error = exc
    if isinstance(error, BaseException):
        return f"{type(error).__name__}: {error}"
    return state.message or "no reason recorded"
