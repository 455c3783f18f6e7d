"""Benchmark of the data half of the loop: collect, clean, validate, preprocess.

    python benchmarks/data_stages.py [--images 20000] [--rows 1000000] [--out benchmarks/out]

Two workspaces are created under --out (wiped first) from the shipped profiles:

* image: the built-in synthetic chest X-ray generator, one night of ``--images`` radiographs;
* tabular: a CSV of ``--rows`` rows resampled from the Wisconsin breast cancer data, with a small
  multiplicative noise on the features (so every row is distinct) and fake identifiers (one MRN
  per ~1.2 rows, so patients repeat). The CSV is generated before any timing.

Each stage runs as its own process in the workspace root (``python -m pipelines.<stage>``, as
its DVC stage command does), and is measured from outside: wall time, and peak RSS from
``os.wait4`` (``ru_maxrss``: the largest single process among the stage and the children it
reaped, e.g. its process-pool workers). When psutil is available the summed RSS of the whole
process tree is also sampled (``tree_peak_mib`` in the JSON).

The validate figure (Great Expectations) is set beside a plain-pandas evaluation of the same
rules (``benchmarks/validate_pandas.py``), also in a fresh process reading the same
parquet files, and the two must agree rule by rule on pass/fail.

Performance figures are printed as measurements, side-by-side comparisons and ratios; nothing
here asserts a timing. Results also go to ``<out>/data_stages.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import BENCH_SALT, child_env  # noqa: E402 - benchmarks/common.py

DEFAULT_OUT = ROOT / "benchmarks" / "out"
MARKER = ".data_stages_out"  # a non-default --out is only wiped when it carries this marker
STAGES = ("collect", "clean", "validate", "preprocess")
MIB = 1024 * 1024


# --------------------------------------------------------------------------------------------
# measuring one child process
# --------------------------------------------------------------------------------------------


class TreeSampler(threading.Thread):
    """Samples the summed RSS of a process and all its descendants (psutil, when present)."""

    def __init__(self, pid: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak = 0
        self.stop = threading.Event()
        try:
            import psutil

            self.psutil = psutil
        except ImportError:  # pragma: no cover - optional
            self.psutil = None

    def run(self) -> None:
        if self.psutil is None:
            return
        try:
            root = self.psutil.Process(self.pid)
        except self.psutil.Error:
            return
        while not self.stop.is_set():
            total = 0
            try:
                procs = [root, *root.children(recursive=True)]
            except self.psutil.Error:
                break
            for proc in procs:
                try:
                    total += proc.memory_info().rss
                except self.psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self.stop.wait(self.interval)

    def result_mib(self) -> float | None:
        return round(self.peak / MIB, 1) if self.psutil is not None and self.peak else None


def measure(command: list[str], cwd: Path, log_stem: Path) -> dict:
    """Run ``command`` in ``cwd``; wall time, peak RSS (wait4) and exit status."""
    log_stem.parent.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log_stem.with_suffix(".out"), log_stem.with_suffix(".err")
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(command, cwd=cwd, env=child_env(), stdout=out, stderr=err)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        sampler.stop.set()
        sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)  # keep Popen from waiting again
    return {
        "wall_s": round(wall, 3),
        "peak_mib": round(usage.ru_maxrss / 1024, 1),  # ru_maxrss is KiB on Linux
        "tree_peak_mib": sampler.result_mib(),
        "user_s": round(usage.ru_utime, 2),
        "sys_s": round(usage.ru_stime, 2),
        "rc": proc.returncode,
        "stdout_tail": _tail(out_path),
        "stderr_tail": _tail(err_path),
    }


def _tail(path: Path, lines: int = 15) -> str:
    text = path.read_text(errors="replace").strip().splitlines()
    return "\n".join(text[-lines:])


# --------------------------------------------------------------------------------------------
# workspaces and data
# --------------------------------------------------------------------------------------------


def profile(name: str) -> dict:
    path = ROOT / name
    return copy.deepcopy(yaml.safe_load(path.read_text()))


def image_params(images: int, out: Path) -> dict:
    params = profile("params.yaml")
    params["source"] = {
        "kind": "synthetic_cxr", "seed": 7, "nights": 1, "images_per_night": images,
        "patients": max(1, images // 2), "image_size": 256, "pneumonia_fraction": 0.45,
        "jpeg_fraction": 0.2,
    }  # fmt: skip
    params["validate"]["min_new_items"] = 1
    params["validate"]["min_total_items"] = 1
    params["storage"]["dvc_remote"] = str(out / "dvc-remote-image")
    return params


def tabular_params(csv_path: Path, out: Path) -> dict:
    params = profile("profiles/breast_cancer.yaml")
    params["source"] = {"kind": "csv", "path": str(csv_path)}
    params["validate"]["min_new_items"] = 1
    params["validate"]["min_total_items"] = 1
    params["storage"]["dvc_remote"] = str(out / "dvc-remote-tabular")
    return params


def make_workspace(folder: Path, params: dict) -> Path:
    from pipelines.ops.scaffold import create_workspace

    params_file = folder.parent / f"{folder.name}-params.yaml"
    params_file.parent.mkdir(parents=True, exist_ok=True)
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    return create_workspace(folder, params_file).root


def write_tabular_csv(rows: int, path: Path, seed: int = 2024) -> dict:
    """``rows`` distinct rows resampled from the Wisconsin data, fake identifiers, one CSV."""
    import numpy as np
    import pandas as pd

    from pipelines.config import BreastCancerSource
    from pipelines.data.sources.breast_cancer import BreastCancerReader

    base = BreastCancerReader(BreastCancerSource(kind="builtin_breast_cancer", seed=11, nights=1)).full_table()
    identifier_columns = ["patient_name", "mrn", "birth_date", "phone", "email", "address", "exam_date", "age", "site"]
    feature_columns = [c for c in base.columns if c not in identifier_columns and c != "diagnosis"]
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(base), size=rows)
    features = base[feature_columns].to_numpy(dtype="float64")[pick]
    features *= 1.0 + rng.normal(0.0, 0.01, size=features.shape)  # ~1% noise: rows are distinct
    frame = pd.DataFrame(features, columns=feature_columns)
    frame["diagnosis"] = base["diagnosis"].to_numpy()[pick]

    # Every patient has at least one row and some have more: ~1.2 rows per MRN.
    patients = max(1, round(rows / 1.2))
    patient = rng.permutation(np.concatenate([
        np.arange(patients), rng.integers(0, patients, size=rows - patients)]))
    first = np.array(["Ada", "Grace", "Maria", "Lena", "Sofia", "Nora", "Ines", "Mira", "Julia", "Hana"])
    last = np.array(["OKAFOR", "LINDQVIST", "MOREAU", "TANAKA", "NOVAK", "ALVAREZ", "BRENNAN", "KOWALSKI"])
    first_of = first[(patient * 7919) % len(first)]
    last_of = last[(patient * 104729) % len(last)]
    born_day = (patient * 2654435761 % (365 * 70)).astype("int64")  # fixed per patient
    birth = np.datetime64("1930-01-01") + born_day.astype("timedelta64[D]")
    exam = np.datetime64("2024-01-08") + rng.integers(0, 700, size=rows).astype("timedelta64[D]")
    age = ((exam - birth).astype("int64") // 365.25).astype("int64")
    pid = pd.Series(patient)
    ident = pd.DataFrame({
        "patient_name": pd.Series(last_of) + "^" + pd.Series(first_of),
        "mrn": "MRN" + pid.map("{:09d}".format),
        "birth_date": pd.Series(birth).dt.strftime("%Y-%m-%d"),
        "phone": "+1-555-" + (100 + pid % 900).map("{:03d}".format) + "-" + (pid % 10000).map("{:04d}".format),
        "email": pd.Series(first_of).str.lower() + "." + pd.Series(last_of).str.lower() + pid.astype(str) + "@example.org",
        "address": (1 + pid % 200).astype(str) + " Elm Street, Springfield",
        "exam_date": pd.Series(exam).dt.strftime("%Y-%m-%d"),
        "age": age,
        "site": np.array(["site-north", "site-south", "site-east"])[patient % 3],
    })  # fmt: skip
    table = pd.concat([ident, frame], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False, float_format="%.7g")
    return {
        "rows": rows,
        "patients": int(pd.Series(patient).nunique()),
        "distinct_feature_rows": int(len(frame.drop_duplicates())),
        "malignant_fraction": round(float((frame["diagnosis"] == "malignant").mean()), 4),
        "csv_mib": round(path.stat().st_size / MIB, 1),
    }


# --------------------------------------------------------------------------------------------
# the pandas baseline of validate, in a fresh process
# --------------------------------------------------------------------------------------------

PANDAS_CHECK = r"""
import json, sys, time
t0 = time.perf_counter()
sys.path.insert(0, sys.argv[2])  # benchmarks/, for validate_pandas
import pandas as pd
from pipelines.config import load_params
from validate_pandas import check_with_pandas
from pipelines.workspace import Layout
t1 = time.perf_counter()
layout = Layout.at(".")
params = load_params(layout.params_file)
records = pd.read_parquet(layout.clean_records)
intake = pd.read_parquet(layout.clean_intake)
t2 = time.perf_counter()
entries = check_with_pandas(params, records, intake)
t3 = time.perf_counter()
json.dump({"import_s": t1 - t0, "read_s": t2 - t1, "check_s": t3 - t2,
           "records": len(records), "intake": len(intake),
           "success": [bool(e["success"]) for e in entries],
           "keys": [[e["suite"], e["expectation"], e["column"]] for e in entries]},
          open(sys.argv[1], "w"))
"""


def pandas_baseline(ws: Path, logs: Path) -> dict:
    result_file = logs / "pandas_check.json"
    command = [sys.executable, "-c", PANDAS_CHECK, str(result_file), str(ROOT / "benchmarks")]
    figure = measure(command, ws, logs / "pandas_check")
    if figure["rc"] == 0:
        inner = json.loads(result_file.read_text())
        figure.update({k: round(inner[k], 3) for k in ("import_s", "read_s", "check_s")})
        figure.update({k: inner[k] for k in ("records", "intake")})
        figure["rules"] = list(zip(inner["keys"], inner["success"]))
    return figure


def agreement(ws: Path, pandas_figure: dict) -> dict:
    report = json.loads((ws / "reports" / "validation.json").read_text())
    gx = [bool(e["success"]) for e in report["expectations"]]
    gx_keys = [[e["suite"], e["expectation"], e["column"]] for e in report["expectations"]]
    pd_rules = pandas_figure.get("rules") or []
    pd_keys = [key for key, _ in pd_rules]
    pd_ok = [ok for _, ok in pd_rules]
    same_rules = gx_keys == pd_keys
    agree = sum(a == b for a, b in zip(gx, pd_ok)) if same_rules else 0
    return {
        "rules": len(gx),
        "same_rules": same_rules,
        "agree": agree,
        "gx_passed": sum(gx),
        "pandas_passed": sum(pd_ok),
        "all_agree": same_rules and agree == len(gx),
        "disagreeing": [k for k, a, b in zip(gx_keys, gx, pd_ok) if a != b] if same_rules else None,
    }


# --------------------------------------------------------------------------------------------
# one modality
# --------------------------------------------------------------------------------------------


def run_modality(name: str, ws: Path, items: int, logs: Path, with_dvc: bool) -> dict:
    results: dict = {"items": items, "workspace": str(ws), "stages": {}}
    for stage in STAGES:
        print(f"[{name}] {stage} ...", flush=True)
        figure = measure([sys.executable, "-m", f"pipelines.{stage}"], ws, logs / stage)
        figure["items_per_s"] = round(items / figure["wall_s"], 1) if figure["wall_s"] else None
        results["stages"][stage] = figure
        if figure["rc"] != 0:
            print(f"[{name}] {stage} FAILED (rc {figure['rc']}):\n{figure['stderr_tail']}", flush=True)
            results["failed"] = stage
            return results
    print(f"[{name}] pandas baseline of validate ...", flush=True)
    baseline = pandas_baseline(ws, logs)
    results["validate_pandas"] = {k: v for k, v in baseline.items() if k != "rules"}
    if baseline["rc"] == 0:
        results["agreement"] = agreement(ws, baseline)
    else:
        print(f"[{name}] pandas baseline FAILED:\n{baseline['stderr_tail']}", flush=True)
    results["records"] = baseline.get("records")
    results["intake"] = baseline.get("intake")
    if with_dvc:
        # The stages ran outside DVC: record their outputs in dvc.lock (hashing them), then a
        # `dvc repro` of the whole chain has nothing to do and shows DVC's skip cost.
        print(f"[{name}] dvc commit + no-op dvc repro ...", flush=True)
        commit = measure([sys.executable, "-m", "dvc", "commit", "--force", "--quiet"], ws, logs / "dvc_commit")
        results["dvc_commit"] = commit
        if commit["rc"] == 0:
            repro = measure([sys.executable, "-m", "dvc", "repro"], ws, logs / "dvc_repro")
            repro["reran_something"] = "Running stage" in (repro["stdout_tail"] + repro["stderr_tail"])
            results["dvc_repro_noop"] = repro
    return results


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def table(name: str, result: dict, unit: str) -> str:
    lines = [f"== {name}: {result['items']:,} {unit} ==",
             f"{'stage':<22}| {'wall s':>9} | {'peak MiB':>9} | {'tree MiB':>9} | {f'{unit}/s':>11}"]
    lines.append("-" * len(lines[-1]))

    def row(label: str, fig: dict | None, rate: bool = True) -> None:
        if not fig:
            return
        tree = fig.get("tree_peak_mib")
        per_s = f"{result['items'] / fig['wall_s']:>11,.1f}" if rate and fig["wall_s"] else f"{'':>11}"
        flag = "" if fig.get("rc", 0) == 0 else f"  FAILED rc={fig['rc']}"
        lines.append(f"{label:<22}| {fig['wall_s']:>9.2f} | {fig['peak_mib']:>9.1f} | "
                     f"{(f'{tree:.1f}' if tree else '-'):>9} | {per_s}{flag}")

    for stage in STAGES:
        row(stage, result["stages"].get(stage))
    total = sum(f["wall_s"] for f in result["stages"].values())
    lines.append(f"{'total (4 stages)':<22}| {total:>9.2f} | {'':>9} | {'':>9} | "
                 f"{result['items'] / total:>11,.1f}")
    row("validate, pandas", result.get("validate_pandas"))
    row("dvc commit (hash)", result.get("dvc_commit"), rate=False)
    row("dvc repro (no-op)", result.get("dvc_repro_noop"), rate=False)
    pandas = result.get("validate_pandas")
    if pandas and pandas.get("rc") == 0:
        lines.append(f"  pandas baseline inside: import {pandas['import_s']:.2f} s, "
                     f"read parquet {pandas['read_s']:.2f} s, check {pandas['check_s']:.2f} s")
    agree = result.get("agreement")
    if agree:
        verdict = "agree" if agree["all_agree"] else f"DISAGREE on {agree['disagreeing']}"
        lines.append(f"  GX vs pandas: {agree['agree']}/{agree['rules']} rules {verdict}; "
                     f"passed GX {agree['gx_passed']}, pandas {agree['pandas_passed']}")
    lines.append(f"  records {result.get('records')}, intake {result.get('intake')}")
    if result.get("failed"):
        lines.append(f"  STOPPED: {result['failed']} failed")
    return "\n".join(lines)


def ratios(results: dict) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, result in results.items():
        stages = result["stages"]
        validate, pandas = stages.get("validate"), result.get("validate_pandas")
        if validate and pandas and pandas.get("rc") == 0:
            out[f"{name}: validate GX / pandas (wall, both fresh processes)"] = validate["wall_s"] / pandas["wall_s"]
            out[f"{name}: validate GX wall / pandas check only"] = validate["wall_s"] / max(pandas["check_s"], 1e-6)
            out[f"{name}: validate GX / pandas (peak MiB)"] = validate["peak_mib"] / pandas["peak_mib"]
        total = sum(f["wall_s"] for f in stages.values())
        if total and not result.get("failed"):
            for stage in STAGES:
                out[f"{name}: {stage} share of 4-stage wall"] = stages[stage]["wall_s"] / total
        repro = result.get("dvc_repro_noop")
        if repro and total:
            out[f"{name}: no-op dvc repro / 4-stage wall"] = repro["wall_s"] / total
    if "image" in results and "tabular" in results:
        a, b = results["image"], results["tabular"]
        if not a.get("failed") and not b.get("failed"):
            ta = sum(f["wall_s"] for f in a["stages"].values())
            tb = sum(f["wall_s"] for f in b["stages"].values())
            out["per-item cost, image / tabular row"] = (ta / a["items"]) / (tb / b["items"])
    return out


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def wipe(out: Path) -> None:
    out = out.resolve()
    if out in (ROOT, Path.home(), Path("/")) or ROOT.is_relative_to(out):
        raise SystemExit(f"refusing to wipe {out}")
    if out.exists():
        if out != DEFAULT_OUT.resolve() and any(out.iterdir()) and not (out / MARKER).exists():
            raise SystemExit(f"{out} is not empty and was not made by this script; not wiping it")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("made by benchmarks/data_stages.py; wiped on every run\n")


def prepare(out: Path, images: int, rows: int, todo: list[str]) -> dict:
    """Workspaces and the tabular CSV (run in a child process: see `launcher_rss_mib`)."""
    setup: dict = {}
    if "image" in todo:
        make_workspace(out / "image" / "ws", image_params(images, out))
    if "tabular" in todo:
        csv_path = out / "tabular" / "source" / "cases.csv"
        start = time.perf_counter()
        setup["tabular_csv"] = write_tabular_csv(rows, csv_path)
        setup["tabular_csv"]["generate_s"] = round(time.perf_counter() - start, 1)
        make_workspace(out / "tabular" / "ws", tabular_params(csv_path, out))
    return setup


def launcher_rss_mib() -> float | None:
    """RSS of this process. Linux records the parent's RSS in a child's ru_maxrss at exec, so
    the launcher stays small (pandas & co. are only imported by child processes) and this is
    the floor below which a stage's peak MiB cannot be read."""
    try:
        import psutil
    except ImportError:  # pragma: no cover
        return None
    return round(psutil.Process().memory_info().rss / MIB, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--rows", type=int, default=1000000)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--no-dvc", action="store_true", help="skip dvc commit + no-op dvc repro")
    parser.add_argument("--only", choices=["image", "tabular"], default=None)
    parser.add_argument("--prepare-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    out = args.out.resolve()
    todo = [m for m in ("image", "tabular") if args.only in (None, m)]
    os.environ.setdefault("MEDLOOP_DEID_SALT", BENCH_SALT)
    if args.prepare_only:
        setup = prepare(out, args.images, args.rows, todo)
        (out / "setup.json").write_text(json.dumps(setup, indent=2) + "\n")
        return 0

    wipe(out)
    print(f"python {platform.python_version()}, {os.cpu_count()} cores, out {out}", flush=True)
    print("preparing workspaces and source data (not timed) ...", flush=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--prepare-only", "--out", str(out),
               "--images", str(args.images), "--rows", str(args.rows)]
    if args.only:
        command += ["--only", args.only]
    subprocess.run(command, env=child_env(), check=True)
    setup = json.loads((out / "setup.json").read_text())
    if "tabular_csv" in setup:
        print(f"[tabular] source CSV: {setup['tabular_csv']}", flush=True)
    workspaces = {name: out / name / "ws" for name in todo}
    setup["launcher_rss_mib"] = launcher_rss_mib()

    results = {}
    sizes = {"image": args.images, "tabular": args.rows}
    for name in todo:
        results[name] = run_modality(name, workspaces[name], sizes[name], out / name / "logs", not args.no_dvc)

    print()
    units = {"image": "images", "tabular": "rows"}
    for name in todo:
        print(table(name, results[name], units[name]))
        print()
    key = ratios(results)
    print("== key ratios ==")
    width = max((len(k) for k in key), default=0)
    for label, value in key.items():
        print(f"{label:<{width}}  {value:8.3f}")
    print("(peak MiB: ru_maxrss from os.wait4, the largest single process of the stage and the "
          "children it reaped; tree MiB: summed RSS of the process tree, sampled every 0.2 s, "
          "shared pages counted in every process that maps them; launcher RSS, the floor of peak MiB: "
          f"{setup['launcher_rss_mib']} MiB)")

    payload = {
        "args": {"images": args.images, "rows": args.rows, "out": str(out)},
        "machine": {"python": platform.python_version(), "cores": os.cpu_count(), "platform": platform.platform()},
        "setup": setup,
        "results": results,
        "ratios": key,
    }
    (out / "data_stages.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"results: {out / 'data_stages.json'}")
    failed = [name for name, r in results.items() if r.get("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
