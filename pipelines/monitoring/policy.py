"""The retraining policy: should a retrain start now, outside the nightly schedule, and why.

The nightly retrain always runs on its cron (``schedule``); it is cheap when nothing changed.
Between nights, the policy (``retrain_policy`` in params, checked by the ``retrain-policy`` flow
on ``check_cron``) starts one when either

- at least ``min_new_labels`` clinician-confirmed labels are waiting for export, or
- ``on_drift`` is set and the champion's live inputs or predictions drift from its training
  reference (``monitoring`` thresholds; see ``pipelines.monitoring.drift``),

unless the last retrain (nightly or triggered; from its MLflow record, `pipelines.ops.runs`)
started less than ``cooldown_hours`` ago, or the
next nightly run is due within the cooldown anyway. Every check gives a `PolicyDecision` that
says which rules fired and which one held it back, and is kept in ``.medloop/policy.jsonl``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from pipelines.ops import runs
from pipelines.config import Params
from pipelines.workspace import Layout, database_url

POLICY_FILE = "policy.jsonl"


@dataclass
class PolicyDecision:
    """One check of the policy.

    Attributes:
        retrain: start a retrain now.
        reasons: the rules that fired (``"62 new confirmed labels >= 50"``, a drift finding).
        held_back_by: why no retrain starts although a rule fired (cooldown, nightly run due).
        new_labels: confirmed labels waiting for export.
        drift: the drift report (``DriftReport.as_dict()``), or None when drift is not checked.
        last_run_started: when the last retrain started (ISO), None when there was none.
        checked_at: when the check ran (ISO, UTC).
        flow_run_id: the retrain flow run the check started, if it started one.
    """

    retrain: bool
    reasons: list[str]
    held_back_by: str | None
    new_labels: int
    drift: dict[str, Any] | None
    last_run_started: str | None
    checked_at: str
    flow_run_id: str | None = None

    @property
    def reason(self) -> str:
        """The reason recorded on the retrain run it starts."""
        return "policy: " + "; ".join(self.reasons)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check(params: Params, layout: Layout, *, next_nightly: datetime | None = None,
          now: datetime | None = None) -> PolicyDecision:
    """Check the policy now, as the ``retrain-policy`` flow and ``medloop policy --check-only`` do:
    the champion's drift is measured when ``on_drift`` is set, then `decide`.

    Args:
        params: the workspace's params.
        layout: the workspace.
        next_nightly: when the next nightly run is due, if known (the flow asks the Prefect server).
        now: the time of the check (default: now).
    """
    report = None
    if params.retrain_policy.on_drift:
        from pipelines.monitoring import drift

        report = drift.champion_report(params, layout)
    return decide(params, layout, drift=report, next_nightly=next_nightly, now=now)


def decide(params: Params, layout: Layout, *, drift: Any = None, next_nightly: datetime | None = None,
           now: datetime | None = None) -> PolicyDecision:
    """Check the policy for the workspace.

    Args:
        params: the workspace's params.
        layout: the workspace.
        drift: the champion's drift report (a ``pipelines.monitoring.drift.DriftReport``), or None when
            drift is not checked (``on_drift`` off, or no champion yet).
        next_nightly: when the next nightly run is due, if known.
        now: the time of the check (default: now).
    """
    policy = params.retrain_policy
    now = now or datetime.now(timezone.utc)
    labels = pending_labels(params, layout)
    reasons = []
    if labels >= policy.min_new_labels:
        reasons.append(f"{labels} new confirmed labels >= {policy.min_new_labels}")
    if policy.on_drift and drift is not None and drift.judged and drift.drifted:
        reasons.append("drift: " + "; ".join(drift.reasons))
    last = runs.last_started(params, layout)
    cooldown = timedelta(hours=policy.cooldown_hours)
    held = None
    if reasons and last is not None and now - last < cooldown:
        held = (f"cooldown: the last retrain started {_ago(now - last)} ago "
                f"(at {last.isoformat(timespec='seconds')}); cooldown is {policy.cooldown_hours:g} h")
    elif reasons and next_nightly is not None and timedelta(0) <= next_nightly - now < cooldown:
        held = f"the nightly retrain is due in {_ago(next_nightly - now)} (at {next_nightly.isoformat(timespec='seconds')})"
    return PolicyDecision(
        retrain=bool(reasons) and held is None, reasons=reasons, held_back_by=held, new_labels=labels,
        drift=drift.as_dict() if drift is not None else None,
        last_run_started=last.isoformat(timespec="seconds") if last else None,
        checked_at=now.isoformat(timespec="seconds"),
    )


def pending_labels(params: Params, layout: Layout) -> int:
    """Confirmed labels (agreed or adjudicated) not exported yet, or changed since their export."""
    from pipelines.feedback_export import pending
    from pipelines.store.feedback import FeedbackStore

    store = FeedbackStore(database_url(layout, params.serving.store_url))
    try:
        return len(pending(store, layout))
    finally:
        store.close()


def record(layout: Layout, decision: PolicyDecision) -> None:
    """Keep the decision in ``.medloop/policy.jsonl`` (one JSON object per line)."""
    layout.state.mkdir(parents=True, exist_ok=True)
    with open(layout.state / POLICY_FILE, "a") as handle:
        handle.write(json.dumps(decision.as_dict(), sort_keys=True, default=str) + "\n")


def headline(decision: PolicyDecision) -> str:
    """One line: what the check decided and why."""
    if decision.retrain:
        return f"retrain started ({'; '.join(decision.reasons)})"
    if decision.held_back_by:
        return f"no retrain: {decision.held_back_by} (although {'; '.join(decision.reasons)})"
    return f"no retrain: {decision.new_labels} confirmed labels waiting, no drift found"


def render_markdown(decision: PolicyDecision) -> str:
    """The Prefect artifact of one policy check."""
    lines = [f"# {headline(decision)}", "", f"- checked at: {decision.checked_at}",
             f"- confirmed labels waiting for export: **{decision.new_labels}**",
             f"- last retrain started: {decision.last_run_started or 'never'}"]
    if decision.flow_run_id:
        lines.append(f"- retrain flow run: `{decision.flow_run_id}`")
    drift = decision.drift
    if drift is None:
        lines.append("- drift: not checked")
    else:
        lines.append(f"- drift: {'DRIFT' if drift.get('drifted') else 'none'}"
                     f"{'' if drift.get('judged') else ' (not judged: too few served inputs)'}")
        lines += [f"  - {reason}" for reason in drift.get("reasons", [])]
    return "\n".join(lines) + "\n"


def _ago(delta: timedelta) -> str:
    minutes = int(delta.total_seconds() // 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"
