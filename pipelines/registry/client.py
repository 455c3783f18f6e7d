"""The one MLflow registry client of medloop: aliases, versions, runs and their logged models, the
promotion history, and the champion (looked up and re-scored one way).

Every module that reads or writes the registry (promote, deploy, lineage, the service, drift,
the tasks and the command line) goes through these functions, so an alias, a version lookup or
a history entry means the same thing everywhere. MLflow is imported inside the functions.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Callable

from pipelines.config import Params
from pipelines.errors import MedloopError
from pipelines.registry.tags import CHAMPION, HISTORY, HISTORY_PAGES
from pipelines.registry.interrupted import no_answer
from pipelines.registry.tracking import configure, display_uri
from pipelines.workspace import Layout

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run
    from mlflow.entities.model_registry import ModelVersion

MODEL_ARTIFACT = "model"  # the artifact path (logged model name) train uses

HISTORY_REASON_LIMIT = 1000
# Registered-model tags are VARCHAR(5000) on PostgreSQL: a history page must fit, or it would be
# cut into invalid JSON.
HISTORY_PAGE_LIMIT = 4500


class RegistryError(MedloopError):
    """A run, model, version or alias asked of the registry is not there."""


def connect(params: Params, layout: Layout) -> "MlflowClient":
    """An MLflow client on the workspace's tracking store (the experiment created if missing)."""
    from mlflow import MlflowClient

    configure(params, layout)
    return MlflowClient()


# --------------------------------------------------------------------------------------------
# models, versions and aliases
# --------------------------------------------------------------------------------------------


def is_registered(client: "MlflowClient", name: str) -> bool:
    """Whether the registry holds a model named ``name``."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return True
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise


def version_with_alias(client: "MlflowClient", name: str, alias: str) -> "ModelVersion | None":
    """The version behind an alias; None when the model or the alias does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def champion(client: "MlflowClient", name: str) -> "ModelVersion | None":
    """The version aliased ``champion`` (the one in service); None when there is none."""
    return version_with_alias(client, name, CHAMPION)


def version_of_run(client: "MlflowClient", name: str, run_id: str) -> str | None:
    """The newest version registered from run ``run_id``, if any."""
    if not is_registered(client, name):
        return None
    versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return str(max(int(v.version) for v in versions)) if versions else None


# --------------------------------------------------------------------------------------------
# runs and their logged models
# --------------------------------------------------------------------------------------------


def get_run(client: "MlflowClient", run_id: str, params: Params, layout: Layout,
            error: type[MedloopError] = RegistryError) -> "Run":
    """The MLflow run ``run_id``; ``error`` naming the tracking store when it is not there."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as exc:
        if no_answer(exc):  # a server that is down has not lost the run
            raise
        raise error(f"run {run_id} is not in the tracking store {display_uri(params, layout)}") from None


def logged_model(client: "MlflowClient", mlflow_run: "Run",
                 error: type[MedloopError] = RegistryError) -> tuple[str | None, str]:
    """The run's logged model ``model``: (model id, source URI to register); ``error`` when the run
    has none."""
    run_id = mlflow_run.info.run_id
    outputs = mlflow_run.outputs.model_outputs if mlflow_run.outputs else []
    # MLflow 3 logs a model as a LoggedModel linked to the run (the newest step wins).
    for output in sorted(outputs, key=lambda o: o.step, reverse=True):
        logged = client.get_logged_model(output.model_id)
        if logged.name == MODEL_ARTIFACT:
            if str(logged.status) in ("PENDING", "FAILED"):
                # Its upload never finished: a version of it could lack artifacts.
                raise error(f"run {run_id}'s logged model {logged.model_id} is {logged.status}: its upload did not "
                            "finish, so it is not registered; re-run train")
            return logged.model_id, f"models:/{logged.model_id}"
    # A model saved among the run's own artifacts (MLflow 2 layout).
    if any(item.path.endswith("MLmodel") for item in client.list_artifacts(run_id, MODEL_ARTIFACT)):
        return None, f"runs:/{run_id}/{MODEL_ARTIFACT}"
    raise error(f"run {run_id} has no logged model {MODEL_ARTIFACT!r}, so there is nothing to register; "
                "re-run train")


# --------------------------------------------------------------------------------------------
# the champion re-scored
# --------------------------------------------------------------------------------------------


def rescorer(params: Params, layout: Layout) -> Callable[[str], dict]:
    """The one way a registered version is re-scored: given ``models:/<name>/<version>``, its
    metrics.json on the workspace's current frozen test set (`pipelines.evaluate.rescore_registered`).
    Promote calls it when the champion's recorded metrics are from another frozen test set."""

    def rescore(model_uri: str) -> dict:
        from pipelines.evaluate import rescore_registered

        return rescore_registered(params, layout, model_uri)

    return rescore


# --------------------------------------------------------------------------------------------
# promotion history: pages of a JSON list in registered-model tags
# --------------------------------------------------------------------------------------------


def append_history(client: "MlflowClient", name: str, entry: dict[str, Any]) -> None:
    """Append one entry. The newest page is ``medloop.promotion.history``; a full page is moved
    to ``medloop.promotion.history.<k>`` (k = 1, 2, ...) so that no tag outgrows its column."""
    tags = client.get_registered_model(name).tags
    if entry.get("reason") and len(entry["reason"]) > HISTORY_REASON_LIMIT:
        # One entry must fit a page; the full reason stays on the version's own tags.
        entry = {**entry, "reason": entry["reason"][:HISTORY_REASON_LIMIT] + "..."}
    page = load_json_list(tags.get(HISTORY)) + [entry]
    if len(json.dumps(page)) > HISTORY_PAGE_LIMIT and len(page) > 1:
        archived = int(tags.get(HISTORY_PAGES, "0")) + 1
        client.set_registered_model_tag(name, f"{HISTORY}.{archived}", json.dumps(page[:-1]))
        client.set_registered_model_tag(name, HISTORY_PAGES, str(archived))
        page = [entry]
    client.set_registered_model_tag(name, HISTORY, json.dumps(page))


def history(client: "MlflowClient", name: str) -> list[dict]:
    """Every entry of the promotion history of model ``name``, oldest first; empty before the first."""
    if not is_registered(client, name):
        return []
    tags = client.get_registered_model(name).tags
    entries: list[dict] = []
    for number in range(1, int(tags.get(HISTORY_PAGES, "0")) + 1):
        entries += load_json_list(tags.get(f"{HISTORY}.{number}"))
    return entries + load_json_list(tags.get(HISTORY))


def load_json_list(value: str | None) -> list:
    """A JSON list kept in a tag; empty when the tag is not set."""
    return json.loads(value) if value else []
