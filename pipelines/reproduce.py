"""Reproduce a registered model version from the git commit that holds its ``dvc.lock``.

1. The commit comes from the version's tags (``medloop.commit``, written by the retrain flow) or
   from ``--rev`` (a commit or tag such as ``pneumonia-cxr-v3``).
2. It is checked out in a separate git worktree, so the user's working tree is never touched, with
   a DVC cache of its own.
3. The inputs are fetched from the DVC remote named at that commit: the collected data
   (``data/raw``, ``data/feedback``) and the frozen test set (``data/splits``). A remote that lacks
   objects is an error naming them.
4. ``dvc repro --force`` reruns every stage there with that commit's code and params. MLflow runs
   of the reproduction go to the worktree's own store (with the default SQLite tracking URI), so
   they never mix with the workspace's registry.
5. The result is compared with the registered version: the weights digest, every value in
   ``reports/metrics.json`` and the operating threshold. On a CPU identical means bit-identical;
   when either side trained on a GPU, metrics may differ within `GPU_TOLERANCE`.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.config import Params
from pipelines.errors import MedloopError, WorkspaceError
from pipelines.registry.lineage import version_lineage
from pipelines.registry.tracking import environment_facts
from pipelines.ops.versioning import dvc, git, repro
from pipelines.workspace import Layout, read_json

log = logging.getLogger("medloop.reproduce")

GPU_TOLERANCE = 1e-3  # largest metric difference accepted when either training ran on a GPU
INPUTS = ("data/raw", "data/feedback", "data/splits")  # what is pulled; everything else is rebuilt
# run_id differs by construction (the reproduction is a new MLflow run); test_cases (per-case
# results) are not kept in the version's metrics tag, which would outgrow its column.
IGNORED = {"run_id", "test_cases"}


class ReproduceError(MedloopError):
    """The version cannot be reproduced: no commit recorded, or data missing from the remote."""


@dataclass(frozen=True)
class Difference:
    """One value that differs: where in metrics.json, registered and reproduced, and by how much."""

    key: str
    registered: Any
    reproduced: Any
    size: float | None = None

    def describe(self) -> str:
        size = f" (differs by {self.size:.3g})" if self.size is not None else ""
        return f"{self.key}: registered {self.registered!r}, reproduced {self.reproduced!r}{size}"


@dataclass(frozen=True)
class Reproduction:
    """The verdict.

    Attributes:
        identical: weights digest, every metric and the threshold are equal (bit for bit on a CPU;
            metrics within ``tolerance`` when a GPU was involved).
        weights_identical: the weights digests are equal.
        tolerance: 0.0 on CPU, `GPU_TOLERANCE` when either side trained on a GPU.
        differences: every value that differs beyond the tolerance, with its size.
        environment_changes: ``(fact, at training, now)`` for each fact that changed.
        compared: how many values were compared.
    """

    model: str
    version: str
    commit: str
    worktree: str
    identical: bool
    weights_identical: bool
    tolerance: float
    compared: int
    seconds: float
    differences: list[Difference] = field(default_factory=list)
    environment_changes: list[tuple[str, str, str]] = field(default_factory=list)

    def describe(self) -> str:
        where = f"{self.model} v{self.version} from commit {self.commit[:12]}"
        on = "bit for bit" if self.tolerance == 0 else f"metrics within {self.tolerance:g} (a GPU was involved)"
        if self.identical:
            lines = [f"IDENTICAL: {where} reproduced {on}: weights digest, operating threshold and "
                     f"all {self.compared} values of metrics.json ({self.seconds:.0f} s)"]
        else:
            lines = [f"DIFFERENT: {where} did not reproduce {on}; {len(self.differences)} of "
                     f"{self.compared} values differ:"]
            lines += [f"  - {difference.describe()}" for difference in self.differences]
        if self.environment_changes:
            lines.append("environment changed since training:")
            lines += [f"  - {fact}: {then} then, {now} now" for fact, then, now in self.environment_changes]
        return "\n".join(lines)


def run(params: Params, layout: Layout, version: str | None = None, rev: str | None = None,
        *, keep: bool = False, workdir: str | Path | None = None) -> Reproduction:
    """Reproduce ``version`` (or the version made at ``rev``) and compare it with the registry.

    Args:
        params: the workspace's current params (for the model name and the registry only; the
            reproduction uses the params of the commit).
        layout: the workspace.
        version: the registered version; default the one made at ``rev``, else the champion.
        rev: a git commit or tag to reproduce from instead of the version's recorded commit.
        keep: leave the worktree in place for inspection.
        workdir: where to create the worktree (default: a new temporary folder).

    Raises:
        ReproduceError: no commit recorded for the version, no version made at ``rev``, data
            missing from the DVC remote (named), or a stage failed at that commit.
    """
    started = time.perf_counter()
    if rev is not None:
        commit = _resolve(layout, rev)
        version = version or _version_at(params, layout, commit, rev)
    registered = version_lineage(params, layout, version)
    version = registered["version"]
    if rev is None:
        commit = registered.get("commit")
        if not commit:
            raise ReproduceError(
                f"{params.model.name} v{version} has no recorded commit (it was not registered by the "
                f"retrain flow); name the commit that holds its dvc.lock with --rev")
        commit = _resolve(layout, commit)
    recorded_metrics = _registered_metrics(params, layout, version)

    base = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix=f"medloop-reproduce-{params.model.name}-v{version}-"))
    target = base / f"{params.model.name}-v{version}"
    git(layout, "worktree", "add", "--detach", str(target), commit)
    copy = Layout.at(target)
    try:
        _pull_inputs(copy, layout, commit)
        log.info("reproducing %s v%s at %s in %s", params.model.name, version, commit[:12], target)
        try:
            repro(copy, "evaluate", force=True)
        except WorkspaceError as exc:
            raise ReproduceError(f"reproducing {params.model.name} v{version} at commit {commit[:12]} failed:\n{exc}") from None
        reproduced = read_json(copy.metrics_json, "the evaluate stage wrote no metrics")
        train_info = read_json(copy.train_json, "the train stage wrote no train.json")
        gpu = _used_gpu(registered.get("device") or {}) or bool((train_info.get("device") or {}).get("gpu_count"))
        tolerance = GPU_TOLERANCE if gpu else 0.0
        differences, compared = compare(recorded_metrics, reproduced, tolerance)
        weights_identical = recorded_metrics.get("weights_sha256") == reproduced.get("weights_sha256")
        return Reproduction(
            model=params.model.name, version=version, commit=commit, worktree=str(target),
            identical=not differences and (weights_identical or gpu), weights_identical=weights_identical,
            tolerance=tolerance, compared=compared, seconds=time.perf_counter() - started,
            differences=differences, environment_changes=environment_changes(registered.get("environment") or {}),
        )
    finally:
        if not keep:
            git(layout, "worktree", "remove", "--force", str(target), check=False)
            shutil.rmtree(target, ignore_errors=True)
            if not workdir:
                shutil.rmtree(base, ignore_errors=True)


def compare(registered: dict, reproduced: dict, tolerance: float = 0.0) -> tuple[list[Difference], int]:
    """Every leaf of two metrics.json documents, compared (numbers within ``tolerance``).

    Returns:
        The differences and the number of values compared.
    """
    differences: list[Difference] = []
    compared = 0

    def walk(left: Any, right: Any, key: str) -> None:
        nonlocal compared
        if isinstance(left, dict) and isinstance(right, dict):
            for name in sorted(set(left) | set(right)):
                if name in IGNORED and not key:
                    continue
                walk(left.get(name), right.get(name), f"{key}.{name}" if key else name)
            return
        if isinstance(left, list) and isinstance(right, list) and len(left) == len(right):
            for index, (a, b) in enumerate(zip(left, right)):
                walk(a, b, f"{key}[{index}]")
            return
        compared += 1
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (left, right))
        if numbers:
            size = abs(float(left) - float(right))
            if size > tolerance or (tolerance == 0 and left != right):
                differences.append(Difference(key, left, right, size))
        elif left != right:
            differences.append(Difference(key, left, right))

    walk(registered, reproduced, "")
    return differences, compared


def environment_changes(recorded: dict[str, str]) -> list[tuple[str, str, str]]:
    """The recorded environment facts that differ from this environment's."""
    now = environment_facts()
    return [(fact, then, now.get(fact, "absent")) for fact, then in sorted(recorded.items())
            if now.get(fact, "absent") != then]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _resolve(layout: Layout, rev: str) -> str:
    done = git(layout, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", check=False)
    if done.returncode != 0:
        raise ReproduceError(f"{rev!r} is not a commit or tag of the workspace {layout.root}")
    return done.stdout.strip()


def _version_at(params: Params, layout: Layout, commit: str, rev: str) -> str:
    """The registered version whose recorded commit is ``commit``."""
    from pipelines.registry.client import connect
    from pipelines.registry.tags import COMMIT

    versions = connect(params, layout).search_model_versions(f"name = '{params.model.name}'")
    made = [v for v in versions if v.tags.get(COMMIT) == commit]
    if not made:
        raise ReproduceError(f"no registered version of {params.model.name} was made at {rev} ({commit[:12]}); "
                             f"name the version to compare with")
    return str(max(int(v.version) for v in made))


def _registered_metrics(params: Params, layout: Layout, version: str) -> dict:
    from pipelines.registry.client import connect
    from pipelines.registry.tags import METRICS

    recorded = connect(params, layout).get_model_version(params.model.name, version).tags.get(METRICS)
    if not recorded:
        raise ReproduceError(f"{params.model.name} v{version} carries no metrics ({METRICS}) to compare with")
    return json.loads(recorded)


def _pull_inputs(copy: Layout, workspace: Layout, commit: str) -> None:
    """``dvc pull`` the collected data and the frozen test set into the worktree's own cache."""
    for path in INPUTS:
        targets = _pull_targets(copy, path)
        if targets:
            # One input a call: given data/raw's `.dvc` files and a stage's output (data/splits)
            # in one `dvc pull`, DVC 3.67 fetched the output and data/raw/index.json but none of
            # the batch folders, and still exited 0.
            _pull(copy, workspace, commit, targets)


def _pull(copy: Layout, workspace: Layout, commit: str, targets: list[str]) -> None:
    done = dvc(copy, "pull", *targets, check=False)
    if done.returncode == 0:
        return
    output = (done.stdout + done.stderr).strip()
    missing = sorted(set(re.findall(r"failed to transfer '([0-9a-f]{32})'", output)))
    remote = dvc(copy, "remote", "list", check=False).stdout.strip()
    if missing:
        names = _object_paths(missing, [copy.root, workspace.root])
        listed = "\n".join(f"  - {names.get(md5, '(path unknown)')} (md5 {md5})" for md5 in missing)
        raise ReproduceError(
            f"the DVC remote lacks {len(missing)} object(s) needed to reproduce commit {commit[:12]}:\n{listed}\n"
            f"remote: {remote}\nPush them from a workspace that still has them (`dvc push`), or restore the remote.")
    raise ReproduceError(f"`dvc pull` failed for commit {commit[:12]} (remote: {remote}):\n{output[-2000:]}")


def _pull_targets(copy: Layout, path: str) -> list[str]:
    """What to name to ``dvc pull`` for ``path`` at the checked-out commit: the path itself when a
    ``.dvc`` file or the lock file records it whole; the ``.dvc`` files below it when it is
    recorded in parts (data/raw, batch by batch); nothing when it is not recorded."""
    if (copy.root / f"{path}.dvc").is_file():
        return [path]
    lock = copy.root / "dvc.lock"
    if lock.is_file() and f"path: {path}\n" in lock.read_text():
        return [path]
    folder = copy.root / path
    return sorted(record.relative_to(copy.root).as_posix() for record in folder.rglob("*.dvc")) if folder.is_dir() else []


def _object_paths(md5s: list[str], roots: list[Path]) -> dict[str, str]:
    """Where each object sits in the data, from the directory manifests (``.dir``) in the caches."""
    wanted, found = set(md5s), {}
    for root in roots:
        for manifest in (root / ".dvc" / "cache" / "files" / "md5").glob("*/*.dir"):
            try:
                entries = json.loads(manifest.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            for entry in entries:
                if entry.get("md5") in wanted:
                    found.setdefault(entry["md5"], entry.get("relpath", "?"))
    return found


def _used_gpu(device: dict[str, str]) -> bool:
    try:
        return int(device.get("gpu_count", "0")) > 0
    except ValueError:
        return False

