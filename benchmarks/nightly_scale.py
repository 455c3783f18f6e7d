"""Benchmark: what a night costs as the archive grows, and the data stages' per-item work on Dask.

    python benchmarks/nightly_scale.py [ARCHIVE ...] [--night 500] [--image-size 64]
                                       [--full-recompute-at N ...] [--archive-batch 5000]
                                       [--archive-jpeg-fraction 0.2]
                                       [--workers 1 2 4] [--items 400] [--skip archives|dask]
                                       [--out benchmarks/out/scale]

Part 1, a night on a growing archive (default archives 5,000, 20,000 and 50,000, a night of
500). One workspace's archive grows as a real one does: it is filled up to the first size
(collected in batches of ``--archive-batch`` synthetic radiographs, then clean, validate and
preprocess through ``dvc repro``; all of this is setup and not timed), a night of ``--night``
new images is collected and taken through the data stages (timed), and the archive, now
holding that night too, is filled up to the next size, and so on. The night is timed stage by
stage exactly as the nightly flow runs it (`tasks.data`): collect in this process
(``collect.run``, which ends with ``dvc add`` of its batch), then ``dvc repro --single-item <stage>``
for clean, validate and preprocess (`tasks.data.stage_task`'s command: each stage alone, the ones
before it having just run). Each stage's time is split
into the stage's own command and DVC's bookkeeping around it (checking deps, hashing and caching
outputs, the lock file; collect's ``dvc add``), read from the time stamps of the lines DVC and
the stage print. A fixed pure-Python loop is timed around each night and printed with the
figures: on a shared machine whose speed drifts, growth that is the machine's shows there. At
the sizes named by ``--full-recompute-at`` (default: the smallest) the same
night is then recomputed in full: earlier nights' per-item results removed
(`pipelines.ops.item_cache`, what every night cost before it existed) and each DVC stage forced.

The images are small on purpose: synthetic ``--image-size`` px radiographs (default 64, the
smallest clean accepts; 20% JPEG, the rest DICOM with fake identifiers), while preprocess writes
the profile's shards (96x96). Most of the setup is generating and de-identifying DICOM files
(about 8 ms each, against under 2 ms for a JPEG): ``--archive-jpeg-fraction 1`` makes the
archive (not the nights) all JPEG, which builds it several times faster; a night on it does the
same work (earlier images are reused from the cache, whatever their format). What grows with
the archive (reading the manifest, rewriting ``data/clean`` and the shards, DVC hashing) is per
file, so small images show it as well; what is reused (decoding, conversion, resizing) costs
less per image here than on real radiographs.

Part 2, items per second on Dask. The per-item work of collect (de-identify and hash), clean
(decode, check, convert) and preprocess (resize, normalise) over ``--items`` images of the
profile's size (256 px): serially in this process, on this machine's cores as ``compute.workers:
1`` runs it (a local process pool), and on Dask ``LocalCluster``\\ s of each ``--workers``
count (`pipelines.ops.compute`); the pool's and clusters' start is not counted. The scaling
curve is items/s against workers, each set beside serial as a ratio.

Figures are measurements and ratios, never assertions. Results also go to
``<out>/nightly_scale.json``.
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
import time
import warnings
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import BENCH_SALT  # noqa: E402 - benchmarks/common.py
from pipelines.ops.compute import PARALLEL_FROM  # noqa: E402 - light: the standard library only

DEFAULT_OUT = ROOT / "benchmarks" / "out" / "scale"
MARKER = ".nightly_scale_out"  # a non-default --out is only wiped when it carries this marker
STAGES = ("collect", "clean", "validate", "preprocess")
DVC_STAGES = STAGES[1:]
ENGINE_STAGES = ("collect", "clean", "preprocess")
LOCK_LINES = ("Updating lock file", "Generating lock file")
NIGHT_JPEG_FRACTION = 0.2  # the rest DICOM, as in the default profile


# --------------------------------------------------------------------------------------------
# a workspace whose archive grows
# --------------------------------------------------------------------------------------------


def base_params(out: Path, image_size: int, patients: int, images: int = 1, seed: int = 7) -> dict:
    params = copy.deepcopy(yaml.safe_load((ROOT / "params.yaml").read_text()))
    params["source"] = source_spec(images, 1, image_size, patients, NIGHT_JPEG_FRACTION, seed)
    params["validate"]["min_new_items"] = 1
    params["validate"]["min_total_items"] = 1
    params["storage"]["dvc_remote"] = str(out / "dvc-remote")
    return params


def source_spec(images: int, night: int, image_size: int, patients: int, jpeg_fraction: float,
                seed: int = 7) -> dict:
    """The built-in generator releasing ``images`` radiographs on ``night`` (every night of one
    seed is different, and the patient pool is the same for all)."""
    return {
        "kind": "synthetic_cxr", "seed": seed, "nights": night, "images_per_night": images, "patients": patients,
        "image_size": image_size, "pneumonia_fraction": 0.45, "jpeg_fraction": jpeg_fraction,
    }  # fmt: skip


def workspace(folder: Path, params: dict):
    from pipelines.ops.scaffold import create_workspace

    params_file = folder.parent / f"{folder.name}-params.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    return create_workspace(folder, params_file)


def set_source(layout, source: dict) -> None:
    raw = yaml.safe_load(layout.params_file.read_text())
    raw["source"] = source
    layout.params_file.write_text(yaml.safe_dump(raw, sort_keys=False))


class GrowingArchive:
    """One workspace, its archive filled night after night with the generator's batches."""

    def __init__(self, out: Path, image_size: int, patients: int, archive_jpeg_fraction: float):
        self.image_size, self.patients = image_size, patients
        self.archive_jpeg_fraction = archive_jpeg_fraction
        self.layout = workspace(out / "archive", base_params(out / "archive", image_size, patients))
        self.images = 0  # images stored in data/raw
        self.nights = 0  # batches the generator has released

    def collect(self, images: int, jpeg_fraction: float = NIGHT_JPEG_FRACTION) -> dict:
        """Collect ``images`` new radiographs as the next night; seconds, and DVC's share."""
        from pipelines import collect
        from pipelines.config import load_params

        self.nights += 1
        set_source(self.layout, source_spec(images, self.nights, self.image_size, self.patients, jpeg_fraction))
        track_seconds = []

        def timed_record(*args, **kwargs):  # collect's own `dvc add` of the batch, timed as it runs
            started = time.perf_counter()
            try:
                return record(*args, **kwargs)
            finally:
                track_seconds.append(time.perf_counter() - started)

        record = collect.record_batches
        collect.record_batches = timed_record
        try:
            started = time.perf_counter()
            result = collect.run(load_params(self.layout.params_file), self.layout, night=self.nights)
            seconds = time.perf_counter() - started
        finally:
            collect.record_batches = record
        if result.stored != images:
            raise SystemExit(f"night {self.nights}: {result.stored} of {images} generated images were stored "
                             f"({result.rejected} rejected, {result.duplicates} duplicates)")
        self.images += result.stored
        return {"total": seconds, "dvc": sum(track_seconds), "command": seconds - sum(track_seconds)}

    def fill_to(self, size: int, batch: int) -> dict:
        """Setup, not measured: collect batches up to ``size`` images, then clean, validate and
        preprocess in one ``dvc repro`` (which also fills the per-item caches, as earlier nights
        would have). Returns its seconds."""
        from pipelines.ops.versioning import repro

        started = time.perf_counter()
        while self.images < size:
            self.collect(min(batch, size - self.images), self.archive_jpeg_fraction)
        collected = time.perf_counter()
        repro(self.layout, DVC_STAGES[-1])
        return {"collect_s": collected - started, "stages_s": time.perf_counter() - collected}


def dvc_repro(layout, stage: str, *, force: bool = False) -> dict:
    """``dvc repro --single-item <stage>`` as the nightly flow runs it (`tasks.data.stage_task`), or
    forced for that stage alone; seconds in all, of the stage's command, and of DVC around it.

    The command's time runs from DVC's ``> python -m pipelines.<stage>`` line to the last line
    printed before DVC writes the lock file (the stage's summary, printed as it ends); both
    processes write unbuffered, so the time stamps are when the lines were written.
    """
    from pipelines.ops.versioning import tool_env

    command = [sys.executable, "-m", "dvc", "repro", *(["--force"] if force else []), "--single-item", stage]
    env = {**tool_env(), "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=layout.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, bufsize=1)
    assert process.stdout is not None
    lines = [(time.perf_counter(), line.rstrip("\n")) for line in process.stdout]
    returncode = process.wait()
    total = time.perf_counter() - started
    output = "\n".join(text for _, text in lines)
    if returncode != 0 or f"Running stage '{stage}'" not in output:
        # A night's stage that DVC skipped or that failed is no figure: show what DVC said.
        raise SystemExit(f"`{' '.join(command[2:])}` in {layout.root} "
                         f"{'failed' if returncode else 'did not run the stage'}:\n{output[-3000:]}")
    command_seconds = command_time(lines, stage)
    return {"total": total, "command": command_seconds, "dvc": total - command_seconds}


def command_time(lines: list[tuple[float, str]], stage: str) -> float:
    """Seconds from DVC starting the stage's command to the command's last line (see `dvc_repro`)."""
    texts = [text for _, text in lines]
    running = next(i for i, text in enumerate(texts) if text.startswith(f"Running stage '{stage}'"))
    start = next(i for i in range(running, len(texts)) if texts[i].startswith("> "))
    lock = next((i for i in range(start, len(texts)) if texts[i].startswith(LOCK_LINES)), len(texts))
    return lines[max(lock - 1, start)][0] - lines[start][0]


def night(archive: GrowingArchive, images: int) -> dict:
    """A night of ``images`` new radiographs through the data stages, as the flow runs them."""
    figures = {"collect": archive.collect(images)}
    for stage in DVC_STAGES:
        figures[stage] = dvc_repro(archive.layout, stage)
    return figures


def reference_seconds() -> float:
    """A fixed pure-Python loop (5 million additions), timed just before and after each night:
    the same 2-core machine has run it anywhere from about 0.2 to 1.2 s, and a drift in its speed
    during a run shows as growth that is not the archive's."""
    started = time.perf_counter()
    total = 0
    for number in range(5_000_000):
        total += number
    return time.perf_counter() - started


def full_recompute(archive: GrowingArchive) -> dict:
    """The same night's DVC stages with nothing of earlier nights reused."""
    shutil.rmtree(archive.layout.state / "cache")
    return {stage: dvc_repro(archive.layout, stage, force=True) for stage in DVC_STAGES}


def archive_nights(archives: list[int], night_images: int, image_size: int, batch: int, archive_jpeg_fraction: float,
                   full_at: set[int], out: Path) -> list[dict]:
    archive = GrowingArchive(out, image_size, max(1, max(archives) // 2), archive_jpeg_fraction)
    rows = []
    for size in archives:
        setup = archive.fill_to(size, batch)
        print(f"archive of {archive.images} images ready (setup: collect {setup['collect_s']:.0f} s, stages "
              f"{setup['stages_s']:.0f} s); the night ...", flush=True)
        before = reference_seconds()
        row = {"archive": archive.images, "night": night_images, "setup_s": setup,
               "reused": night(archive, night_images)}
        row["reference_s"] = (before + reference_seconds()) / 2
        if size in full_at:
            row["full_recompute"] = full_recompute(archive)
        print(f"  data stages {sum(f['total'] for f in row['reused'].values()):.1f} s"
              + (f", full recompute {sum(f['total'] for f in row['full_recompute'].values()):.1f} s"
                 if "full_recompute" in row else ""), flush=True)
        rows.append(row)
    shutil.rmtree(archive.layout.root, ignore_errors=True)  # the disk it holds
    return rows


def print_nights(rows: list[dict], night_images: int, image_size: int) -> dict:
    def total(figures: dict, part: str = "total") -> float:
        return sum(figures[stage][part] for stage in figures)

    height, width = yaml.safe_load((ROOT / "params.yaml").read_text())["preprocess"]["image_size"]
    print(f"\nA night of {night_images} new images (synthetic {image_size}x{image_size} radiographs, {height}x{width} "
          "shards) on a growing archive, seconds,\nas the nightly flow runs each stage "
          "(collect in process with `dvc add` of its batch; then `dvc repro --single-item <stage>`):")
    header = f"{'archive':>8} | " + " | ".join(f"{s:>10}" for s in STAGES) + f" | {'data stages':>11}"
    print(header)
    for row in rows:
        figures = row["reused"]
        print(f"{row['archive']:>8} | " + " | ".join(f"{figures[s]['total']:10.1f}" for s in STAGES)
              + f" | {total(figures):11.1f}")
    print("of which DVC's bookkeeping (deps and outs hashed, cache, lock file; collect's `dvc add`):")
    for row in rows:
        figures = row["reused"]
        print(f"{row['archive']:>8} | " + " | ".join(f"{figures[s]['dvc']:10.1f}" for s in STAGES)
              + f" | {total(figures, 'dvc'):11.1f}")
    first, last = rows[0], rows[-1]
    growth = {stage: last["reused"][stage]["total"] / first["reused"][stage]["total"] for stage in STAGES}
    growth["data stages"] = total(last["reused"]) / total(first["reused"])
    if len(rows) > 1:
        print(f"{'growth':>8} | " + " | ".join(f"{'x%.2f' % growth[s]:>10}" for s in STAGES)
              + f" | {'x%.2f' % growth['data stages']:>11}")
        verdict = "met" if growth["data stages"] < 1.2 else "NOT met"
        print(f"Goal: the night's data-stage time grows by less than 20% from archive {first['archive']} to "
              f"{last['archive']}: x{growth['data stages']:.2f}, {verdict}.")
        speed = last["reference_s"] / first["reference_s"]
        growth["machine"] = speed
        print("The machine's own speed (a fixed Python loop around each night, seconds): "
              + ", ".join(f"{row['reference_s']:.2f} at {row['archive']}" for row in rows)
              + f"; the data stages' growth divided by the loop's: x{growth['data stages'] / speed:.2f}"
              " (a rough correction: the stages are not all Python)")
    for row in rows:
        if "full_recompute" in row:
            full = row["full_recompute"]
            reused = {stage: row["reused"][stage] for stage in DVC_STAGES}
            print(f"Full recompute at archive {row['archive']} (nothing of earlier nights reused), seconds, "
                  "reused | full: " + ", ".join(f"{s} {reused[s]['total']:.1f} | {full[s]['total']:.1f}"
                                                for s in DVC_STAGES)
                  + f"; clean + validate + preprocess {total(reused):.1f} | {total(full):.1f} "
                  f"(x{total(full) / total(reused):.2f})")
            print(f"  (what reuse spares, decoding, converting and resizing each image, grows with its pixels: "
                  f"small at {image_size} px, far larger on real radiographs)")
    return growth


# --------------------------------------------------------------------------------------------
# per-item work: serial, this machine's cores, Dask
# --------------------------------------------------------------------------------------------


def engine_throughput(items: int, workers: list[int], out: Path) -> dict:
    """items/s of collect's, clean's and preprocess's per-item work on each engine."""
    import pandas as pd
    from distributed import Client, LocalCluster

    from pipelines import clean, collect, preprocess
    from pipelines.config import load_params
    from pipelines.data import manifest, packs
    from pipelines.data.sources import open_source
    from pipelines.deid.keys import load_salt
    from pipelines.ops.compute import ItemMap, item_map

    params = base_params(out / "engines", image_size=256, patients=max(1, items // 2), images=items, seed=9)
    layout = workspace(out / "engines", params)
    params = load_params(layout.params_file)
    collect.run(params, layout)
    clean.run(params, layout)
    salt = load_salt(params.deid.salt_env)
    collect_jobs = [(item.read(), salt) for item in open_source(params).night_items(1)]
    raw = manifest.read(layout)
    raw = raw[raw["status"] == "stored"]
    scratch = out / "engines-scratch"
    scratch.mkdir()
    spec = params.clean.image
    clean_jobs = [(str(layout.raw / record), str(scratch), digest, spec.channels, spec.min_side, spec.max_pixels,
                   spec.dicom) for record, digest in zip(raw["record_id"], raw["content_hash"])]
    height, width = params.preprocess.image_size
    with packs.PackReader(layout.clean) as reader:
        prepare_jobs = [(reader.read(path), height, width)
                        for path in pd.read_parquet(layout.clean_records)["image_path"].tolist()]
    work = (("collect", collect.deidentify_job, collect_jobs, 8), ("clean", clean.clean_one_image, clean_jobs, 32),
            ("preprocess", preprocess.prepare_image, prepare_jobs, 16))  # the stages' own chunk sizes

    def rate(engine: ItemMap, warm: int) -> dict[str, float]:
        figures = {}
        for name, function, jobs, chunksize in work:
            engine.map(function, jobs[:warm], chunksize=chunksize)  # imports on the workers, the pool started
            started = time.perf_counter()
            engine.map(function, jobs, chunksize=chunksize)
            figures[name] = len(jobs) / (time.perf_counter() - started)
        return figures

    results = {"items": len(clean_jobs), "engines": {}}
    print(f"\nper-item work over {len(clean_jobs)} images: serial ...", flush=True)
    results["engines"]["serial"] = rate(ItemMap("serial"), 8)
    # compute.workers: 1 on this machine: a pool of its cores for batches of PARALLEL_FROM or more
    with item_map(params.compute, "per-item work") as engine:
        label = f"workers: 1, {engine.description.removeprefix('per-item work ')}"
        print(f"  {label} ...", flush=True)
        results["engines"][label] = rate(engine, PARALLEL_FROM)
    # Collect's jobs carry the images' bytes into the task graph, as collect on Dask does; Dask
    # warns about graphs over 10 MB, which says nothing the figures do not.
    warnings.filterwarnings("ignore", message="Sending large graph", category=UserWarning)
    for count in workers:
        label = f"Dask, {count} worker{'s' if count > 1 else ''}"
        print(f"  {label} ...", flush=True)
        with LocalCluster(n_workers=count, threads_per_worker=1, processes=True, dashboard_address=None,
                          host="127.0.0.1") as cluster, Client(cluster) as client:
            results["engines"][label] = rate(ItemMap(label, client=client), 8 * count)
    shutil.rmtree(layout.root, ignore_errors=True)
    return results


def print_engines(results: dict) -> None:
    engines = results["engines"]
    serial = engines["serial"]
    print(f"\nPer-item work, items/s over {results['items']} synthetic 256x256 images "
          "(the pool's and clusters' start not counted), and each over serial:")
    print(f"{'engine':>28} | " + " | ".join(f"{s:>17}" for s in ENGINE_STAGES))
    for engine, figures in engines.items():
        print(f"{engine:>28} | " + " | ".join(f"{figures[s]:8.1f} (x{figures[s] / serial[s]:5.2f})"
                                              for s in ENGINE_STAGES))
    print("(with workers: 1, collect itself stays in this process: its pool figure is what a pool would give)")


# --------------------------------------------------------------------------------------------


def wipe(out: Path) -> None:
    if out.exists():
        if out != DEFAULT_OUT and not (out / MARKER).exists():
            raise SystemExit(f"{out} exists and was not made by this benchmark; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("made by benchmarks/nightly_scale.py\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("archives", type=int, nargs="*", default=[5000, 20000, 50000],
                        help="archive sizes in images, ascending (default 5000 20000 50000)")
    parser.add_argument("--night", type=int, default=500, help="new images in the night measured")
    parser.add_argument("--image-size", type=int, default=64, help="synthetic radiographs' side in px (>= 64)")
    parser.add_argument("--full-recompute-at", type=int, nargs="*", default=None,
                        help="archive sizes at which the night is also recomputed in full (default: the smallest)")
    parser.add_argument("--archive-batch", type=int, default=5000, help="images per collected batch in the setup")
    parser.add_argument("--archive-jpeg-fraction", type=float, default=NIGHT_JPEG_FRACTION,
                        help=f"JPEG share of the archive's images (the nights': {NIGHT_JPEG_FRACTION}); "
                             "1 builds it about five times faster")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="Dask worker processes to try")
    parser.add_argument("--items", type=int, default=400, help="images for the per-item throughput")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--skip", choices=["archives", "dask"], action="append", default=[])
    args = parser.parse_args(argv)
    if args.archives != sorted(set(args.archives)) or min(args.archives, default=1) < 1:
        parser.error("archive sizes must be positive and ascending")
    if any(later < earlier + args.night for earlier, later in zip(args.archives, args.archives[1:])):
        parser.error(f"each archive must exceed the one before by at least --night ({args.night}): the night "
                     "measured on one archive stays in it")
    if not 0.0 <= args.archive_jpeg_fraction <= 1.0:
        parser.error("--archive-jpeg-fraction must be between 0 and 1")
    if args.items < PARALLEL_FROM:
        parser.error(f"--items must be at least {PARALLEL_FROM}: below that, workers: 1 uses no pool of cores")
    if args.image_size < 64:
        parser.error("--image-size must be at least 64 (clean quarantines smaller images)")
    if args.full_recompute_at is None:
        args.full_recompute_at = args.archives[:1]
    if set(args.full_recompute_at) - set(args.archives):
        parser.error("--full-recompute-at must name archive sizes being measured")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("MEDLOOP_DEID_SALT", BENCH_SALT)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    out = args.out.resolve()
    wipe(out)
    started = time.perf_counter()
    print(f"python {platform.python_version()}, {os.cpu_count()} cores, out {out}", flush=True)
    report: dict = {"machine": {"python": platform.python_version(), "cores": os.cpu_count(),
                                "platform": platform.platform()},
                    "arguments": {key: str(value) if isinstance(value, Path) else value
                                  for key, value in vars(args).items()}}

    if "archives" not in args.skip:
        rows = archive_nights(args.archives, args.night, args.image_size, args.archive_batch,
                              args.archive_jpeg_fraction, set(args.full_recompute_at), out)
        report["nights"] = rows
        report["growth_largest_over_smallest"] = print_nights(rows, args.night, args.image_size)

    if "dask" not in args.skip:
        engines = engine_throughput(args.items, args.workers, out)
        report["per_item_work"] = engines
        print_engines(engines)
    report["benchmark_s"] = time.perf_counter() - started
    print(f"\nthe whole benchmark took {report['benchmark_s'] / 60:.1f} min", flush=True)
    (out / "nightly_scale.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
