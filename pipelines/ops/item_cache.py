"""Per-item results of a data stage, kept between nights and keyed by content, so that a night
costs what is new rather than the whole archive.

Clean decodes, checks and converts each stored image; preprocess resizes and normalises each
cleaned image. Both are pure functions of the item's bytes, the stage's settings and the
stage's code, so an earlier night's result is reused exactly when all three are the same: the
key is the item's content hash, under a version that hashes the settings and the source of the
modules doing the work (a code or params change starts a new version, so nothing stale is ever
read). What is global (duplicates across batches, clinician relabels, the patient-level split,
the frozen test set, the shards' order) is still decided every night, on the small per-item
tables, so the outputs are byte-identical to a full recompute.

Besides one entry per item, a stage may keep a batch's headers as one entry (`keep_together`),
read back in one go (`headers`), and the stages note there which output files they may link
into the next night's output (`pipelines.ops.compute.KeptFiles`).

The cache lives in the workspace's state folder (``.medloop/cache/<stage>/<version>/``), is no
DVC output and no record: deleting it only makes the next night recompute everything. A fresh
clone (``medloop reproduce``) starts without it.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

HEADER_LENGTH = 8  # bytes of the big-endian length of an entry's JSON header


class ItemCache:
    """Results by content hash for one stage version: a JSON header and optional bytes each."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._folder = str(folder)
        self.hits = 0
        self.misses = 0

    @classmethod
    def open(cls, state: Path, stage: str, code: list[ModuleType], settings: Any) -> "ItemCache":
        """The cache of ``stage`` for this code and these settings.

        Args:
            state: the workspace's state folder (``layout.state``).
            stage: the stage's name.
            code: the modules whose functions compute the results.
            settings: what of params the results depend on (JSON-serialisable).
        """
        version = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
        for module in code:
            version.update(Path(inspect.getsourcefile(module)).read_bytes())
        stage_folder = state / "cache" / stage
        folder = stage_folder / version.hexdigest()[:24]
        # Older versions can never be read again (their code or settings are gone): drop them.
        if stage_folder.is_dir():
            for other in stage_folder.iterdir():
                if other != folder:
                    shutil.rmtree(other, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        return cls(folder)

    @property
    def version(self) -> str:
        """The hash of the settings and code this cache's results were computed with."""
        return self.folder.name

    def get(self, key: str) -> tuple[dict, bytes] | None:
        """The header and bytes stored under ``key``, or None."""
        return self._counted(self._read(key, payload=True))

    def header(self, key: str) -> dict | None:
        """The header stored under ``key`` (its bytes are not read), or None."""
        entry = self._counted(self._read(key, payload=False))
        return None if entry is None else entry[0]

    def headers(self, keys: list[str]) -> tuple[list[dict | None], bool]:
        """The headers of ``keys`` (a batch's items, in order), and whether they were read at once:
        in one read when they were kept together (`keep_together`), else one read each. On a
        large archive most of a night's items come from earlier batches, and one read per item
        would grow with the archive."""
        together = self._read(_group_key(keys), payload=False)
        if together is not None and len(together[0]["headers"]) == len(keys):
            self.hits += len(keys)
            return together[0]["headers"], True
        return [self.header(key) for key in keys], False

    def keep_together(self, keys: list[str], headers: list[dict]) -> None:
        """Keep the headers of ``keys`` as one entry too, for `headers` to read at once."""
        self.put(_group_key(keys), {"headers": headers})

    def payload(self, key: str) -> bytes | None:
        """The bytes stored under ``key``, or None; for an entry whose `header` was already read
        (and counted as reused), so it is not counted again."""
        entry = self._read(key, payload=True)
        return None if entry is None else entry[1]

    def put(self, key: str, header: dict, payload: bytes = b"") -> None:
        """Store a result (written under a temporary name and renamed: never half an entry)."""
        path = self._path(key)
        path.parent.mkdir(exist_ok=True)
        encoded = json.dumps(header, sort_keys=True).encode()
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        temporary.write_bytes(len(encoded).to_bytes(HEADER_LENGTH, "big") + encoded + payload)
        temporary.replace(path)

    def describe(self) -> str:
        return f"{self.misses} computed, {self.hits} reused from earlier nights"

    def _counted(self, entry: tuple[dict, bytes] | None) -> tuple[dict, bytes] | None:
        if entry is None:
            self.misses += 1
        else:
            self.hits += 1
        return entry

    def _read(self, key: str, *, payload: bool) -> tuple[dict, bytes] | None:
        try:
            with open(self._location(key), "rb") as entry:
                length = int.from_bytes(entry.read(HEADER_LENGTH), "big")
                header = json.loads(entry.read(length))
                return header, entry.read() if payload else b""
        except FileNotFoundError:
            return None

    def _path(self, key: str) -> Path:
        return Path(self._location(key))

    def _location(self, key: str) -> str:
        # A string, not a Path: this runs for every item of the archive each night.
        if len(key) < 8 or key.strip("0123456789abcdef"):
            raise ValueError(f"an item cache key is a hex digest, not {key[:20]!r}")
        return os.path.join(self._folder, key[:2], key)


def _group_key(keys: list[str]) -> str:
    return hashlib.sha256(("group\n" + "\n".join(keys)).encode()).hexdigest()
