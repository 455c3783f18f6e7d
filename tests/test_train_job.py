"""The train stage as its own job on a GPU work pool, checked offline: the deployment in
infra/prefect.yaml, the values medloop fills in, and the job variables rendered through the
Kubernetes work pool's base job template (infra/k8s/) into the pod's nvidia.com/gpu request."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from conftest import ROOT, image_params, make_workspace, load
from flows.deployments import deployment_values
from tasks.train_job import GPU_VARIABLE, TRAIN_FLOW, train_deployment_name, train_job_variables

TEMPLATE = ROOT / "infra" / "k8s" / "work-pool-base-job-template.json"


def prefect_spec() -> dict:
    return yaml.safe_load((ROOT / "infra" / "prefect.yaml").read_text())


def params_with(tmp_path, **schedule):
    raw = image_params()
    raw["schedule"].update(schedule)
    layout = make_workspace(tmp_path, raw)
    return layout, load(layout)


def test_the_train_job_deployment_runs_the_train_flow_on_its_own_pool():
    from flows.train_job import train_stage

    [train] = [d for d in prefect_spec()["deployments"] if d["entrypoint"].startswith("flows/train_job.py")]
    assert train["entrypoint"] == "flows/train_job.py:train_stage" and train_stage.name == TRAIN_FLOW
    assert train["name"] == "{{ $MEDLOOP_TRAIN_DEPLOYMENT }}"
    assert train["work_pool"]["name"] == "{{ $MEDLOOP_TRAIN_WORK_POOL }}"
    assert train["parameters"] == {"params_file": "{{ $MEDLOOP_PARAMS_FILE }}"}
    assert "schedules" not in train  # started by the retrain flow, never on its own


def test_every_value_of_prefect_yaml_is_filled_and_the_train_pool_is_the_one_asked_for(tmp_path):
    text = (ROOT / "infra" / "prefect.yaml").read_text()
    used = set(re.findall(r"\{\{ \$(MEDLOOP_[A-Z_]+) \}\}", text))
    layout, params = params_with(tmp_path, train_work_pool="gpu-pool", train_gpus=2)
    values = deployment_values(params, layout)
    assert used <= set(values), sorted(used - set(values))
    assert values["MEDLOOP_TRAIN_WORK_POOL"] == "gpu-pool"
    assert values["MEDLOOP_TRAIN_DEPLOYMENT"] == train_deployment_name(params) == f"{params.schedule.deployment}-train"
    assert train_job_variables(params) == {GPU_VARIABLE: 2}

    plain = params.model_copy(update={"schedule": params.schedule.model_copy(update={"train_work_pool": None})})
    assert deployment_values(plain, layout)["MEDLOOP_TRAIN_WORK_POOL"] == params.schedule.work_pool


def test_the_gpu_request_reaches_the_job_manifest(tmp_path):
    import jsonschema
    from prefect.utilities.templating import apply_values

    assert TEMPLATE.is_file(), "infra/k8s/ must ship the Prefect Kubernetes work pool's base job template"
    template = json.loads(TEMPLATE.read_text())
    schema = template["variables"]
    _, params = params_with(tmp_path, train_work_pool="gpu-pool", train_gpus=2)
    variables = train_job_variables(params)
    jsonschema.validate(variables, schema)
    defaults = {name: spec["default"] for name, spec in schema["properties"].items() if "default" in spec}
    rendered = apply_values(template["job_configuration"], {**defaults, **variables, "command": ["prefect"]})
    [container] = rendered["job_manifest"]["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 2
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({GPU_VARIABLE: -1}, schema)
