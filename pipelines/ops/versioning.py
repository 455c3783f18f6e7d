"""Git and DVC in a workspace, through their command lines.

DVC is driven through ``python -m dvc`` (the same interpreter as medloop) rather than its
internal Python API, which changes between releases; its own caching, lock file and lineage are
then exactly the ones a user gets from the shell.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

from pipelines.config import StorageSpec
from pipelines.errors import WorkspaceError, mask_credentials
from pipelines.workspace import Layout

REMOTE_NAME = "storage"


def dvc(layout: Layout, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``dvc <args>`` in the workspace; a failure raises WorkspaceError with DVC's words."""
    return _run([sys.executable, "-m", "dvc", *args], layout.root, check=check, tool="dvc")


def git(layout: Layout, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``git <args>`` in the workspace."""
    return _run(["git", *args], layout.root, check=check, tool="git")


def track(layout: Layout, path: Path) -> Path:
    """``dvc add`` a data folder so its new version is recorded in ``<path>.dvc``."""
    relative = path.relative_to(layout.root).as_posix()
    dvc(layout, "add", "--quiet", relative)
    return path.with_name(path.name + ".dvc")


def configure_remote(layout: Layout, storage: StorageSpec) -> str:
    """Point the default DVC remote at ``storage.dvc_remote`` (a folder or ``s3://...``)."""
    url = storage.dvc_remote
    if "://" not in url:
        folder = Path(url)
        folder = folder if folder.is_absolute() else (layout.root / folder)
        folder.mkdir(parents=True, exist_ok=True)
        url = str(folder.resolve())
    dvc(layout, "remote", "add", "--force", "--default", REMOTE_NAME, url)
    if storage.s3_endpoint_url:
        dvc(layout, "remote", "modify", REMOTE_NAME, "endpointurl", storage.s3_endpoint_url)
    if url.startswith("s3://"):
        # Ask the store to encrypt at rest what DVC pushes (or stop asking, when params say null).
        for option, value in (("sse", storage.s3_server_side_encryption), ("sse_kms_key_id", storage.s3_kms_key_id)):
            if value:
                dvc(layout, "remote", "modify", REMOTE_NAME, option, value)
            else:
                dvc(layout, "remote", "modify", "--unset", REMOTE_NAME, option)
    return url


def push(layout: Layout, *targets: str) -> None:
    """Upload tracked data to the default remote.

    Raises:
        PushFailed: DVC could not upload it (the remote did not answer, refused, or is full); the
            message names the remote and carries DVC's words.
    """
    done = dvc(layout, "push", *targets, check=False)  # not --quiet: it hides DVC's error too
    if done.returncode != 0:
        listed = dvc(layout, "remote", "list", check=False).stdout.split()
        remote = listed[listed.index(REMOTE_NAME) + 1] if REMOTE_NAME in listed[:-1] else "(the default remote)"
        output = f"{done.stderr}\n{done.stdout}"
        errors = [line.removeprefix("ERROR: ").removeprefix("unexpected error - ")
                  for line in output.splitlines() if line.startswith("ERROR: ")]
        detail = "; ".join(errors) or output.strip()
        raise PushFailed(mask_credentials(
            f"the data could not be pushed to the DVC remote {remote}: {detail}\nIt stays in this workspace's DVC "
            f"cache; `dvc push` in {layout.root} sends it once the remote answers."))


def tool_env() -> dict[str, str]:
    """The environment for git, DVC and stage commands: `python` in dvc.yaml is this
    interpreter, whatever PATH the caller had; no analytics, no terminal prompts."""
    env = dict(os.environ)
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.setdefault("GIT_TERMINAL_PROMPT", "0")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _run(command: list[str], cwd: Path, *, check: bool, tool: str) -> subprocess.CompletedProcess[str]:
    env = tool_env()
    try:
        done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    except FileNotFoundError:
        raise WorkspaceError(f"{tool} is not installed (needed in {cwd})") from None
    if check and done.returncode != 0:
        # DVC may put its error on either stream, and its support line on stderr.
        lines = f"{done.stderr}\n{done.stdout}".splitlines()
        detail = "\n".join(line for line in lines if line.strip() and not line.startswith("Having any troubles?"))
        raise WorkspaceError(f"`{tool} {' '.join(command[3 if tool == 'dvc' else 1:])}` failed in {cwd}:\n{detail}")
    return done


def repro(layout: Layout, stage: str, on_line: Callable[[str], None] | None = None, *, force: bool = False,
          alone: bool = False, extra_env: dict[str, str] | None = None) -> bool:
    """``dvc repro <stage>`` (and what it depends on); True when something was rerun.

    Args:
        layout: the workspace.
        stage: the stage to bring up to date.
        on_line: called with each line the stage prints, as it prints it (progress displays).
        force: rerun the stage and every stage upstream of it even when nothing changed.
        alone: check and run this stage only (``--single-item``), for a caller that has just
            brought every stage upstream of it up to date, in order, as the nightly flows do.
            DVC would otherwise check each upstream stage's deps and outs again, walking and
            looking up every file of ``data/raw`` and ``data/clean`` once more per stage; the
            lock file still records the hashes of what this stage read.
        extra_env: variables given to the DVC process (and so to the stage commands) on top of
            `tool_env`, e.g. the flow run id (`pipelines.registry.tracking.flow_run_env`); this
            process's own environment is never changed.

    Raises:
        StageFailed: the stage command failed; the message carries its own error output.
    """
    command = [sys.executable, "-m", "dvc", "repro", *(["--force"] if force else []),
               *(["--single-item"] if alone else []), stage]
    try:
        process = subprocess.Popen(command, cwd=layout.root, env={**tool_env(), **(extra_env or {})}, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, bufsize=1)
    except FileNotFoundError:
        raise WorkspaceError(f"dvc is not installed (needed in {layout.root})") from None
    lines = []
    assert process.stdout is not None
    for line in process.stdout:
        lines.append(line)
        if on_line is not None:
            on_line(line.rstrip("\n"))
    returncode = process.wait()
    output = "".join(lines).strip()
    if returncode != 0:
        failed = re.search(r"failed to reproduce '([^']+)'", output)
        raise StageFailed(failed.group(1) if failed else stage, _stage_message(output))
    return "Running stage" in output


def changed(layout: Layout) -> list[str]:
    """What ``dvc status`` finds out of date: stage names and ``.dvc`` files, sorted; empty when
    every stage's deps, params and outs match ``dvc.lock``."""
    done = dvc(layout, "status", "--json")
    return sorted(json.loads(done.stdout or "{}"))


def tag(layout: Layout, name: str, message: str) -> str:
    """Tag HEAD with an annotated tag (kept when it already exists on HEAD); the tag's commit.

    Raises:
        WorkspaceError: the tag exists on another commit (a version number is never reused).
    """
    head = head_commit(layout)
    existing = git(layout, "rev-list", "-n", "1", name, check=False)
    if existing.returncode == 0:
        if existing.stdout.strip() != head:
            raise WorkspaceError(f"git tag {name} already exists on commit {existing.stdout.strip()[:12]}, not on HEAD {head[:12]}")
        return head
    git(layout, "-c", "user.name=medloop", "-c", "user.email=medloop@localhost", "tag", "-a", name, "-m", message)
    return head


def commit(layout: Layout, message: str) -> str | None:
    """Commit everything git tracks in the workspace (dvc.lock, .dvc files); the new commit or None."""
    git(layout, "add", "-A")
    if not git(layout, "status", "--porcelain").stdout.strip():
        return None
    git(layout, "-c", "user.name=medloop", "-c", "user.email=medloop@localhost", "commit", "--quiet", "-m", message)
    return head_commit(layout)


def head_commit(layout: Layout) -> str | None:
    """The workspace's HEAD commit, or None before its first commit."""
    done = git(layout, "rev-parse", "HEAD", check=False)
    return done.stdout.strip() if done.returncode == 0 else None


class PushFailed(WorkspaceError):
    """The DVC remote did not take the data."""


class StageFailed(WorkspaceError):
    """A DVC stage's command exited with an error (a failed gate among them)."""

    def __init__(self, stage: str, detail: str):
        self.stage = stage
        super().__init__(f"stage {stage!r} failed; nothing downstream ran.\n{detail}")


_KILLED = re.compile(r"exited with -(\d+)\s*$", re.MULTILINE)


# Not the stage's own words: DVC's wrapper and skip lines, and TensorFlow's start-up chatter.
_NOISE = re.compile(r"ERROR: failed to reproduce|Running stage|> python|.*didn't change, skipping$|.* is cached - skipping"
                    r"|WARNING: All log messages before absl|[IWE]\d{4} \d\d:\d\d:\d\d")


def _stage_message(output: str) -> str:
    lines = [line for line in output.splitlines() if not _NOISE.match(line)]
    killed = _KILLED.search(output)
    if killed:  # DVC's words for a stage process ended by a signal: say what that means
        number = int(killed.group(1))
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        lines.append(f"Its process was killed by {name} (signal {number}): out of memory, or stopped by a person "
                     "or the system. dvc.lock was not updated, so the next run starts the stage again.")
    return "\n".join(lines[-40:])
