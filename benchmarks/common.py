"""What the benchmark scripts share: the public benchmark salt and the environment of the
medloop processes they start."""

from __future__ import annotations

BENCH_SALT = "benchmark-salt-not-secret-0123456789"


def child_env() -> dict[str, str]:
    """medloop's tool environment (this interpreter first on PATH), quiet, with a salt."""
    from pipelines.ops.versioning import tool_env

    env = tool_env()
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env.setdefault("MEDLOOP_DEID_SALT", BENCH_SALT)
    env.setdefault("DO_NOT_TRACK", "1")
    return env
