"""Where things live in a medloop workspace.

A workspace is a git repository with DVC initialised, holding ``params.yaml``, ``dvc.yaml``, the
stage code (``pipelines/``), the ``.dvc`` files of collected data and ``dvc.lock``. Every stage
and task takes a `Layout` and never builds paths by hand.
"""

from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pipelines.errors import MedloopError, WorkspaceError
from pipelines.values import now_iso


@dataclass(frozen=True)
class Layout:
    """Paths of one workspace, all under ``root``."""

    root: Path

    @classmethod
    def at(cls, root: str | Path = ".") -> "Layout":
        return cls(Path(root).resolve())

    # data/raw: append-only, one folder per collect batch, tracked with `dvc add`
    @property
    def raw(self) -> Path:
        return self.root / "data" / "raw"

    @property
    def batches(self) -> Path:
        return self.raw / "batches"

    @property
    def raw_record(self) -> Path:
        """DVC's record of ``data/raw/index.json``, which pins every batch: its hash is the
        archive's version. Each batch has its own record beside its folder (`batch_record`)."""
        return self.raw / "index.json.dvc"

    def batch_record(self, batch_id: str) -> Path:
        return self.batches / f"{batch_id}.dvc"

    @property
    def raw_folder_record(self) -> Path:
        """``data/raw.dvc``: how workspaces collected before per-batch records recorded data/raw
        (one folder, hashed whole by every ``dvc add``); collect moves them over."""
        return self.root / "data" / "raw.dvc"

    @property
    def feedback(self) -> Path:
        return self.root / "data" / "feedback"

    # DVC stage outputs
    @property
    def clean(self) -> Path:
        return self.root / "data" / "clean"

    @property
    def clean_records(self) -> Path:
        return self.clean / "records.parquet"

    @property
    def clean_intake(self) -> Path:
        return self.clean / "intake.parquet"

    @property
    def splits(self) -> Path:
        """Patient splits and the frozen test set: kept between runs (DVC ``persist``)."""
        return self.root / "data" / "splits"

    @property
    def processed(self) -> Path:
        return self.root / "data" / "processed"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def quarantine_csv(self) -> Path:
        return self.reports / "quarantine.csv"

    @property
    def validation_json(self) -> Path:
        return self.reports / "validation.json"

    @property
    def data_docs(self) -> Path:
        return self.reports / "data_docs"

    # the model and its evaluation (train and evaluate stage outputs)
    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def model_file(self) -> Path:
        return self.models / "model.keras"

    @property
    def train_json(self) -> Path:
        return self.models / "train.json"

    @property
    def metrics_json(self) -> Path:
        return self.reports / "metrics.json"

    @property
    def plots(self) -> Path:
        return self.reports / "plots"

    @property
    def model_card(self) -> Path:
        return self.reports / "model_card.md"

    # medloop's own scratch space: never tracked, never under data/
    @property
    def state(self) -> Path:
        return self.root / ".medloop"

    @property
    def tmp(self) -> Path:
        return self.state / "tmp"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def params_file(self) -> Path:
        return self.root / "params.yaml"

    def require(self) -> "Layout":
        """Check that this is an initialised workspace (DVC and params present)."""
        if not (self.root / ".dvc").is_dir():
            raise WorkspaceError(
                f"{self.root} is not a medloop workspace (no .dvc folder); "
                f"create one with `medloop init {self.root}`"
            )
        if not self.params_file.is_file():
            raise WorkspaceError(f"{self.params_file} is missing")
        return self


def read_json(path: Path, hint: str, error: type[MedloopError] = MedloopError) -> dict:
    """A JSON file one stage wrote for another; missing or broken, it is an error naming it.

    Args:
        path: the file.
        hint: what to do about it, e.g. "run the train stage first".
        error: the MedloopError subclass to raise.
    """
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise error(f"{path} is missing; {hint}") from None
    except json.JSONDecodeError as exc:
        raise error(f"{path} is not valid JSON ({exc}); {hint}") from None


def database_url(layout: Layout, url: str) -> str:
    """A database URL with a relative SQLite path (``sqlite:///.medloop/x.db``) made absolute
    inside the workspace, its folder created; any other URL unchanged."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/"):
        path = layout.root / url[len(prefix):]
        path.parent.mkdir(parents=True, exist_ok=True)
        return prefix + str(path)
    return url


class WorkspaceBusy(WorkspaceError):
    """Another run holds the workspace (git, DVC and the registry are changed by one run at a time)."""


@contextmanager
def exclusive(layout: Layout, purpose: str = "retrain") -> Iterator[Path]:
    """Hold the workspace's lock for one run; refuse at once when another run holds it.

    The lock is an ``flock`` on ``.medloop/<purpose>.lock``: the operating system releases it
    when the holder exits, so a crashed run never leaves the workspace locked.

    Raises:
        WorkspaceBusy: another process holds it; the message says which and since when.
    """
    layout.state.mkdir(parents=True, exist_ok=True)
    path = layout.state / f"{purpose}.lock"
    handle = open(path, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise WorkspaceBusy(
                f"{layout.root}: a {purpose} run is already in progress ({holder}); this one did "
                f"nothing. It runs one at a time per workspace ({path})."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} since {now_iso()}\n")
        handle.flush()
        yield path
    finally:
        handle.close()  # closing the descriptor releases the flock
