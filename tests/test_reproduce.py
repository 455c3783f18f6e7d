"""Reproduce registered versions from their commits, for real: two nights through the retrain
flow (each new version committed, tagged and pushed), then rebuilds in fresh git worktrees from
the DVC remote alone: version 2 from its commit, version 1 from its tag after params changed on
main (each rebuild costs a night, so each version is rebuilt once)."""

from __future__ import annotations

import os
import shutil

import pytest
import yaml

from conftest import SALT, load, make_workspace, passing_params
from pipelines.ops.versioning import commit, git


@pytest.fixture(scope="module")
def versions(tmp_path_factory, prefect_server):
    """A workspace where the flow registered versions 1 and 2."""
    from flows.retrain import retrain

    previous_salt = os.environ.get("MEDLOOP_DEID_SALT")
    os.environ["MEDLOOP_DEID_SALT"] = SALT
    tmp_path = tmp_path_factory.mktemp("reproduce")
    params = passing_params()
    params["source"]["nights"] = 2
    params["promote"]["non_inferiority_margin"] = 1.0  # every passing night becomes a version
    layout = make_workspace(tmp_path, params)
    outcomes = [retrain(str(layout.params_file)) for _ in range(2)]
    assert [o["outcome"] for o in outcomes] == ["promoted", "promoted"], [o.get("promotion") for o in outcomes]
    yield {"layout": layout, "remote": tmp_path / "ws-remote", "tmp": tmp_path, "outcomes": outcomes}
    if previous_salt is None:
        os.environ.pop("MEDLOOP_DEID_SALT", None)
    else:
        os.environ["MEDLOOP_DEID_SALT"] = previous_salt


def assert_bit_for_bit(result, versions, version: str) -> None:
    assert result.version == version and result.identical, result.describe()
    assert result.weights_identical and result.tolerance == 0.0 and not result.differences
    assert result.compared > 50  # every metric, interval, subgroup and the threshold
    assert result.commit == versions["outcomes"][int(version) - 1]["publish"]["commit"]
    assert result.describe().startswith(f"IDENTICAL: breast-cancer-mlp v{version} from commit {result.commit[:12]} "
                                        f"reproduced bit for bit")


@pytest.mark.slow
def test_version_two_reproduces_bit_for_bit(versions):
    from pipelines import reproduce

    layout = versions["layout"]
    before = git(layout, "status", "--porcelain").stdout
    head = git(layout, "rev-parse", "HEAD").stdout
    assert_bit_for_bit(reproduce.run(load(layout), layout, "2"), versions, "2")
    # The user's working tree and HEAD were never touched; the worktree is gone.
    assert git(layout, "status", "--porcelain").stdout == before
    assert git(layout, "rev-parse", "HEAD").stdout == head
    assert git(layout, "worktree", "list").stdout.count("\n") == 1


@pytest.mark.slow
def test_version_one_reproduces_with_its_own_params_after_params_changed_on_main(versions):
    from pipelines import reproduce

    layout = versions["layout"]
    edited = yaml.safe_load(layout.params_file.read_text())
    edited["train"]["epochs"] = 3
    edited["train"]["learning_rate"] = 0.05
    layout.params_file.write_text(yaml.safe_dump(edited, sort_keys=False))
    commit(layout, "params: shorter training")
    assert_bit_for_bit(reproduce.run(load(layout), layout, rev="breast-cancer-mlp-v1"), versions, "1")


@pytest.mark.slow
def test_an_object_missing_from_the_remote_is_named(versions):
    from pipelines import reproduce

    layout = versions["layout"]
    # Take one collected item of version 1's data out of the remote.
    tag = "breast-cancer-mlp-v1"
    [record, *_] = [name for name in git(layout, "ls-tree", "--name-only", f"{tag}:data/raw/batches").stdout.split()
                    if name.endswith(".dvc")]  # DVC records each batch alone
    batch = yaml.safe_load(git(layout, "show", f"{tag}:data/raw/batches/{record}").stdout)["outs"][0]["md5"]
    manifest = versions["remote"] / "files" / "md5" / batch[:2] / batch[2:]
    entry = __import__("json").loads(manifest.read_text())[0]
    victim = versions["remote"] / "files" / "md5" / entry["md5"][:2] / entry["md5"][2:]
    kept = versions["tmp"] / "kept-object"
    shutil.move(victim, kept)
    try:
        with pytest.raises(reproduce.ReproduceError) as error:
            reproduce.run(load(layout), layout, "1")
    finally:
        shutil.move(kept, victim)
    message = str(error.value)
    assert "the DVC remote lacks 1 object(s)" in message
    assert entry["md5"] in message and entry["relpath"] in message
    assert git(layout, "worktree", "list").stdout.count("\n") == 1


def test_compare_reports_each_difference_with_its_size():
    from pipelines.reproduce import compare

    registered = {"run_id": "a", "weights_sha256": "x", "operating_threshold": 0.5,
                  "test": {"auroc": 0.91, "n": 40, "auroc_ci": [0.8, 0.95]}}
    same = {**registered, "run_id": "b"}
    assert compare(registered, same) == ([], 6)
    moved = {**same, "operating_threshold": 0.5004, "test": {"auroc": 0.91, "n": 40, "auroc_ci": [0.8, 0.96]}}
    differences, compared = compare(registered, moved)
    assert compared == 6
    assert [(d.key, round(d.size, 4)) for d in differences] == [("operating_threshold", 0.0004), ("test.auroc_ci[1]", 0.01)]
    within, _ = compare(registered, moved, tolerance=1e-3)
    assert [d.key for d in within] == ["test.auroc_ci[1]"]
    assert compare(registered, {**same, "weights_sha256": "y"})[0][0].describe() == "weights_sha256: registered 'x', reproduced 'y'"
