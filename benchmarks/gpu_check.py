"""GPU check: medloop's training in mixed precision against float32, on the GPUs of this machine.

    python benchmarks/gpu_check.py [--workspace PATH] [--images 4000] [--image-size 150]
                                   [--architecture cxr_small] [--batch-size N] [--epochs 6]
                                   [--deterministic | --no-deterministic] [--out benchmarks/out/gpu]
    python benchmarks/gpu_check.py --cpu-smoke        # seconds, on the CPU: the check itself runs

The same model is trained twice on the same data, as the train stage trains it: the device set
up by `pipelines.train.configure_device` from ``train.mixed_precision`` (``off``, then ``on``)
and ``train.distribution`` (the workspace's, ``mirrored`` by default: a ``MirroredStrategy``
over every visible GPU), the model from `pipelines.model.architectures.build_model` built in the
strategy's scope, the batches from `pipelines.data.inputs.image_dataset` (the TFRecord shards,
cached, shuffled and augmented), the balanced class weights, ``model.fit``. For each it reports
images/s from the second epoch on (the first traces the graph and fills the cache), the AUROC on
the test split (scikit-learn; the validation split when the test split lacks a class), and the
GPUs' utilisation and memory sampled every 250 ms by ``nvidia-smi`` while the measured epochs
run (TensorFlow reserves most of a GPU's memory up front, so memory shows its reservation).
Goals (issue 17): mixed precision at least 2.5x float32's images/s, AUROC within 0.01.

The data: ``--workspace``, a medloop workspace whose ``data/processed`` is there (read only; its
params give the model and training settings), or else a scratch workspace made under ``--out``
from the built-in generator (``--images`` synthetic radiographs of ``--image-size`` px, collected,
cleaned and preprocessed by medloop's own stages; nothing is downloaded). ``--architecture``,
``--batch-size``, ``--epochs`` and ``--deterministic`` override the params (the batch is global:
split among the replicas).

With no GPU visible to TensorFlow it says so and exits with status 2 (the pins install
``tensorflow-cpu``; ``make gpu`` installs the CUDA build of the same version). ``--cpu-smoke``
runs the whole check on the CPU on tiny data instead: ``configure_device`` then keeps float32 for
both runs, as medloop does without a GPU, so its figures prove only that the check works.
Figures are printed side by side with ratios, never asserted; they also go to
``<out>/gpu_check.json``.
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

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "benchmarks" / "out" / "gpu"
GOAL_SPEEDUP = 2.5
GOAL_AUROC_DIFFERENCE = 0.01
NO_GPU = ("no GPU is visible to TensorFlow {version} ({build}), so there is nothing to check. On a GPU "
          "machine, install the CUDA build of the pinned TensorFlow with `make gpu` (it replaces "
          "tensorflow-cpu), check that `nvidia-smi` lists the GPUs, and run this again; "
          "`--cpu-smoke` runs the check on the CPU on tiny data, to see that it works.")
SMOKE = {"images": 96, "image_size": 64, "epochs": 2, "batch_size": 16}
PRECISIONS = (("float32", "off"), ("mixed", "on"))


# --------------------------------------------------------------------------------------------
# the data: a workspace's data/processed
# --------------------------------------------------------------------------------------------


def scratch_workspace(out: Path, images: int, image_size: int):
    """A workspace under ``out`` with ``images`` synthetic radiographs collected, cleaned and
    preprocessed at ``image_size`` px by medloop's stages; returns its layout."""
    from pipelines import clean, collect, preprocess
    from pipelines.config import load_params
    from pipelines.ops.scaffold import create_workspace

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import BENCH_SALT  # benchmarks/common.py: the public benchmark salt

    os.environ.setdefault("MEDLOOP_DEID_SALT", BENCH_SALT)
    raw = copy.deepcopy(yaml.safe_load((ROOT / "params.yaml").read_text()))
    raw["source"].update(nights=1, images_per_night=images, patients=max(1, images // 2), image_size=image_size)
    raw["validate"].update(min_new_items=1, min_total_items=1)
    raw["preprocess"]["image_size"] = [image_size, image_size]
    raw["storage"]["dvc_remote"] = str(out / "dvc-remote")
    params_file = out / "scratch-params.yaml"
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    layout = create_workspace(out / "scratch", params_file)
    params = load_params(layout.params_file)
    started = time.perf_counter()
    for stage in (collect, clean, preprocess):
        stage.run(params, layout)
    print(f"data: {images} synthetic {image_size}x{image_size} radiographs collected, cleaned and preprocessed "
          f"in {time.perf_counter() - started:.0f} s", flush=True)
    return layout


def check_params(layout, overrides: dict, mixed_precision: str):
    """The workspace's params with the check's overrides and ``train.mixed_precision``."""
    from pipelines.config import parse_params

    raw = yaml.safe_load(layout.params_file.read_text())
    raw["train"].update({key: value for key, value in overrides.items() if value is not None})
    raw["train"]["mixed_precision"] = mixed_precision
    return parse_params(raw, str(layout.params_file))


# --------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------


class GpuSampler:
    """``nvidia-smi`` sampled every 250 ms in the background: per GPU, utilisation % and memory
    MiB with the time each sample arrived. Without ``nvidia-smi`` it samples nothing."""

    QUERY = ["--query-gpu=index,utilization.gpu,memory.used", "--format=csv,noheader,nounits", "-lms", "250"]

    def __init__(self):
        self.samples: list[tuple[float, int, float, float]] = []  # (time, gpu, util %, memory MiB)
        self.available = shutil.which("nvidia-smi") is not None
        self._process = None
        self._reader = None

    def __enter__(self) -> "GpuSampler":
        if self.available:
            self._process = subprocess.Popen(["nvidia-smi", *self.QUERY], stdout=subprocess.PIPE,
                                             stderr=subprocess.DEVNULL, text=True, bufsize=1)
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()
        return self

    def _read(self) -> None:
        for line in self._process.stdout:
            try:
                index, utilisation, memory = (float(part) for part in line.split(","))
            except ValueError:  # "[N/A]" on some boards, or a partial line
                continue
            self.samples.append((time.perf_counter(), int(index), utilisation, memory))

    def __exit__(self, *exc) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
            self._reader.join(timeout=10)

    def summary(self, start: float, end: float) -> dict | None:
        """Mean and peak utilisation and peak memory per GPU between ``start`` and ``end``."""
        if not self.available:
            return None
        per_gpu: dict[int, list[tuple[float, float]]] = {}
        for moment, gpu, utilisation, memory in self.samples:
            if start <= moment <= end:
                per_gpu.setdefault(gpu, []).append((utilisation, memory))
        return {str(gpu): {"utilisation_mean": float(np.mean([u for u, _ in values])),
                           "utilisation_max": float(max(u for u, _ in values)),
                           "memory_max_mib": float(max(m for _, m in values)), "samples": len(values)}
                for gpu, values in sorted(per_gpu.items())}


def train_and_score(layout, params, sampler: GpuSampler) -> dict:
    """Train ``params``' model as the train stage does; images/s, AUROC and the device used."""
    import keras
    from sklearn.metrics import roc_auc_score

    from pipelines import train
    from pipelines.data import inputs
    from pipelines.model.architectures import build_model, class_probabilities

    class EpochClock(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.ends: list[float] = []

        def on_train_begin(self, logs=None):
            self.begin = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.ends.append(time.perf_counter())

    classes = params.model.classes
    positive = classes.index(params.model.positive_class)
    previous_policy = keras.mixed_precision.global_policy().name
    device = train.configure_device(params)
    try:
        policy = keras.mixed_precision.global_policy().name
        with device.strategy.scope():
            model = build_model(params, inputs.input_shape(layout))
        train_labels = inputs.split_labels(layout, "train")
        weights = inputs.class_weights(train_labels, len(classes))
        clock = EpochClock()
        model.fit(inputs.image_dataset(layout, "train", params, training=True), epochs=params.train.epochs,
                  class_weight=weights, callbacks=[clock], shuffle=False, verbose=0)
        measured = clock.ends[-1] - clock.ends[0]  # epochs 2..n
        split = "test"
        labels = inputs.split_labels(layout, split)
        if len(set((labels == positive).tolist())) < 2:
            split, labels = "validation", inputs.split_labels(layout, "validation")
        probabilities = class_probabilities(model, inputs.image_dataset(layout, split, params, training=False))
        auroc = float(roc_auc_score(labels == positive, probabilities[:, positive]))
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
    return {
        "policy": policy,
        "strategy": device.facts["strategy"],
        "replicas": device.facts["replicas"],
        "gpus": device.facts["gpus"],
        "deterministic": params.train.deterministic,
        "batch_size": params.train.batch_size,
        "train_images": len(train_labels),
        "epochs": params.train.epochs,
        "first_epoch_s": clock.ends[0] - clock.begin,
        "images_per_s": len(train_labels) * (len(clock.ends) - 1) / measured,
        "auroc_split": split,
        "auroc": auroc,
        "gpu": sampler.summary(clock.ends[0], clock.ends[-1]),
    }


# --------------------------------------------------------------------------------------------


def print_results(results: dict[str, dict], *, on_gpu: bool) -> dict:
    base, mixed = results["float32"], results["mixed"]
    print(f"\n{base['train_images']} training images at batch {base['batch_size']} (global), {base['epochs']} "
          f"epochs, op determinism {'on' if base['deterministic'] else 'off'}; images/s from epoch 2 on; AUROC on "
          f"the {base['auroc_split']} split:")
    print(f"{'run':>8} | {'policy':>13} | {'strategy (replicas)':>27} | {'images/s':>9} | {'AUROC':>6} | "
          f"{'GPU util mean/max %, memory MiB':>34}")
    for name, row in results.items():
        gpu = row["gpu"]
        cell = ("no nvidia-smi" if gpu is None else
                "; ".join(f"{index}: {g['utilisation_mean']:.0f}/{g['utilisation_max']:.0f}, {g['memory_max_mib']:.0f}"
                          for index, g in gpu.items()) or "no samples")
        strategy = "default device" if row["strategy"].startswith("_Default") else row["strategy"]
        print(f"{name:>8} | {row['policy']:>13} | {strategy + ' (' + str(row['replicas']) + ')':>27} | "
              f"{row['images_per_s']:9.1f} | {row['auroc']:6.4f} | {cell:>34}")
    speedup = mixed["images_per_s"] / base["images_per_s"]
    difference = mixed["auroc"] - base["auroc"]
    verdict = {"speedup": speedup, "auroc_difference": difference,
               "speedup_met": speedup >= GOAL_SPEEDUP, "auroc_met": abs(difference) <= GOAL_AUROC_DIFFERENCE}
    print(f"mixed over float32: images/s x{speedup:.2f} (goal at least x{GOAL_SPEEDUP}: "
          f"{'met' if verdict['speedup_met'] else 'NOT met'}); AUROC {difference:+.4f} "
          f"(goal within {GOAL_AUROC_DIFFERENCE}: {'met' if verdict['auroc_met'] else 'NOT met'})")
    if not on_gpu:
        print("CPU smoke run: no GPU, so `mixed_precision: on` fell back to float32 as medloop does on a CPU; "
              "these figures show only that the check runs.")
    elif any(g["utilisation_mean"] < 50 for row in results.values() for g in (row["gpu"] or {}).values()):
        print("A GPU was busy less than half the time: the input pipeline (decoding, augmentation on the CPU) "
              "or a small batch limits the throughput, not the GPU's arithmetic; try --batch-size.")
    return verdict


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", type=Path, help="a workspace with data/processed (default: a scratch one)")
    parser.add_argument("--images", type=int, default=4000, help="synthetic images of the scratch workspace")
    parser.add_argument("--image-size", type=int, default=150, help="their side in px (and the model's input)")
    parser.add_argument("--architecture", choices=["cxr_small", "seed_cnn"], help="default: the params'")
    parser.add_argument("--batch-size", type=int, help="global batch (default: the params')")
    parser.add_argument("--epochs", type=int, default=6, help="epochs per run, at least 2 (default 6)")
    parser.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=None,
                        help="TensorFlow op determinism (default: the params')")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--cpu-smoke", action="store_true", help="run on the CPU on tiny data (seconds)")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        for key, value in SMOKE.items():
            if parser.get_default(key) == getattr(args, key):
                setattr(args, key, value)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first epoch is not measured")
    if args.image_size < 64:
        parser.error("--image-size must be at least 64 (clean quarantines smaller images)")
    if args.workspace is not None and not (args.workspace / "data" / "processed" / "preprocess.json").is_file():
        parser.error(f"{args.workspace} has no data/processed/preprocess.json: run preprocess there first")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.cpu_smoke and "tensorflow" not in sys.modules:
        os.environ["CUDA_VISIBLE_DEVICES"] = "-1"  # the CPU alone, even on a GPU machine
    import tensorflow as tf

    build = tf.sysconfig.get_build_info()
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus and not args.cpu_smoke:
        kind = "a CUDA build" if build.get("is_cuda_build") else "a CPU-only build"
        print(NO_GPU.format(version=tf.__version__, build=kind), file=sys.stderr)
        return 2
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    from pipelines.workspace import Layout

    if args.workspace is not None:
        layout = Layout.at(args.workspace.resolve())
    else:
        shutil.rmtree(out / "scratch", ignore_errors=True)
        layout = scratch_workspace(out, args.images, args.image_size)
    kind = f"CUDA {build.get('cuda_version')}" if build.get("is_cuda_build") else "CPU"
    print(f"TensorFlow {tf.__version__} ({kind} build), GPUs: {len(gpus)}, {os.cpu_count()} CPU cores", flush=True)
    overrides = {"architecture": args.architecture, "batch_size": args.batch_size, "epochs": args.epochs,
                 "deterministic": args.deterministic}
    results = {}
    with GpuSampler() as sampler:
        for name, setting in PRECISIONS:
            print(f"training: {name} (train.mixed_precision {setting}) ...", flush=True)
            results[name] = train_and_score(layout, check_params(layout, overrides, setting), sampler)
    verdict = print_results(results, on_gpu=bool(gpus))
    report = {"machine": {"python": platform.python_version(), "cores": os.cpu_count(), "tensorflow": tf.__version__,
                          "cuda_build": bool(build.get("is_cuda_build")), "gpus": len(gpus)},
              "cpu_smoke": args.cpu_smoke, "workspace": str(layout.root), "runs": results, "verdict": verdict}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    if args.workspace is None:
        shutil.rmtree(layout.root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
