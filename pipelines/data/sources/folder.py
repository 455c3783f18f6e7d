"""A folder of class subfolders, in the layout of the public pneumonia chest X-ray set.

    <root>/NORMAL/IM-0001.jpeg                  or    <root>/train/NORMAL/IM-0001.jpeg
    <root>/PNEUMONIA/person1_bacteria_1.jpeg          <root>/test/PNEUMONIA/person1_virus_6.dcm

The class folder is the label (normalised later by clean). Split folders (train, test, val) are
only a layout: medloop makes its own patient-level split. Any file is offered, whatever its
name; clean judges the bytes, not the name.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterator

from pipelines.config import ImageFolderSource
from pipelines.errors import SourceError
from pipelines.data.sources.base import ImageItem, ItemUnavailable, SourceState

SPLIT_FOLDERS = {"train", "test", "val", "validation"}
IGNORED_NAMES = {".DS_Store", "Thumbs.db", "desktop.ini"}


class ImageFolderReader:
    """Lists images under a local folder; see the module docstring for the layout."""

    def __init__(self, spec: ImageFolderSource):
        self.spec = spec
        self.root = Path(spec.path).expanduser()
        self.name = f"image_folder:{self.root}"
        self.patient_pattern = re.compile(spec.patient_id_pattern) if spec.patient_id_pattern else None

    def items(self, state: SourceState) -> Iterator[ImageItem]:
        """Every file under the root, in a stable order; nothing is read until asked."""
        if not self.root.is_dir():
            raise SourceError(f"source.path {self.root}: folder not found")
        root = self.root.resolve()
        for path in sorted(_walk(self.root)):
            relative = path.relative_to(self.root).as_posix()
            yield _folder_item(path, relative, root, self.patient_pattern)


def label_from_parts(parts: list[str]) -> str | None:
    """The class folder of a relative path: the first folder that is not a split folder."""
    folders = parts[:-1]
    for folder in folders:
        if folder.lower() not in SPLIT_FOLDERS:
            return folder
    return None


def patient_from_name(name: str, pattern: re.Pattern[str] | None) -> str | None:
    """The patient identifier found in a file name by ``patient_id_pattern``, if any."""
    if pattern is None:
        return None
    match = pattern.search(name)
    if not match:
        return None
    return match.group(1) if match.groups() else match.group(0)


def _folder_item(path: Path, relative: str, root: Path, pattern: re.Pattern[str] | None) -> ImageItem:
    parts = relative.split("/")
    label = label_from_parts(parts)
    problem = None
    # A link that points outside the source (``../../etc/passwd``) is never followed.
    if not path.resolve().is_relative_to(root):
        problem = f"path resolves outside the source folder ({relative} -> outside {root})"
    elif label is None:
        problem = "file is not inside a class folder (expected <class>/<file>)"

    def read() -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise ItemUnavailable(f"cannot read {relative}: {exc.strerror or exc}") from None

    return ImageItem(
        source_ref=relative,
        label=label,
        read=read,
        patient_hint=patient_from_name(parts[-1], pattern),
        problem=problem,
    )


def _walk(root: Path) -> Iterator[Path]:
    for folder, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = [name for name in dirnames if not name.startswith(".")]
        for name in filenames:
            if name in IGNORED_NAMES or name.startswith("."):
                continue
            yield Path(folder) / name
