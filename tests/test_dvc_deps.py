"""dvc.yaml declares every medloop module each stage runs, so `dvc status` at a commit is
truthful: a change to any code a stage executes makes that stage out of date."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def module_file(name: str) -> Path | None:
    path = ROOT / Path(*name.split("."))
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


def imported_modules(path: Path) -> set[str]:
    """Every ``pipelines`` module a file imports, at the top or inside functions."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("pipelines")}
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                parts = package.split(".")
                module = ".".join(parts[: len(parts) - node.level + 1] + ([module] if module else []))
            if module.startswith("pipelines"):
                found.add(module)
                found |= {f"{module}.{alias.name}" for alias in node.names if module_file(f"{module}.{alias.name}")}
    return found


def code_of(module: str) -> set[str]:
    """The files of a module and of everything it imports from pipelines, transitively."""
    seen: set[str] = set()
    pending = [module]
    while pending:
        name = pending.pop()
        if name in seen or module_file(name) is None:
            continue
        seen.add(name)
        pending += imported_modules(module_file(name))
        pending += [".".join(name.split(".")[:i]) for i in range(1, len(name.split(".")))]
    return {module_file(name).relative_to(ROOT).as_posix() for name in seen}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_module_a_stage_runs_is_a_declared_dependency(stage):
    spec = STAGES[stage]
    module = spec["cmd"].split()[-1]
    declared = {dep if isinstance(dep, str) else next(iter(dep)) for dep in spec["deps"]}
    undeclared = sorted(path for path in code_of(module)
                        if not any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in declared))
    assert undeclared == [], f"dvc.yaml stage {stage} runs {undeclared} without declaring them"


def test_the_check_sees_imports_inside_functions():
    # train imports pipelines.model.pyfunc only inside a function; it must still count.
    top_level = ast.parse((ROOT / "pipelines" / "train.py").read_text()).body
    assert not any(isinstance(node, ast.ImportFrom) and node.module == "pipelines.model.pyfunc" for node in top_level)
    assert "pipelines/model/pyfunc.py" in code_of("pipelines.train")
