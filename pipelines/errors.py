"""The errors medloop raises on purpose.

Every error a user can cause (bad params, bad input, a failed gate) is a `MedloopError`: the
command line prints its message as one paragraph, without a traceback. Messages name the file,
row, field or key and say what is wrong.
"""

from __future__ import annotations

import errno
import os
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


class DiskFullError(MedloopError):
    """A write failed because the disk (or the user's quota) is full. The message names the
    folder and what was kept: a stage that raises it has left nothing half-written."""


DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# How a tool run as a subprocess (DVC, git, SQLite inside DVC) says it: the C library's words for
# the two errnos, and SQLite's own ("database or disk is full").
DISK_FULL_WORDS = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT), "database or disk is full")


def is_disk_full(exc: BaseException) -> bool:
    """True for an OSError of a full disk or quota (pyarrow's errors carry the errno too)."""
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


def says_disk_full(text: str) -> bool:
    """True when a tool's error output says the disk or quota is full."""
    return any(words.lower() in text.lower() for words in DISK_FULL_WORDS)
