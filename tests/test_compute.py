"""The data stages on Dask: a 2-worker LocalCluster of processes writes byte for byte what the
serial path writes; a worker dying mid-stage is retried, or fails the stage with nothing
half-written published."""

from __future__ import annotations

import hashlib
import os
import re
import shutil

import pandas as pd
import pytest
import yaml
from distributed import WorkerPlugin

from conftest import image_params, load, make_workspace
from pipelines import clean, collect, preprocess
from pipelines.config import parse_params
from pipelines.ops.compute import ComputeError, item_map, staged_directory
from pipelines.workspace import Layout


def outputs(layout) -> dict[str, str]:
    """SHA-256 of every file the two stages write (what DVC hashes, and the quarantine)."""
    files = {}
    for folder in (layout.clean, layout.processed, layout.splits):
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                files[path.relative_to(layout.root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    files["reports/quarantine.csv"] = hashlib.sha256(layout.quarantine_csv.read_bytes()).hexdigest()
    return files


def with_compute(layout, **compute) -> None:
    raw = yaml.safe_load(layout.params_file.read_text())
    raw["compute"].update(compute)
    layout.params_file.write_text(yaml.safe_dump(raw, sort_keys=False))


def clean_and_preprocess(layout) -> dict[str, str]:
    params = load(layout)
    clean.run(params, layout)
    preprocess.run(params, layout)
    return outputs(layout)


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    """Two nights of small synthetic radiographs, collected (the stages are run on copies)."""
    from conftest import SALT

    raw = image_params()
    raw["source"].update(nights=2, images_per_night=20, image_size=64)
    raw["preprocess"]["image_size"] = [32, 32]
    root = tmp_path_factory.mktemp("compute")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEDLOOP_DEID_SALT", SALT)
        layout = make_workspace(root, raw)
        for _ in range(2):
            collect.run(load(layout), layout)
    return layout


@pytest.fixture(scope="module")
def serial_outputs(collected):
    return clean_and_preprocess(collected)


def copy_of(layout, tmp_path) -> Layout:
    copy = Layout.at(shutil.copytree(layout.root, tmp_path / "ws", symlinks=True))
    # Nothing of the serial run's: its outputs, and its per-item cache (the work must be redone).
    for folder in (copy.clean, copy.processed, copy.splits, copy.state / "cache"):
        shutil.rmtree(folder, ignore_errors=True)
    return copy


@pytest.fixture(scope="module")
def cluster():
    """A real 2-worker LocalCluster of processes (the stages reach it through compute.scheduler)."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      host="127.0.0.1") as local, Client(local) as client:
        yield local, client


@pytest.mark.slow
def test_a_local_dask_cluster_writes_what_the_serial_path_writes(collected, serial_outputs, tmp_path):
    layout = copy_of(collected, tmp_path)
    with_compute(layout, workers=2)  # the stage starts its own LocalCluster of 2 processes
    assert clean_and_preprocess(layout) == serial_outputs
    assert any(name.endswith(".tfrecord") for name in serial_outputs)
    assert not list(layout.root.glob("data/.*.partial"))


def collected_files(layout) -> tuple[list, dict[str, str]]:
    """The manifest (batch ids and arrival times aside) and the stored files' hashes by name."""
    from pipelines.data import manifest

    frame = manifest.read(layout).drop(columns=["batch_id", "arrival_time"])
    frame["record_id"] = frame["record_id"].str.replace(r"^batches/[^/]+/", "", regex=True)
    files = {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in layout.batches.rglob("images/*")}
    return frame.astype(str).values.tolist(), files


@pytest.mark.slow
def test_collect_on_a_local_dask_cluster_stores_what_the_serial_path_stores(collected, tmp_path):
    raw = yaml.safe_load(collected.params_file.read_text())
    raw["compute"]["workers"] = 2
    layout = make_workspace(tmp_path, raw)
    for _ in range(2):
        collect.run(load(layout), layout)
    assert collected_files(layout) == collected_files(collected)
    assert len(collected_files(layout)[1]) >= 30


class DieOnce(WorkerPlugin):
    """A Dask worker plugin: the first task a worker starts kills that worker's process
    (once in the whole cluster, a marker file says so), as an out-of-memory kill would."""

    name = "die-once"

    def __init__(self, marker: str):
        self.marker = marker

    def transition(self, key, start, finish, **kwargs):
        if finish == "executing":
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return
            os._exit(1)


@pytest.mark.slow
def test_a_worker_dying_mid_stage_is_retried_and_changes_nothing(cluster, collected, serial_outputs, tmp_path):
    local, client = cluster
    layout = copy_of(collected, tmp_path)
    with_compute(layout, scheduler=local.scheduler_address)
    marker = tmp_path / "died"
    client.register_plugin(DieOnce(str(marker)))
    try:
        assert clean_and_preprocess(layout) == serial_outputs
    finally:
        client.unregister_worker_plugin(DieOnce.name)
    assert marker.exists()  # a worker did die during the stage
    client.wait_for_workers(2, timeout=60)


def test_an_item_that_kills_every_worker_fails_the_stage_and_publishes_nothing(tmp_path):
    spec = parse_params(image_params()).compute.model_copy(update={"workers": 2})
    final = tmp_path / "clean"
    final.mkdir()
    (final / "records.parquet").write_bytes(b"the previous, complete output")
    import dask

    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        with pytest.raises(ComputeError, match=r"killed every worker it ran on.*nothing was published"):
            with staged_directory(final) as out:
                (out / "records.parquet").write_bytes(b"half")
                with item_map(spec, "clean") as items:
                    items.map(os._exit, [1, 1, 1])
    assert (final / "records.parquet").read_bytes() == b"the previous, complete output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean"]


def test_an_unreachable_scheduler_is_named(tmp_path):
    import dask

    from conftest import free_port

    spec = parse_params(image_params()).compute.model_copy(
        update={"scheduler": f"tcp://127.0.0.1:{free_port()}"})
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}), \
            pytest.raises(ComputeError, match=r"cannot reach the Dask scheduler tcp://127\.0\.0\.1:\d+ named by "
                                              r"compute\.scheduler"):
        with item_map(spec, "clean"):
            pass


def test_compute_settings_are_checked():
    raw = image_params()
    raw["compute"]["scheduler"] = "10.0.0.5"
    with pytest.raises(Exception, match="is not an address like tls://host:8786"):
        parse_params(raw)
    raw["compute"]["scheduler"] = "tcp://10.0.0.5:8786"
    with pytest.raises(Exception, match="is plain TCP to another host: .* images before de-identification"):
        parse_params(raw)
    raw["compute"]["scheduler"] = "tls://10.0.0.5:8786"
    assert parse_params(raw).compute.scheduler == "tls://10.0.0.5:8786"
    raw = image_params()
    raw["compute"]["workers"] = 0
    with pytest.raises(Exception, match="compute.workers"):
        parse_params(raw)


@pytest.mark.slow
def test_a_night_reuses_earlier_nights_work_and_writes_what_a_full_recompute_writes(tmp_path, caplog):
    raw = image_params()
    raw["source"].update(nights=3, images_per_night=12, image_size=64, jpeg_fraction=0.0)
    raw["preprocess"].update(image_size=[32, 32], shard_size=4)
    layout = make_workspace(tmp_path, raw)
    for _ in range(2):
        collect.run(load(layout), layout)
    clean_and_preprocess(layout)  # nights 1 and 2: everything computed, and kept
    before = {path.name: path.stat().st_ino for path in (layout.clean / "images").iterdir()}
    shards_before = {path.name: path.stat().st_ino for path in (layout.processed / "images").iterdir()}
    collect.run(load(layout), layout)
    caplog.clear()
    with caplog.at_level("INFO", logger="medloop"):
        incremental = clean_and_preprocess(layout)
    # Earlier batches' packs of cleaned images are the same files (linked, not rewritten): DVC need
    # not hash them again; the night adds its own pack.
    after = {path.name: path.stat().st_ino for path in (layout.clean / "images").iterdir()}
    assert len(before) == 2 and len(after) == 3 and all(after[name] == inode for name, inode in before.items())
    messages = [record.getMessage() for record in caplog.records]
    assert "clean: 2 of 3 packs kept from the last run (same images, same code)" in messages
    new_items = int((manifest_of(layout)["batch_id"] == manifest_of(layout)["batch_id"].max()).sum())
    clean_line = next(m for m in messages if m.startswith("clean: images "))
    computed, reused = (int(word) for word in re.findall(r"(\d+) (?:computed|reused)", clean_line))
    assert 0 < computed <= new_items and reused >= 20  # only what the third night brought
    assert any(m.startswith("preprocess: images ") and " reused" in m for m in messages)
    # The shards before the night's new items keep their members: linked from last night's output.
    preprocess_line = next(m for m in messages if m.startswith("preprocess: images "))
    kept, total = (int(n) for n in re.search(r"(\d+) of (\d+) shards kept", preprocess_line).groups())
    shards_after = {path.name: path.stat().st_ino for path in (layout.processed / "images").iterdir()}
    linked = [name for name, inode in shards_before.items() if shards_after.get(name) == inode]
    assert 0 < kept < total and len(linked) == kept, (preprocess_line, linked)
    # A kept shard cut short (by hand, a bad disk) is not linked again: it is written whole.
    victim = layout.processed / "images" / linked[0]
    victim.write_bytes(victim.read_bytes()[:-10])
    preprocess.run(load(layout), layout)
    assert outputs(layout) == incremental
    # So is a kept pack of cleaned images, from the cache's copies of its images; one missing from
    # the cache, and one damaged there, are made again from the stored files.
    pack = layout.clean / "images" / sorted(before)[0]
    pack.write_bytes(pack.read_bytes()[:-10])
    records = pd.read_parquet(layout.clean_records)
    in_pack = records[records["image_path"].str.startswith(f"images/{sorted(before)[0]}/")]["content_hash"].tolist()
    [entries] = [path for path in (layout.state / "cache" / "clean").iterdir()]
    (entries / in_pack[0][:2] / in_pack[0]).unlink()
    damaged = entries / in_pack[1][:2] / in_pack[1]
    damaged.write_bytes(damaged.read_bytes()[:-5] + b"12345")
    assert clean_and_preprocess(layout) == incremental

    # A full recompute, as a fresh clone does: no cache, no earlier outputs to link.
    for folder in (layout.state / "cache", layout.clean, layout.processed):
        shutil.rmtree(folder)
    assert clean_and_preprocess(layout) == incremental

    # A changed setting is a new cache version: nothing stale is read.
    with_settings = yaml.safe_load(layout.params_file.read_text())
    with_settings["preprocess"]["image_size"] = [24, 24]
    layout.params_file.write_text(yaml.safe_dump(with_settings, sort_keys=False))
    caplog.clear()
    with caplog.at_level("INFO", logger="medloop"):
        clean_and_preprocess(layout)
    preprocess_line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("preprocess: images"))
    assert " 0 reused from earlier nights; 0 of " in preprocess_line


def manifest_of(layout):
    from pipelines.data import manifest

    return manifest.read(layout)


def test_a_batch_of_cached_results_is_read_at_once_and_only_for_the_same_items(tmp_path):
    from pipelines.ops.item_cache import ItemCache

    cache = ItemCache.open(tmp_path, "clean", [clean], {"size": 1})
    keys = [hashlib.sha256(str(n).encode()).hexdigest() for n in range(3)]
    for n, key in enumerate(keys):
        cache.put(key, {"n": n}, b"png")
    assert cache.headers(keys) == ([{"n": 0}, {"n": 1}, {"n": 2}], False)  # one read each, the first time
    cache.keep_together(keys, [{"n": 0}, {"n": 1}, {"n": 2}])
    assert cache.headers(keys) == ([{"n": 0}, {"n": 1}, {"n": 2}], True)
    # Another set or order of items is another group: read one by one, never another batch's results.
    assert cache.headers(keys[::-1]) == ([{"n": 2}, {"n": 1}, {"n": 0}], False)
    assert cache.headers(keys[:2] + [hashlib.sha256(b"new").hexdigest()]) == ([{"n": 0}, {"n": 1}, None], False)
    assert cache.describe() == "1 computed, 11 reused from earlier nights"


def test_a_pack_that_is_not_what_clean_wrote_is_a_clear_error(tmp_path):
    import zipfile

    from pipelines.data import packs
    from pipelines.errors import MedloopError

    (tmp_path / "images").mkdir()
    packs.write(tmp_path / packs.pack_name("b1"), [("a.png", b"png-a"), ("b.png", b"png-b")])
    with packs.PackReader(tmp_path) as reader:
        assert reader.read(packs.image_path("b1", "b.png")) == b"png-b"
    with zipfile.ZipFile(tmp_path / packs.pack_name("b2"), "w") as other:  # compressed: no pack of ours
        other.writestr("a.png", b"png-a" * 100, compress_type=zipfile.ZIP_DEFLATED)
    cut = tmp_path / packs.pack_name("b3")
    cut.write_bytes((tmp_path / packs.pack_name("b1")).read_bytes()[:-30])
    for path, reason in ((packs.image_path("b2", "a.png"), "compressed or encrypted"),
                         (packs.image_path("b3", "a.png"), "File is not a zip file"),
                         (packs.image_path("b1", "c.png"), "There is no item named 'c.png'"),
                         ("images/b1.png", "not a packed image path")):
        with pytest.raises(MedloopError, match=f"the cleaned image cannot be read .*{reason}.*run clean again"):
            with packs.PackReader(tmp_path) as reader:
                reader.read(path)
