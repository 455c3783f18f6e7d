"""The frozen test set as a person sees it: how big it is, and extending it deliberately.

Preprocess grows the test set with new patients until it reaches ``preprocess.test_set`` and
then freezes it (``data/splits/test_set.json``). Extending a frozen test set is a deliberate act:
`extend` raises the minimum in the workspace's params.yaml and commits that change with who asked
and why, so git records it; the next preprocess grows the set again, promote refuses to judge until
it is frozen as the next version, and the champion is re-scored on it before any comparison
(``pipelines.promote``: different frozen test set, re-score).
"""

from __future__ import annotations

import json
import re

from pipelines.config import Params, parse_params
from pipelines.errors import ConfigError
from pipelines.preprocess import TEST_SET_FILE, describe_test_set, test_set_minimum
from pipelines.ops.versioning import git
from pipelines.workspace import Layout


def current(layout: Layout) -> dict | None:
    """``data/splits/test_set.json`` (None before the first preprocess)."""
    path = layout.splits / TEST_SET_FILE
    return json.loads(path.read_text()) if path.exists() else None


def describe(params: Params, layout: Layout) -> str:
    """One paragraph: the test set's state and the minimum params hold it to."""
    state = current(layout)
    minimum = test_set_minimum(params)
    wanted = f"minimum: {minimum['cases_per_class']} cases of each class and {minimum['items']} items"
    if state is None:
        return f"no test set yet (run the loop once); {wanted}"
    return f"{describe_test_set(state)}; {wanted}"


def extend(params: Params, layout: Layout, *, cases_per_class: int, items: int | None, reason: str,
           actor: str) -> str:
    """Raise the test set's minimum in params.yaml and commit it, recording who and why.

    Args:
        cases_per_class: the new minimum of cases of each class.
        items: the new minimum of items (default: unchanged).
        reason: why (required; it goes into the commit message).
        actor: who asked (the commit's author).

    Returns:
        The commit message.

    Raises:
        ConfigError: no reason, or a minimum that would not grow the test set.
    """
    if not reason.strip():
        raise ConfigError("--reason is required: extending the test set is recorded with who and why")
    state = current(layout) or {}
    fewest = min(state.get("cases", {}).values(), default=0)
    held_items = state.get("items", 0)
    if cases_per_class <= fewest and (items is None or items <= held_items):
        raise ConfigError(f"the test set already holds at least {fewest} cases of every class and {held_items} "
                          f"items; extending it needs a minimum above that (got --cases-per-class "
                          f"{cases_per_class}{f', --items {items}' if items is not None else ''})")
    text = layout.params_file.read_text()
    text = _set_key(text, "min_cases_per_class", str(cases_per_class), layout)
    if items is not None:
        text = _set_key(text, "min_items", str(items), layout)
    import yaml

    parse_params(yaml.safe_load(text), origin=str(layout.params_file))  # refuse before writing
    layout.params_file.write_text(text)
    message = (f"testset: extend the test set to {cases_per_class} cases of each class"
               f"{f' and {items} items' if items is not None else ''} (by {actor}): {reason.strip()}")
    git(layout, "add", layout.params_file.name)
    git(layout, "-c", f"user.name={actor}", "-c", "user.email=medloop@localhost", "commit", "--quiet",
        "-m", message)
    return message


def _set_key(text: str, key: str, value: str, layout: Layout) -> str:
    pattern = re.compile(rf"^(\s+{key}:\s*)([^\s#]+)", re.MULTILINE)
    if len(pattern.findall(text)) != 1:
        raise ConfigError(f"{layout.params_file}: cannot find preprocess.test_set.{key} to change; edit it by hand")
    return pattern.sub(lambda match: match.group(1) + value, text)
