"""The micro-batcher on its own (serving.batching): which requests end up in one model call, and
what each request gets back. The "model" here is a plain function that records its calls and
answers each input with a value computed from it, so every request can check its own result."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from serving.batching import MicroBatcher


class Version:
    """Stands for a served model version: batches are grouped by identity."""

    def __init__(self, name: str):
        self.name = name


class RecordingModel:
    """Scores a batch: for each request, ``(version, [x * 10 for x in inputs])``; refuses a
    negative input (the whole call fails, as a model call on a bad array would)."""

    def __init__(self, delay: float = 0.0):
        self.calls: list[tuple[str, list[list[int]]]] = []
        self.delay = delay
        self.lock = threading.Lock()

    def __call__(self, served, model_inputs):
        with self.lock:
            self.calls.append((served.name, [list(inputs) for inputs in model_inputs]))
        time.sleep(self.delay)
        if any(x < 0 for inputs in model_inputs for x in inputs):
            raise ValueError("negative input")
        return [(served.name, [x * 10 for x in inputs]) for inputs in model_inputs]


async def request(batcher: MicroBatcher, served, inputs: list[int], preparing_for: float = 0.0):
    """One request: 'prepares' for a while (counted as on its way), then joins a batch."""
    with batcher.preparing():
        await asyncio.sleep(preparing_for)
    return await batcher.score(served, inputs, len(inputs))


def test_concurrent_requests_share_model_calls_and_get_their_own_results():
    model = RecordingModel(delay=0.02)
    v1 = Version("v1")

    async def scenario():
        batcher = MicroBatcher(model, max_size=8, max_wait=0.05)
        results = await asyncio.gather(*(request(batcher, v1, [n, n + 1], preparing_for=0.001 * (n % 3))
                                         for n in range(40)))
        await batcher.close()
        return results

    results = asyncio.run(scenario())
    assert results == [("v1", [n * 10, (n + 1) * 10]) for n in range(40)]
    sizes = [sum(len(inputs) for inputs in batch) for _, batch in model.calls]
    assert sum(sizes) == 80 and max(sizes) <= 8
    assert len(model.calls) < 40  # requests were coalesced, not scored one by one
    scored = sorted(tuple(inputs) for _, batch in model.calls for inputs in batch)
    assert scored == sorted((n, n + 1) for n in range(40))  # each exactly once


def test_a_batch_never_mixes_two_versions_and_none_is_dropped():
    model = RecordingModel(delay=0.01)
    old, new = Version("v1"), Version("v2")

    async def scenario():
        batcher = MicroBatcher(model, max_size=16, max_wait=0.05)
        # As after a reload: requests that took v1 and requests that took v2 arrive interleaved.
        results = await asyncio.gather(*(request(batcher, old if n % 2 else new, [n]) for n in range(30)))
        await batcher.close()
        return results

    results = asyncio.run(scenario())
    assert results == [("v1" if n % 2 else "v2", [n * 10]) for n in range(30)]
    for version, batch in model.calls:
        assert all((inputs[0] % 2 == 1) == (version == "v1") for inputs in batch), (version, batch)
    assert sorted(inputs[0] for _, batch in model.calls for inputs in batch) == list(range(30))


def test_a_bad_input_fails_only_its_own_request():
    model = RecordingModel()
    v1 = Version("v1")

    async def scenario():
        batcher = MicroBatcher(model, max_size=32, max_wait=0.05)
        results = await asyncio.gather(*(request(batcher, v1, [-1] if n == 3 else [n]) for n in range(10)),
                                       return_exceptions=True)
        await batcher.close()
        return results

    results = asyncio.run(scenario())
    assert isinstance(results[3], ValueError) and "negative" in str(results[3])
    assert [r for n, r in enumerate(results) if n != 3] == [("v1", [n * 10]) for n in range(10) if n != 3]


def test_a_lone_request_does_not_wait_for_company():
    model = RecordingModel()
    v1 = Version("v1")

    async def scenario():
        batcher = MicroBatcher(model, max_size=32, max_wait=2.0)
        started = time.perf_counter()
        result = await request(batcher, v1, [7])
        elapsed = time.perf_counter() - started
        await batcher.close()
        return result, elapsed

    result, elapsed = asyncio.run(scenario())
    assert result == ("v1", [70])
    assert elapsed < 1.0  # nobody else was on the way: not held for max_wait (2 s)


def test_batches_respect_max_size_and_a_large_request_is_scored_alone():
    model = RecordingModel(delay=0.01)
    v1 = Version("v1")

    async def scenario():
        batcher = MicroBatcher(model, max_size=4, max_wait=0.05)
        results = await asyncio.gather(request(batcher, v1, list(range(100, 110))),
                                       *(request(batcher, v1, [n]) for n in range(12)))
        await batcher.close()
        return results

    results = asyncio.run(scenario())
    assert results[0] == ("v1", [x * 10 for x in range(100, 110)])
    assert results[1:] == [("v1", [n * 10]) for n in range(12)]
    for _, batch in model.calls:
        sizes = [len(inputs) for inputs in batch]
        assert sum(sizes) <= 4 or sizes == [10]


def test_a_cancelled_request_does_not_stop_the_others():
    model = RecordingModel(delay=0.05)
    v1 = Version("v1")

    async def scenario():
        batcher = MicroBatcher(model, max_size=8, max_wait=0.01)
        tasks = [asyncio.create_task(request(batcher, v1, [n])) for n in range(6)]
        await asyncio.sleep(0)
        tasks[2].cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        after = await request(batcher, v1, [99])  # the worker is still alive
        await batcher.close()
        return results, after

    results, after = asyncio.run(scenario())
    assert isinstance(results[2], asyncio.CancelledError)
    assert [r for n, r in enumerate(results) if n != 2] == [("v1", [n * 10]) for n in range(6) if n != 2]
    assert after == ("v1", [990])


@pytest.mark.parametrize("max_size", [1, 2])
def test_small_batches_still_answer_everyone(max_size):
    model = RecordingModel()
    v1 = Version("v1")

    async def scenario():
        batcher = MicroBatcher(model, max_size=max_size, max_wait=0.01)
        results = await asyncio.gather(*(request(batcher, v1, [n]) for n in range(9)))
        await batcher.close()
        return results

    assert asyncio.run(scenario()) == [("v1", [n * 10]) for n in range(9)]
    assert all(sum(len(i) for i in batch) <= max_size for _, batch in model.calls)
