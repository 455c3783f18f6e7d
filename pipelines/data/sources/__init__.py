"""Data sources: where collect reads from, chosen by ``source.kind`` in params."""

from __future__ import annotations

from pipelines.config import Params
from pipelines.data.sources.base import ImageSource, TableSource


def open_source(params: Params) -> ImageSource | TableSource:
    """The reader for the configured source (an image source or a table source)."""
    spec = params.source
    if spec.kind == "image_folder":
        from pipelines.data.sources.folder import ImageFolderReader

        return ImageFolderReader(spec)
    if spec.kind in ("csv", "parquet"):
        from pipelines.data.sources.tables import TableFileReader

        return TableFileReader(spec)
    if spec.kind == "sql":
        from pipelines.data.sources.tables import SqlReader

        return SqlReader(spec)
    if spec.kind == "s3":
        from pipelines.data.sources.s3 import S3Reader

        return S3Reader(spec)
    if spec.kind == "builtin_breast_cancer":
        from pipelines.data.sources.breast_cancer import BreastCancerReader

        return BreastCancerReader(spec)
    if spec.kind == "synthetic_cxr":
        from pipelines.data.sources.synthetic_cxr import SyntheticCxrSourceReader

        return SyntheticCxrSourceReader(spec)
    raise AssertionError(f"unhandled source kind {spec.kind}")  # the config schema forbids it
