"""The command-line wrapper every DVC stage module shares (``python -m pipelines.<stage>``)."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, TypeVar

from pipelines.config import DEFAULT_PARAMS_FILE, Params, load_params
from pipelines.errors import MedloopError
from pipelines.ops.logs import setup_logging
from pipelines.workspace import Layout

Result = TypeVar("Result")


def stage_main(
    name: str,
    run: Callable[[Params, Layout], Result],
    describe: Callable[[Result], str],
    argv: list[str] | None = None,
) -> int:
    """Run one stage in the current folder (the workspace root) and report it.

    A `MedloopError` (bad params, bad data, a failed gate) is printed as one paragraph on stderr
    and gives exit status 1, which makes DVC stop the chain; nothing prints a traceback.
    """
    parser = argparse.ArgumentParser(prog=f"python -m pipelines.{name}", description=f"The {name} stage.")
    parser.add_argument("--params", default=DEFAULT_PARAMS_FILE, help="the params file")
    args = parser.parse_args(argv)
    layout = Layout.at(".")
    setup_logging(layout)
    try:
        result = run(load_params(args.params), layout)
    except MedloopError as exc:
        print(f"{name} failed: {exc}", file=sys.stderr)
        return 1
    print(describe(result))
    return 0
