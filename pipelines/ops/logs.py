"""Logging for stage processes: to stderr and to ``logs/medloop.log`` in the workspace.

The log file is the stages' audit trail of what ran when. It never holds identifiers: collect
logs counts and pseudonymous references only.
"""

from __future__ import annotations

import logging
import sys

from pipelines.workspace import Layout

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(layout: Layout | None = None, level: int = logging.INFO) -> None:
    """Send medloop's loggers to stderr (and the workspace log file when given); quiet the rest."""
    root = logging.getLogger("medloop")
    root.setLevel(level)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(stream)
    if layout is not None:
        layout.logs.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(layout.logs / "medloop.log")
        file_handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(file_handler)
    root.propagate = False
    # Libraries that talk too much at INFO (Great Expectations, DVC, TensorFlow).
    for name in ("great_expectations", "dvc", "tensorflow", "absl", "h5py"):
        logging.getLogger(name).setLevel(logging.WARNING)
