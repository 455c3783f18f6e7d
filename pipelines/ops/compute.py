"""Where a data stage's per-item work runs: this process, its cores, or a Dask cluster.

Collect (de-identify, hash), clean (decode, check, convert) and preprocess (resize, normalise)
do the same pure work on every item, so the work can run anywhere and be gathered back in the items' order; what is written,
and in which order, stays with the stage, so the outputs are byte-identical whichever ran
(``compute`` is not a DVC param for that reason: changing it reruns nothing).

``compute`` in params.yaml:

- ``workers: 1`` and no ``scheduler`` (the default): this process, with a pool of its cores for
  batches of ``PARALLEL_FROM`` items or more in clean and preprocess (below that a pool costs
  more than it saves; collect stays in this process).
- ``workers: N`` (N > 1): a Dask ``LocalCluster`` of N worker processes, one thread each, made
  for the stage and closed after it.
- ``scheduler: tls://host:8786``: the Dask cluster behind that scheduler (its workers need
  medloop installed and the workspace's files at the same paths, e.g. a shared volume).

A worker that dies is replaced and its items run again (Dask retries a task
``distributed.scheduler.allowed-failures`` times, 3 by default); an item that kills every worker
it lands on fails the stage with `ComputeError` before anything is published.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

from pipelines.errors import MedloopError

log = logging.getLogger("medloop.compute")

PARALLEL_FROM = 200  # below this many items a local process pool costs more than it saves

Job = TypeVar("Job")
Outcome = TypeVar("Outcome")


class ComputeError(MedloopError):
    """The per-item work could not be done on the cluster (workers lost, scheduler gone)."""


class ItemMap:
    """``map(function, jobs)``: the outcomes in the jobs' order, on the chosen engine."""

    def __init__(self, description: str, client: Any = None, pool: Any = None):
        self.description = description
        self._client = client
        self._pool = pool

    def map(self, function: Callable[[Job], Outcome], jobs: Sequence[Job], *, chunksize: int = 16) -> list[Outcome]:
        if self._client is not None:
            return _dask_map(self._client, function, list(jobs), self.description, chunksize)
        if self._pool is not None and len(jobs) >= PARALLEL_FROM:
            return list(self._pool.map(function, jobs, chunksize=chunksize))
        return [function(job) for job in jobs]


@contextmanager
def staged_directory(final: Path) -> Iterator[Path]:
    """A folder to write a stage's output into, put in ``final``'s place only when the block
    ends without an error: a stage that fails half-way (a lost worker, a full disk) leaves the
    previous output as it was, never a half-written one."""
    staging = final.with_name(f".{final.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)


class KeptFiles:
    """The files a stage's last run wrote into its output (a persistent DVC output), by name, each
    with its inode, modification time and size, kept in ``path`` outside the output (beside the
    stage's item cache). A file of last night's output is linked into the new one only while it
    is still the very file that run wrote: one changed in place, cut short, or put back by
    ``dvc checkout`` is written again. A linked file keeps its inode and times, so DVC need not
    hash it again."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.last = json.loads(path.read_text())
        except (OSError, ValueError):
            self.last = {}
        self.now: dict[str, list[int] | None] = {}

    def keep(self, previous: Path, target: Path, name: str) -> bool:
        """Hard-link ``previous`` (last run's file ``name``) to ``target`` if it is unchanged;
        False where it is not (or cannot be linked: no hard links here), and the stage writes it."""
        if not isinstance(self.last, dict) or self.last.get(name) is None or file_signature(previous) != self.last[name]:
            return False
        try:
            os.link(previous, target)
        except OSError:
            return False
        return True

    def note(self, name: str, written: Path) -> None:
        """Remember the file this run put in its output under ``name``."""
        self.now[name] = file_signature(written)

    def save(self) -> None:
        temporary = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(self.now, sort_keys=True))
        temporary.replace(self.path)


def file_signature(path: Path) -> list[int] | None:
    """A file's inode, modification time (ns) and size, or None when it is not there."""
    try:
        status = path.stat()
    except OSError:
        return None
    return [status.st_ino, status.st_mtime_ns, status.st_size]


@contextmanager
def item_map(spec: Any, stage: str, *, local_pool: bool = True) -> Iterator[ItemMap]:
    """The engine that ``compute`` asks for, open for one stage.

    Args:
        spec: ``params.compute``.
        stage: the stage's name, for messages.
        local_pool: with ``workers: 1``, use this machine's cores for large batches (False:
            this process only, where a pool was measured to gain little).

    Raises:
        ComputeError: the scheduler cannot be reached, or the cluster cannot start.
    """
    if spec.scheduler or spec.workers > 1:
        with _dask_client(spec, stage) as client:
            yield ItemMap(f"{stage} on {_describe(spec)}", client=client)
        return
    cores = os.cpu_count() or 1
    if cores == 1 or not local_pool:
        yield ItemMap(f"{stage} in this process")
        return
    pool = _LazyPool(cores)
    try:
        yield ItemMap(f"{stage} on {cores} local cores", pool=pool)
    finally:
        pool.shutdown()


class _LazyPool:
    """A process pool started on first use (most nights' batches are below PARALLEL_FROM)."""

    def __init__(self, workers: int):
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None

    def map(self, function, jobs, chunksize=1):
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=self.workers)
        return self._pool.map(function, jobs, chunksize=chunksize)

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


def _describe(spec: Any) -> str:
    return f"the Dask scheduler {spec.scheduler}" if spec.scheduler else f"a local Dask cluster of {spec.workers} processes"


@contextmanager
def _dask_client(spec: Any, stage: str) -> Iterator[Any]:
    import dask
    from distributed import Client, LocalCluster

    if spec.scheduler:
        try:  # Dask's own connect timeout (30 s unless DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT says)
            client = Client(spec.scheduler, timeout=dask.config.get("distributed.comm.timeouts.connect"))
        except (OSError, TimeoutError) as exc:
            raise ComputeError(
                f"{stage}: cannot reach the Dask scheduler {spec.scheduler} named by compute.scheduler "
                f"({exc}); start it, or set compute.scheduler to null to work on this machine"
            ) from None
        with client:
            yield client
        return
    # Processes, one thread each: the work is CPU-bound Python (decoders hold the GIL).
    with LocalCluster(n_workers=spec.workers, threads_per_worker=1, processes=True, dashboard_address=None,
                      host="127.0.0.1") as cluster, Client(cluster) as client:
        yield client


def run_chunk(function: Callable, jobs: list) -> list:
    """One Dask task: several items, so the scheduler's cost per task is shared."""
    return [function(job) for job in jobs]


def _dask_map(client: Any, function: Callable, jobs: list, description: str, chunksize: int) -> list:
    from distributed import KilledWorker

    if not jobs:
        return []
    chunks = [jobs[start:start + chunksize] for start in range(0, len(jobs), chunksize)]
    # pure=False: every chunk is its own task even when two are equal (duplicates are the
    # stage's to judge, not the cache's).
    futures = client.map(run_chunk, [function] * len(chunks), chunks, pure=False)
    try:
        return [outcome for chunk in client.gather(futures) for outcome in chunk]
    except KilledWorker as exc:
        raise ComputeError(
            f"{description}: an item's work killed every worker it ran on ({exc}); nothing was "
            "published. The workers' logs name the cause (often memory: give workers more, or "
            "lower compute.workers); run the stage again"
        ) from None
    finally:
        client.cancel(futures)
