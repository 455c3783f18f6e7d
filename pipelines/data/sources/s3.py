"""Objects under a prefix of an S3 bucket, through boto3.

Any S3-compatible store works: set ``source.endpoint_url`` (MinIO, Ceph, a local moto server).
Credentials come from boto3's usual chain (environment, profile, instance role). Image objects
follow the folder layout (``<prefix>/NORMAL/x.dcm``); tabular objects are CSV or Parquet files.

Listing and reading are separate moments: an object listed and then deleted before it is read
becomes a rejected item ("object vanished"), never a crash and never a silent drop.
"""

from __future__ import annotations

import io
import re
from pathlib import PurePosixPath
from typing import Iterator

import pandas as pd

from pipelines.config import S3Source
from pipelines.errors import SourceError
from pipelines.data.sources.base import ImageItem, ItemUnavailable, SourceState, TableChunk
from pipelines.data.sources.folder import label_from_parts, patient_from_name
from pipelines.data.sources.tables import CSV_SUFFIXES, PARQUET_SUFFIXES

MISSING_OBJECT_CODES = {"NoSuchKey", "404", "NotFound"}


class S3Reader:
    """Lists a bucket prefix; yields images or tables depending on the model's modality."""

    def __init__(self, spec: S3Source):
        self.spec = spec
        self.prefix = spec.prefix.strip("/")
        self.name = f"s3://{spec.bucket}/{self.prefix}"
        self.patient_pattern = re.compile(spec.patient_id_pattern) if spec.patient_id_pattern else None

    def items(self, state: SourceState) -> Iterator[ImageItem]:
        client = self._client()
        for key in self._keys(client):
            relative = key[len(self.prefix) :].lstrip("/") if self.prefix else key
            parts = relative.split("/")
            problem = None
            if ".." in parts or relative.startswith("/"):
                problem = f"object key {key!r} contains '..' (path traversal); not read"
            elif label_from_parts(parts) is None:
                problem = "object is not under a class prefix (expected <class>/<name>)"
            yield ImageItem(
                source_ref=relative,
                label=label_from_parts(parts),
                read=self._reader(client, key),
                patient_hint=patient_from_name(parts[-1], self.patient_pattern),
                problem=problem,
            )

    def chunks(self, state: SourceState) -> Iterator[TableChunk]:
        client = self._client()
        for key in self._keys(client):
            suffix = PurePosixPath(key).suffix.lower()
            if suffix not in CSV_SUFFIXES | PARQUET_SUFFIXES:
                continue
            if ".." in key.split("/"):
                raise SourceError(f"{self.name}: object key {key!r} contains '..'; refusing it")
            try:
                data = self._reader(client, key)()
            except ItemUnavailable as exc:
                raise SourceError(f"{self.name}: {exc}") from None
            origin = f"s3://{self.spec.bucket}/{key}"
            try:
                if suffix in PARQUET_SUFFIXES:
                    frame = pd.read_parquet(io.BytesIO(data))
                else:
                    frame = pd.read_csv(io.BytesIO(data), keep_default_na=False, na_values=[""])
            except (ValueError, OSError, pd.errors.ParserError) as exc:
                raise SourceError(f"{origin}: cannot read as a table: {exc}") from None
            yield TableChunk(frame=frame, origin=origin)

    # -- helpers ---------------------------------------------------------------------------

    def _client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.spec.endpoint_url,
            region_name=self.spec.region,
            # Fail fast on an unreachable endpoint; Prefect retries the whole task instead.
            config=Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 2}),
        )

    def _keys(self, client) -> list[str]:
        from botocore.exceptions import BotoCoreError, ClientError

        keys: list[str] = []
        prefix = f"{self.prefix}/" if self.prefix else ""
        try:
            for page in client.get_paginator("list_objects_v2").paginate(
                Bucket=self.spec.bucket, Prefix=prefix
            ):
                keys.extend(obj["Key"] for obj in page.get("Contents", []) if not obj["Key"].endswith("/"))
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            raise SourceError(f"{self.name}: cannot list objects ({code}): {exc}") from None
        except BotoCoreError as exc:
            raise SourceError(f"{self.name}: cannot reach the S3 endpoint: {exc}") from None
        return sorted(keys)

    def _reader(self, client, key: str):
        def read() -> bytes:
            from botocore.exceptions import BotoCoreError, ClientError

            try:
                return client.get_object(Bucket=self.spec.bucket, Key=key)["Body"].read()
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                if code in MISSING_OBJECT_CODES:
                    raise ItemUnavailable(f"object vanished between listing and reading ({code})") from None
                raise ItemUnavailable(f"cannot read object ({code})") from None
            except BotoCoreError as exc:
                raise ItemUnavailable(f"cannot read object: {exc}") from None

        return read
