"""Train -> evaluate -> promote with real trained models, through DVC, into a real MLflow registry."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import load, make_workspace, registry, tabular_params
from pipelines import collect, promote
from pipelines.ops.versioning import repro


def set_params(layout, **sections) -> None:
    params = yaml.safe_load(layout.params_file.read_text())
    for section, values in sections.items():
        params[section].update(values)
    layout.params_file.write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.slow
def test_first_model_a_better_one_a_worse_one_then_override_and_rollback(tmp_path):
    params = tabular_params()
    # Floors suited to a test set of a few dozen cases; the gates themselves are table-tested.
    # The margin is one such a set can show: non-inferiority of sensitivity and specificity is
    # judged on the lower bound of the paired difference's interval, which is wide on a few dozen.
    params["promote"].update(min_auroc=0.85, min_sensitivity=0.5, min_specificity=0.3, max_ece=0.3,
                             subgroup_min_count=1000, non_inferiority_margin=0.3)
    params["train"].update(epochs=15)
    layout = make_workspace(tmp_path, params)
    name = params["model"]["name"]
    for _night in range(2):
        collect.run(load(layout), layout)

    # The first model has no champion to beat: judged on the floors alone.
    assert repro(layout, "evaluate")
    first = promote.run(load(layout), layout, actor="test")
    assert first.passed and str(first.version) == "1"
    client = registry(layout)
    champion = client.get_model_version_by_alias(name, "champion")
    assert str(champion.version) == "1"
    assert champion.tags["medloop.promotion.decision"] == "promoted"
    assert champion.tags["medloop.git_commit"]
    assert champion.run_id == json.loads(layout.train_json.read_text())["run_id"]
    # Re-scoring the registered version from the registry alone gives the same test metrics.
    from pipelines.evaluate import rescore_registered

    rescored = rescore_registered(load(layout), layout, f"models:/{name}/1")
    assert rescored["test"] == json.loads(layout.metrics_json.read_text())["test"]

    # Two more nights of data and a full training: better, promoted; v1 becomes previous-champion.
    for _night in range(2):
        collect.run(load(layout), layout)
    set_params(layout, train={"epochs": 60})
    assert repro(layout, "evaluate")
    metrics = json.loads(layout.metrics_json.read_text())
    assert metrics["test"]["auroc"] > 0.9
    better = promote.run(load(layout), layout, actor="test")
    assert better.passed and str(better.version) == "2", better.describe()
    assert str(client.get_model_version_by_alias(name, "champion").version) == "2"
    assert str(client.get_model_version_by_alias(name, "previous-champion").version) == "1"

    # A good model that fails a subgroup floor (age band with at least 5 cases): refused.
    set_params(layout, train={"seed": 99},
               promote={"subgroup_min_count": 5, "subgroup_min_auroc": 0.9999, "subgroup_min_sensitivity": 0.9999})
    assert repro(layout, "evaluate")
    strict = promote.run(load(layout), layout, actor="test")
    assert not strict.passed
    failed = [r for r in json.loads(client.get_run(strict.run_id).data.tags["medloop.promotion.reasons"])]
    assert any(r["gate"].startswith("subgroup_min_") for r in failed), failed
    assert len(client.search_model_versions(f"name='{name}'")) == 2
    set_params(layout, train={"seed": 1234}, promote={"subgroup_min_count": 1000})

    # A model that barely trained: refused, and the registry is not touched.
    set_params(layout, train={"epochs": 1, "learning_rate": 1e-6, "mlp_hidden_units": 1, "early_stopping_patience": 0})
    assert repro(layout, "evaluate")
    worse = promote.run(load(layout), layout, actor="test")
    assert not worse.passed
    refused_run = json.loads(layout.train_json.read_text())["run_id"]
    assert len(client.search_model_versions(f"name='{name}'")) == 2
    run = client.get_run(refused_run)
    assert run.data.tags["medloop.promotion.decision"] == "refused"
    reasons = json.loads(run.data.tags["medloop.promotion.reasons"])
    assert reasons and all({"gate", "observed", "required"} <= set(r) for r in reasons)
    with pytest.raises(promote.PromotionRefused) as error:
        promote.run(load(layout), layout, actor="test", require_promotion=True)
    # The error names every gate the run failed, each with what was observed and required.
    message = str(error.value)
    assert refused_run in message and message.count("(observed ") == len(reasons)
    for reason in reasons:
        assert f"  - {reason['gate']}: " in message and ", required " in message, (reason, message)

    # A reviewer overrides the refusal, then rolls it back.
    forced = promote.override(load(layout), layout, refused_run, "reader study supports it", actor="dr.lee")
    assert str(forced.version) == "3"
    assert str(client.get_model_version_by_alias(name, "champion").version) == "3"
    assert str(client.get_model_version_by_alias(name, "previous-champion").version) == "2"
    forced_tags = client.get_model_version(name, "3").tags
    assert forced_tags["medloop.promotion.decision"] == "override"
    assert forced_tags["medloop.promotion.actor"] == "dr.lee"
    back = promote.rollback(load(layout), layout, actor="dr.lee", reason="override reverted")
    assert str(back.version) == "2"
    assert str(client.get_model_version_by_alias(name, "champion").version) == "2"
    actions = [(entry["action"], str(entry["version"])) for entry in promote.history(load(layout), layout)]
    assert actions == [("promoted", "1"), ("promoted", "2"), ("override", "3"), ("rollback", "2")]

    # Extending the test set is deliberate and recorded (git: who and why); until it is frozen
    # again nothing is promoted, and the champion stays.
    import subprocess

    from pipelines.data import testset
    from pipelines.errors import ConfigError

    state = testset.current(layout)
    assert (state["status"], state["version"]) == ("frozen", 1)
    held = min(state["cases"].values())
    with pytest.raises(ConfigError, match=f"already holds at least {held} cases of every class and {state['items']} items"):
        testset.extend(load(layout), layout, cases_per_class=held, items=state["items"], reason="more", actor="dr.lee")
    wanted = max(state["cases"].values()) + 100  # more than the data set can give: it keeps growing
    message = testset.extend(load(layout), layout, cases_per_class=wanted, items=None,
                             reason="the ethics board asks for a tighter interval", actor="dr.lee")
    assert message.endswith(f"{wanted} cases of each class (by dr.lee): the ethics board asks for a tighter interval")
    logged = subprocess.run(["git", "-C", str(layout.root), "log", "-1", "--format=%an|%s"], capture_output=True,
                            text=True).stdout.strip()
    assert logged == f"dr.lee|{message}"
    assert load(layout).preprocess.test_set.min_cases_per_class == wanted
    assert repro(layout, "evaluate")
    grown = testset.current(layout)
    assert (grown["status"], grown["version"]) == ("growing", 1)
    waiting = promote.run(load(layout), layout, actor="test")
    assert not waiting.passed and "test set too small" in waiting.describe()
    assert str(client.get_model_version_by_alias(name, "champion").version) == "2"
