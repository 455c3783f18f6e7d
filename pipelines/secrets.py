"""Secrets: read from the environment, or from a file only its owner can read.

A secret is named by an environment variable, ``NAME``. Its value is ``$NAME``; when that is
unset, the contents of the file that ``$NAME_FILE`` names (the convention of Docker and Kubernetes
secrets, mounted as files), which must not be readable by group or others. Nothing else is a
source: params.yaml is committed to git, so no secret is ever written there.

Endpoints' own clients read the rest the same way, with no medloop code: PostgreSQL's password
from ``PGPASSWORD`` or ``PGPASSFILE`` (libpq refuses a pass file others can read), S3's keys from
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` or ``AWS_SHARED_CREDENTIALS_FILE``, MLflow's from
``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` (``MLFLOW_TRACKING_PASSWORD_FILE`` is
read here, `export_file_secrets`).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from pipelines.errors import MedloopError

FILE_SUFFIX = "_FILE"
# Secrets that other clients read from the environment, which medloop fills from ``NAME_FILE``.
CLIENT_SECRETS = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_TOKEN")


class SecretError(MedloopError):
    """A secret's file is missing, unreadable, or readable by others."""


def read_secret(env_name: str) -> str | None:
    """The secret named by ``env_name``: ``$env_name``, else the file ``$env_name_FILE``
    (trailing newline removed), else None.

    Raises:
        SecretError: ``$env_name_FILE`` names a file that is missing, unreadable, or readable or
            writable by group or others (it must be 0600 or 0400).
    """
    value = os.environ.get(env_name)
    if value:
        return value
    file_name = os.environ.get(env_name + FILE_SUFFIX)
    if not file_name:
        return None
    path = Path(file_name)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        text = path.read_text()
    except OSError as exc:
        raise SecretError(f"{env_name}{FILE_SUFFIX} names {path}, which cannot be read ({exc.strerror}): "
                          f"point it at the file that holds {env_name}") from None
    if mode & 0o077:
        raise SecretError(f"{path} ({env_name}{FILE_SUFFIX}) holds a secret but its mode is {mode:o}: group or "
                          f"others may read it. Run `chmod 600 {path}`")
    return text.rstrip("\r\n") or None


def secret_source(env_name: str) -> str:
    """Where `read_secret` looks, in words, for messages (never the value)."""
    if os.environ.get(env_name):
        return f"environment variable {env_name}"
    if os.environ.get(env_name + FILE_SUFFIX):
        return f"file {os.environ[env_name + FILE_SUFFIX]} ({env_name}{FILE_SUFFIX})"
    return f"{env_name} (or {env_name}{FILE_SUFFIX}), which is not set"


def export_file_secrets(names: tuple[str, ...] = CLIENT_SECRETS) -> list[str]:
    """Put each secret that only a ``NAME_FILE`` holds into ``NAME`` of this process's
    environment, where its client (MLflow) reads it; the names filled."""
    filled = []
    for name in names:
        if not os.environ.get(name) and os.environ.get(name + FILE_SUFFIX):
            value = read_secret(name)
            if value:
                os.environ[name] = value
                filled.append(name)
    return filled


def redact(text: str, values: list[str | None]) -> str:
    """``text`` with every one of ``values`` (secrets) replaced by ``***``; short values (under
    6 characters) are left, as they would mask ordinary words."""
    for value in values:
        if value and len(value) >= 6:
            text = text.replace(value, "***")
    return text
