"""Rich renderings for the command line: the live view of a retrain run, the run summary, status
and lineage tables. Only presentation lives here."""

from __future__ import annotations

import threading
import time
from typing import Any

from rich.console import Group
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pipelines.ops.report import fmt as _fmt
from pipelines.ops.runs import PROMOTED

STEPS = ("feedback", "collect", "clean", "validate", "preprocess", "train", "evaluate", "promote", "deploy", "publish")
MARKS = {"waiting": "[dim]·[/]", "running": "[yellow]…[/]", "done": "[green]✓[/]",
         "skipped": "[dim]skipped[/]", "failed": "[red]✗[/]"}


class RunView:
    """The live view of one retrain run: every step with its state and time, and a progress bar
    of training epochs. Fed by `tasks.progress` events (`update`)."""

    def __init__(self) -> None:
        self.state = {step: "waiting" for step in STEPS}
        self.started: dict[str, float] = {}
        self.seconds: dict[str, float] = {}
        self.notes: dict[str, str] = {}
        self.bars = Progress(TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn())
        self.bar_ids: dict[str, Any] = {}
        self.lock = threading.Lock()

    def update(self, event: dict[str, Any]) -> None:
        step, status = event["step"], event["status"]
        with self.lock:
            if status == "progress":
                if step not in self.bar_ids:
                    self.bar_ids[step] = self.bars.add_task(f"{step} epochs", total=event["total"])
                self.bars.update(self.bar_ids[step], completed=event["completed"], total=event["total"])
                return
            if status == "running" and self.state.get(step) != "running":
                self.started[step] = time.perf_counter()
            if status in ("done", "skipped", "failed") and step in self.started:
                self.seconds[step] = time.perf_counter() - self.started[step]
            if step == "publish" and status == "done" and self.state.get(step) == "waiting":
                return  # nothing was published: keep it shown as not run
            self.state[step] = status
            for key in ("action", "stored"):
                if key in event:
                    self.notes[step] = f"{key} {event[key]}"

    def __rich__(self) -> Group:
        table = Table(show_header=False, box=None, padding=(0, 1))
        with self.lock:
            for step in STEPS:
                seconds = f"{self.seconds[step]:.1f} s" if step in self.seconds else ""
                status = self.state[step]
                label = MARKS.get(status, status)
                if status == "done" and step in ("clean", "validate", "preprocess", "train", "evaluate"):
                    label = MARKS["done"] + " ran"
                table.add_row(label, step, seconds, self.notes.get(step, ""))
        return Group(table, self.bars)


def summary_table(summary: dict[str, Any]) -> Table:
    """The end-of-run table: metrics of the candidate against the champion."""
    table = Table(title="frozen test set", show_lines=False)
    table.add_column("metric")
    table.add_column("candidate", justify="right")
    table.add_column("champion", justify="right")
    candidate = summary.get("metrics") or {}
    champion = summary.get("champion_metrics") or {}
    for key in ("auroc", "sensitivity", "specificity", "ppv", "npv", "ece", "n"):
        if key in candidate:
            table.add_row(key, _fmt(candidate.get(key)), _fmt(champion.get(key)))
    return table


def runs_table(runs: list[dict[str, Any]]) -> Table:
    table = Table(title="last runs (newest first)")
    for column in ("finished (UTC)", "outcome", "version", "new items", "seconds"):
        table.add_column(column)
    for run in runs:
        promotion = run.get("promotion") or {}
        version = promotion.get("version") if promotion.get("action") in PROMOTED else ""
        outcome = run.get("outcome", "?")
        style = {"promoted": "green", "refused": "yellow", "failed": "red", "crashed": "red"}.get(outcome, "")
        table.add_row(str(run.get("finished_at", "")), f"[{style}]{outcome}[/]" if style else outcome,
                      f"v{version}" if version else "", str((run.get("collect") or {}).get("stored", "")),
                      f"{(run.get('seconds') or {}).get('total', 0):.0f}")
    return table


def lineage_table(found: dict[str, Any]) -> Table:
    table = Table(title=f"{found['model']} v{found['version']}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    promotion = found.get("promotion") or {}
    rows = [
        ("aliases", ", ".join(found.get("aliases") or []) or "-"),
        ("commit", found.get("commit") or "- (not committed by a flow run)"),
        ("git tag", found.get("git_tag") or "-"),
        ("trained from commit", found.get("trained_from_commit") or "-"),
        *[(f"data: {key}", value or "-") for key, value in (found.get("data") or {}).items()],
        ("learned from", learned_from(found)),
        ("params hash", found.get("params_hash") or "-"),
        ("operating threshold", found.get("operating_threshold") or "-"),
        ("weights sha256", found.get("weights_sha256") or "-"),
        *[(f"test {key}", _fmt(value)) for key, value in (found.get("metrics") or {}).items()
          if key in ("auroc", "sensitivity", "specificity", "ece", "n")],
        ("MLflow run", f"{found.get('mlflow_run_id')} (experiment {found.get('experiment_id')})"),
        ("Prefect flow run", found.get("flow_run_id") or "- (not run by a flow)"),
        ("promotion", f"{promotion.get('decision')} by {promotion.get('actor')} at {promotion.get('at')}"),
        ("why", promotion.get("reason") or "-"),
    ]
    gates = found.get("gates") or []
    if gates:
        failed = [g["gate"] for g in gates if not g.get("passed")]
        rows.append(("gates", f"{len(gates) - len(failed)} of {len(gates)} passed" + (f"; failed: {', '.join(failed)}" if failed else "")))
    for section in ("device", "environment"):
        facts = found.get(section) or {}
        if facts:
            rows.append((section, ", ".join(f"{k}={v}" for k, v in sorted(facts.items()))))
    for what, value in rows:
        table.add_row(what, str(value))
    return table


def learned_from(found: dict[str, Any]) -> str:
    """What a version was trained on, from its lineage: the data version and the clinicians'
    confirmed labels among its training and validation items."""
    data = found.get("data") or {}
    learned = found.get("learned_from") or {}
    raw = (data.get("raw") or "-")[:12]
    labels = learned.get("clinician_labels")
    if labels is None:
        clinicians = "clinicians' labels not recorded"
    elif labels == 0:
        clinicians = "no clinician labels yet"
    else:
        batches = learned.get("clinician_label_batches") or []
        clinicians = (f"{labels} clinician-confirmed labels (feedback data {(data.get('feedback') or '-')[:12]}"
                      f"{', export ' + ', '.join(batches) if batches else ''})")
    return f"data/raw {raw}; {clinicians}"


def clinic_lines(monitoring: dict[str, Any]) -> list[str]:
    """The demo summary's lines on the served model: live agreement with the clinicians per
    version (from ``GET /monitoring``) and the drift verdict."""
    lines = []
    for version in monitoring.get("versions") or []:
        agreement = version.get("agreement")
        lines.append(f"live, v{version['version']}:        {version.get('predictions', 0)} predictions, "
                     f"{version.get('confirmed', 0)} confirmed by clinicians; agreement "
                     f"{'-' if agreement is None else f'{agreement:.0%}'}, sensitivity {_fmt(version.get('sensitivity'))}, "
                     f"specificity {_fmt(version.get('specificity'))}")
    drift = monitoring.get("drift")
    if drift is None:
        lines.append("drift:            no reference in the served model")
    else:
        lines.append(f"drift:            {drift.get('note')}")
    return lines


DOCTOR_MARKS = {"ok": "[green]ok[/]", "warn": "[yellow]warn[/]", "fail": "[bold red]FAIL[/]", "off": "[dim]off[/]"}


def doctor_table(checks: list[Any]) -> Table:
    """`medloop doctor`: one row per endpoint or credential (`pipelines.ops.doctor.Check`)."""
    table = Table(title="medloop doctor", title_justify="left", show_lines=False)
    for column in ("check", "status", "where", "detail"):
        table.add_column(column, overflow="fold")
    for check in checks:
        table.add_row(check.name, DOCTOR_MARKS.get(check.status, check.status), check.where, check.detail)
    failing = sum(check.status == "fail" for check in checks)
    table.caption = (f"[bold red]{failing} required check(s) failed: the night would fail[/]" if failing
                     else "[green]everything required answers[/]")
    return table
