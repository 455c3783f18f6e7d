"""Bearer tokens with roles. Only SHA-256 hashes of tokens are stored (``serving.tokens_file``);
a token is shown once, when it is made (``medloop token add``).

Roles: ``clinician`` may predict and give feedback; ``reviewer`` may also adjudicate;
``admin`` may do everything, including reload and export.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from pathlib import Path

from pipelines.errors import MedloopError

ROLES = {
    "clinician": {"predict", "feedback"},
    "reviewer": {"predict", "feedback", "review"},
    "admin": {"predict", "feedback", "review", "admin"},
}


@dataclass(frozen=True)
class Caller:
    """Who is calling: the token's name (recorded on every write) and role."""

    name: str
    role: str

    def may(self, permission: str) -> bool:
        return permission in ROLES[self.role]


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def add_token(tokens_file: Path, name: str, role: str) -> str:
    """Make a new token for ``name`` with ``role``; store its hash; return the token (shown once)."""
    if role not in ROLES:
        raise MedloopError(f"unknown role {role!r}; roles are {sorted(ROLES)}")
    entries = load_entries(tokens_file)
    if any(entry["name"] == name for entry in entries):
        raise MedloopError(f"{tokens_file} already has a token named {name!r}")
    token = secrets.token_urlsafe(32)
    entries.append({"name": name, "role": role, "sha256": digest(token)})
    tokens_file.parent.mkdir(parents=True, exist_ok=True)
    tokens_file.write_text(json.dumps({"tokens": entries}, indent=2) + "\n")
    tokens_file.chmod(0o600)
    return token


def load_entries(tokens_file: Path) -> list[dict]:
    if not tokens_file.is_file():
        return []
    try:
        entries = json.loads(tokens_file.read_text())["tokens"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise MedloopError(f"{tokens_file}: not a medloop tokens file (expected {{\"tokens\": [...]}})") from None
    for index, entry in enumerate(entries):
        if entry.get("role") not in ROLES or not entry.get("name") or len(entry.get("sha256", "")) != 64:
            raise MedloopError(f"{tokens_file}: token entry {index} needs a name, a role in {sorted(ROLES)} and a sha256")
    return entries


class TokenTable:
    """The tokens file, read once at start; lookups compare hashes in constant time."""

    def __init__(self, tokens_file: Path):
        self.entries = load_entries(tokens_file)

    def caller(self, token: str) -> Caller | None:
        wanted = digest(token)
        found = None
        for entry in self.entries:
            if hmac.compare_digest(entry["sha256"], wanted):
                found = Caller(entry["name"], entry["role"])
        return found
