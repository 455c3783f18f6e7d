"""Micro-batching: /predict requests that arrive together are scored by one model call.

Each request parses, de-identifies and prepares its own inputs (so a bad image fails only its own
request), then hands them to `MicroBatcher.score` together with the `serving.model.Served`
version it took when it arrived. One worker task takes what is waiting for the version at the
head of the queue, up to ``max_size`` inputs, runs the model once in a thread, and hands each
request its own rows back:

- A batch never mixes two versions. After a reload, requests that took the old version are
  still scored by it (in their own batch), and none is dropped.
- The first request of a batch waits at most ``max_wait`` seconds for others to join, and only
  while other requests are still being prepared (`MicroBatcher.preparing`): a request that
  arrives alone is scored at once. While the model runs, new requests gather for the next
  batch, so under load batches fill without waiting.
- A request with more than ``max_size`` inputs is scored as a batch of its own.
- When a batch fails as a whole, each of its requests is scored on its own, so that only the
  request at fault fails (with its own error).

Everything here runs on the service's event loop except the model call.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator

log = logging.getLogger("medloop.serving")


@dataclass
class _Job:
    served: Any
    model_input: Any
    size: int
    future: asyncio.Future


class MicroBatcher:
    """Coalesces concurrent requests into one model call per batch (see the module docstring).

    Args:
        score: ``score(served, [model input of each request]) -> [result of each request]``,
            called in a worker thread with the requests of one served version only.
        max_size: most inputs in one batch.
        max_wait: seconds the first request of a batch may wait for others.
        on_batch: called with the number of inputs of each model call (metrics).
    """

    def __init__(self, score: Callable[[Any, list[Any]], list[Any]], max_size: int, max_wait: float,
                 on_batch: Callable[[int], None] | None = None):
        self.max_size = max_size
        self.max_wait = max_wait
        self._score = score
        self._on_batch = on_batch
        self._waiting: collections.deque[_Job] = collections.deque()
        self._preparing = 0
        self._wake = asyncio.Event()
        self._worker: asyncio.Task | None = None

    @contextlib.contextmanager
    def preparing(self) -> Iterator[None]:
        """Marks a request that will join a batch once its inputs are prepared, so that a batch
        waits for it (and only for such requests)."""
        self._preparing += 1
        try:
            yield
        finally:
            self._preparing -= 1
            self._wake.set()

    async def score(self, served: Any, model_input: Any, size: int) -> Any:
        """This request's result, from a batch of requests for the same ``served`` version.

        Raises:
            Exception: whatever scoring this request on its own raised.
        """
        job = _Job(served, model_input, size, asyncio.get_running_loop().create_future())
        self._waiting.append(job)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work(), name="medloop-micro-batcher")
        self._wake.set()
        return await job.future

    async def close(self) -> None:
        """Stop the worker; requests still waiting fail."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        while self._waiting:
            job = self._waiting.popleft()
            if not job.future.done():
                job.future.set_exception(RuntimeError("the service is shutting down"))

    # ---------------------------------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            while not self._waiting:
                await self._sleep(None)
            batch = await self._gather()
            try:
                await self._run(batch)
            except Exception as exc:  # noqa: BLE001 - the worker must outlive any one batch
                log.exception("micro-batch of %d requests failed", len(batch))
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)

    async def _gather(self) -> list[_Job]:
        """Wait (within ``max_wait``) for the head version's batch to fill, then take it."""
        loop = asyncio.get_running_loop()
        served = self._waiting[0].served
        deadline = loop.time() + self.max_wait
        while self._preparing > 0 and self._queued(served) < self.max_size:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            await self._sleep(remaining)
        batch, kept, size = [], collections.deque(), 0
        for job in self._waiting:
            if job.served is served and (not batch or size + job.size <= self.max_size):
                batch.append(job)
                size += job.size
            else:
                kept.append(job)
        self._waiting = kept
        return batch

    async def _run(self, batch: list[_Job]) -> None:
        jobs = [job for job in batch if not job.future.done()]  # a request may have been cancelled
        if not jobs:
            return
        served = jobs[0].served
        if self._on_batch is not None:
            self._on_batch(sum(job.size for job in jobs))
        try:
            results = await asyncio.to_thread(self._score, served, [job.model_input for job in jobs])
        except Exception:  # noqa: BLE001 - find the request at fault: score each on its own
            if len(jobs) == 1:
                raise
            log.warning("a micro-batch of %d requests failed; scoring them one by one", len(jobs))
            for job in jobs:
                try:
                    [result] = await asyncio.to_thread(self._score, served, [job.model_input])
                except Exception as exc:  # noqa: BLE001 - it goes to its own request
                    _settle(job, exception=exc)
                else:
                    _settle(job, result=result)
            return
        for job, result in zip(jobs, results):
            _settle(job, result=result)

    def _queued(self, served: Any) -> int:
        return sum(job.size for job in self._waiting if job.served is served)

    async def _sleep(self, timeout: float | None) -> None:
        """Until a request arrives or finishes preparing, or ``timeout`` seconds pass."""
        self._wake.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)


def _settle(job: _Job, *, result: Any = None, exception: BaseException | None = None) -> None:
    if job.future.done():
        return
    if exception is not None:
        job.future.set_exception(exception)
    else:
        job.future.set_result(result)
