"""Deploy (a task, not a DVC stage): put the promoted version in service and record that it is.

The prediction service serves ``models:/<name>@champion``. Promotion moves that alias when a model
passes its gates; deploy is the step that makes the move official and auditable:

- it checks that ``champion`` points at the version to deploy and moves it there when it does not
  (a promotion interrupted between its two alias writes leaves it on the old champion);
- it records the deployment on the registered model: tag ``medloop.deployed`` (version, when, who,
  the Prefect flow run) and an entry ``deployed`` in the promotion history.

Deploying the version already in service changes nothing and says so, so a retried task or a
second run is harmless.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass

from pipelines.config import Params
from pipelines.errors import MedloopError
from pipelines.registry.interrupted import answering
from pipelines.registry.client import append_history, champion as champion_of, connect, is_registered
from pipelines.registry.tags import CHAMPION, DEPLOYED
from pipelines.values import now_iso
from pipelines.workspace import Layout

log = logging.getLogger("medloop.deploy")


class DeployError(MedloopError):
    """There is nothing to deploy (no registered model, or no such version)."""


@dataclass(frozen=True)
class DeployResult:
    """What deploy did.

    Attributes:
        action: ``deployed`` (a new version is in service) or ``unchanged`` (it already was).
        model_name: the registered model.
        version: the version in service now.
        replaced: the version that was in service before (None for the first deployment).
        actor: who deployed.
        at: when (UTC, ISO 8601).
    """

    action: str
    model_name: str
    version: str
    replaced: str | None
    actor: str
    at: str

    def describe(self) -> str:
        if self.action == "unchanged":
            return f"{self.model_name} v{self.version} is already in service"
        before = f" (replacing v{self.replaced})" if self.replaced else ""
        return f"{self.model_name} v{self.version} deployed as {CHAMPION}{before}"

    def as_dict(self) -> dict:
        return asdict(self)


def run(params: Params, layout: Layout, version: str | None = None, *, actor: str = "medloop",
        flow_run_id: str | None = None) -> DeployResult:
    """Put ``version`` (default: the current champion) in service and record it, with the Prefect
    flow run that deployed it (``flow_run_id``, when a flow did).

    Raises:
        DeployError: the model is not registered, has no champion, or has no such version.
        TrackingUnavailable: the tracking server did not answer (deploying again finishes it).
    """
    with answering(params, layout, f"deploying {params.model.name} v{version or '(the champion)'}",
                   "The deployment is recorded in the registry last, so deploying again (`medloop deploy`) "
                   "finishes it."):
        result = _deploy(params, layout, version, actor, flow_run_id)
    if result.action == "deployed":
        tell_service(params)
    return result


def _deploy(params: Params, layout: Layout, version: str | None, actor: str, flow_run_id: str | None) -> DeployResult:
    from mlflow.exceptions import MlflowException

    client = connect(params, layout)
    name = params.model.name
    if not is_registered(client, name):
        raise DeployError(f"model {name} is not registered yet: nothing to deploy (promote a model first)")
    champion = champion_of(client, name)
    if version is None:
        if champion is None:
            raise DeployError(f"model {name} has no {CHAMPION}: nothing to deploy")
        version = str(champion.version)
    try:
        client.get_model_version(name, version)
    except MlflowException:
        raise DeployError(f"model {name} has no version {version}") from None

    deployed = _deployed(client, name)
    if champion is not None and str(champion.version) == version and deployed == version:
        return DeployResult("unchanged", name, version, None, actor, now_iso())
    if champion is None or str(champion.version) != version:
        client.set_registered_model_alias(name, CHAMPION, version)
    at = now_iso()
    record = {"version": version, "at": at, "actor": actor, "flow_run_id": flow_run_id or ""}
    # The store first and the registry tag last: the tag is what makes a retry say "unchanged",
    # so nothing before it can be skipped by a retry after a failure.
    _record_in_store(params, layout, version, actor, record["flow_run_id"])
    append_history(client, name, {"version": version, "alias": CHAMPION, "action": "deployed",
                                   "actor": actor, "reason": "in service", "at": at, "replaced": deployed})
    client.set_registered_model_tag(name, DEPLOYED, json.dumps(record))
    log.info("%s v%s deployed (replacing %s) by %s", name, version, deployed or "nothing", actor)
    return DeployResult("deployed", name, version, deployed, actor, at)


def tell_service(params: Params) -> bool:
    """Ask the running service (``serving.url``) to reload now; True when it answered.

    A service that is down or has no admin token configured is not an error: it checks for a
    new champion every ``serving.reload_seconds`` anyway.
    """
    import urllib.error
    import urllib.request

    from pipelines.secrets import read_secret

    url, token = params.serving.url, read_secret(params.serving.admin_token_env)
    if not url:
        return False
    if not token:
        log.warning("serving.url is set but %s is empty: the service will pick up the new champion "
                    "on its next check", params.serving.admin_token_env)
        return False
    request = urllib.request.Request(url.rstrip("/") + "/admin/reload", method="POST",
                                     headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            log.info("service at %s reloaded: %s", url, answer.read().decode()[:200])
            return True
    except (urllib.error.URLError, OSError) as exc:
        log.warning("could not reach the service at %s (%s); it will pick up the new champion on "
                    "its next check", url, exc)
        return False


def _record_in_store(params: Params, layout: Layout, version: str, actor: str, flow_run_id: str) -> None:
    """The deployments table of the feedback store: what was served when."""
    from pipelines.store.feedback import FeedbackStore
    from pipelines.workspace import database_url

    store = FeedbackStore(database_url(layout, params.serving.store_url))
    try:
        store.record_deployment(params.model.name, version, actor, flow_run_id or None)
    finally:
        store.close()


def _deployed(client, name: str) -> str | None:
    recorded = client.get_registered_model(name).tags.get(DEPLOYED)
    return json.loads(recorded)["version"] if recorded else None
