"""What orchestration costs: the retrain flow on one workspace, three times, against a real Prefect
server on 127.0.0.1 (the production set-up: server running, flow run from a client).

1. a full run (new data: every stage runs, a model is trained, judged and versioned);
2. a no-change run (no new data, same params and code): target at most 10% of the full run;
3. a run after a training-param change (train and evaluate rerun, the data stages do not).

For each run: the wall time of the flow call, the sum of its steps' own wall times (collect, each
DVC command, promote, deploy, publish; measured inside the tasks), and the difference, which is
what Prefect adds (flow and task runs, state changes, the artifact, the run log): target under 5%
of the full run. Figures are printed side by side as ratios; the absolute seconds depend on the
machine.

    python benchmarks/orchestration.py [--profile profiles/breast_cancer.yaml] [--images-per-night 160]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import BENCH_SALT  # noqa: E402 - benchmarks/common.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default=str(ROOT / "params.yaml"), help="params profile (default: params.yaml)")
    parser.add_argument("--images-per-night", type=int, default=160, help="synthetic source only")
    parser.add_argument("--workdir", default=None, help="where to build the workspace (default: a temp folder)")
    args = parser.parse_args()

    os.environ.setdefault("MEDLOOP_DEID_SALT", BENCH_SALT)
    os.environ.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", PREFECT_LOGGING_LEVEL="WARNING",
                      TF_CPP_MIN_LOG_LEVEL="2")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="medloop-bench-orchestration-"))
    workdir.mkdir(parents=True, exist_ok=True)
    server = _start_prefect(workdir)
    try:
        rows = _measure(workdir, Path(args.profile), args.images_per_night)
    finally:
        from medloop.servers import stop_server

        stop_server(server)
    _print(rows)


def _start_prefect(workdir: Path):
    import socket

    from medloop.servers import prefect_server_command, start_server

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    home = workdir / "prefect-home"
    home.mkdir(exist_ok=True)
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": ""}
    server = start_server("Prefect", prefect_server_command(port), env, home / "server.log", url + "/health")
    os.environ.update(PREFECT_HOME=str(home), PREFECT_API_URL=url)
    return server


def _measure(workdir: Path, profile: Path, images_per_night: int) -> list[dict]:
    from flows.retrain import retrain
    from pipelines.ops.scaffold import create_workspace

    params = yaml.safe_load(profile.read_text())
    # One night of data only, so that the second run finds nothing new.
    params["source"]["nights"] = 1
    if params["source"]["kind"] == "synthetic_cxr":
        params["source"]["images_per_night"] = images_per_night
    params["storage"]["dvc_remote"] = str(workdir / "dvc-remote")
    params_file = workdir / "bench-params.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    layout = create_workspace(workdir / "ws", params_file)

    rows = []
    for label in ("full run", "no-change run", "training-param change"):
        if label == "training-param change":
            edited = yaml.safe_load(layout.params_file.read_text())
            edited["train"]["learning_rate"] = edited["train"]["learning_rate"] / 2
            layout.params_file.write_text(yaml.safe_dump(edited, sort_keys=False))
        started = time.perf_counter()
        summary = retrain(str(layout.params_file))
        wall = time.perf_counter() - started
        steps = sum(seconds for step, seconds in summary["seconds"].items() if step != "total")
        rows.append({"label": label, "wall": wall, "steps": steps, "overhead": wall - steps,
                     "outcome": summary["outcome"],
                     "ran": [stage for stage, ran in (summary.get("stages") or {}).items() if ran]})
        print(f"{label}: {summary['outcome']}, {wall:.1f} s", flush=True)
    return rows


def _print(rows: list[dict]) -> None:
    full = rows[0]["wall"]
    print()
    print(f"| run | outcome | stages run | wall s | steps s | orchestration s | wall / full run | orchestration / full run |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['label']} | {row['outcome']} | {', '.join(row['ran']) or '-'} | {row['wall']:.1f} | "
              f"{row['steps']:.1f} | {row['overhead']:.2f} | {row['wall'] / full:.1%} | {row['overhead'] / full:.1%} |")
    no_change = rows[1]["wall"] / full
    overhead = rows[0]["overhead"] / full
    print()
    print(f"no-change run / full run: {no_change:.1%} (target <= 10%): {'met' if no_change <= 0.10 else 'NOT met'}")
    print(f"orchestration overhead / full run: {overhead:.1%} (target < 5%): {'met' if overhead < 0.05 else 'NOT met'}")


if __name__ == "__main__":
    main()
