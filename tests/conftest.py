"""Shared fixtures: every workspace and store lives under pytest's tmp_path."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from pipelines.workspace import Layout

ROOT = Path(__file__).resolve().parent.parent
SALT = "test-salt-0123456789abcdef-not-secret"
# Tests run on a few dozen items: their test set may judge at once (the sizing is tested on its own).
TINY_TEST_SET = {"min_items": 1, "min_cases_per_class": 1, "precision": 0.15}

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


# The longest modules first. `make test` runs the suite on two processes (pytest-xdist, a module
# at a time: ``-n 2 --dist loadfile``); started first, these run side by side with the rest
# instead of one of them running alone at the end. A stable sort: each module keeps its order.
LONGEST_FIRST = ("test_production.py", "test_flow_retrain.py", "test_loop_promotion.py", "test_reproduce.py",
                 "test_serving.py", "test_demo.py", "test_canaries.py", "test_loop_e2e.py",
                 "test_schedule_integration.py", "test_dvc_pipeline.py", "test_cli.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: place for place, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


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


def small_image_params() -> dict:
    """The small image profile a tiny CNN trains on in a few seconds: 48x48, 2 epochs."""
    raw = image_params()
    raw["preprocess"]["image_size"] = [48, 48]
    raw["train"].update(epochs=2, batch_size=16)
    return raw


def tabular_params(**source) -> dict:
    params = profile("breast_cancer.yaml")
    if source:
        params["source"] = source
    params["validate"]["min_new_items"] = 1
    params["validate"]["min_total_items"] = 1
    params["preprocess"]["test_set"] = TINY_TEST_SET
    return params


def passing_params() -> dict:
    params = tabular_params()
    # Floors suited to a test set of a few dozen cases; the gates themselves are table-tested.
    params["promote"].update(min_auroc=0.85, min_sensitivity=0.5, min_specificity=0.3, max_ece=0.3,
                             subgroup_min_count=1000)
    params["train"].update(epochs=15)
    params["source"]["nights"] = 2  # the data set released in two nights: fewer runs to reach "nothing new"
    return params


def registry(layout):
    """An MLflow client on the workspace's tracking store."""
    import mlflow
    from mlflow import MlflowClient

    from pipelines.registry.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri(load(layout), layout))
    return MlflowClient()


def make_workspace(tmp_path: Path, params: dict, name: str = "ws"):
    """A real workspace (git + DVC) with these params; its DVC remote is a folder in tmp_path.

    What ``create_workspace`` makes depends on the params only through ``storage`` (the DVC
    remote): the first workspace of a ``storage`` section is created for real (git init, dvc
    init, ...) as a template, and each workspace is a copy of it with its own params.yaml and
    remote, committed as ``create_workspace`` commits them."""
    from pipelines.config import load_params
    from pipelines.ops.versioning import git

    params = copy.deepcopy(params)
    remote = tmp_path / f"{name}-remote"
    params["storage"]["dvc_remote"] = str(remote)
    params_file = tmp_path / f"{name}-params.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    load_params(params_file)  # a broken profile is refused, as create_workspace refuses it
    template, template_remote = workspace_template(params["storage"])
    shutil.copytree(template, tmp_path / name, symlinks=True)
    remote.mkdir(parents=True, exist_ok=True)
    layout = Layout.at(tmp_path / name)
    shutil.copyfile(params_file, layout.params_file)
    dvc_config = layout.root / ".dvc" / "config"
    dvc_config.write_text(dvc_config.read_text().replace(template_remote, str(remote.resolve())))
    git(layout, "add", "-A")
    git(layout, "-c", "user.name=medloop", "-c", "user.email=medloop@localhost",
        "commit", "--quiet", "--amend", "--no-edit", "--reset-author")
    return layout


_TEMPLATES: dict[str, tuple[Path, str]] = {}


def workspace_template(storage: dict) -> tuple[Path, str]:
    """A workspace made by ``create_workspace`` once per ``storage`` section (its remote aside),
    in a folder of this session; and its remote's path as ``.dvc/config`` holds it."""
    import atexit
    import tempfile

    from pipelines.ops.scaffold import create_workspace

    key = json.dumps({k: v for k, v in storage.items() if k != "dvc_remote"}, sort_keys=True)
    if key not in _TEMPLATES:
        folder = Path(tempfile.mkdtemp(prefix="medloop-template-"))
        atexit.register(shutil.rmtree, folder, True)
        params = profile()
        params["storage"] = {**storage, "dvc_remote": str(folder / "template-remote")}
        params_file = folder / "params.yaml"
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        create_workspace(folder / "ws", params_file)
        _TEMPLATES[key] = (folder / "ws", str((folder / "template-remote").resolve()))
    return _TEMPLATES[key]


def copy_world(source: Path, target: Path) -> Path:
    """A copy of a world's folder (a workspace, its DVC remote, its stores) that shares nothing
    with it: every absolute path to ``source`` the copy holds (MLflow's artifact locations in its
    SQLite store, the DVC remote in ``.dvc/config`` and ``params.yaml``, state files) is
    rewritten to ``target``. Git objects and binary artifacts hold no such path."""
    import sqlite3

    shutil.copytree(source, target, symlinks=True)
    old, new = str(source.resolve()) + os.sep, str(target.resolve()) + os.sep
    for path in target.rglob("*"):
        if ".git" in path.relative_to(target).parts or path.is_symlink() or not path.is_file():
            continue
        if path.suffix == ".db":
            with contextlib.closing(sqlite3.connect(path)) as database, database:
                tables = [row[0] for row in database.execute("SELECT name FROM sqlite_master WHERE type='table'")]
                for table in tables:
                    for column in database.execute(f'PRAGMA table_info("{table}")').fetchall():
                        if column[2].upper() in ("", "TEXT") or "CHAR" in column[2].upper():
                            database.execute(f'UPDATE "{table}" SET "{column[1]}" = replace("{column[1]}", ?, ?) '
                                             f'WHERE instr("{column[1]}", ?) > 0', (old, new, old))
        elif path.suffix in TEXT_SUFFIXES or path.name == "config":
            text = path.read_bytes()
            if old.encode() in text:
                path.write_bytes(text.replace(old.encode(), new.encode()))
    return target


TEXT_SUFFIXES = {".yaml", ".yml", ".json", ".jsonl", ".txt", ".md", ".html", ".dvc", ".lock", ".csv", ".log"}


def load(layout):
    from pipelines.config import load_params

    return load_params(layout.params_file)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def salted():
    """``MEDLOOP_DEID_SALT`` set while a session fixture builds its world (the autouse
    ``deid_salt`` fixture sets it per test only)."""
    previous = os.environ.get("MEDLOOP_DEID_SALT")
    os.environ["MEDLOOP_DEID_SALT"] = SALT
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("MEDLOOP_DEID_SALT", None)
        else:
            os.environ["MEDLOOP_DEID_SALT"] = previous


# How long the end of the session waits for Prefect's log and event workers to send what they
# hold. Prefect's own harness (`prefect_test_harness`) waits without a limit: on CI (2026-12-01)
# its drain never returned and the session hung in its teardown until pytest-timeout failed it
# 900 s later. The cause was a world that stopped its own Prefect server while this process's
# workers were bound to it (tests/test_production.py now drains them first); the limit stays.
PREFECT_DRAIN_S = 60


@pytest.fixture(scope="session")
def prefect_server():
    """One Prefect server for every flow test of the session, as Prefect's test harness makes it
    (a subprocess server on a temporary SQLite database, the API of every flow run in this
    process), with a bounded end: the log and event workers get ``PREFECT_DRAIN_S`` to drain,
    then the server stops whether or not they have, with a warning when one has not."""
    import tempfile
    import warnings

    import prefect.context
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.server.database.dependencies import temporary_database_interface
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_DATABASE_CONNECTION_URL, temporary_settings
    from tests_support import drain_prefect_workers

    with contextlib.ExitStack() as stack:
        folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="medloop-prefect-"))
        stack.enter_context(temporary_database_interface())
        stack.enter_context(temporary_settings(
            {PREFECT_SERVER_DATABASE_CONNECTION_URL: f"sqlite+aiosqlite:///{folder}/prefect.db"}))
        server = SubprocessASGIServer()  # no port: the default server, the one Prefect's own code asks for
        server.start(timeout=120)
        stack.callback(server.stop)
        stack.enter_context(temporary_settings({PREFECT_API_URL: server.api_url}))
        # Threads whose context was copied before these settings (none should be) see them too.
        global_settings = prefect.context.GLOBAL_SETTINGS_CONTEXT
        prefect.context.GLOBAL_SETTINGS_CONTEXT = prefect.context.get_settings_context()
        stack.callback(setattr, prefect.context, "GLOBAL_SETTINGS_CONTEXT", global_settings)
        yield
        stuck = drain_prefect_workers(PREFECT_DRAIN_S)
        if stuck:
            warnings.warn(f"Prefect's {' and '.join(stuck)} did not drain in {PREFECT_DRAIN_S} s; "
                          "the test server stops without waiting for them")


@pytest.fixture(scope="session")
def tabular_champion(tmp_path_factory) -> Path:
    """The folder of a world whose champion is a trained tabular MLP (v1 of ``passing_params``
    on one night): the workspace ``ws``, its DVC remote and params. Built once per session and
    never changed: a test or fixture that changes it works on a ``copy_world`` of it."""
    from pipelines import collect, promote
    from pipelines.ops.versioning import repro

    folder = tmp_path_factory.mktemp("tabular-champion")
    with salted():
        layout = make_workspace(folder, passing_params())
        collect.run(load(layout), layout)
        assert repro(layout, "evaluate")
        assert promote.run(load(layout), layout, actor="test").version == "1"
    return folder


@pytest.fixture(scope="session")
def served_workspace(tabular_champion, tmp_path_factory):
    """A copy of the tabular champion's world, and tokens for three roles, shared by every
    serving test. A test that changes it (a new champion, other params) puts it back as it
    found it.

    Returns:
        ``{"layout", "tokens": {role: token, "clinician2": token}, "tmp"}``.
    """
    from serving.auth import add_token

    tmp_path = tmp_path_factory.mktemp("serving")
    layout = Layout.at(copy_world(tabular_champion, tmp_path / "world") / "ws")
    tokens_file = layout.root / ".medloop" / "tokens.json"
    tokens = {role: add_token(tokens_file, f"dr-{role}", role) for role in ("clinician", "reviewer", "admin")}
    tokens["clinician2"] = add_token(tokens_file, "dr-clinician2", "clinician")
    with salted():  # module-scoped apps built on it de-identify outside any test's own salt
        yield {"layout": layout, "tokens": tokens, "tmp": tmp_path}


@pytest.fixture(scope="session")
def tiny_cnn_champion(tmp_path_factory) -> dict:
    """A world whose champion is a 2-epoch CNN on two tiny synthetic nights, built once per
    session and never changed (a test copies it with ``copy_world``):
    ``{"folder", "params": the params dict, "version": the champion's version}``."""
    from pipelines import collect, promote
    from pipelines.ops.versioning import repro

    params = image_params()
    params["train"]["epochs"] = 2
    folder = tmp_path_factory.mktemp("tiny-cnn")
    with salted():
        layout = make_workspace(folder, params)
        for _night in range(2):
            collect.run(load(layout), layout)
        assert repro(layout, "evaluate")
        result = promote.run(load(layout), layout, actor="test")
        if not result.passed:  # a 2-epoch CNN on 48 tiny images: register it by override for the test
            result = promote.override(load(layout), layout, result.run_id, "test: serve a tiny CNN", actor="test")
    return {"folder": folder, "params": params, "version": result.version}


def processed_workspace(folder: Path, raw: dict, nights: int):
    """A workspace in ``folder`` taken through collect, clean and preprocess: (layout, params)."""
    from pipelines import clean, collect, preprocess

    with salted():
        layout = make_workspace(folder, raw)
        params = load(layout)
        for _ in range(nights):
            collect.run(params, layout)
        clean.run(params, layout)
        preprocess.run(params, layout)
    return layout, params


@pytest.fixture(scope="session")
def trained_tabular(tmp_path_factory):
    """A tabular MLP trained (5 epochs) on the whole data set collected at once, no DVC; shared
    read-only by the session: ``(layout, params, TrainResult)``."""
    from pipelines import train

    raw = tabular_params()
    raw["source"]["nights"] = 1  # the whole data set at once: about 370 training rows
    raw["train"].update(epochs=5)
    layout, params = processed_workspace(tmp_path_factory.mktemp("trained-tabular"), raw, nights=1)
    return layout, params, train.run(params, layout)


@pytest.fixture(scope="session")
def trained_image(tmp_path_factory):
    """A tiny CNN (``cxr_small``, 2 epochs on 48x48 images of three synthetic nights) trained
    without DVC; shared read-only by the session (a test that trains again copies its world,
    ``layout.root.parent``): ``(layout, params, TrainResult)``."""
    from pipelines import train

    layout, params = processed_workspace(tmp_path_factory.mktemp("trained-image"), small_image_params(), nights=3)
    return layout, params, train.run(params, layout)


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
