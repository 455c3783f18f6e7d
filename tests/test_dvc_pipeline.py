"""The DVC stage graph: caching, params granularity, the gate blocking downstream, fresh clones."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest
import yaml

from conftest import load, make_workspace, tabular_params
from pipelines import collect
from pipelines.errors import WorkspaceError
from pipelines.ops.versioning import StageFailed, commit, dvc, git, push, repro


def ran_stages(layout) -> list[str]:
    out = dvc(layout, "repro", "preprocess").stdout
    return [stage for stage in ("clean", "validate", "preprocess") if f"Running stage '{stage}'" in out]


def set_param(layout, section: str, key: str, value) -> None:
    params = yaml.safe_load(layout.params_file.read_text())
    params[section][key] = value
    layout.params_file.write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.slow
def test_stages_cache_and_rerun_only_what_changed(tmp_path):
    layout = make_workspace(tmp_path, tabular_params())
    collect.run(load(layout), layout)
    assert ran_stages(layout) == ["clean", "validate", "preprocess"]
    assert ran_stages(layout) == []  # nothing changed: DVC skips everything
    set_param(layout, "preprocess", "validation_fraction", 0.2)
    assert ran_stages(layout) == ["preprocess"]  # a preprocess setting does not rerun cleaning
    set_param(layout, "validate", "max_null_fraction", 0.05)
    assert ran_stages(layout)[:1] == ["validate"]  # a gate setting reruns the gate, not cleaning
    collect.run(load(layout), layout)  # a new night of data reruns the chain
    assert ran_stages(layout) == ["clean", "validate", "preprocess"]
    lock = yaml.safe_load((layout.root / "dvc.lock").read_text())
    clean_deps = {dep["path"] for dep in lock["stages"]["clean"]["deps"]}
    assert {"data/raw/index.json", "pipelines/clean.py", "pipelines/data/images.py"} <= clean_deps
    assert set(lock["stages"]["preprocess"]["params"]["params.yaml"]) >= {"preprocess", "model.classes"}


@pytest.mark.slow
def test_failed_gate_stops_the_chain_and_keeps_the_previous_version(tmp_path):
    from tests_support import breast_cancer_frame

    rows = breast_cancer_frame(60)
    source = tmp_path / "export.csv"
    rows.to_csv(source, index=False)
    layout = make_workspace(tmp_path, tabular_params(kind="csv", path=str(source)))
    collect.run(load(layout), layout)
    repro(layout, "preprocess")
    processed_before = (layout.processed / "index.parquet").read_bytes()
    lock_before = yaml.safe_load((layout.root / "dvc.lock").read_text())["stages"]["preprocess"]

    bad = breast_cancer_frame(90).tail(30).copy()
    bad["mean_radius"] = -5.0  # physically impossible measurements
    pd.concat([rows, bad]).to_csv(source, index=False)
    collect.run(load(layout), layout)
    with pytest.raises(StageFailed) as error:
        repro(layout, "preprocess")
    message = str(error.value)
    assert message.startswith("stage 'validate' failed; nothing downstream ran.")
    assert error.value.stage == "validate"
    assert "mean_radius" in message and "between 0" in message
    assert "reports/data_docs/index.html" in message
    assert (layout.data_docs / "index.html").is_file()
    # downstream did not run: processed data and the lock still describe the previous version
    assert (layout.processed / "index.parquet").read_bytes() == processed_before
    assert yaml.safe_load((layout.root / "dvc.lock").read_text())["stages"]["preprocess"] == lock_before


@pytest.mark.slow
def test_fresh_clone_pulls_and_reproduces_identical_outputs(tmp_path):
    layout = make_workspace(tmp_path, tabular_params())
    collect.run(load(layout), layout)
    collect.run(load(layout), layout)
    repro(layout, "preprocess")
    push(layout)
    commit(layout, "data: two nights")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(layout.root), str(clone)], check=True)
    from pipelines.workspace import Layout

    cloned = Layout.at(clone)
    dvc(cloned, "pull", "--quiet", "--with-deps", "preprocess")
    dvc(cloned, "pull", "--quiet", "-R", "data/raw")  # each batch's own .dvc file: no stage depends on them
    dvc(cloned, "repro", "--force", "preprocess")
    original = yaml.safe_load((layout.root / "dvc.lock").read_text())
    again = yaml.safe_load((clone / "dvc.lock").read_text())
    for stage in ("clean", "preprocess"):
        assert again["stages"][stage]["outs"] == original["stages"][stage]["outs"], stage
    assert dvc(cloned, "status", "--with-deps", "preprocess").stdout.strip().endswith("Data and pipelines are up to date.")


@pytest.mark.slow
@pytest.mark.integration
def test_s3_remote_is_one_params_change(tmp_path, s3_bucket, s3_endpoint):
    client, bucket = s3_bucket
    params = tabular_params()
    layout = make_workspace(tmp_path, params)
    params["storage"] = {"dvc_remote": f"s3://{bucket}/dvc", "s3_endpoint_url": s3_endpoint}
    layout.params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    from pipelines.ops.scaffold import create_workspace

    create_workspace(layout.root)  # re-reads params.yaml and points the remote at S3
    collect.run(load(layout), layout)
    push(layout)
    keys = [obj["Key"] for obj in client.list_objects_v2(Bucket=bucket, Prefix="dvc/")["Contents"]]
    assert len(keys) >= 2  # the directory listing and its files


def test_a_workspace_is_required(tmp_path):
    from pipelines.workspace import Layout

    with pytest.raises(WorkspaceError, match="is not a medloop workspace"):
        collect.run(load(make_workspace(tmp_path, tabular_params())), Layout.at(tmp_path / "elsewhere"))


def test_stage_modules_run_as_commands_and_fail_cleanly(tmp_path):
    layout = make_workspace(tmp_path, tabular_params())
    done = subprocess.run([sys.executable, "-m", "pipelines.clean"], cwd=layout.root, capture_output=True, text=True)
    assert done.returncode == 1
    assert "clean failed:" in done.stderr and "nothing collected yet" in done.stderr
    assert "Traceback" not in done.stderr
    git(layout, "status")
