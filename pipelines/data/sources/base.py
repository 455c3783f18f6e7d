"""What a data source hands to collect.

Image sources yield `ImageItem`s whose bytes are read lazily (an S3 object may vanish between
listing and reading: that raises `ItemUnavailable` and becomes a rejected manifest row, not a
crash). Tabular sources yield `TableChunk`s: a DataFrame of raw rows and where they came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import pandas as pd

from pipelines.errors import MedloopError


class ItemUnavailable(MedloopError):
    """One item could not be read from its source (it vanished, or access was refused)."""


@dataclass(frozen=True)
class ImageItem:
    """One image as a source offers it.

    Attributes:
        source_ref: where it is within the source (relative path or object key).
        label: the label as the source gives it (usually the class folder name), not yet
            normalised; ``None`` when the source has none.
        read: returns the file's bytes; raises `ItemUnavailable` when they cannot be had.
        patient_hint: an identifier of the patient found outside the file (e.g. in the file
            name); it is pseudonymised before it is stored. DICOM headers take precedence.
        problem: set when the source already knows the item is unusable (e.g. a path that
            escapes the source root); the item is then recorded as rejected with this reason.
    """

    source_ref: str
    label: str | None
    read: Callable[[], bytes]
    patient_hint: str | None = None
    problem: str | None = None


@dataclass(frozen=True)
class TableChunk:
    """Raw rows from a tabular source.

    Attributes:
        frame: the rows exactly as read (identifiers still in: collect de-identifies them).
        origin: human name of where they came from (file path, table, query, object key),
            used in error messages and as the manifest's source_ref prefix.
        first_row: number of the first row within ``origin`` (1-based, header excluded), so
            that messages can name the row.
        night: for built-in sources released night by night, the night of this chunk.
    """

    frame: pd.DataFrame
    origin: str
    first_row: int = 1
    night: int | None = None


@dataclass(frozen=True)
class SourceState:
    """What collect already has from this source, so a source can skip work early."""

    nights_released: int = 0


class ImageSource(Protocol):
    name: str

    def items(self, state: SourceState) -> Iterator[ImageItem]: ...


class TableSource(Protocol):
    name: str

    def chunks(self, state: SourceState) -> Iterator[TableChunk]: ...
