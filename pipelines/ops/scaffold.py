"""Create a medloop workspace: the folder a user (or ``make demo``) runs the loop in.

A workspace is its own git repository with DVC initialised. It holds ``params.yaml`` (copied
from a profile), ``dvc.yaml`` and a copy of the stage code (``pipelines/``), so that the git
commit that holds a ``dvc.lock`` also holds the exact code and params that produced it: checking
out that commit is enough to reproduce the data and the model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pipelines.config import load_params
from pipelines.errors import ConfigError, WorkspaceError
from pipelines.ops.versioning import configure_remote, dvc, git
from pipelines.workspace import Layout

WORKSPACE_GITIGNORE = """\
# medloop workspace: data is tracked by DVC (.dvc files), not by git
logs/
.medloop/
dvc-remote/
__pycache__/
*.pyc
"""


def project_root() -> Path:
    """The medloop source tree (holding dvc.yaml, params.yaml, profiles/ and pipelines/)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "dvc.yaml").is_file():
        raise WorkspaceError(
            f"cannot find medloop's dvc.yaml next to {root}; install medloop from its source "
            f"tree (`pip install -e .`, as the Makefile does)"
        )
    return root


def create_workspace(target: str | Path, params_file: str | Path | None = None) -> Layout:
    """Create (or refresh the code of) a workspace.

    Args:
        target: the folder; created when missing.
        params_file: the profile to copy as ``params.yaml`` (default: the project's params.yaml).
            An existing workspace keeps its own params.yaml unless one is given.

    Returns:
        The workspace layout.
    """
    source = project_root()
    layout = Layout.at(target)
    layout.root.mkdir(parents=True, exist_ok=True)
    fresh = not (layout.root / ".dvc").is_dir()
    if not (layout.root / ".git").exists():
        git(layout, "init", "--quiet", "--initial-branch=main")
    if fresh:
        dvc(layout, "init", "--quiet")
        dvc(layout, "config", "core.autostage", "true")
        dvc(layout, "config", "core.analytics", "false")
    if params_file is not None or not layout.params_file.exists():
        chosen = resolve_profile(params_file) if params_file is not None else source / "params.yaml"
        params = load_params(chosen)  # refuse a broken profile before copying it
        shutil.copyfile(chosen, layout.params_file)
    else:
        params = load_params(layout.params_file)
    shutil.copyfile(source / "dvc.yaml", layout.root / "dvc.yaml")
    _copy_code(source / "pipelines", layout.root / "pipelines")
    gitignore = layout.root / ".gitignore"
    if not gitignore.exists():
        gitignore.write_text(WORKSPACE_GITIGNORE)
    configure_remote(layout, params.storage)
    if not fresh:
        from pipelines.collect import index_batches

        index_batches(layout)  # clean's dependency (dvc.yaml), for data collected by earlier code
    git(layout, "add", "-A")
    if git(layout, "status", "--porcelain").stdout.strip():
        git(layout, "-c", "user.name=medloop", "-c", "user.email=medloop@localhost",
            "commit", "--quiet", "-m", "medloop workspace: params, dvc.yaml and stage code")
    return layout


def resolve_profile(name: str | Path) -> Path:
    """The params file a user named: a path, or a profile shipped with medloop by name.

    ``profiles/breast_cancer.yaml``, ``breast_cancer.yaml`` and ``breast_cancer`` all name the
    shipped tabular profile from any folder; an existing file at the given path wins.

    Raises:
        ConfigError: neither a file nor a shipped profile; the message lists the shipped ones.
    """
    given = Path(name)
    if given.is_file():
        return given
    shipped = project_root() / "profiles"
    for candidate in (project_root() / given, shipped / given.name, shipped / f"{given.name}.yaml"):
        if candidate.is_file():
            return candidate
    names = ", ".join(sorted(p.stem for p in shipped.glob("*.yaml"))) or "none"
    raise ConfigError(f"{name}: no such params file, and no shipped profile of that name "
                      f"(shipped profiles: {names}; or give the path of your own params.yaml)")


def _copy_code(source: Path, target: Path) -> None:
    if target.resolve() == source.resolve():
        return  # the workspace is the medloop source tree itself
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
