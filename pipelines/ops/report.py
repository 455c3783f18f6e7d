"""The report of one retrain run: what was collected, the gates, the metrics against the champion,
the promotion decision and why, and where to look (MLflow run, Data Docs).

`render_markdown` turns the run summary the retrain flow builds into the Markdown the flow
publishes as a Prefect artifact; `append_run` keeps the same summaries, one JSON line per run, in
``.medloop/runs.jsonl`` so that ``medloop status`` can list the last runs without a server. That
file is a cache: the record of each run is in MLflow (`pipelines.ops.runs.record`), from which
`pipelines.ops.runs.rebuild_cache` writes it anew.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipelines.workspace import Layout
from pipelines.values import number

RUNS_FILE = "runs.jsonl"
SHOWN_METRICS = ("auroc", "sensitivity", "specificity", "ppv", "npv", "ece", "n")


def headline(summary: dict[str, Any]) -> str:
    """One line saying how the run ended, e.g. ``pneumonia-cxr v3 promoted as champion``."""
    name = summary["model"]
    outcome = summary["outcome"]
    promotion = summary.get("promotion") or {}
    if outcome == "nothing-changed":
        return f"{name}: nothing changed (no new data, same params and code); no training, no new version"
    if outcome == "promoted":
        return f"{name} v{promotion.get('version')} promoted as champion"
    if outcome == "refused":
        return f"{name}: the new model was refused; the champion is unchanged"
    if outcome == "data-only":
        return f"{name}: data updated; the trained model did not change, so nothing was promoted"
    return f"{name}: {outcome}"


def render_markdown(summary: dict[str, Any]) -> str:
    """The Prefect artifact of a retrain run."""
    lines = [f"# {headline(summary)}", ""]
    if summary.get("trigger"):
        lines += [f"Started by: {summary['trigger']}", ""]
    collected = summary.get("collect") or {}
    lines += ["## Collected", "",
              f"- new items stored: **{collected.get('stored', 0)}**, rejected: {collected.get('rejected', 0)}, "
              f"duplicates: {collected.get('duplicates', 0)}, batch: `{collected.get('batch_id') or 'none'}`", ""]
    stages = summary.get("stages") or {}
    if stages:
        lines += ["## Stages (DVC)", "", "| stage | |", "| --- | --- |"]
        lines += [f"| {stage} | {'ran' if ran else 'up to date (skipped by DVC)'} |" for stage, ran in stages.items()]
        lines.append("")
    validation = summary.get("validation")
    if validation:
        verdict = "passed" if validation.get("success") else "FAILED"
        lines += ["## Data quality gate", "",
                  f"- {verdict}: {validation.get('evaluated', 0) - validation.get('failed', 0)} of "
                  f"{validation.get('evaluated', 0)} expectations met",
                  f"- Data Docs: {summary.get('links', {}).get('data_docs', 'reports/data_docs/index.html')}", ""]
    candidate = summary.get("metrics") or {}
    champion = summary.get("champion_metrics") or {}
    if candidate:
        lines += ["## Frozen test set: candidate against champion", "",
                  "| metric | candidate | champion |", "| --- | --- | --- |"]
        for key in SHOWN_METRICS:
            if key in candidate:
                lines.append(f"| {key} | {fmt(candidate.get(key))} | {fmt(champion.get(key))} |")
        lines.append("")
    promotion = summary.get("promotion")
    if promotion:
        lines += ["## Promotion decision", "", f"- **{promotion.get('action')}**: {promotion.get('reason', '')}"]
        gates = promotion.get("gates") or []
        if gates:
            lines += ["", "| gate | observed | required | passed |", "| --- | --- | --- | --- |"]
            lines += [f"| {g['gate']} | {fmt(g.get('observed'))} | {fmt(g.get('required'))} | "
                      f"{'yes' if g.get('passed') else '**no**'} |" for g in gates]
        lines.append("")
    publish = summary.get("publish") or {}
    if publish.get("commit"):
        tag = f", tag `{publish['git_tag']}`" if publish.get("git_tag") else ""
        lines += ["## Versioned", "", f"- workspace commit `{publish['commit'][:12]}`{tag}; data pushed to the DVC remote", ""]
    links = summary.get("links") or {}
    if links:
        lines += ["## Where to look", ""]
        lines += [f"- {label}: {value}" for label, value in links.items()]
    return "\n".join(lines).rstrip() + "\n"


def append_run(layout: Layout, summary: dict[str, Any]) -> Path:
    """Add a run's summary to the workspace's run log (one JSON object per line)."""
    layout.state.mkdir(parents=True, exist_ok=True)
    path = layout.state / RUNS_FILE
    with open(path, "a") as handle:
        handle.write(json.dumps(summary, sort_keys=True, default=str) + "\n")
    return path


def write_runs(layout: Layout, summaries: list[dict[str, Any]]) -> Path:
    """Write the run log anew with ``summaries`` (oldest first): the cache rebuilt from MLflow."""
    layout.state.mkdir(parents=True, exist_ok=True)
    path = layout.state / RUNS_FILE
    path.write_text("".join(json.dumps(summary, sort_keys=True, default=str) + "\n" for summary in summaries))
    return path


def recent_runs(layout: Layout, limit: int = 5) -> list[dict[str, Any]]:
    """The last ``limit`` run summaries, newest first (a damaged line is skipped, never fatal)."""
    path = layout.state / RUNS_FILE
    if not path.is_file():
        return []
    runs = []
    for line in path.read_text().splitlines():
        try:
            runs.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return list(reversed(runs[-limit:]))


def fmt(value: Any) -> str:
    """A metric for a table: 4 decimals, ``-`` for none."""
    return number(value, digits=4, missing="-")
