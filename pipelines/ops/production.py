"""A workspace's params for the production stack, from a profile and the environment.

Production swaps URLs, not code: the compose stack and the Kubernetes manifests (infra/) create
their workspace with ``python -m pipelines.ops.production <folder>``, which takes a shipped
profile and sets each endpoint from a ``MEDLOOP_*`` variable of the environment (`ENDPOINTS`),
then makes the workspace as ``medloop init`` does. Only endpoints come from here, never a
secret: params.yaml is committed to the workspace's git.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from typing import Any, Mapping

import yaml

from pipelines.errors import ConfigError, mask_credentials

# environment variable -> (section, key) of params
ENDPOINTS: dict[str, tuple[str, str]] = {
    "MEDLOOP_TRACKING_URI": ("tracking", "uri"),
    "MEDLOOP_ARTIFACT_ROOT": ("tracking", "artifact_root"),
    "MEDLOOP_STORE_URL": ("serving", "store_url"),
    "MEDLOOP_SERVICE_URL": ("serving", "url"),
    "MEDLOOP_DVC_REMOTE": ("storage", "dvc_remote"),
    "MEDLOOP_S3_ENDPOINT_URL": ("storage", "s3_endpoint_url"),
    "MEDLOOP_S3_SSE": ("storage", "s3_server_side_encryption"),
    "MEDLOOP_WORK_POOL": ("schedule", "work_pool"),
}


def production_params(profile: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """``profile`` with every endpoint the environment names set.

    Raises:
        ConfigError: a value holds a password (it would be committed to git).
    """
    params = copy.deepcopy(dict(profile))
    for variable, (section, key) in ENDPOINTS.items():
        value = env.get(variable)
        if not value:
            continue
        if mask_credentials(value) != value:
            raise ConfigError(f"{variable} holds a password ({mask_credentials(value)}): params.yaml is committed "
                              f"to git; give the password to the client instead (PGPASSWORD, "
                              f"MLFLOW_TRACKING_PASSWORD, AWS_SECRET_ACCESS_KEY)")
        params[section] = {**(params.get(section) or {}), key: value}
    return params


def main(argv: list[str] | None = None) -> None:
    """``python -m pipelines.ops.production FOLDER``: make the workspace (once; an existing one is
    left as it is) with the profile ``MEDLOOP_PROFILE`` (default: params.yaml) and the
    environment's endpoints."""
    from pipelines.ops.scaffold import create_workspace, project_root, resolve_profile
    from pipelines.workspace import Layout

    folder = Path((argv or sys.argv[1:] or ["workspace"])[0])
    if Layout.at(folder).params_file.exists():
        print(f"workspace {folder} exists; left as it is")
        return
    name = os.environ.get("MEDLOOP_PROFILE") or ""
    profile_file = resolve_profile(name) if name else project_root() / "params.yaml"
    params = production_params(yaml.safe_load(Path(profile_file).read_text()), os.environ)
    folder.mkdir(parents=True, exist_ok=True)
    chosen = folder.parent / f".{folder.name}-params.yaml"
    chosen.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        layout = create_workspace(folder, chosen)
    finally:
        chosen.unlink(missing_ok=True)
    print(f"workspace ready at {layout.root}")


if __name__ == "__main__":
    main()
