"""The ``medloop`` command line.

Commands only parse arguments and call into ``pipelines`` and ``flows``; heavy imports happen
inside the commands so that ``medloop --help`` answers at once.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    name="medloop",
    help="Continuous training for medical diagnosis models: collect, clean, validate, preprocess, "
    "train, evaluate, promote, deploy, and clinicians' feedback back into the data.",
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
    params: Optional[str] = typer.Option(None, "--params", help="params file, or a shipped profile by name (breast_cancer)."),
) -> None:
    """Create a workspace (git + DVC, params.yaml, dvc.yaml, stage code, DVC remote)."""
    from pipelines.ops.scaffold import create_workspace

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
    from pipelines.ops.logs import setup_logging
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
    from pipelines.ops.versioning import repro as dvc_repro
    from pipelines.workspace import Layout

    ran = dvc_repro(Layout.at(workspace).require(), stage)
    _console().print(f"{stage}: {'reproduced' if ran else 'up to date'}")


@app.command()
def refresh(workspace: Path = WorkspaceOption, night: Optional[int] = typer.Option(None)) -> None:
    """Run the data-refresh flow once (collect -> clean -> validate -> preprocess -> commit)."""
    layout = _layout(workspace, collects=True)
    _quiet_prefect()
    from flows.data_refresh import data_refresh

    with _logs_to_workspace(layout):
        outcome = data_refresh(str(layout.root), night)
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
        from pipelines.registry.client import rescorer

        result = promotion.run(params, layout, actor=promotion.default_actor(), require_promotion=True,
                               rescore=rescorer(params, layout))
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
def run(
    workspace: Path = WorkspaceOption,
    reason: str = typer.Option("started by hand (medloop run)", "--reason",
                               help="What started it; kept in the report and on the MLflow run."),
) -> None:
    """Run the retrain flow once now, with a live view of its steps."""
    summary = _run_retrain(_layout(workspace, collects=True), reason)
    _print_summary(summary)


@app.command()
def policy(
    workspace: Path = WorkspaceOption,
    check_only: bool = typer.Option(False, "--check-only", help="Say what the policy decides; start nothing."),
    as_json: bool = typer.Option(False, "--json", help="The decision as JSON."),
) -> None:
    """Check the retraining policy now and start the retrain deployment if it says so.

    The policy weighs the confirmed labels waiting, the champion's drift and the cooldown. Without
    --check-only it runs the retrain-policy flow, which needs PREFECT_API_URL."""
    _quiet_prefect()
    import json

    from pipelines.monitoring import policy as retrain_policy
    from pipelines.config import load_params

    layout = _layout(workspace)
    if check_only:
        decision = retrain_policy.check(load_params(layout.params_file), layout).as_dict()
    else:
        from flows.deployments import api_url
        from flows.policy import retrain_policy as policy_flow

        api_url()  # the retrain it may start is a run of the deployment on the server
        with _logs_to_workspace(layout):
            decision = policy_flow(str(layout.params_file))
    if as_json:
        typer.echo(json.dumps(decision, indent=2, default=str))
        return
    console = _console()
    console.print(retrain_policy.render_markdown(retrain_policy.PolicyDecision(**decision)), highlight=False)


@app.command()
def status(workspace: Path = WorkspaceOption) -> None:
    """The champion, the last runs, and the next scheduled run."""
    from pipelines.config import load_params
    from pipelines.errors import MedloopError
    from pipelines.ops import runs as recorded_runs
    from pipelines.registry.lineage import LineageError, version_lineage

    from medloop import views

    layout = _layout(workspace)
    params = load_params(layout.params_file)
    console = _console()
    try:
        champion = version_lineage(params, layout)
        metrics = champion.get("metrics") or {}
        console.print(
            f"champion: [bold]{champion['model']} v{champion['version']}[/] "
            f"(AUROC {metrics.get('auroc', '-')}, sensitivity {metrics.get('sensitivity', '-')}, "
            f"specificity {metrics.get('specificity', '-')}); promoted by "
            f"{champion['promotion']['actor']} at {champion['promotion']['at']}; commit "
            f"{(champion.get('commit') or '-')[:12]}", highlight=False)
    except LineageError as exc:
        console.print(f"champion: none ({exc})", highlight=False)
    runs = recorded_runs.recent(params, layout, 5)
    if runs:
        console.print(views.runs_table(runs))
    else:
        console.print("last runs: none yet (`medloop run`)")
    from flows.deployments import next_scheduled_run

    if not os.environ.get("PREFECT_API_URL"):
        console.print("next scheduled run: unknown - PREFECT_API_URL is not set (see `medloop schedule`)")
        return
    try:
        due = next_scheduled_run(params)
        console.print(f"next scheduled run: {due.isoformat() if due else 'none planned yet'} "
                      f"({params.schedule.cron} {params.schedule.timezone})", highlight=False)
    except MedloopError as exc:
        console.print(f"next scheduled run: unknown - {exc}", highlight=False)


@app.command()
def schedule(workspace: Path = WorkspaceOption) -> None:
    """Create the work pool and the nightly deployment on the Prefect server (PREFECT_API_URL)."""
    _quiet_prefect()
    from flows.deployments import apply_schedule
    from pipelines.config import load_params

    layout = _layout(workspace)
    applied = apply_schedule(load_params(layout.params_file), layout)
    console = _console()
    console.print(f"[green]scheduled[/] {applied['deployment']} on work pool {applied['work_pool']}: "
                  f"cron '{applied['cron']}' ({applied['timezone']}); next run "
                  f"{applied['next_run'] or 'planned by the server within a minute (see `medloop status`)'}",
                  highlight=False)
    console.print(f"[green]scheduled[/] {applied['policy_deployment']}: the retraining policy is checked on cron "
                  f"'{applied['policy_cron']}' ({applied['timezone']})", highlight=False)
    console.print(f"start a worker with: medloop worker -w {layout.root}", highlight=False)


@app.command()
def worker(workspace: Path = WorkspaceOption) -> None:
    """Start a Prefect worker for the workspace's work pool (runs the scheduled retrains)."""
    import subprocess

    _quiet_prefect()
    from flows.deployments import api_url, worker_command
    from pipelines.config import load_params
    from pipelines.ops.versioning import tool_env

    layout = _layout(workspace)
    api_url()
    command = worker_command(load_params(layout.params_file))
    _console().print(f"worker for pool {command[command.index('--pool') + 1]} (Ctrl-C stops it)", highlight=False)
    try:
        raise typer.Exit(subprocess.call(command, env=tool_env()))
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


@app.command()
def ui(
    workspace: Path = WorkspaceOption,
    mlflow_port: int = typer.Option(5000, help="Port of the MLflow UI."),
    prefect_port: int = typer.Option(4200, help="Port of the Prefect server and UI."),
    prefect: bool = typer.Option(True, help="Also start a Prefect server (off: MLflow only)."),
) -> None:
    """Start the MLflow UI (and a Prefect server with its UI) on 127.0.0.1; Ctrl-C stops them."""
    from medloop.servers import serve_uis

    serve_uis(_layout(workspace), mlflow_port, prefect_port if prefect else None, _console())


@app.command()
def doctor(
    workspace: Path = WorkspaceOption,
    as_json: bool = typer.Option(False, "--json", help="The checks as JSON."),
) -> None:
    """Check every endpoint and credential the params name (salt, MLflow, feedback store, DVC
    remote, S3 source, Prefect API, TLS files): one screen; exit status 1 when a required one fails."""
    import json

    from pipelines.config import load_params
    from pipelines.ops import doctor as checks
    from pipelines.workspace import Layout

    from medloop import views

    layout = Layout.at(workspace).require()
    found = checks.run(load_params(layout.params_file), layout)
    if as_json:
        typer.echo(json.dumps([check.as_dict() for check in found], indent=2))
    else:
        _console().print(views.doctor_table(found))
    raise typer.Exit(1 if checks.failed(found) else 0)


ModelArgument = typer.Argument(None, help="Registered model (default: the workspace's model.name).")
VersionArgument = typer.Argument(None, help="Registered version (default: the champion).")


@app.command()
def lineage(
    model: Optional[str] = ModelArgument,
    version: Optional[str] = VersionArgument,
    workspace: Path = WorkspaceOption,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """What a model version was made from: commit, data versions, params, gates, runs, promotion."""
    import json

    from pipelines.registry.lineage import version_lineage

    from medloop import views

    layout = _layout(workspace)
    found = version_lineage(_params_for(layout, model), layout, version)
    if as_json:
        print(json.dumps(found, indent=2, sort_keys=True))
    else:
        _console().print(views.lineage_table(found))


@app.command()
def reproduce(
    model: Optional[str] = ModelArgument,
    version: Optional[str] = VersionArgument,
    rev: Optional[str] = typer.Option(None, "--rev", help="Git commit or tag to reproduce from instead."),
    workspace: Path = WorkspaceOption,
    keep: bool = typer.Option(False, help="Keep the worktree for inspection."),
) -> None:
    """Rebuild a registered version from its commit in a separate worktree and compare it."""
    from pipelines import reproduce as reproduction

    layout = _layout(workspace)
    result = reproduction.run(_params_for(layout, model), layout, version, rev, keep=keep)
    _console().print(result.describe(), highlight=False)
    if keep:
        _console().print(f"worktree kept at {result.worktree}", highlight=False)
    if not result.identical:
        raise typer.Exit(1)


def _params_for(layout, model: Optional[str]):
    """The workspace's params, refusing a model name that is not the workspace's."""
    from pipelines.config import load_params
    from pipelines.errors import MedloopError

    params = load_params(layout.params_file)
    if model is not None and model != params.model.name:
        raise MedloopError(f"the workspace {layout.root} holds model {params.model.name!r}, not {model!r} "
                           f"(pick the workspace with -w)")
    return params


@app.command()
def serve(
    workspace: Path = WorkspaceOption,
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, help="Port to listen on."),
) -> None:
    """Serve the champion over HTTP (predict, feedback, review, health, metrics).

    One process per service: run several services (ports or hosts) behind a load balancer to
    scale out; each reloads on its own.
    """
    import uvicorn

    from pipelines.config import load_params

    from medloop.servers import uvicorn_tls

    layout = _layout(workspace)
    tls = uvicorn_tls(load_params(layout.params_file), layout)  # serving.tls: HTTPS only
    os.environ["MEDLOOP_PARAMS"] = str(layout.params_file)
    _console().print(f"serving {layout.params_file} on {'https' if tls else 'http'}://{host}:{port} "
                     f"(API description at /openapi.json)", highlight=False)
    uvicorn.run("serving.app:app_from_environment", factory=True, host=host, port=port, log_level="warning", **tls)


testset_app = typer.Typer(help="The frozen test set: its size, and extending it deliberately.", no_args_is_help=True)
app.add_typer(testset_app, name="testset")


@testset_app.command("show")
def testset_show(workspace: Path = WorkspaceOption) -> None:
    """Whether the test set is still growing or frozen (which version), and its size."""
    from pipelines.data import testset
    from pipelines.config import load_params

    layout = _layout(workspace)
    _console().print(testset.describe(load_params(layout.params_file), layout), highlight=False)


@testset_app.command("extend")
def testset_extend(
    cases_per_class: int = typer.Option(..., "--cases-per-class", help="The new minimum of cases of each class."),
    reason: str = typer.Option(..., "--reason", help="Why; recorded in the commit with who asked."),
    items: Optional[int] = typer.Option(None, "--items", help="The new minimum of items (default: unchanged)."),
    workspace: Path = WorkspaceOption,
) -> None:
    """Grow the frozen test set again: raise its minimum in params.yaml and commit who and why.

    The next run adds new patients to it; nothing is promoted until it is frozen again as the
    next version, and the champion is re-scored on it before any comparison."""
    from pipelines import promote as promotion
    from pipelines.data import testset
    from pipelines.config import load_params

    layout = _layout(workspace)
    message = testset.extend(load_params(layout.params_file), layout, cases_per_class=cases_per_class,
                             items=items, reason=reason, actor=promotion.default_actor())
    _console().print(f"[green]committed[/] {message}", highlight=False)


token_app = typer.Typer(help="Bearer tokens of the prediction service.", no_args_is_help=True)
app.add_typer(token_app, name="token")


@token_app.command("add")
def token_add(
    name: str = typer.Argument(..., help="Who holds it (recorded on every write they make)."),
    role: str = typer.Option("clinician", help="clinician | reviewer | admin"),
    workspace: Path = WorkspaceOption,
) -> None:
    """Make a token; it is printed once and only its hash is stored."""
    from pipelines.config import load_params
    from serving.auth import add_token

    layout = _layout(workspace)
    tokens_file = Path(load_params(layout.params_file).serving.tokens_file)
    tokens_file = tokens_file if tokens_file.is_absolute() else layout.root / tokens_file
    print(add_token(tokens_file, name, role))


@app.command()
def demo(
    workspace: Path = typer.Option(Path("workspace/demo"), "--workspace", "-w"),
    params: Optional[str] = typer.Option(None, "--params",
                                         help="params file, or a shipped profile by name (default: params.yaml)."),
    nights: int = typer.Option(4, help="At most this many nights to reach a first champion."),
    clinic: bool = typer.Option(True, help="Then serve it, let simulated clinicians work, and retrain on their labels."),
) -> None:
    """Run the whole loop on the built-in data: nights of retraining until a champion is promoted;
    the champion served on 127.0.0.1; simulated clinicians predict, confirm, correct and
    disagree through the HTTP API, a reviewer adjudicates; the next night learns from them."""
    os.environ.setdefault("MEDLOOP_DEID_SALT", "demo-salt-not-a-secret-0123456789")
    from pipelines.ops.scaffold import create_workspace

    console = _console()
    layout = create_workspace(workspace, params)
    night, champion = 0, False
    while night < nights and not champion:
        night += 1
        console.rule(f"night {night}")
        summary = _run_retrain(layout, f"demo night {night}")
        _print_summary(summary)
        champion = summary["outcome"] == "promoted" or _has_champion(layout)
    day = None
    if clinic and champion:
        console.rule("the clinic: the champion served, clinicians at work")
        day = _demo_clinic(layout)
        console.print(f"clinicians: {day.predictions} predictions from v{day.version}; {day.confirmed} confirmed, "
                      f"{day.corrected} corrected, {day.adjudicated} disagreements adjudicated by a reviewer, "
                      f"{day.new_cases} new cases", highlight=False)
        night += 1
        console.rule(f"night {night}: learning from the clinicians")
        _print_summary(_run_retrain(layout, f"demo night {night}: clinicians' labels"))
    _demo_summary(layout, day)


def _has_champion(layout) -> bool:
    from pipelines import promote
    from pipelines.config import load_params
    from pipelines.ops.runs import PROMOTED

    return any(entry["action"] in PROMOTED for entry in promote.history(load_params(layout.params_file), layout))


def _demo_clinic(layout):
    """Serve the champion (`medloop serve` on 127.0.0.1), let the simulated clinicians work
    through its HTTP API, and stop it."""
    import socket

    from pipelines.ops import clinicians
    from pipelines.config import load_params
    from serving.auth import add_token, load_entries

    from medloop.servers import start_server, stop_server

    params = load_params(layout.params_file)
    tokens_file = Path(params.serving.tokens_file)
    tokens_file = tokens_file if tokens_file.is_absolute() else layout.root / tokens_file
    taken = {entry["name"] for entry in load_entries(tokens_file)}
    tokens = {}
    for key, role in clinicians.ROLES.items():
        name, suffix = f"demo-{key}", 1
        while name in taken:  # a demo run again in the same workspace: new people, new tokens
            suffix += 1
            name = f"demo-{key}-{suffix}"
        tokens[key] = add_token(tokens_file, name, role)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "medloop", "serve", "-w", str(layout.root), "--port", str(port)]
    layout.logs.mkdir(parents=True, exist_ok=True)
    server = start_server("medloop serve", command, dict(os.environ), layout.logs / "demo-serve.log", base + "/readyz")
    try:
        return clinicians.simulate(params, layout, base, tokens, seed=getattr(params.source, "seed", 0))
    finally:
        stop_server(server)


def _run_retrain(layout, reason: str = "started by hand (medloop run)") -> dict:
    """The retrain flow in this process, drawn live."""
    _quiet_prefect()
    from rich.live import Live

    from flows.retrain import retrain
    from tasks import progress

    from medloop.views import RunView

    view = RunView()
    console = _console()
    progress.subscribe(view.update)
    try:
        with _logs_to_workspace(layout), Live(view, console=console, refresh_per_second=4):
            return retrain(str(layout.params_file), reason)
    finally:
        progress.unsubscribe(view.update)
        if not console.is_terminal:
            console.print()  # a plain-file log gets the final view without a closing newline


def _print_summary(summary: dict) -> None:
    from pipelines.ops.report import headline

    from medloop import views

    console = _console()
    style = {"promoted": "green", "refused": "yellow"}.get(summary["outcome"], "bold")
    console.print(f"[{style}]{headline(summary)}[/]", highlight=False)
    if summary.get("metrics"):
        console.print(views.summary_table(summary))
    promotion = summary.get("promotion") or {}
    if summary["outcome"] == "refused":
        console.print(promotion.get("reason", ""), highlight=False)
    for label, value in (summary.get("links") or {}).items():
        console.print(f"  {label}: {value}", highlight=False)


def _demo_summary(layout, day=None) -> None:
    from pipelines import promote
    from pipelines.config import load_params
    from pipelines.registry.lineage import version_lineage

    from medloop import views

    console = _console()
    params = load_params(layout.params_file)
    history = promote.history(params, layout)
    console.rule("what the loop did")
    promoted = [h for h in history if h["action"] in ("promoted", "override", "rollback")]
    console.print(f"versions:         {', '.join('v' + h['version'] + ' ' + h['action'] for h in promoted) or 'none promoted'}", highlight=False)
    for version in sorted({h["version"] for h in promoted}, key=int):
        console.print(f"  v{version} learned from: {views.learned_from(version_lineage(params, layout, version))}",
                      highlight=False)
    if day is not None:
        for line in views.clinic_lines(day.monitoring):
            console.print(line, highlight=False)
    console.rule("where to look")
    console.print(f"workspace:        {layout.root}", highlight=False)
    console.print(f"champion:         medloop status -w {layout.root}", highlight=False)
    console.print(f"lineage:          medloop lineage -w {layout.root}", highlight=False)
    console.print(f"reproduce:        medloop reproduce -w {layout.root}   (rebuilds the champion from its commit)",
                  highlight=False)
    console.print(f"MLflow UI:        medloop ui -w {layout.root}   (then http://127.0.0.1:5000)", highlight=False)
    console.print(f"clinicians' screen: medloop token add dr-you --role reviewer -w {layout.root}; medloop serve -w "
                  f"{layout.root}; then http://127.0.0.1:8000/pages, signed in with the token", highlight=False)
    console.print(f"reports:          {layout.reports} (metrics.json, model_card.md, plots/, data_docs/index.html)", highlight=False)
    console.print(f"quarantine list:  {layout.quarantine_csv}", highlight=False)
    console.print(f"data versions:    git -C {layout.root} log --oneline; git -C {layout.root} tag", highlight=False)


def _layout(workspace: Path, *, collects: bool = False):
    """The workspace, with its params checked before any flow or server starts (a config error
    is one paragraph in well under a second, not a failed flow run); with ``collects``, also the
    de-identification salt that collecting needs."""
    from pipelines.config import load_params
    from pipelines.workspace import Layout

    layout = Layout.at(workspace).require()
    params = load_params(layout.params_file)
    if collects:
        from pipelines.deid.keys import load_salt

        load_salt(params.deid.salt_env)
    return layout


@contextlib.contextmanager
def _logs_to_workspace(layout):
    """While a flow runs in this process, what Prefect and medloop log (tracebacks of a failed
    task included) goes to the workspace's ``logs/medloop.log``, not to the terminal: the person
    sees the live view and one paragraph of error (``main``)."""
    import logging

    from pipelines.ops.logs import FORMAT

    layout.logs.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(layout.logs / "medloop.log")
    to_file.setFormatter(logging.Formatter(FORMAT))
    loggers = [logging.getLogger(), logging.getLogger("medloop")]
    moved = {}
    for logger in loggers:
        moved[logger] = [h for h in logger.handlers if type(h) is not logging.FileHandler]
        for handler in moved[logger]:
            logger.removeHandler(handler)
        logger.addHandler(to_file)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeHandler(to_file)
            for handler in moved[logger]:
                logger.addHandler(handler)
        to_file.close()


def _quiet_prefect() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def _console():
    from rich.console import Console

    return Console()


def _print_error(label: str, text: str) -> None:
    """``label`` in red, then ``text`` as it is: not read as Rich markup (a path or list in square
    brackets stays), and not wrapped mid-word (a long path stays whole to copy; the terminal wraps)."""
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, soft_wrap=True).print(f"[bold red]{label}[/] {escape(text)}", highlight=False)


def main() -> None:
    """Entry point: run the app, turning medloop's own errors into one clear paragraph."""
    from pipelines.errors import MedloopError

    try:
        # Without standalone mode, click returns a command's `typer.Exit` code instead of exiting.
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except MedloopError as exc:
        if _state["debug"]:
            raise
        _print_error("error:", str(exc))
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
        _print_error("unexpected error:", f"{type(exc).__name__}: {exc}\n(run with --debug for the traceback)")
        sys.exit(2)


if __name__ == "__main__":
    main()
