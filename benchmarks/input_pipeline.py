"""Benchmark of medloop's training input pipeline beside what a Keras user would write instead.

    python benchmarks/input_pipeline.py [--images 2000] [--epochs 3] [--out benchmarks/out/input_pipeline]

Set-up (not timed as throughput): ``--images`` synthetic 256x256 chest radiographs
(`pipelines.data.sources.synthetic_cxr.render_radiograph`, ~45% pneumonia) are written as PNG files
into class folders ``train/NORMAL`` and ``train/PNEUMONIA``; a medloop workspace with an
``image_folder`` source pointing there is taken through the real collect, clean and preprocess
stages (150x150, 3 channels: the default profile), which write the TFRecord shards. The images
of medloop's training split are then hard-linked into a second class-folder tree, so every
pipeline below reads exactly the same training images.

Measured, each in its own fresh process (tf.data's determinism switch is process-wide), batch
size 32, images 150x150x3, the same augmentation (rotation 5 degrees, zoom 0.1, contrast 0.1;
the Keras layers of `pipelines.data.inputs.augmentation_layers`):

(a) medloop: ``pipelines.data.inputs.image_dataset(..., training=True)``, as training runs it
    (``train.deterministic: true``: op determinism on), and once more with determinism off;
(b) ``keras.utils.image_dataset_from_directory`` + the augmentation layers in a parallel
    ``map`` + ``prefetch``, as in the Keras image-classification tutorial;
(c) ``ImageDataGenerator(rescale=1/255, rotation_range=5, zoom_range=0.1).flow_from_directory``.

Throughput is images per second over epochs 2..``--epochs`` (the first epoch fills medloop's
cache and traces functions), first iterating the data alone, then with a trivial model step
(global average pooling + one sigmoid unit, ``model.fit``). Results are printed with the ratios
medloop / (b) and medloop / (c), and written to ``<out>/input_pipeline.json``. Nothing is
asserted: these are measurements.
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
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import BENCH_SALT, child_env  # noqa: E402 - benchmarks/common.py

DEFAULT_OUT = ROOT / "benchmarks" / "out" / "input_pipeline"
MARKER = ".input_pipeline_out"  # a non-default --out is only wiped when it carries this marker
CASES = ("medloop", "medloop_nondeterministic", "image_dataset_from_directory", "ImageDataGenerator")
BATCH = 32
SIZE = (150, 150)
SEED = 1234


# --------------------------------------------------------------------------------------------
# set-up: PNG class folders, a medloop workspace, the training split as a class-folder tree
# --------------------------------------------------------------------------------------------


def _render(job: tuple[int, bool, str]) -> None:
    import numpy as np
    from PIL import Image

    from pipelines.data.sources.synthetic_cxr import render_radiograph

    seed, pneumonia, path = job
    pixels = render_radiograph(np.random.default_rng(seed), 256, pneumonia)
    Image.fromarray(pixels, mode="L").save(path, format="PNG", compress_level=6)


def write_folder(folder: Path, images: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(2024)
    pneumonia = rng.random(images) < 0.45
    jobs = []
    for label in ("NORMAL", "PNEUMONIA"):
        (folder / "train" / label).mkdir(parents=True, exist_ok=True)
    for index in range(images):
        label = "PNEUMONIA" if pneumonia[index] else "NORMAL"
        jobs.append((10_000 + index, bool(pneumonia[index]), str(folder / "train" / label / f"cxr-{index:05d}.png")))
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(_render, jobs, chunksize=32))
    return {"NORMAL": int((~pneumonia).sum()), "PNEUMONIA": int(pneumonia.sum())}


def make_workspace(out: Path, folder: Path):
    from pipelines.ops.scaffold import create_workspace

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = copy.deepcopy(params)
    params["source"] = {"kind": "image_folder", "path": str(folder)}
    params["validate"]["min_new_items"] = 1
    params["validate"]["min_total_items"] = 1
    params["storage"]["dvc_remote"] = str(out / "dvc-remote")
    params_file = out / "ws-params.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    return create_workspace(out / "ws", params_file)


def prepare(out: Path, images: int) -> dict:
    from pipelines import clean, collect, preprocess
    from pipelines.config import load_params

    folder = out / "folder"
    started = time.perf_counter()
    counts = write_folder(folder, images)
    rendered = time.perf_counter() - started
    layout = make_workspace(out, folder)
    params = load_params(layout.params_file)
    timings = {}
    for name, stage in (("collect", collect), ("clean", clean), ("preprocess", preprocess)):
        started = time.perf_counter()
        stage.run(params, layout)
        timings[name] = round(time.perf_counter() - started, 2)

    # The training split as class folders of the original PNGs (hard links: same files).
    import pandas as pd

    index = pd.read_parquet(layout.processed / "index.parquet")
    train = index[index["split"] == "train"]
    baseline = out / "baseline" / "train"
    for row in train.itertuples():
        source = folder / row.source_ref
        target = baseline / row.label / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(source, target)
    return {
        "images": images, "class_counts": counts, "render_s": round(rendered, 2),
        "stages_s": timings, "train_images": int(len(train)),
        "workspace": str(layout.root), "baseline_folder": str(baseline),
    }


# --------------------------------------------------------------------------------------------
# one measurement (runs in its own process)
# --------------------------------------------------------------------------------------------


def measure(case: str, workspace: Path, baseline: Path, epochs: int) -> dict:
    import tensorflow as tf

    from pipelines.config import load_params
    from pipelines.workspace import Layout

    layout = Layout.at(workspace)
    params = load_params(layout.params_file)
    if case == "medloop":
        tf.config.experimental.enable_op_determinism()  # what train does with deterministic: true

    def make_data():
        if case.startswith("medloop"):
            from pipelines.data import inputs

            return inputs.image_dataset(layout, "train", params, training=True)
        if case == "image_dataset_from_directory":
            import keras

            from pipelines.data.inputs import augmentation_layers

            augment = keras.Sequential(augmentation_layers(params.train.augmentation, SEED))
            dataset = keras.utils.image_dataset_from_directory(
                baseline, labels="inferred", label_mode="binary", color_mode="rgb", batch_size=BATCH,
                image_size=SIZE, shuffle=True, seed=SEED, verbose=False,
            )
            return dataset.map(lambda x, y: (augment(x, training=True), y),
                               num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
        from tensorflow.keras.preprocessing.image import ImageDataGenerator

        generator = ImageDataGenerator(rescale=1 / 255, rotation_range=5, zoom_range=0.1)
        return generator.flow_from_directory(
            str(baseline), target_size=SIZE, color_mode="rgb", class_mode="binary", batch_size=BATCH,
            shuffle=True, seed=SEED,
        )

    iterate = _iterate(make_data(), epochs)
    with_model = _fit_trivial_model(make_data(), epochs)
    return {"case": case, "iterate": iterate, "trivial_model": with_model}


def _iterate(data, epochs: int) -> dict:
    per_epoch = []
    for _ in range(epochs):
        seen, started = 0, time.perf_counter()
        if hasattr(data, "on_epoch_end") and hasattr(data, "__getitem__"):  # legacy iterator
            for index in range(len(data)):
                x, _ = data[index]
                seen += len(x)
            data.on_epoch_end()
        else:
            for x, _ in data:
                seen += int(x.shape[0])
        per_epoch.append((seen, time.perf_counter() - started))
    return _rate(per_epoch)


def _fit_trivial_model(data, epochs: int) -> dict:
    import keras

    model = keras.Sequential([
        keras.Input(shape=(*SIZE, 3)),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(1, activation="sigmoid"),
    ])
    model.compile(optimizer="sgd", loss="binary_crossentropy")
    timer = _EpochTimer()
    model.fit(data, epochs=epochs, callbacks=[timer], verbose=0)
    return _rate(timer.per_epoch)


class _EpochTimer:
    """A Keras callback recording (images, seconds) per epoch (built lazily: Keras imported late)."""

    def __new__(cls):
        import keras

        class Timer(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.per_epoch = []

            def on_epoch_begin(self, epoch, logs=None):
                self.started, self.seen = time.perf_counter(), 0

            def on_train_batch_end(self, batch, logs=None):
                self.seen += 1

            def on_epoch_end(self, epoch, logs=None):
                self.per_epoch.append((self.seen * BATCH, time.perf_counter() - self.started))

        return Timer()


def _rate(per_epoch: list[tuple[int, float]]) -> dict:
    later = per_epoch[1:] or per_epoch
    images = sum(n for n, _ in later)
    seconds = sum(s for _, s in later)
    return {
        "images_per_s": round(images / seconds, 1) if seconds else None,
        "first_epoch_s": round(per_epoch[0][1], 3),
        "later_epochs_s": [round(s, 3) for _, s in later],
        "images_per_epoch": per_epoch[0][0],
    }


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------


def run_case(case: str, setup: dict, epochs: int, logs: Path) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--measure", case,
               "--workspace", setup["workspace"], "--baseline", setup["baseline_folder"], "--epochs", str(epochs)]
    started = time.perf_counter()
    done = subprocess.run(command, env=child_env(), capture_output=True, text=True)
    (logs / f"{case}.err").write_text(done.stderr)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-8:])
        return {"case": case, "error": f"exit {done.returncode}: {tail}"}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_s"] = round(time.perf_counter() - started, 2)
    return result


def _format(value) -> str:
    return f"{value:10.1f}" if isinstance(value, (int, float)) else f"{'n/a':>10}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--measure", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--workspace", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--baseline", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    if args.measure:
        print(json.dumps(measure(args.measure, args.workspace, args.baseline, args.epochs)))
        return 0

    out = args.out.resolve()
    if out.exists():
        if out != DEFAULT_OUT.resolve() and not (out / MARKER).exists():
            print(f"{out} exists and was not made by this benchmark; choose another --out", file=sys.stderr)
            return 2
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("made by benchmarks/input_pipeline.py\n")
    os.environ.setdefault("MEDLOOP_DEID_SALT", BENCH_SALT)  # the set-up's collect runs in this process
    logs = out / "logs"
    logs.mkdir()

    print(f"set-up: {args.images} synthetic 256x256 PNGs -> collect, clean, preprocess (150x150x3 shards) ...",
          flush=True)
    setup = prepare(out, args.images)
    print(f"  rendered in {setup['render_s']} s; stages {setup['stages_s']} s; "
          f"training split {setup['train_images']} images", flush=True)

    results = {}
    for case in CASES:
        print(f"measuring {case} ...", flush=True)
        results[case] = run_case(case, setup, args.epochs, logs)
        if "error" in results[case]:
            print(f"  {case} could not run: {results[case]['error']}")

    print()
    print(f"training input throughput, images/s over epochs 2..{args.epochs} "
          f"({setup['train_images']} images/epoch, batch {BATCH}, 150x150x3, same augmentation; "
          f"{os.cpu_count()} CPU cores, no GPU used)")
    print(f"{'pipeline':<34}{'data only':>10}{'+ model':>10}{'epoch 1 s':>11}")
    for case, result in results.items():
        if "error" in result:
            print(f"{case:<34}{'n/a':>10}{'n/a':>10}{'n/a':>11}")
            continue
        print(f"{case:<34}{_format(result['iterate']['images_per_s'])}"
              f"{_format(result['trivial_model']['images_per_s'])}{result['iterate']['first_epoch_s']:>11.2f}")

    ratios = {}
    for name, other in (("image_dataset_from_directory", "image_dataset_from_directory"),
                        ("ImageDataGenerator", "ImageDataGenerator")):
        for kind in ("iterate", "trivial_model"):
            mine, theirs = results.get("medloop", {}), results.get(other, {})
            if "error" in mine or "error" in theirs or not mine or not theirs:
                continue
            ratios[f"medloop/{name} ({kind})"] = round(mine[kind]["images_per_s"] / theirs[kind]["images_per_s"], 2)
    print()
    targets = {"image_dataset_from_directory": 3.0, "ImageDataGenerator": 5.0}
    for key, value in ratios.items():
        target = next(t for n, t in targets.items() if n in key)
        print(f"{key:<58}{value:>7.2f}x   (target >= {target:.0f}x)")
    print(f"\none-off cost medloop pays before training: collect {setup['stages_s']['collect']} s, clean "
          f"{setup['stages_s']['clean']} s, preprocess {setup['stages_s']['preprocess']} s (shared with the data gate)")

    report = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "setup": setup, "results": results, "ratios": ratios, "epochs": args.epochs, "batch_size": BATCH,
    }
    (out / "input_pipeline.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"results: {out / 'input_pipeline.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
