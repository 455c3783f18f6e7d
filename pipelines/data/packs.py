"""Packs: a batch's cleaned images in one file, ``data/clean/images/<batch_id>.zip``.

Clean writes one PNG per usable image. Kept as one file each, a large archive is hundreds of
thousands of files in ``data/clean``, and DVC walks and looks up every one of them several times
whenever clean runs, and again wherever the folder is pushed, pulled or checked out: the night's
cost grows with the archive. A batch never changes once collected, so its cleaned images go into
one pack, and a night adds one file (a night that changes how images are cleaned rewrites all).

A pack is a plain zip archive (any unzip tool opens it) written so that the same images always
give the same bytes: members stored uncompressed (PNG is already compressed) in the order given,
named ``<content_hash>.png``, with fixed times and permissions. A cleaned image's ``image_path``
in ``records.parquet`` names its pack and member: ``images/<batch_id>.zip/<content_hash>.png``
(the way `zipfile.Path` spells a member), read with a `PackReader`.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path
from typing import Iterable

from pipelines.errors import MedloopError

SUFFIX = ".zip"
FIXED_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip can hold: no clock in the bytes
MEMBER_MODE = 0o100644 << 16  # a regular file, rw-r--r--


def pack_name(batch_id: str) -> str:
    """The pack of a batch, relative to ``data/clean``."""
    return f"images/{batch_id}{SUFFIX}"


def image_path(batch_id: str, member: str) -> str:
    """Where a cleaned image is, relative to ``data/clean``: its pack, then its member."""
    return f"{pack_name(batch_id)}/{member}"


def split(path: str) -> tuple[str, str]:
    """An ``image_path`` as (pack, member); a clear error for anything else."""
    pack, marker, member = path.partition(f"{SUFFIX}/")
    if not marker or not member or "/" in member:
        raise ValueError(f"{path!r} is not a packed image path (images/<batch>.zip/<member>)")
    return pack + SUFFIX, member


def write(path: Path, members: Iterable[tuple[str, bytes]]) -> None:
    """Write a pack of ``(member name, bytes)``, in that order, always the same bytes for the same
    members."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as pack:
        for name, data in members:
            info = zipfile.ZipInfo(name, date_time=FIXED_TIME)
            info.create_system = 3  # unix, whatever system wrote it
            info.external_attr = MEMBER_MODE
            pack.writestr(info, data, compress_type=zipfile.ZIP_STORED)


def members_digest(members: Iterable[tuple[str, str]]) -> str:
    """What decides a pack's bytes: its members' names and SHA-256s, in order, as one SHA-256."""
    return hashlib.sha256("\n".join(f"{name}\t{digest}" for name, digest in members).encode()).hexdigest()


class PackReader:
    """Reads packed images, keeping the last pack open (images of one batch come together)."""

    def __init__(self, root: Path):
        self.root = root
        self._name: str | None = None
        self._pack: zipfile.ZipFile | None = None

    def read(self, path: str) -> bytes:
        """The bytes of one packed image; a clear error when its pack or member is not there or
        is damaged."""
        try:
            pack, member = split(path)
            if pack != self._name:
                self.close()
                self._pack = zipfile.ZipFile(os.path.join(self.root, pack))
                self._name = pack
            info = self._pack.getinfo(member)  # type: ignore[union-attr]
            if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:  # bit 0: encrypted
                raise ValueError(f"member {member} is compressed or encrypted: not a pack `write` made")
            return self._pack.read(info)  # type: ignore[union-attr]
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise MedloopError(f"{self.root / path}: the cleaned image cannot be read ({exc}); data/clean is not "
                               "what clean wrote: run clean again (`dvc repro clean`)") from None

    def close(self) -> None:
        if self._pack is not None:
            self._pack.close()
        self._pack, self._name = None, None

    def __enter__(self) -> "PackReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
