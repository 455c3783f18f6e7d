"""The errors medloop raises on purpose.

Every error a user can cause (bad params, bad input, a failed gate) is a `MedloopError`: the
command line prints its message as one paragraph, without a traceback. Messages name the file,
row, field or key and say what is wrong.
"""

from __future__ import annotations


import re

_URL_PASSWORD = re.compile(r"(://[^/:@\s]+:)[^@\s/]+@")


def mask_credentials(text: str) -> str:
    """``scheme://user:password@host`` -> ``scheme://user:***@host``, anywhere in the text."""
    return _URL_PASSWORD.sub(r"\1***@", text)


class MedloopError(Exception):
    """Base class of the errors that carry a message meant for the user."""


class ConfigError(MedloopError):
    """params.yaml is missing, unreadable, or does not match the schema."""


class WorkspaceError(MedloopError):
    """The folder is not a medloop workspace, or git/DVC failed in it."""


class SourceError(MedloopError):
    """A data source cannot be read as a whole (unreachable, missing columns, ...).

    Problems with single items never raise this: they become quarantine entries.
    """


class DeidentificationError(MedloopError):
    """Data could not be proven free of identifiers, so it was not written."""


class GateError(MedloopError):
    """A quality gate failed; the message lists what failed and where the report is."""
