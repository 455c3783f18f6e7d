"""Shared fixtures: every workspace and store lives under pytest's tmp_path."""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SALT = "test-salt-0123456789abcdef-not-secret"
# Tests run on a few dozen items: their test set may judge at once (the sizing is tested on its own).
TINY_TEST_SET = {"min_items": 1, "min_cases_per_class": 1, "precision": 0.15}

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(autouse=True)
def deid_salt(monkeypatch):
    monkeypatch.setenv("MEDLOOP_DEID_SALT", SALT)
    return SALT


def profile(name: str = "params.yaml") -> dict:
    """A shipped profile as a mutable dict (``params.yaml`` or ``profiles/<name>``)."""
    path = ROOT / name if name == "params.yaml" else ROOT / "profiles" / name
    return copy.deepcopy(yaml.safe_load(path.read_text()))


def image_params(**source) -> dict:
    """The default (image) profile, small: tiny synthetic nights unless a source is given."""
    params = profile()
    params["source"] = source or {
        "kind": "synthetic_cxr", "seed": 3, "nights": 3, "images_per_night": 24,
        "patients": 30, "image_size": 96, "pneumonia_fraction": 0.45, "jpeg_fraction": 0.25,
    }
    params["validate"]["min_new_items"] = 1
    params["validate"]["min_total_items"] = 1
    params["preprocess"]["image_size"] = [64, 64]
    params["preprocess"]["shard_size"] = 16
    params["preprocess"]["test_set"] = TINY_TEST_SET
    return params


def tabular_params(**source) -> dict:
    params = profile("breast_cancer.yaml")
    if source:
        params["source"] = source
    params["validate"]["min_new_items"] = 1
    params["validate"]["min_total_items"] = 1
    params["preprocess"]["test_set"] = TINY_TEST_SET
    return params


def make_workspace(tmp_path: Path, params: dict, name: str = "ws"):
    """A real workspace (git + DVC) with these params; its DVC remote is a folder in tmp_path."""
    from pipelines.ops.scaffold import create_workspace

    params = copy.deepcopy(params)
    params["storage"]["dvc_remote"] = str(tmp_path / f"{name}-remote")
    params_file = tmp_path / f"{name}-params.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    return create_workspace(tmp_path / name, params_file)


def load(layout):
    from pipelines.config import load_params

    return load_params(layout.params_file)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def served_workspace(tmp_path_factory):
    """A workspace whose champion is a trained tabular MLP (v1), and tokens for three roles;
    trained once per session and shared by every serving test. A test that changes it (a new
    champion, other params) puts it back as it found it.

    Returns:
        ``{"layout", "tokens": {role: token, "clinician2": token}, "tmp"}``.
    """
    from pipelines import collect, promote
    from pipelines.ops.versioning import repro
    from serving.auth import add_token
    from test_flow_retrain import passing_params

    previous = os.environ.get("MEDLOOP_DEID_SALT")
    os.environ["MEDLOOP_DEID_SALT"] = SALT
    tmp_path = tmp_path_factory.mktemp("serving")
    layout = make_workspace(tmp_path, passing_params())
    collect.run(load(layout), layout)
    assert repro(layout, "evaluate")
    assert promote.run(load(layout), layout, actor="test").version == "1"
    tokens_file = layout.root / ".medloop" / "tokens.json"
    tokens = {role: add_token(tokens_file, f"dr-{role}", role) for role in ("clinician", "reviewer", "admin")}
    tokens["clinician2"] = add_token(tokens_file, "dr-clinician2", "clinician")
    yield {"layout": layout, "tokens": tokens, "tmp": tmp_path}
    if previous is None:
        os.environ.pop("MEDLOOP_DEID_SALT", None)
    else:
        os.environ["MEDLOOP_DEID_SALT"] = previous


@contextlib.contextmanager
def serving_settings(layout, **values):
    """The workspace's ``serving`` section with these values, restored afterwards."""
    original = layout.params_file.read_text()
    params = yaml.safe_load(original)
    params["serving"].update(values)
    layout.params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        yield
    finally:
        layout.params_file.write_text(original)


def in_range_instance(features: dict, shift: float = 0.0) -> dict:
    """A tabular case inside every feature's declared range (``features``: ``tabular.features``);
    ``shift`` from 0 to about 7 moves it along the ranges, each feature a little apart."""
    row = {}
    for index, (name, spec) in enumerate(features.items()):
        low = spec.min if spec.min is not None else 0.0
        high = spec.max if spec.max is not None else low + 100.0
        value = low + (high - low) * (0.05 + 0.12 * shift + 0.001 * index)
        row[name] = round(value) if spec.dtype == "int" else value
    return row


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible server (moto's) on 127.0.0.1 for the whole session."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_credentials(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "medloop-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "medloop-test-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture
def s3_bucket(s3_endpoint, s3_credentials, request):
    """A fresh bucket on the local S3 server; returns (client, bucket name)."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    name = "medloop-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    client.create_bucket(Bucket=name)
    return client, name
