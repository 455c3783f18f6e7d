"""The secret salt and the keyed hashes built on it.

Pseudonyms and item hashes are HMAC-SHA256 under a salt read from an environment variable, so
that nobody without the salt can recompute a patient's pseudonym from a known identifier.
"""

from __future__ import annotations

import hashlib
import hmac
from pipelines.errors import DeidentificationError
from pipelines.secrets import read_secret

MIN_SALT_LENGTH = 16


def load_salt(env_name: str) -> bytes:
    """Read the de-identification salt.

    Args:
        env_name: name of the environment variable (``deid.salt_env`` in params); when it is
            unset, the file that ``<env_name>_FILE`` names, readable by its owner only
            (`pipelines.secrets.read_secret`).

    Raises:
        DeidentificationError: the variable is unset or too short to be a secret.
        SecretError: ``<env_name>_FILE`` is unreadable or others may read it.
    """
    value = read_secret(env_name) or ""
    if not value:
        raise DeidentificationError(
            f"environment variable {env_name} (or a file named by {env_name}_FILE) is not set: it holds the secret salt of patient "
            f"pseudonyms (deid.salt_env in params). Set it to a long random string and keep it "
            f"stable, e.g. export {env_name}=$(python -c 'import secrets; print(secrets.token_hex(32))')"
        )
    if len(value) < MIN_SALT_LENGTH:
        raise DeidentificationError(
            f"the salt in {env_name} is {len(value)} characters long; a salt needs at "
            f"least {MIN_SALT_LENGTH}"
        )
    return value.encode()


def keyed_hash(salt: bytes, data: bytes, purpose: str = "item") -> str:
    """HMAC-SHA256 of ``data`` under the salt, separated by purpose; 64 hex characters."""
    return hmac.new(salt, purpose.encode() + b"\x00" + data, hashlib.sha256).hexdigest()


def pseudonym(salt: bytes, value: str, prefix: str = "pt") -> str:
    """A stable pseudonym such as ``pt-3f9c0a1b2c4d5e6f`` for an identifier.

    The same identifier always gives the same pseudonym under the same salt; the identifier
    cannot be recovered from it.
    """
    digest = keyed_hash(salt, value.strip().encode(), purpose=prefix)
    return f"{prefix}-{digest[:16]}"


def content_hash(data: bytes) -> str:
    """Plain SHA-256 of stored (already de-identified) content."""
    return hashlib.sha256(data).hexdigest()
