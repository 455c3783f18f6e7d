"""Faults, and nothing half-written: each fault is injected into the real thing, and the test
counts what was injected, what recovered and what was lost (which must be nothing).

- PostgreSQL, the feedback store, restarted (``pg_ctl restart -m fast``) twice and then stopped
  for longer than the service waits, while clients post predictions and feedback through the
  service (in process, the session's tabular champion): no answer is a 500, every prediction and
  feedback acknowledged is in the database, a client that got 503 sends the same idempotency key
  again and its feedback is stored exactly once.
- The disk of the workspace full during collect: a size-limited tmpfs mounted on the workspace
  (where this process may mount; otherwise ENOSPC simulated at the file-writing seam collect
  uses), filled, then freed a little at a time: every collect fails with a clear error naming the
  folder, data/raw, its DVC record and the DVC cache are as they were, and once space is freed
  the next night collects every item exactly once and runs clean, validate and preprocess.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import in_range_instance, load, make_workspace, serving_settings, tabular_params
from tests_support import own_postgres, sign_in_to_pages

pytestmark = [pytest.mark.slow, pytest.mark.integration]


# ------------------------------------------------------------------------------------------------
# PostgreSQL restarted under the service's feedback load
# ------------------------------------------------------------------------------------------------

RETRY_SECONDS = 2  # serving.store_retry_seconds of the app under test
CLIENTS = 4  # threads posting feedback; one more posts predictions


class Tally:
    """What the clients saw, kept under one lock: posted and acknowledged feedback keys, the
    prediction ids answered, the 503s, and any answer that is neither (must stay empty)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.posted: list[tuple[str, str]] = []  # (reviewer token name, idempotency key)
        self.acknowledged: dict[tuple[str, str], int] = {}  # -> feedback id
        self.replayed_after_503 = 0
        self.predicted: list[str] = []
        self.unavailable = 0
        self.unexpected: list[str] = []

    def count(self) -> int:
        with self.lock:
            return len(self.acknowledged) + len(self.predicted)


def deliver(client, path: str, body: dict, headers: dict, tally: Tally, deadline: float):
    """Send one request until it is answered other than 503, as a client honouring Retry-After
    does; the final answer (None past the deadline)."""
    refused = False
    while time.monotonic() < deadline:
        answer = client.post(path, json=body, headers=headers)
        if answer.status_code != 503:
            if refused and path == "/feedback" and answer.status_code == 200:
                with tally.lock:
                    tally.replayed_after_503 += 1  # the refused try had been stored after all: a replay
            return answer
        refused = True
        problem = check_unavailable(answer, path)
        if problem:
            with tally.lock:
                tally.unexpected.append(problem)
            return answer
        with tally.lock:
            tally.unavailable += 1
        time.sleep(int(answer.headers["Retry-After"]))
    with tally.lock:
        tally.unexpected.append(f"{path}: still not answered at the deadline")
    return None


def check_unavailable(answer, path: str) -> str | None:
    """What is wrong with a 503 answer (None: a clear paragraph and a Retry-After)."""
    detail = answer.json().get("detail", "")
    if answer.headers.get("Retry-After") != str(RETRY_SECONDS):
        return f"{path}: 503 without Retry-After {RETRY_SECONDS}: {answer.headers}"
    if "feedback store is not answering" not in detail or "Traceback" in answer.text or "[SQL" in answer.text:
        return f"{path}: 503 without a clear message: {answer.text[:300]}"
    if path == "/feedback" and "same idempotency key" not in detail:
        return f"{path}: 503 does not say to send the same idempotency key: {detail}"
    return None


def feedback_client(client, worker: int, token: tuple[str, str], prediction_ids: list[str], label: str,
                    tally: Tally, stop: threading.Event, deadline: float) -> None:
    """Posts feedback, each with a key of its own, until ``stop``; every post is sent again after
    a 503 with the same key, until it is acknowledged."""
    name, secret = token
    headers = {"Authorization": f"Bearer {secret}"}
    number = 0
    while not stop.is_set() and time.monotonic() < deadline:
        key = f"restart-{worker}-{number}"
        body = {"prediction_id": prediction_ids[number % len(prediction_ids)], "label": label, "idempotency_key": key}
        with tally.lock:
            tally.posted.append((name, key))
        answer = deliver(client, "/feedback", body, headers, tally, deadline)
        if answer is not None and answer.status_code in (200, 201):
            with tally.lock:
                tally.acknowledged[(name, key)] = answer.json()["feedback_id"]
        elif answer is not None:
            with tally.lock:
                tally.unexpected.append(f"/feedback {key}: {answer.status_code} {answer.text[:200]}")
        number += 1
        time.sleep(0.01)


def prediction_client(client, features, secret: str, tally: Tally, stop: threading.Event, deadline: float) -> None:
    headers = {"Authorization": f"Bearer {secret}"}
    number = 0
    while not stop.is_set() and time.monotonic() < deadline:
        body = {"instances": [in_range_instance(features, shift=(number % 50) / 10)]}
        answer = deliver(client, "/predict", body, headers, tally, deadline)
        if answer is not None and answer.status_code == 200:
            with tally.lock:
                tally.predicted.extend(p["prediction_id"] for p in answer.json()["predictions"])
        elif answer is not None:
            with tally.lock:
                tally.unexpected.append(f"/predict: {answer.status_code} {answer.text[:200]}")
        number += 1
        time.sleep(0.01)


def wait_for_progress(tally: Tally, more: int, timeout: float = 60) -> None:
    """Until the clients have had ``more`` further answers acknowledged."""
    target = tally.count() + more
    deadline = time.monotonic() + timeout
    while tally.count() < target:
        assert time.monotonic() < deadline, f"the clients made no progress: {tally.count()} of {target} answers"
        time.sleep(0.02)


def test_postgresql_restarted_under_feedback_load_loses_nothing(served_workspace):
    from fastapi.testclient import TestClient
    from sqlalchemy import create_engine, event, text

    from pipelines.store.db import CONNECT_TIMEOUT_SECONDS, engine_for
    from serving.app import create_app

    layout, tokens = served_workspace["layout"], served_workspace["tokens"]
    params = load(layout)
    label = params.model.classes[0]
    reviewers = [("dr-clinician", tokens["clinician"]), ("dr-clinician2", tokens["clinician2"])]
    with own_postgres() as postgres:
        with serving_settings(layout, store_url=postgres.url, store_retry_seconds=RETRY_SECONDS):
            app = create_app(layout.params_file, reload_seconds=3600)
        with TestClient(app, raise_server_exceptions=False) as client:
            first = client.post("/predict", headers={"Authorization": f"Bearer {tokens['clinician']}"},
                                json={"instances": [in_range_instance(params.tabular.features, s / 5) for s in range(20)]})
            assert first.status_code == 200, first.text
            prediction_ids = [p["prediction_id"] for p in first.json()["predictions"]]
            signed = sign_in_to_pages(client, tokens["clinician"])  # a clinician on the pages too
            assert signed.status_code == 303, signed.text

            tally, stop = Tally(), threading.Event()
            deadline = time.monotonic() + 240
            threads = [threading.Thread(target=feedback_client, args=(client, worker, reviewers[worker % 2],
                                                                      prediction_ids, label, tally, stop, deadline))
                       for worker in range(CLIENTS)]
            threads.append(threading.Thread(target=prediction_client, args=(client, params.tabular.features,
                                                                            tokens["clinician"], tally, stop, deadline)))
            for thread in threads:
                thread.start()
            restarts = outages = 0
            try:
                wait_for_progress(tally, 20)
                for _ in range(2):  # restarted under load; the service keeps answering
                    postgres.restart()
                    restarts += 1
                    wait_for_progress(tally, 20)

                # Stopped for longer than the service waits: a clear 503 with Retry-After ...
                postgres.stop()
                probe = {"prediction_id": prediction_ids[0], "label": label, "idempotency_key": "probe-after-503"}
                headers = {"Authorization": f"Bearer {tokens['clinician']}"}
                refused = client.post("/feedback", json=probe, headers=headers)
                assert refused.status_code == 503 and check_unavailable(refused, "/feedback") is None, refused.text
                refused_prediction = client.post("/predict", headers=headers,
                                                 json={"instances": [in_range_instance(params.tabular.features)]})
                assert refused_prediction.status_code == 503, refused_prediction.text
                assert check_unavailable(refused_prediction, "/predict") is None
                # The clinicians' pages say so on a page of their own, not with the API's JSON.
                page = client.get("/pages/worklist")
                assert page.status_code == 503 and page.headers["content-type"].startswith("text/html"), page.text
                assert page.headers["Retry-After"] == str(RETRY_SECONDS)
                assert "The feedback store is not answering" in page.text and "Reload the page" in page.text
                # ... and the same post, sent again as the server comes back, is stored once (the
                # store's own retries usually carry it over the start; else the client's next try).
                again: dict = {}
                sender = threading.Thread(target=lambda: again.update(
                    answer=deliver(client, "/feedback", probe, headers, tally, deadline)))
                sender.start()
                time.sleep(0.3)
                postgres.start()
                outages += 1
                sender.join(timeout=120)
                assert again["answer"] is not None and again["answer"].status_code == 201, again["answer"]
                wait_for_progress(tally, 20)
            finally:
                stop.set()
                for thread in threads:
                    thread.join(timeout=120)
            metrics = client.get("/metrics").text
        connect_options: dict = {}
        probe_engine = engine_for(postgres.url)  # as the service makes it: with a connect timeout
        event.listen(probe_engine, "do_connect", lambda _d, _r, _a, options: connect_options.update(options))
        with probe_engine.connect():
            pass
        probe_engine.dispose()
        assert connect_options["connect_timeout"] == CONNECT_TIMEOUT_SECONDS

        engine = create_engine(postgres.url)
        try:
            with engine.connect() as connection:
                stored = connection.execute(text(
                    "SELECT reviewer_id, idempotency_key, count(*) FROM feedback GROUP BY reviewer_id, idempotency_key"
                )).all()
                predictions = {row[0] for row in connection.execute(text("SELECT id FROM predictions")).all()}
        finally:
            engine.dispose()

    assert tally.unexpected == [], tally.unexpected[:5]
    rows = {(reviewer, key): count for reviewer, key, count in stored}
    posted = set(tally.posted)
    lost = [key for key in tally.acknowledged if key not in rows]
    duplicates = [key for key, count in rows.items() if count > 1]
    unacknowledged = posted - set(tally.acknowledged)
    lost_predictions = [pid for pid in tally.predicted if pid not in predictions]
    assert lost == [] and duplicates == [] and lost_predictions == []
    assert unacknowledged == set(), f"posts never acknowledged: {sorted(unacknowledged)[:5]}"
    # Exactly what was posted is stored (and the probe, once), nothing else.
    assert set(rows) == posted | {("dr-clinician", "probe-after-503")}
    assert rows[("dr-clinician", "probe-after-503")] == 1
    retries = metric_value(metrics, "medloop_store_retries_total")
    assert retries >= 1, "no write was ever tried again: the restart was not felt"
    assert 'status="500"' not in metrics
    # The figures of the README's "Faults" (shown by `pytest tests/test_faults.py -rP`).
    print(f"PostgreSQL: {restarts} restarts (pg_ctl restart -m fast) and {outages} stop of over {RETRY_SECONDS} s "
          f"under load; feedback: {len(posted) + 1} posted, {len(tally.acknowledged) + 1} acknowledged; "
          f"predictions: {len(tally.predicted) + len(prediction_ids)} answered; {tally.unavailable + 2} answers 503 "
          f"(sent again), {int(retries)} writes retried by the store, {tally.replayed_after_503} replays after a 503; "
          f"lost {len(lost) + len(lost_predictions)}, duplicates {len(duplicates)}, 500s 0")


def metric_value(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# ------------------------------------------------------------------------------------------------
# The disk of the workspace full during collect
# ------------------------------------------------------------------------------------------------

DISK_SIZE = "16m"  # the workspace (git, stage code, DVC cache, one night of data) takes about 2 MiB


def mount_small_disk(folder: Path) -> bool:
    """A size-limited tmpfs mounted on ``folder`` when this process may mount (root, or
    CAP_SYS_ADMIN); False when it may not (the test then simulates ENOSPC)."""
    if shutil.which("mount") is None:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE},mode=0700", "medloop-test-disk",
                           str(folder)], capture_output=True, text=True)
    return done.returncode == 0


def unmount(folder: Path) -> None:
    done = subprocess.run(["umount", str(folder)], capture_output=True, text=True)
    if done.returncode != 0:  # still busy: detach it now, the kernel frees it when the last file closes
        subprocess.run(["umount", "-l", str(folder)], check=True)


def fill(disk: Path) -> Path:
    """Write a file on ``disk`` until the disk is full (as a log or another job would); it."""
    filler = disk / "filler"
    descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for block in (1 << 20, 1 << 12):
            while True:
                try:
                    os.write(descriptor, b"\0" * block)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    finally:
        os.close(descriptor)
    assert shutil.disk_usage(disk).free < 4096
    return filler


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def recorded_raw(layout) -> dict[str, str]:
    """The files of data/raw as DVC last recorded them (each batch's ``.dvc`` file and its ``.dir``
    object in the cache, and the index's): relative path -> md5."""
    import yaml

    recorded = {}
    for record in layout.batches.glob("*.dvc"):
        digest = yaml.safe_load(record.read_text())["outs"][0]["md5"]
        listing = json.loads((layout.root / ".dvc" / "cache" / "files" / "md5" / digest[:2] / digest[2:]).read_text())
        recorded.update({f"batches/{record.stem}/{entry['relpath']}": entry["md5"] for entry in listing})
    recorded["index.json"] = yaml.safe_load((layout.raw / "index.json.dvc").read_text())["outs"][0]["md5"]
    return recorded


def raw_files(layout) -> dict[str, str]:
    """The data files of data/raw (not DVC's records and git's ignore lists beside them)."""
    return {path.relative_to(layout.raw).as_posix(): md5(path) for path in layout.raw.rglob("*")
            if path.is_file() and path.suffix != ".dvc" and path.name != ".gitignore"}


def raw_records(layout) -> dict[str, bytes]:
    """DVC's records of data/raw and git's ignore lists: relative path -> bytes."""
    return {path.relative_to(layout.root).as_posix(): path.read_bytes() for path in layout.root.joinpath("data").rglob("*")
            if path.is_file() and (path.suffix == ".dvc" or path.name == ".gitignore")}


def assert_nothing_half_written(layout, before: dict, error) -> None:
    """After a failed collect: data/raw is file for file the version DVC last recorded, which is
    the version before the run (so the manifest, the source's state, says the same items are
    still to collect); nothing is left in the staging folder; the DVC cache holds no half-copied
    file and every object in it is whole (its content hashes to its name)."""
    message = str(error)
    assert "is full (no space left on device" in message and str(layout.root) in message, message
    assert "same items are collected again on the next run" in message and "Traceback" not in message
    assert "\n" not in message, "one paragraph"
    assert raw_files(layout) == before["raw"] == recorded_raw(layout)
    assert raw_records(layout) == before["record"]
    assert not layout.tmp.exists() or list(layout.tmp.iterdir()) == []
    cache = layout.root / ".dvc" / "cache" / "files" / "md5"
    for path in cache.rglob("*"):
        if path.is_file():
            assert not path.name.endswith(".tmp"), f"a half-copied file left in the DVC cache: {path}"
            name = path.parent.name + path.name.removesuffix(".dir")
            assert md5(path) == name, f"{path} is not whole"


def test_a_full_disk_during_collect_leaves_nothing_half_written(tmp_path, monkeypatch):
    from pipelines import clean, collect, preprocess, validate
    from pipelines.data import manifest
    from pipelines.errors import DiskFullError

    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = mount_small_disk(disk)
    failures: list[str] = []  # where each injected fault struck: "staging" or "DVC cache"
    try:
        raw = tabular_params()
        raw["source"]["nights"] = 2
        layout = make_workspace(disk, raw)
        params = load(layout)
        assert collect.run(params, layout).stored == 285  # night 1, on a disk with room
        before = {"raw": raw_files(layout), "record": raw_records(layout)}

        if mounted:
            # A real full disk: every write fails with ENOSPC, wherever it comes from (pyarrow,
            # DVC's copy into its cache, SQLite inside DVC, git). Space is then freed a little at
            # a time, doubling: the first size that holds the batch cannot also hold DVC's copy of
            # it, so the fault strikes both while staging and while DVC records the batch.
            filler = fill(disk)
            free = 16 * 1024
            while len(set(failures)) < 2:
                assert len(failures) < 12, f"collect never stopped on the DVC cache: {failures}"
                with pytest.raises(DiskFullError) as caught:
                    collect.run(params, layout)
                failures.append("DVC cache" if "dvc add" in str(caught.value) else "staging")
                assert_nothing_half_written(layout, before, caught.value)
                os.truncate(filler, max(0, filler.stat().st_size - free))
                free *= 2
            filler.unlink()  # space freed
        else:
            # This process may not mount: ENOSPC raised at the file-writing seam collect uses, after
            # half of the batch manifest is written (as a full disk leaves it).
            def half_written(frame, batch_dir):
                path = batch_dir / manifest.MANIFEST_FILE
                manifest.conform(frame).to_parquet(path, index=False)
                path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

            with monkeypatch.context() as seam:
                seam.setattr(manifest, "write_batch", half_written)
                with pytest.raises(DiskFullError) as caught:
                    collect.run(params, layout)
            failures.append("staging")
            assert_nothing_half_written(layout, before, caught.value)

        # The next night, with room again: the same items come back, each once, and the loop runs on.
        night = collect.run(params, layout)
        assert night.stored == 284 and night.already_collected == 0
        stored = manifest.read(layout)
        stored = stored[stored["status"] == "stored"]
        expected = {f"night-01#row={n}" for n in range(1, 286)} | {f"night-02#row={n}" for n in range(1, 285)}
        assert sorted(stored["source_ref"]) == sorted(expected)  # every item, exactly once
        assert stored["item_id"].is_unique and stored["batch_id"].nunique() == 2
        assert raw_files(layout) == recorded_raw(layout)
        cleaned = clean.run(params, layout)
        assert cleaned.accepted + cleaned.quarantined == 569
        assert validate.run(params, layout).success
        assert sum(preprocess.run(params, layout).counts.values()) == cleaned.accepted
    finally:
        if mounted:
            unmount(disk)
    how = f"a {DISK_SIZE} tmpfs filled" if mounted else "ENOSPC simulated at manifest.write_batch (may not mount)"
    print(f"disk full during collect ({how}): {len(failures)} faults injected ({failures.count('staging')} while "
          f"staging the batch, {failures.count('DVC cache')} while DVC copied it into its cache), {len(failures)} "
          "refused with a clear error and nothing half-written; next night: 569 of 569 items collected, each "
          "once; lost 0")
