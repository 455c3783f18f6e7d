"""The clinicians' pages with many predictions in the store: time per page of the worklist and the
case page, beside the JSON API endpoints that read the same store.

    python benchmarks/pages.py [--predictions 10000] [--labelled 2000] [--requests 200] [--workdir DIR]

A tabular workspace with a registered champion is built first, as `benchmarks/serving.py` builds
it (not timed; reused with the same ``--workdir``). Its feedback store is then filled with
``--predictions`` predictions of the champion (feature values drawn inside the declared ranges),
``--labelled`` of them already labelled by the clinician who signs in, and `medloop serve` runs
alone on 127.0.0.1. One client, one request at a time (so the time is the server's own, plus
loopback), after a warm-up, asks for:

* ``GET /pages/worklist``: newest first (the database limits to one page of 50) and least
  certain first (every awaiting prediction's margin is read and sorted);
* ``GET /pages/cases/{id}``: a random awaiting case (the prediction, its history, the worklist
  around it for next/previous, and one row appended to the access log);
* ``GET /pages/monitoring`` (signed in as a reviewer): live figures, drift and the policy check;
* the JSON API beside them: ``GET /review`` (the adjudication queue) and ``GET /monitoring``
  (live figures per version from every prediction and confirmed label, and drift). The API has
  no worklist or case endpoint; these two read the same tables.

Printed: p50 and p95 milliseconds per request, and the results go to ``<workdir>/pages.json``.
Nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "benchmarks"))  # after the project: `serving` stays the package

from common import child_env  # noqa: E402 - benchmarks/common.py


def benchmark_module(name: str):
    """A sibling benchmark script as a module (``benchmarks/serving.py`` would shadow the
    ``serving`` package if its folder were put on the import path)."""
    spec = importlib.util.spec_from_file_location(f"medloop_benchmark_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--predictions", type=int, default=10_000)
    parser.add_argument("--labelled", type=int, default=2_000, help="of them labelled by the clinician already")
    parser.add_argument("--requests", type=int, default=200, help="measured requests per page")
    parser.add_argument("--api-requests", type=int, default=20, help="measured requests per JSON endpoint")
    parser.add_argument("--workdir", type=Path, default=None, help="the workspace (reused when built)")
    args = parser.parse_args(argv)

    serving_benchmark = benchmark_module("serving")
    env = child_env()
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="medloop-bench-pages-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"python {platform.python_version()}, {os.cpu_count()} cores, workdir {workdir}", flush=True)
    workspace = serving_benchmark.build(workdir / "tabular", serving_benchmark.MODELS["tabular"], 2, env)
    store = workdir / "pages-store.db"
    for leftover in workdir.glob("pages-store.db*"):
        leftover.unlink()
    params_file = workspace / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    params["serving"]["store_url"] = f"sqlite:///{store}"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    os.environ.setdefault("MEDLOOP_DEID_SALT", env["MEDLOOP_DEID_SALT"])
    tokens, awaiting = fill(workspace, args.predictions, args.labelled)
    print(f"store filled: {args.predictions} predictions, {args.labelled} labelled by the clinician", flush=True)

    port = free_port()
    log = workdir / "serve.log"
    with open(log, "w") as handle:
        server = subprocess.Popen([sys.executable, "-m", "medloop", "serve", "-w", str(workspace), "--port", str(port)],
                                  env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(server, base + "/readyz", log)
        results = measure(base, tokens, awaiting, args)
    finally:
        server.terminate()
        server.wait(timeout=60)
    print()
    print(table(args, results))
    (workdir / "pages.json").write_text(json.dumps({
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {"python": platform.python_version(), "cores": os.cpu_count(), "platform": platform.platform()},
        "results": results}, indent=2) + "\n")
    print(f"results: {workdir / 'pages.json'}")
    return 0


def fill(workspace: Path, predictions: int, labelled: int) -> tuple[dict[str, str], list[str]]:
    """The store filled as the service would have filled it; tokens for a clinician and a
    reviewer; the ids still awaiting the clinician."""
    from pipelines.config import load_params
    from pipelines.store.feedback import FeedbackStore
    from pipelines.workspace import Layout, database_url
    from serving.auth import add_token

    layout = Layout.at(workspace)
    params = load_params(layout.params_file)
    store = FeedbackStore(database_url(layout, params.serving.store_url))
    rng = random.Random(7)
    positive, negative = params.model.positive_class, next(c for c in params.model.classes if c != params.model.positive_class)
    ids = []
    for _ in range(predictions):
        features = {name: round(rng.uniform(spec.min or 0.0, spec.max if spec.max is not None else 100.0), 4)
                    for name, spec in params.tabular.features.items()}
        p = round(rng.random(), 6)
        ids.append(store.record_prediction(
            model_name=params.model.name, model_version="1", input_sha256=uuid.uuid4().hex * 2, modality="tabular",
            probabilities={negative: round(1 - p, 6), positive: p}, decision=positive if p >= 0.5 else negative,
            operating_threshold=0.5, requested_by="bench", input_metadata={"features": features}))
    suffix = uuid.uuid4().hex[:6]
    clinician, reviewer = f"bench-clinician-{suffix}", f"bench-reviewer-{suffix}"
    for index, prediction_id in enumerate(ids[:labelled]):
        store.add_feedback(prediction_id, negative if index % 3 else positive, clinician, f"k{index}")
    store.close()
    tokens_file = Path(params.serving.tokens_file)
    tokens_file = tokens_file if tokens_file.is_absolute() else layout.root / tokens_file
    tokens = {"clinician": add_token(tokens_file, clinician, "clinician"),
              "reviewer": add_token(tokens_file, reviewer, "reviewer")}
    return tokens, ids[labelled:]


def measure(base: str, tokens: dict[str, str], awaiting: list[str], args) -> dict[str, dict]:
    import httpx

    rng = random.Random(11)
    results = {}
    with httpx.Client(base_url=base, timeout=120) as client, httpx.Client(base_url=base, timeout=120) as reviewer:
        sign_in(client, tokens["clinician"])
        sign_in(reviewer, tokens["reviewer"])
        api = {"Authorization": f"Bearer {tokens['reviewer']}"}
        targets = {
            "page: worklist, newest first": (lambda: client.get("/pages/worklist"), args.requests),
            "page: worklist, least certain first": (lambda: client.get("/pages/worklist?order=uncertain"), args.requests),
            "page: case": (lambda: client.get(f"/pages/cases/{rng.choice(awaiting)}"), args.requests),
            "page: monitoring": (lambda: reviewer.get("/pages/monitoring"), args.api_requests),
            "API: GET /review": (lambda: client.get("/review", headers=api), args.api_requests),
            "API: GET /monitoring": (lambda: client.get("/monitoring", headers=api), args.api_requests),
        }
        for name, (request, count) in targets.items():
            for _ in range(max(3, count // 10)):  # warm-up
                request()
            times = []
            for _ in range(count):
                started = time.perf_counter()
                answer = request()
                times.append(time.perf_counter() - started)
                assert answer.status_code == 200, (name, answer.status_code, answer.text[:300])
            times.sort()
            results[name] = {"requests": count, "p50_ms": 1000 * quantile(times, 0.5),
                             "p95_ms": 1000 * quantile(times, 0.95)}
            print(f"{name}: p50 {results[name]['p50_ms']:.1f} ms, p95 {results[name]['p95_ms']:.1f} ms", flush=True)
    return results


def sign_in(client, token: str) -> None:
    """The sign-in form, as a browser sends it (its CSRF token from the form)."""
    form = client.get("/pages/signin")
    csrf = form.text.split('name="csrf" value="')[1].split('"')[0]
    signed = client.post("/pages/signin", data={"csrf": csrf, "token": token})
    assert signed.status_code == 303, signed.text


def quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def wait_ready(process: subprocess.Popen, url: str, log: Path, limit: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + limit
    while process.poll() is None and time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"medloop serve was not ready:\n{log.read_text()[-3000:]}")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def table(args, results: dict[str, dict]) -> str:
    lines = [f"{args.predictions} predictions in the store ({args.labelled} labelled by the clinician), one request at a time",
             "| request | requests | p50 ms | p95 ms |", "| --- | --- | --- | --- |"]
    lines += [f"| {name} | {result['requests']} | {result['p50_ms']:.1f} | {result['p95_ms']:.1f} |"
              for name, result in results.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
