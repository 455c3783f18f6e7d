"""The decisions of a retrain run, made here so that the flow, ``medloop run`` and a person
reading the code see the same rules: is there anything to do, which version goes into service,
how did the run end, and what does its commit say.

The flow (`flows.retrain`) only wires these to its tasks.
"""

from __future__ import annotations

import logging
from typing import Any

from pipelines import promote
from pipelines.config import Params
from pipelines.ops.versioning import changed
from pipelines.workspace import Layout, read_json

log = logging.getLogger("medloop.runs")

PROMOTED = ("promoted", "override")


def nothing_changed(params: Params, layout: Layout) -> bool:
    """True when there is nothing to do: ``dvc status`` finds every stage up to date and the model
    of the last training was already judged by promote."""
    out_of_date = changed(layout)
    if out_of_date:
        log.info("out of date: %s", ", ".join(out_of_date))
        return False
    if not layout.train_json.is_file():
        return False
    run_id = read_json(layout.train_json, "run the train stage").get("run_id")
    return promote.earlier_decision(params, layout, run_id) is not None


def new_version(promotion: dict[str, Any]) -> str | None:
    """The version this run registered as champion (promoted, or by override), else None: the
    version the workspace commit is tagged with."""
    return promotion["version"] if promotion["action"] in PROMOTED else None


def version_to_deploy(promotion: dict[str, Any]) -> str | None:
    """The version to put in service after promote: the new champion, or a run registered earlier
    that is champion (deploy is idempotent, so a deploy that failed on an earlier night is
    completed now); None when nothing is to be deployed."""
    return new_version(promotion) or (promotion["version"] if promotion.get("passed") else None)


def outcome(promotion: dict[str, Any]) -> str:
    """How a run that trained (or found its model trained) ended: promoted, refused or data-only."""
    if promotion["action"] in PROMOTED:
        return "promoted"
    if promotion["action"] == "refused":
        return "refused"
    return "data-only"


def commit_message(model: str, outcome: str, promotion: dict[str, Any], collected: dict[str, Any]) -> str:
    """The workspace commit's message: the outcome, the run judged and the data batch."""
    batch = f"batch {collected['batch_id']}" if collected.get("batch_id") else "no new data"
    run = (promotion.get("run_id") or "")[:12]
    if outcome == "promoted":
        return f"{model} v{promotion['version']}: promoted (run {run}; {batch})"
    if outcome == "refused":
        return f"{model}: run {run} refused, champion unchanged ({batch})"
    return f"{model}: data updated ({batch})"


def feedback_commit_message(export: dict[str, Any]) -> str:
    """The commit of a night with nothing to retrain but clinicians' labels to version."""
    return f"feedback: export {export['export_id']} ({export['exported']} confirmed labels)"
