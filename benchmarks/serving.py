"""Prediction throughput and latency: ``medloop serve`` beside ``mlflow models serve`` of the same
registered model version, on the same machine, driven by the same client with the same inputs.

    python benchmarks/serving.py [--quick] [--only image|tabular] [--requests 300] [--concurrency 1 8 32]

Two workspaces are built first (not timed; kept under ``--workdir`` and reused when it is given
again), the way a user would: ``medloop init`` from a shipped profile, ``medloop collect``,
``dvc repro evaluate``, ``medloop promote`` (or, when the gates refuse the small benchmark model,
``medloop promote --run <run> --reason benchmark``):

* image: the default profile (``params.yaml``: ``cxr_small`` at 96x96, synthetic chest
  radiographs), one night of data and ``--epochs`` epochs (the weights do not change the cost of
  scoring);
* tabular: ``profiles/breast_cancer.yaml`` (the reference MLP on the Wisconsin data), one night.

Each server then runs alone on 127.0.0.1, one process each, with one uvicorn worker each:
``medloop serve`` (micro-batching at the workspace's ``serving.batch_max_size`` and
``batch_max_wait_ms``, every prediction stored in the feedback store, de-identification of every
upload), and ``mlflow models serve -m models:/<name>/<version> --env-manager local --workers 1``
of the very version medloop serves. One async httpx client sends one input per request at each
concurrency (that many requests in flight), after a warm-up, for a fixed number of requests:

* medloop: ``POST /predict`` with ``{"images": [<base64 file>]}`` or ``{"instances": [row]}``;
* mlflow: ``POST /invocations`` with ``{"dataframe_records": [{"image": <base64 file>}]}`` or
  ``{"dataframe_records": [row]}`` (the pyfunc decodes base64 text itself).

The images are the synthetic source's own files (DICOM with fake identifiers and JPEG, 256x256)
of a night the model never saw, the rows the profile's feature columns. Printed: requests per
second, p50 and p99 latency for both, and the ratios (medloop/mlflow throughput; medloop/mlflow
p99), and, as a check that both serve the same model, the largest difference between their
probabilities for the same 16 inputs (medloop answers to 6 decimals). Results also go to
``<workdir>/serving.json``. Nothing here asserts a timing.

Where the difference comes from: both run the same pyfunc's preparation code and the same Keras
model, but the pyfunc's ``predict`` calls Keras ``model.predict``, which sets up a data pipeline
and callbacks on every call (tens of milliseconds on a CPU, more than the model itself for one
input), while medloop calls the model once per micro-batch with ``predict_on_batch``
(`serving.scoring`). medloop does more per request besides: de-identification of each upload,
keeping the de-identified image, and a database write per prediction.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import child_env  # noqa: E402 - benchmarks/common.py

MODELS = {"image": ROOT / "params.yaml", "tabular": ROOT / "profiles" / "breast_cancer.yaml"}
BUILT = ".serving-benchmark-built"
CHECKED = 16  # inputs whose answers are compared between the two servers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--only", choices=sorted(MODELS), default=None, help="one model only")
    parser.add_argument("--requests", type=int, default=300, help="measured requests per concurrency")
    parser.add_argument("--warmup", type=int, default=50, help="requests before measuring (per server)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--epochs", type=int, default=2, help="training epochs of the image model")
    parser.add_argument("--quick", action="store_true", help="100 requests, 20 warm-up (a smoke run)")
    parser.add_argument("--workdir", type=Path, default=None, help="workspaces (reused when built)")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.warmup = 100, 20

    env = child_env()
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="medloop-bench-serving-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"python {platform.python_version()}, {os.cpu_count()} cores, workdir {workdir}", flush=True)
    results = {}
    for kind in [k for k in MODELS if args.only in (None, k)]:
        workspace = build(workdir / kind, MODELS[kind], args.epochs, env)
        results[kind] = measure(kind, workspace, args, env)
    print()
    for kind, result in results.items():
        print(table(kind, result))
        print()
    (workdir / "serving.json").write_text(json.dumps({
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {"python": platform.python_version(), "cores": os.cpu_count(), "platform": platform.platform()},
        "results": results}, indent=2) + "\n")
    print(f"results: {workdir / 'serving.json'}")
    return 0


# --------------------------------------------------------------------------------------------
# the workspaces (not timed)
# --------------------------------------------------------------------------------------------


def build(folder: Path, profile: Path, epochs: int, env: dict[str, str]) -> Path:
    """A workspace with a registered champion, built by medloop's own commands; reused if built."""
    workspace = folder / "ws"
    if (workspace / BUILT).is_file():
        print(f"[{folder.name}] reusing {workspace}", flush=True)
        return workspace
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    params = yaml.safe_load(profile.read_text())
    params["source"]["nights"] = 1
    if params["model"]["modality"] == "image":
        params["train"]["epochs"] = epochs
    params["storage"]["dvc_remote"] = str(folder / "dvc-remote")
    params_file = folder / "bench-params.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    print(f"[{folder.name}] building a workspace with a registered model (not timed) ...", flush=True)
    medloop = [sys.executable, "-m", "medloop"]
    _run([*medloop, "init", str(workspace), "--params", str(params_file)], env)
    _run([*medloop, "collect", "-w", str(workspace)], env)
    _run([sys.executable, "-m", "dvc", "repro", "evaluate"], env, cwd=workspace)
    if subprocess.run([*medloop, "promote", "-w", str(workspace)], env=env, cwd=workspace,
                      capture_output=True, text=True).returncode != 0:
        run_id = json.loads((workspace / "models" / "train.json").read_text())["run_id"]
        _run([*medloop, "promote", "-w", str(workspace), "--run", run_id,
              "--reason", "benchmark: serve the small benchmark model"], env)
    (workspace / BUILT).write_text("built\n")
    return workspace


def _run(command: list[str], env: dict[str, str], cwd: Path | None = None) -> str:
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


def champion(workspace: Path, env: dict[str, str]) -> dict[str, str]:
    """Name, version and tracking URI of the workspace's champion (asked in a child process, so
    that this client process stays free of MLflow and TensorFlow)."""
    code = (
        "import json, sys\n"
        "from pipelines.config import load_params\n"
        "from pipelines.registry.client import champion, connect\n"
        "from pipelines.registry.tracking import tracking_uri\n"
        "from pipelines.workspace import Layout\n"
        "layout = Layout.at(sys.argv[1]); params = load_params(layout.params_file)\n"
        "version = champion(connect(params, layout), params.model.name)\n"
        "print(json.dumps({'name': params.model.name, 'version': str(version.version),\n"
        "                  'tracking_uri': tracking_uri(params, layout)}))\n"
    )
    return json.loads(_run([sys.executable, "-c", code, str(workspace)], env).strip().splitlines()[-1])


def inputs(kind: str, workspace: Path, count: int = 64) -> list[dict]:
    """``count`` distinct inputs, each as (medloop body, mlflow body)."""
    from pipelines.config import load_params

    params = load_params(workspace / "params.yaml")
    if kind == "image":
        from pipelines.data.sources.synthetic_cxr import SyntheticCxrSourceReader

        # Night 2's studies: never collected, so never seen in training (the service scores them
        # as it would tomorrow's uploads).
        source = params.source.model_copy(update={"nights": 2})
        items = SyntheticCxrSourceReader(source).night_items(2)[:count]
        encoded = [base64.b64encode(item.read()).decode() for item in items]
        return [{"medloop": {"images": [text]}, "mlflow": {"dataframe_records": [{"image": text}]}} for text in encoded]
    from pipelines.data.sources.breast_cancer import BreastCancerReader

    features = list(params.tabular.features)
    table = BreastCancerReader(params.source).full_table().tail(count)
    rows = [{name: float(value) for name, value in zip(features, values)} for values in table[features].to_numpy()]
    return [{"medloop": {"instances": [row]}, "mlflow": {"dataframe_records": [row]}} for row in rows]


# --------------------------------------------------------------------------------------------
# the servers and the client
# --------------------------------------------------------------------------------------------


def measure(kind: str, workspace: Path, args, env: dict[str, str]) -> dict:
    model = champion(workspace, env)
    bodies = inputs(kind, workspace)
    token = _run([sys.executable, "-m", "medloop", "token", "add", f"bench-{time.time_ns()}", "--role", "clinician",
                  "-w", str(workspace)], env).strip().splitlines()[-1]
    port = _free_port()
    servers = {
        "medloop": ([sys.executable, "-m", "medloop", "serve", "-w", str(workspace), "--port", str(port)],
                    f"http://127.0.0.1:{port}", "/readyz", "/predict", {"Authorization": f"Bearer {token}"}),
        "mlflow": ([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{model['name']}/{model['version']}",
                    "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                   f"http://127.0.0.1:{port}", "/ping", "/invocations", {}),
    }
    result = {"model": model["name"], "version": model["version"], "servers": {}}
    answers: dict[str, list[dict[str, float]]] = {}
    for name, (command, base, ready, path, headers) in servers.items():
        log = workspace.parent / f"{name}-server.log"
        print(f"[{kind}] {name}: starting {' '.join(command[1:6])} ...", flush=True)
        with log.open("wb") as sink:
            process = subprocess.Popen(command, env={**env, "MLFLOW_TRACKING_URI": model["tracking_uri"]},
                                       cwd=workspace.parent, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_ready(process, base + ready, log)
            payloads = [body[name] for body in bodies]
            answers[name] = _probabilities(name, base + path, headers, payloads[:CHECKED])
            asyncio.run(_drive(base + path, headers, payloads, args.warmup, 8))
            rows = {}
            for concurrency in args.concurrency:
                rows[concurrency] = asyncio.run(_drive(base + path, headers, payloads, args.requests, concurrency))
                row = rows[concurrency]
                print(f"[{kind}] {name} c={concurrency}: {row['throughput']:.1f} req/s, p50 {row['p50_ms']:.1f} ms, "
                      f"p99 {row['p99_ms']:.1f} ms, errors {row['errors']}", flush=True)
            result["servers"][name] = rows
        finally:
            _stop(process)
    # The same version, the same inputs: the same probabilities (both answer to float32).
    result["max_probability_difference"] = max(abs(mine[label] - theirs[label])
                                               for mine, theirs in zip(answers["medloop"], answers["mlflow"])
                                               for label in mine)
    print(f"[{kind}] same answers from both: largest probability difference over {CHECKED} inputs "
          f"{result['max_probability_difference']:.1e}", flush=True)
    return result


def _probabilities(server: str, url: str, headers: dict, payloads: list[dict]) -> list[dict[str, float]]:
    """Each input's probabilities per class, one request each."""
    import httpx

    found = []
    for payload in payloads:
        answer = httpx.post(url, json=payload, headers=headers, timeout=120)
        answer.raise_for_status()
        if server == "medloop":
            found.append(answer.json()["predictions"][0]["probabilities"])
        else:  # mlflow: {"predictions": [{class: probability, ...}]}
            found.append({label: float(p) for label, p in answer.json()["predictions"][0].items()})
    return found


async def _drive(url: str, headers: dict, payloads: list[dict], requests: int, concurrency: int) -> dict:
    """``requests`` POSTs, ``concurrency`` in flight at any time; one input each."""
    import httpx

    bodies = [json.dumps(p).encode() for p in payloads]
    latencies: list[float] = []
    errors: list[str] = []
    counter = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits,
                                 headers={**headers, "Content-Type": "application/json"}) as client:
        async def worker() -> None:
            for n in counter:
                started = time.perf_counter()
                answer = await client.post(url, content=bodies[n % len(bodies)])
                latencies.append(time.perf_counter() - started)
                if answer.status_code != 200:
                    errors.append(f"{answer.status_code}: {answer.text[:200]}")

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    latencies.sort()
    if errors:
        print(f"  {len(errors)} failed requests, e.g. {errors[0]}", flush=True)
    return {"requests": requests, "concurrency": concurrency, "wall_s": round(wall, 3),
            "throughput": requests / wall, "p50_ms": 1000 * _quantile(latencies, 0.50),
            "p99_ms": 1000 * _quantile(latencies, 0.99), "errors": len(errors)}


def _quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _wait_ready(process: subprocess.Popen, url: str, log: Path, limit: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + limit
    while True:
        if process.poll() is not None:
            raise SystemExit(f"the server stopped (exit {process.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"the server was not ready after {limit} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def _stop(process: subprocess.Popen) -> None:
    import signal

    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)  # its own session: mlflow's uvicorn child too
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def table(kind: str, result: dict) -> str:
    medloop, mlflow = result["servers"]["medloop"], result["servers"]["mlflow"]
    lines = [f"{kind}: {result['model']} v{result['version']}, one input per request",
             "| clients | medloop req/s | mlflow req/s | throughput medloop/mlflow | medloop p50 ms | mlflow p50 ms "
             "| medloop p99 ms | mlflow p99 ms | p99 medloop/mlflow |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for concurrency, mine in medloop.items():
        theirs = mlflow[concurrency]
        lines.append(f"| {concurrency} | {mine['throughput']:.1f} | {theirs['throughput']:.1f} | "
                     f"{mine['throughput'] / theirs['throughput']:.2f}x | {mine['p50_ms']:.1f} | {theirs['p50_ms']:.1f} | "
                     f"{mine['p99_ms']:.1f} | {theirs['p99_ms']:.1f} | {mine['p99_ms'] / theirs['p99_ms']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
