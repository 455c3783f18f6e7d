"""infra/: the compose stack is accepted by docker compose and keeps its promises (pinned images,
health checks, start order, one-shot inits, secrets only from .env, TLS in front); the Kubernetes
manifests and the work pool's base job template (with its GPU variable) validate offline."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml

from conftest import ROOT

INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
KUBERNETES_VERSION = "1.33.0"
LONG_RUNNING = {"postgres", "seaweedfs", "mlflow", "prefect-server", "worker", "serve", "proxy"}
ONE_SHOT = {"db-init", "bucket-init", "mlflow-user-init"}


def compose() -> dict:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


def filled_env(tmp_path):
    """.env.example with every empty value filled (as a site fills it)."""
    text = re.sub(r"^([A-Z0-9_]+)=$", r"\1=value-for-test", (INFRA / ".env.example").read_text(), flags=re.M)
    path = tmp_path / ".env"
    path.write_text(text)
    return path


def compose_command() -> list[str]:
    if shutil.which("docker") is None:
        pytest.skip("docker is not installed")
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.skip("docker is installed without compose (neither `docker compose` nor `docker-compose`)")


def test_docker_compose_accepts_the_stack_and_refuses_it_without_its_secrets(tmp_path):
    command = [*compose_command(), "-f", str(INFRA / "compose.yaml")]
    env_file = filled_env(tmp_path)
    done = subprocess.run([*command, "--env-file", str(env_file), "config"], capture_output=True, text=True,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)
    assert set(resolved["services"]) == LONG_RUNNING | ONE_SHOT
    assert resolved["services"]["mlflow"]["environment"]["MLFLOW_AUTH_ADMIN_PASSWORD"] == "value-for-test"

    env_file.write_text(env_file.read_text().replace("MLFLOW_ADMIN_PASSWORD=value-for-test", "MLFLOW_ADMIN_PASSWORD="))
    refused = subprocess.run([*command, "--env-file", str(env_file), "config"], capture_output=True, text=True,
                             cwd=tmp_path)
    assert refused.returncode != 0 and "set MLFLOW_ADMIN_PASSWORD in .env" in refused.stderr


def test_the_compose_stack_keeps_its_promises():
    spec = compose()
    services = spec["services"]
    text = (INFRA / "compose.yaml").read_text()
    for name, service in services.items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: image {image} is not pinned"
        if name in LONG_RUNNING:
            assert service["healthcheck"]["test"], name
            assert service["restart"] == "unless-stopped", name
        else:
            assert service["restart"] == "no", name
        for needed, condition in (service.get("depends_on") or {}).items():
            wanted = "service_completed_successfully" if needed in ONE_SHOT else "service_healthy"
            assert condition == {"condition": wanted}, (name, needed)
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source.startswith(("./", "${")) or source in spec["volumes"], (name, volume)
    assert [name for name, s in services.items() if s.get("ports")] == ["proxy"]  # only TLS is public
    assert {"postgres-data", "seaweedfs-data", "workspace"} <= set(spec["volumes"])

    mlflow = " ".join(services["mlflow"]["command"])
    for part in ("--app-name=basic-auth", "--backend-store-uri=postgresql://", "--artifacts-destination=s3://",
                 "--serve-artifacts", "--allowed-hosts="):
        assert part in mlflow
    assert "ServerSideEncryption" in services["mlflow"]["environment"]["MLFLOW_S3_UPLOAD_EXTRA_ARGS"]
    auth = (INFRA / "mlflow" / "basic_auth.ini").read_text()
    assert "default_permission = NO_PERMISSIONS" in auth and "admin_password" not in auth.replace("# ", "")
    assert "pg_trgm" in (INFRA / "postgres" / "init.sh").read_text()
    assert services["prefect-server"]["environment"]["PREFECT_SERVER_DATABASE_DRIVER"] == "postgresql+asyncpg"
    caddy = (INFRA / "proxy" / "Caddyfile").read_text()
    assert caddy.count("tls /certs/tls.crt /certs/tls.key") == 3

    # Every variable the file reads is in .env.example; no secret has a value in the repository.
    example = dict(line.split("=", 1) for line in (INFRA / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", text))
    assert used <= set(example), used - set(example)
    for key, value in example.items():
        if any(word in key for word in ("PASSWORD", "SECRET", "SALT", "TOKEN")):
            assert value == "", f"{key} has a value in .env.example"


def k8s_resources() -> list[dict]:
    resources = []
    for path in sorted(K8S.glob("*.yaml")):
        resources += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return resources


def test_kubernetes_manifests_validate_offline():
    import kubernetes_validate

    resources = k8s_resources()
    kinds = sorted({r["kind"] for r in resources})
    assert {"Deployment", "StatefulSet", "Service", "Job", "Ingress", "ConfigMap", "Role"} <= set(kinds)
    for resource in resources:
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
        assert resource["metadata"].get("namespace", "medloop") == "medloop" or resource["kind"] == "Namespace"
    with pytest.raises(kubernetes_validate.ValidationError):  # the validation can fail
        kubernetes_validate.validate({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
                                      "spec": {"replicas": "two"}}, KUBERNETES_VERSION, strict=True)
    images = {c["image"] for r in resources if r["kind"] in ("Deployment", "StatefulSet", "Job")
              for c in r["spec"]["template"]["spec"].get("containers", [])}
    assert all(":" in image and not image.endswith(":latest") for image in images), images


def test_the_work_pool_template_requests_gpus_by_a_variable():
    import kubernetes_validate

    template = json.loads((K8S / "work-pool-base-job-template.json").read_text())
    variables = template["variables"]["properties"]
    assert variables["gpu_count"]["type"] == "integer" and variables["gpu_count"]["default"] == 0
    text = json.dumps(template["job_configuration"])
    placeholders = set(re.findall(r"\{\{ (\w+) \}\}", text))
    assert placeholders <= set(variables), placeholders - set(variables)

    # The Job a flow run gets, with the variables as the worker fills them: 2 GPUs asked.
    values = {name: spec.get("default") for name, spec in variables.items()}
    values.update(name="retrain-night", command=["prefect", "flow-run", "execute"], env={"A": "1"},
                  labels={"app": "medloop"}, gpu_count=2, job_watch_timeout_seconds=None)

    def fill(node):
        if isinstance(node, dict):
            return {key: fill(value) for key, value in node.items()}
        if isinstance(node, list):
            return [fill(value) for value in node]
        if isinstance(node, str):
            whole = re.fullmatch(r"\{\{ (\w+) \}\}", node)
            if whole:
                return values[whole.group(1)]
            return re.sub(r"\{\{ (\w+) \}\}", lambda m: str(values[m.group(1)]), node)
        return node

    job = fill(template["job_configuration"]["job_manifest"])
    job["spec"]["template"]["spec"]["containers"][0]["env"] = [{"name": "A", "value": "1"}]  # the worker's form
    kubernetes_validate.validate(job, KUBERNETES_VERSION, strict=True)
    resources = job["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == 2


def test_production_params_take_endpoints_from_the_environment_and_refuse_passwords():
    from pipelines.config import parse_params
    from pipelines.errors import ConfigError
    from pipelines.ops.production import production_params

    profile = yaml.safe_load((ROOT / "profiles" / "breast_cancer.yaml").read_text())
    env = {"MEDLOOP_TRACKING_URI": "http://mlflow:5000", "MEDLOOP_STORE_URL": "postgresql://feedback@postgres/feedback",
           "MEDLOOP_DVC_REMOTE": "s3://medloop-dvc/x", "MEDLOOP_S3_ENDPOINT_URL": "http://seaweedfs:8333",
           "MEDLOOP_S3_SSE": "AES256"}
    params = parse_params(production_params(profile, env))
    assert params.tracking.uri == "http://mlflow:5000" and params.storage.s3_server_side_encryption == "AES256"
    assert params.serving.store_url == "postgresql://feedback@postgres/feedback"
    assert params.model == parse_params(profile).model
    with pytest.raises(ConfigError, match=r"MEDLOOP_STORE_URL holds a password \(postgresql://f:\*\*\*@db/x\)"):
        production_params(profile, {"MEDLOOP_STORE_URL": "postgresql://f:hunter22@db/x"})
