"""`medloop demo` as a user runs it, on the tabular profile (small): nights until a champion, the
champion served, simulated clinicians through the HTTP API, and a next night that learns from
their labels, which the final version's lineage names."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from conftest import SALT, load, passing_params


@pytest.mark.slow
def test_the_demo_closes_the_loop(tmp_path):
    from pipelines.registry.lineage import version_lineage
    from pipelines.workspace import Layout

    params = passing_params()
    params["storage"]["dvc_remote"] = str(tmp_path / "remote")
    profile = tmp_path / "demo-params.yaml"
    profile.write_text(yaml.safe_dump(params, sort_keys=False))
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env["MEDLOOP_DEID_SALT"] = SALT
    done = subprocess.run([sys.executable, "-m", "medloop", "demo", "--params", str(profile), "-w", str(tmp_path / "ws"),
                           "--nights", "2"], capture_output=True, text=True, env=env, timeout=1200, cwd=tmp_path)
    out = " ".join(done.stdout.split())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "the clinic: the champion served, clinicians at work" in out
    assert "disagreements adjudicated by a reviewer" in out and "3 new cases" in out

    layout = Layout.at(tmp_path / "ws")
    final = version_lineage(load(layout), layout)  # the champion after the clinicians' night
    assert int(final["version"]) >= 2, final["promotion"]
    learned = final["learned_from"]
    assert learned["clinician_labels"] > 0 and learned["clinician_label_batches"], learned
    assert learned["clinician_label_batch_count"] == len(learned["clinician_label_batches"]) == 1  # one clinic day
    assert f"v{final['version']} learned from: data/raw" in out
    assert f"{learned['clinician_labels']} clinician-confirmed labels" in out
    assert "live, v1:" in out and "confirmed by clinicians; agreement" in out
    assert "drift:" in out
