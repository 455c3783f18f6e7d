"""The GPU path without a GPU: the precision and strategy medloop picks for a host's GPUs, the
`make gpu` switch to the CUDA build of the pinned TensorFlow, and the GPU check script on the CPU."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess

import pytest

from conftest import ROOT, image_params
from pipelines.config import parse_params
from pipelines.data import inputs
from pipelines.train import plan_device

TWO_GPUS = ["/physical_device:GPU:0", "/physical_device:GPU:1"]


def train_spec(mixed_precision: str, distribution: str):
    raw = image_params()
    raw["train"].update(mixed_precision=mixed_precision, distribution=distribution)
    return parse_params(raw).train


@pytest.mark.parametrize(
    "mixed_precision, distribution, gpus, policy, strategy",
    [
        ("auto", "mirrored", TWO_GPUS, "mixed_float16", "MirroredStrategy"),
        ("auto", "mirrored", TWO_GPUS[:1], "mixed_float16", "MirroredStrategy"),  # one GPU: the same path
        ("on", "mirrored", TWO_GPUS, "mixed_float16", "MirroredStrategy"),
        ("off", "mirrored", TWO_GPUS, "float32", "MirroredStrategy"),
        ("auto", "none", TWO_GPUS, "mixed_float16", "default"),
        ("auto", "multi_worker", TWO_GPUS, "mixed_float16", "MultiWorkerMirroredStrategy"),
        ("auto", "mirrored", [], "float32", "default"),
        ("off", "mirrored", [], "float32", "default"),
        ("auto", "multi_worker", [], "float32", "MultiWorkerMirroredStrategy"),
    ],
)
def test_float16_compute_and_mirroring_only_with_gpus(mixed_precision, distribution, gpus, policy, strategy):
    plan = plan_device(train_spec(mixed_precision, distribution), gpus)
    assert (plan.policy, plan.strategy, plan.warning) == (policy, strategy, None)


def test_mixed_precision_on_without_a_gpu_falls_back_to_float32_and_says_so():
    plan = plan_device(train_spec("on", "mirrored"), [])
    assert (plan.policy, plan.strategy) == ("float32", "default")
    assert plan.warning == ("train.mixed_precision is on, but no GPU is visible: training in float32 "
                            "(float16 on a CPU is slower and gains nothing)")


def test_make_gpu_installs_the_cuda_build_of_the_version_constraints_pin():
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    pins = re.findall(r"^tensorflow[-_]cpu==(\S+)$", (ROOT / "constraints.txt").read_text(), re.MULTILINE)
    assert len(pins) == 1, "constraints.txt must pin tensorflow-cpu exactly once"
    # -n: print the commands, run nothing (no network, no install)
    dry_run = subprocess.run(["make", "-n", "-s", "gpu"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert dry_run.returncode == 0, dry_run.stderr
    commands = dry_run.stdout.splitlines()
    uninstall = next(i for i, line in enumerate(commands) if "pip uninstall" in line)
    install = next(i for i, line in enumerate(commands) if '"tensorflow[and-cuda]==' in line)
    assert "tensorflow-cpu tensorflow" in commands[uninstall] and uninstall < install
    assert f'"tensorflow[and-cuda]=={pins[0]}"' in commands[install] and "-c constraints.txt" in commands[install]
    assert pins[0] not in (ROOT / "Makefile").read_text()  # read from constraints.txt, never written twice


@pytest.mark.slow
def test_gpu_check_runs_on_the_cpu_against_a_processed_workspace(trained_image, tmp_path, capsys):
    layout = trained_image[0]
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)

    assert gpu_check.main(["--cpu-smoke", "--workspace", str(layout.root), "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    runs = report["runs"]
    assert set(runs) == {"float32", "mixed"} and report["cpu_smoke"] is True
    # no GPU: medloop keeps float32 for `mixed_precision: on` and trains on the default device
    assert runs["float32"]["policy"] == runs["mixed"]["policy"] == "float32"
    assert all(run["replicas"] == 1 and run["gpus"] == [] and run["gpu"] is None for run in runs.values())
    assert all(run["images_per_s"] > 0 and 0.0 <= run["auroc"] <= 1.0 for run in runs.values())
    assert runs["mixed"]["auroc"] == runs["float32"]["auroc"]  # the same seeded float32 training twice
    assert runs["float32"]["train_images"] == len(inputs.split_labels(layout, "train"))
    printed = capsys.readouterr().out
    assert "mixed over float32: images/s x" in printed and "CPU smoke run" in printed
