"""The data-refresh Prefect flow, run for real (Prefect's test harness starts a local server)."""

from __future__ import annotations

import pytest

from conftest import image_params, make_workspace
from pipelines.ops.versioning import git


@pytest.mark.slow
def test_nights_then_nothing_new(tmp_path, prefect_server):
    from flows.data_refresh import data_refresh

    params = image_params()
    params["source"]["nights"] = 2
    layout = make_workspace(tmp_path, params)
    first = data_refresh(str(layout.root))
    second = data_refresh(str(layout.root))
    third = data_refresh(str(layout.root))
    assert first["collect"]["stored"] == 24 and all(first["stages"].values())
    assert second["collect"]["stored"] == 24 and all(second["stages"].values())
    assert not third["collect"]["batch_id"] and not any(third["stages"].values())
    assert third["commit"] is None
    log = git(layout, "log", "--format=%s").stdout.splitlines()
    assert log[0] == f"data: batch {second['collect']['batch_id']}"
    assert log[1] == f"data: batch {first['collect']['batch_id']}"
    assert git(layout, "status", "--porcelain").stdout.strip() == ""
    # Pushed before it was committed: every committed data version is on the remote.
    from pipelines.ops.versioning import dvc

    cloud = dvc(layout, "status", "--cloud", "--all-commits", "--json").stdout
    assert cloud.strip() in ("", "{}"), cloud


@pytest.mark.slow
def test_a_failed_gate_fails_the_flow(tmp_path, prefect_server):
    from flows.data_refresh import data_refresh
    from pipelines.ops.versioning import StageFailed

    params = image_params()
    params["validate"]["min_new_items"] = 1000  # no night brings that many
    layout = make_workspace(tmp_path, params)
    with pytest.raises(StageFailed, match="stage 'validate' failed") as error:
        data_refresh(str(layout.root))
    # The first night brings 24 images (source.images_per_night): the newest-batch gate names both.
    assert "newest_batch: records of batch '" in str(error.value)
    assert "(new or newly labelled) at least 1000: found 24" in str(error.value)
    assert not (layout.processed / "index.parquet").exists()
