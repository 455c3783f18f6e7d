"""How long a retried task waits before each retry.

Production waits minutes (a tracking server or an S3 store that restarts needs them). A test
that stops a server on purpose, or an operator re-running a night by hand, sets
``MEDLOOP_RETRY_DELAYS`` (comma-separated seconds, e.g. ``1`` or ``1,2,5``) instead: it is read
when a retry is due, not when the task is defined, so nothing is read at import time and the same
task definitions serve both. The number of retries stays each task's own.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

RETRY_DELAYS_ENV = "MEDLOOP_RETRY_DELAYS"


class RetryDelays(list):
    """The delays, in seconds, of a task's retries: ``seconds`` unless ``MEDLOOP_RETRY_DELAYS``
    is set when Prefect looks them up (it indexes the list at each retry; the last delay repeats).

    Raises (when looked up):
        ValueError: ``MEDLOOP_RETRY_DELAYS`` is not a list of non-negative numbers.
    """

    def current(self) -> list[float]:
        raw = os.environ.get(RETRY_DELAYS_ENV, "").strip()
        return parse_delays(raw) if raw else list(super().__iter__())

    def __getitem__(self, index):  # type: ignore[override]
        return self.current()[index]

    def __len__(self) -> int:
        return len(self.current())

    def __iter__(self) -> Iterator[float]:
        return iter(self.current())


def parse_delays(raw: str) -> list[float]:
    """``"1,2.5"`` -> ``[1.0, 2.5]``.

    Raises:
        ValueError: an item is not a non-negative number (the message names the variable).
    """
    try:
        delays = [float(item) for item in raw.split(",")]
    except ValueError:
        delays = []
    if not delays or any(delay < 0 for delay in delays):
        raise ValueError(f"{RETRY_DELAYS_ENV}={raw!r} is not a comma-separated list of seconds (e.g. 1,2,5)")
    return delays


def retry_policy(retries: int, *seconds: float) -> dict:
    """``@task`` options: ``retries`` retries after ``seconds`` (see `RetryDelays`)."""
    return {"retries": retries, "retry_delay_seconds": RetryDelays(seconds)}
