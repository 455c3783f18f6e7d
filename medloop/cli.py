"""The ``medloop`` command line.

Commands only parse arguments and call into ``pipelines`` and ``flows``; heavy imports happen
inside the commands so that ``medloop --help`` answers at once.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    name="medloop",
    help="Continuous training for medical diagnosis models: collect, clean, validate, preprocess "
    "(and, as the loop grows, train, evaluate, promote, deploy, feedback).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

_state = {"debug": False}

WorkspaceOption = typer.Option(Path("."), "--workspace", "-w", help="The workspace folder.")


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors.")) -> None:
    _state["debug"] = debug


@app.command()
def init(
    folder: Path = typer.Argument(Path("."), help="Where to create the workspace."),
    params: Optional[Path] = typer.Option(None, "--params", help="Profile to use as params.yaml."),
) -> None:
    """Create a workspace (git + DVC, params.yaml, dvc.yaml, stage code, DVC remote)."""
    from pipelines.scaffold import create_workspace

    layout = create_workspace(folder, params)
    _console().print(f"[green]workspace ready[/] at {layout.root}")


@app.command()
def collect(
    workspace: Path = WorkspaceOption,
    night: Optional[int] = typer.Option(None, help="Built-in sources: release this night."),
) -> None:
    """Collect new items from the configured source into data/raw (de-identified, dvc add)."""
    from pipelines import collect as collect_stage
    from pipelines.config import load_params
    from pipelines.logs import setup_logging
    from pipelines.workspace import Layout

    layout = Layout.at(workspace).require()
    setup_logging(layout)
    result = collect_stage.run(load_params(layout.params_file), layout, night=night)
    _console().print(result.as_dict())


@app.command()
def repro(
    stage: str = typer.Argument("preprocess", help="Stage to bring up to date (with its upstream)."),
    workspace: Path = WorkspaceOption,
) -> None:
    """Run `dvc repro` for a data stage in the workspace."""
    from pipelines.versioning import repro as dvc_repro
    from pipelines.workspace import Layout

    ran = dvc_repro(Layout.at(workspace).require(), stage)
    _console().print(f"{stage}: {'reproduced' if ran else 'up to date'}")


@app.command()
def refresh(workspace: Path = WorkspaceOption, night: Optional[int] = typer.Option(None)) -> None:
    """Run the data-refresh flow once (collect -> clean -> validate -> preprocess -> commit)."""
    _quiet_prefect()
    from flows.data_refresh import data_refresh

    outcome = data_refresh(str(Path(workspace).resolve()), night)
    _console().print(outcome)


@app.command()
def promote(
    workspace: Path = WorkspaceOption,
    run: Optional[str] = typer.Option(None, "--run", help="Override: register and promote this refused run."),
    reason: Optional[str] = typer.Option(None, "--reason", help="Why (required with --run); recorded."),
) -> None:
    """Gate the evaluated model and register it as champion if it passes (or override with --run)."""
    from pipelines import promote as promotion
    from pipelines.config import load_params
    from pipelines.errors import MedloopError
    from pipelines.workspace import Layout

    layout = Layout.at(workspace).require()
    params = load_params(layout.params_file)
    if run:
        if not reason:
            raise MedloopError("--reason is required with --run: an override is recorded with who and why")
        result = promotion.override(params, layout, run, reason, actor=None)
    else:
        if reason:
            raise MedloopError("--reason goes with --run (a human override); a gated promotion records its gates")
        from pipelines.evaluate import rescore_registered

        result = promotion.run(
            params, layout, actor=promotion.default_actor(), require_promotion=True,
            rescore=lambda uri: rescore_registered(params, layout, uri),
        )
    _console().print(result.describe())


@app.command()
def rollback(
    workspace: Path = WorkspaceOption,
    reason: str = typer.Option("", "--reason", help="Why; recorded in the promotion history."),
) -> None:
    """Make the previous champion the champion again (recorded)."""
    from pipelines import promote as promotion
    from pipelines.config import load_params
    from pipelines.workspace import Layout

    layout = Layout.at(workspace).require()
    result = promotion.rollback(load_params(layout.params_file), layout, reason=reason)
    _console().print(result.describe())


@app.command()
def demo(
    workspace: Path = typer.Option(Path("workspace/demo"), "--workspace", "-w"),
    params: Optional[Path] = typer.Option(None, "--params", help="Profile (default: params.yaml)."),
    nights: int = typer.Option(3, help="How many nights to simulate."),
) -> None:
    """Create a workspace and run the data-refresh flow for several simulated nights."""
    _quiet_prefect()
    os.environ.setdefault("MEDLOOP_DEID_SALT", "demo-salt-not-a-secret-0123456789")
    from flows.data_refresh import data_refresh
    from pipelines.scaffold import create_workspace

    console = _console()
    layout = create_workspace(workspace, params)
    for night in range(1, nights + 1):
        console.rule(f"night {night}")
        outcome = data_refresh(str(layout.root))
        collected = outcome["collect"]
        console.print(
            f"collected {collected['stored']} new, {collected['rejected']} rejected, "
            f"{collected['duplicates']} duplicates; stages run: "
            f"{[s for s, ran in outcome['stages'].items() if ran]}; commit {outcome['commit']}"
        )
    _summary(layout)


def _summary(layout) -> None:
    import json

    console = _console()
    summary = json.loads((layout.processed / "preprocess.json").read_text())
    console.rule("where to look")
    console.print(f"workspace:        {layout.root}")
    console.print(f"split counts:     {summary['counts']}")
    console.print(f"frozen test set:  {summary['frozen_test_set']['items']} items")
    console.print(f"quarantine list:  {layout.quarantine_csv}")
    console.print(f"data quality:     {layout.data_docs / 'index.html'}")
    console.print(f"data versions:    git -C {layout.root} log --oneline")


def _quiet_prefect() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def _console():
    from rich.console import Console

    return Console()


def main() -> None:
    """Entry point: run the app, turning medloop's own errors into one clear paragraph."""
    from pipelines.errors import MedloopError

    try:
        app(standalone_mode=False)
    except MedloopError as exc:
        if _state["debug"]:
            raise
        from rich.console import Console

        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(1)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - click usage errors and the unexpected
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if _state["debug"]:
            raise
        Console = __import__("rich.console", fromlist=["Console"]).Console
        Console(stderr=True).print(
            f"[bold red]unexpected error:[/] {type(exc).__name__}: {exc}\n(run with --debug for the traceback)",
            highlight=False,
        )
        sys.exit(2)


if __name__ == "__main__":
    main()
