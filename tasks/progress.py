"""Progress events of a retrain run, for a live display (``medloop run``).

Tasks report ``step`` started / finished / skipped / failed, and for training each epoch
(read from the stage's own ``epoch k/n`` log lines). Whoever wants them subscribes a callback; with
no subscriber (a worker running a scheduled run) an event costs one empty loop. The callbacks run
in the task's thread and must be quick.
"""

from __future__ import annotations

import re
import threading
from typing import Any, Callable

Listener = Callable[[dict[str, Any]], None]

_listeners: list[Listener] = []
_lock = threading.Lock()
EPOCH_LINE = re.compile(r"\bepoch (\d+)/(\d+): ")


def subscribe(listener: Listener) -> None:
    with _lock:
        _listeners.append(listener)


def unsubscribe(listener: Listener) -> None:
    with _lock:
        if listener in _listeners:
            _listeners.remove(listener)


def emit(step: str, status: str, **details: Any) -> None:
    """Tell the subscribers; ``status`` is running | done | skipped | failed | progress."""
    with _lock:
        listeners = list(_listeners)
    for listener in listeners:
        listener({"step": step, "status": status, **details})


def stage_line(step: str) -> Callable[[str], None]:
    """A line callback for `pipelines.ops.versioning.repro`: turns ``epoch k/n`` lines into progress."""

    def on_line(line: str) -> None:
        match = EPOCH_LINE.search(line)
        if match:
            emit(step, "progress", completed=int(match.group(1)), total=int(match.group(2)))

    return on_line
