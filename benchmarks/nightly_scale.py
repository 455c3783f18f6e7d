"""Benchmark: what a night costs as the archive grows, and the data stages on Dask.

    python benchmarks/nightly_scale.py [--archives 5000 20000 50000] [--night 500]
                                       [--workers 1 2 3 4] [--items 400] [--out benchmarks/out/scale]

Part 1, a night on a growing archive. For each archive size a workspace collects an archive of
synthetic radiographs (the built-in generator, one seed) and runs clean and preprocess on it
once (the earlier nights, untimed); then a night of ``--night`` new images (another seed) is
collected and clean and preprocess are timed twice: as medloop runs them (earlier nights'
per-item results reused, `pipelines.ops.item_cache`) and as a full recompute (the cache
removed first, what every night cost before). The figures are printed side by side per stage,
with the ratio of the largest archive's night to the smallest's (the goal: under 1.2).

Part 2, items per second on Dask. The per-item work of clean (decode, check, convert) and of
preprocess (resize, normalise) over ``--items`` images, serially in this process and on a Dask
``LocalCluster`` of 1, 2, ... worker processes (`pipelines.ops.compute`), the cluster's start
not counted; the scaling curve is items/s against workers.

Stages run in this process (``clean.run``, ``preprocess.run``) and are timed with
``time.perf_counter``; figures are measurements, ratios and comparisons, never assertions.
Results also go to ``<out>/nightly_scale.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import BENCH_SALT  # noqa: E402 - benchmarks/common.py

DEFAULT_OUT = ROOT / "benchmarks" / "out" / "scale"
MARKER = ".nightly_scale_out"  # a non-default --out is only wiped when it carries this marker


def params_for(images: int, seed: int, out: Path) -> dict:
    params = copy.deepcopy(yaml.safe_load((ROOT / "params.yaml").read_text()))
    params["source"] = {
        "kind": "synthetic_cxr", "seed": seed, "nights": 1, "images_per_night": images,
        "patients": max(1, images // 2), "image_size": 128, "pneumonia_fraction": 0.45, "jpeg_fraction": 0.2,
    }  # fmt: skip
    params["validate"]["min_new_items"] = 1
    params["validate"]["min_total_items"] = 1
    params["storage"]["dvc_remote"] = str(out / "dvc-remote")
    return params


def workspace(folder: Path, params: dict):
    from pipelines.ops.scaffold import create_workspace

    params_file = folder.parent / f"{folder.name}-params.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    return create_workspace(folder, params_file)


def set_source(layout, source: dict) -> None:
    raw = yaml.safe_load(layout.params_file.read_text())
    raw["source"] = source
    layout.params_file.write_text(yaml.safe_dump(raw, sort_keys=False))


def timed_stages(layout) -> dict[str, float]:
    from pipelines import clean, preprocess
    from pipelines.config import load_params

    params = load_params(layout.params_file)
    seconds = {}
    for name, stage in (("clean", clean), ("preprocess", preprocess)):
        started = time.perf_counter()
        stage.run(params, layout)
        seconds[name] = time.perf_counter() - started
    seconds["data stages"] = seconds["clean"] + seconds["preprocess"]
    return seconds


def night_on_archive(archive: int, night: int, out: Path) -> dict:
    from pipelines import collect
    from pipelines.config import load_params

    layout = workspace(out / f"archive-{archive}", params_for(archive, seed=7, out=out / f"archive-{archive}"))
    collect.run(load_params(layout.params_file), layout)
    timed_stages(layout)  # the earlier nights: fills the per-item cache
    set_source(layout, params_for(night, seed=8, out=out)["source"])
    collect.run(load_params(layout.params_file), layout, night=1)
    incremental = timed_stages(layout)
    shutil.rmtree(layout.state / "cache")
    full = timed_stages(layout)
    shutil.rmtree(layout.root, ignore_errors=True)  # the disk it holds
    return {"archive": archive, "night": night, "incremental_s": incremental, "full_recompute_s": full}


def dask_throughput(items: int, workers: list[int], out: Path) -> dict:
    """items/s of clean's and preprocess's per-item work: serial, then on Dask clusters."""
    from distributed import Client, LocalCluster

    from pipelines import clean, collect, preprocess
    from pipelines.config import load_params
    from pipelines.ops.compute import ItemMap

    layout = workspace(out / "dask", params_for(items, seed=9, out=out / "dask"))
    params = load_params(layout.params_file)
    collect.run(params, layout)
    clean.run(params, layout)
    from pipelines.data import manifest

    raw = manifest.read(layout)
    raw = raw[raw["status"] == "stored"]
    scratch = out / "dask-scratch"
    scratch.mkdir()
    spec = params.clean.image
    clean_jobs = [(str(layout.raw / record), str(scratch), digest, spec.channels, spec.min_side, spec.max_pixels,
                   spec.dicom) for record, digest in zip(raw["record_id"], raw["content_hash"])]
    height, width = params.preprocess.image_size
    prepare_jobs = [(str(path), height, width) for path in sorted((layout.clean / "images").glob("*.png"))]

    def rate(engine: ItemMap) -> dict[str, float]:
        figures = {}
        for name, function, jobs in (("clean", clean.clean_one_image, clean_jobs),
                                     ("preprocess", preprocess.prepare_image, prepare_jobs)):
            engine.map(function, jobs[:8])  # warm: imports on the workers
            started = time.perf_counter()
            engine.map(function, jobs)
            figures[name] = len(jobs) / (time.perf_counter() - started)
        return figures

    results = {"items": len(clean_jobs), "serial": rate(ItemMap("serial"))}
    for count in workers:
        with LocalCluster(n_workers=count, threads_per_worker=1, processes=True, dashboard_address=None,
                          host="127.0.0.1") as cluster, Client(cluster) as client:
            results[f"dask_{count}"] = rate(ItemMap(f"dask {count}", client=client))
    return results


def wipe(out: Path) -> None:
    if out.exists():
        if out != DEFAULT_OUT and not (out / MARKER).exists():
            raise SystemExit(f"{out} exists and was not made by this benchmark; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("made by benchmarks/nightly_scale.py\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archives", type=int, nargs="+", default=[5000, 20000, 50000])
    parser.add_argument("--night", type=int, default=500)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--items", type=int, default=400)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--skip", choices=["archives", "dask"], action="append", default=[])
    args = parser.parse_args(argv)
    os.environ.setdefault("MEDLOOP_DEID_SALT", BENCH_SALT)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    out = args.out.resolve()
    wipe(out)
    print(f"python {platform.python_version()}, {os.cpu_count()} cores, out {out}", flush=True)
    report: dict = {"machine": {"python": platform.python_version(), "cores": os.cpu_count(),
                                "platform": platform.platform()}}

    if "archives" not in args.skip:
        nights = [night_on_archive(size, args.night, out) for size in args.archives]
        report["nights"] = nights
        print(f"\nA night of {args.night} new images, seconds (reused | full recompute):")
        print(f"{'archive':>9} | {'clean':>15} | {'preprocess':>15} | {'data stages':>15}")
        for row in nights:
            cells = [f"{row['incremental_s'][s]:6.1f} | {row['full_recompute_s'][s]:6.1f}"
                     for s in ("clean", "preprocess", "data stages")]
            print(f"{row['archive']:>9} | " + " | ".join(cells))
        first, last = nights[0], nights[-1]
        growth = {kind: {s: last[kind][s] / first[kind][s] for s in ("clean", "preprocess", "data stages")}
                  for kind in ("incremental_s", "full_recompute_s")}
        report["growth_largest_over_smallest"] = growth
        print(f"night's time, archive {last['archive']} over {first['archive']}: "
              + ", ".join(f"{s} x{growth['incremental_s'][s]:.2f} (full recompute x{growth['full_recompute_s'][s]:.2f})"
                          for s in ("clean", "preprocess", "data stages")))

    if "dask" not in args.skip:
        dask = dask_throughput(args.items, args.workers, out)
        report["dask"] = dask
        print(f"\nPer-item work, items/s over {dask['items']} images (cluster start not counted):")
        print(f"{'engine':>10} | {'clean':>7} | {'preprocess':>10}")
        for engine, figures in dask.items():
            if engine != "items":
                print(f"{engine:>10} | {figures['clean']:7.1f} | {figures['preprocess']:10.1f}")
        if "dask_2" in dask:
            print("Dask 2 workers over serial: " + ", ".join(
                f"{s} x{dask['dask_2'][s] / dask['serial'][s]:.2f}" for s in ("clean", "preprocess")))
    (out / "nightly_scale.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
