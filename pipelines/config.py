"""One typed configuration, loaded from params.yaml.

Every setting of medloop lives in params.yaml and is described here. Unknown keys, missing keys
and values of the wrong type are errors that name the key (``source.nights: Input should be a
valid integer``). Nothing is read at import time.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipelines.errors import ConfigError, mask_credentials

DEFAULT_PARAMS_FILE = "params.yaml"


class Strict(BaseModel):
    """Base of every config section: unknown keys are an error, values are not coerced loosely."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------------------------
# model: what is being diagnosed
# --------------------------------------------------------------------------------------------


class ModelSpec(Strict):
    """What the model diagnoses.

    Attributes:
        name: registered model name (also used for folder and run names).
        modality: ``image`` (radiographs) or ``tabular`` (clinical measurements).
        classes: the label set, in a fixed order; index i of the model output is classes[i].
        positive_class: the finding the model screens for (used for sensitivity).
    """

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    modality: Literal["image", "tabular"]
    classes: list[str] = Field(min_length=2)
    positive_class: str

    @model_validator(mode="after")
    def _positive_is_a_class(self) -> "ModelSpec":
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be unique, got {self.classes}")
        if self.positive_class not in self.classes:
            raise ValueError(
                f"positive_class {self.positive_class!r} is not one of classes {self.classes}"
            )
        return self


# --------------------------------------------------------------------------------------------
# source: where collect reads from
# --------------------------------------------------------------------------------------------


class ImageFolderSource(Strict):
    """A folder of class subfolders (``NORMAL/``, ``PNEUMONIA/``), optionally under split
    folders (``train/``, ``test/``, ``val/``), holding JPEG, PNG and DICOM files."""

    kind: Literal["image_folder"]
    path: str
    # Regular expression with one group that finds the patient in a file name, e.g. the public
    # pneumonia set's ``person123_bacteria_456.jpeg``. Without it (or without a match) every
    # image counts as its own patient, unless the DICOM header names one.
    patient_id_pattern: str | None = None


class TableFileSource(Strict):
    """A CSV or Parquet file (or a folder of them) of one row per case."""

    kind: Literal["csv", "parquet"]
    path: str


class SqlSource(Strict):
    """A table or a query reached through an SQLAlchemy URL."""

    kind: Literal["sql"]
    url: str
    table: str | None = None
    query: str | None = None

    @model_validator(mode="after")
    def _table_or_query(self) -> "SqlSource":
        if (self.table is None) == (self.query is None):
            raise ValueError("give exactly one of source.table or source.query")
        return self


class S3Source(Strict):
    """Objects under a prefix of an S3 bucket (any S3-compatible store via endpoint_url).

    Image objects are laid out like the image folder (``<prefix>/NORMAL/x.dcm``); tabular
    objects are CSV or Parquet files.
    """

    kind: Literal["s3"]
    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    region: str | None = None
    patient_id_pattern: str | None = None


class BreastCancerSource(Strict):
    """Built-in: the Wisconsin diagnostic breast cancer data that scikit-learn ships, released
    in batches as if it arrived over several nights, with fake identifier columns added so that
    de-identification has something to remove."""

    kind: Literal["builtin_breast_cancer"]
    seed: int
    nights: int = Field(ge=1)


class SyntheticCxrSource(Strict):
    """Built-in: a seeded generator of synthetic chest radiographs (not real patients)."""

    kind: Literal["synthetic_cxr"]
    seed: int
    nights: int = Field(ge=1)
    images_per_night: int = Field(ge=1)
    patients: int = Field(ge=1)
    image_size: int = Field(ge=32, le=2048)
    pneumonia_fraction: float = Field(ge=0.0, le=1.0)
    jpeg_fraction: float = Field(ge=0.0, le=1.0)


SourceSpec = Annotated[
    Union[
        ImageFolderSource,
        TableFileSource,
        SqlSource,
        S3Source,
        BreastCancerSource,
        SyntheticCxrSource,
    ],
    Field(discriminator="kind"),
]


# --------------------------------------------------------------------------------------------
# tabular schema and de-identification
# --------------------------------------------------------------------------------------------


class FeatureSpec(Strict):
    """One measured feature of a tabular case."""

    dtype: Literal["float", "int"]
    min: float | None = None
    max: float | None = None

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not a value of this feature, or None when it is one (or is None:
        how much may be missing is the caller's rule). The one per-value check of a feature's
        declaration: a number (not a boolean), finite, whole for ``int``, within ``min``..``max``
        (worded as validate words the range, `Bounds.describe`).
        """
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a number or null, got {type(value).__name__}"
        try:
            number = float(value)
        except OverflowError:  # an integer beyond the float range
            return "must be a finite number (null when missing), got an integer beyond the float range"
        if not math.isfinite(number):
            return f"must be a finite number (null when missing), got {number}"
        if self.dtype == "int" and not number.is_integer():
            return f"must be a whole number, got {number:g}"
        bounds = Bounds(min=self.min, max=self.max)
        if not bounds.holds(number):
            return f"must be {bounds.describe()} (its declared range in tabular.features), got {number:g}"
        return None


class TabularSchema(Strict):
    """The columns a tabular source must have after de-identification (besides identifiers).

    Every column of the source must be declared here or under ``deid.columns``: an undeclared
    column is refused, because it might carry an identifier nobody meant to keep.
    """

    label: str
    features: dict[str, FeatureSpec] = Field(min_length=1)
    subgroups: list[str] = []
    # A date column (declared in deid.columns with action ``year``) that gives the study year.
    study_date: str | None = None


# Subgroups that collect reads from an item's metadata (DICOM tags, image folders) into the manifest.
METADATA_SUBGROUPS = ("sex", "age_band", "view", "site")

IdentifierAction = Literal["drop", "pseudonymize", "year", "age_band", "age"]


class DeidSpec(Strict):
    """De-identification before anything is written under data/.

    Attributes:
        salt_env: environment variable holding the secret salt of pseudonyms and keyed hashes.
        columns: tabular identifier columns and what happens to them (HIPAA Safe Harbor):
            ``drop``; ``pseudonymize`` (salted hash, becomes ``patient_id``); ``year`` (an event
            date such as the exam date kept as its year, same column name; never use it on a
            birth date, whose year identifies patients over 89: drop those); ``age_band`` (an
            age in years turned into a ten-year band, column ``age_band``, over 89 -> "90+");
            ``age`` (whole years, ages over 89 become 90, the Safe Harbor "90 or older").
    """

    salt_env: str = Field(min_length=1)
    columns: dict[str, IdentifierAction] = {}


# --------------------------------------------------------------------------------------------
# stages
# --------------------------------------------------------------------------------------------


class DicomTagRule(Strict):
    """What one DICOM header attribute of a training image must hold.

    Attributes:
        allowed: accepted values, compared case-insensitively after trimming spaces; a
            multi-valued attribute is accepted when every one of its values is allowed.
        required: whether a file without the attribute (or with it empty) is refused. When
            false, an absent attribute passes: PACS exports often leave out optional ones
            such as ViewPosition or BodyPartExamined.
        on_mismatch: ``quarantine`` the file (the default), or ``warn``: keep it, and note the
            mismatch in ``data/clean/intake.parquet`` and the log.
    """

    allowed: list[str] = Field(min_length=1)
    required: bool = False
    on_mismatch: Literal["quarantine", "warn"] = "quarantine"


class DicomHeaderSpec(Strict):
    """Header checks on DICOM files, so that only the images the model is built for are used.

    ``tags`` maps DICOM keywords (``Modality``, ``BodyPartExamined``, ``ViewPosition``,
    ``PhotometricInterpretation``, ...) to their rule. Only coded-string (CS) attributes can be
    checked: their values are enumerated codes, never free text that could identify someone.
    An empty mapping checks nothing. JPEG and PNG files carry no such header and are not
    checked.
    """

    tags: dict[str, DicomTagRule]

    @field_validator("tags")
    @classmethod
    def _coded_string_keywords(cls, tags: dict[str, DicomTagRule]) -> dict[str, DicomTagRule]:
        from pydicom.datadict import dictionary_VR, tag_for_keyword

        for keyword in tags:
            tag = tag_for_keyword(keyword)
            if tag is None:
                raise ValueError(f"{keyword!r} is not a DICOM keyword (spelled as in PS3.6, e.g. 'ViewPosition')")
            if dictionary_VR(tag) != "CS":
                raise ValueError(
                    f"{keyword!r} has VR {dictionary_VR(tag)}; only coded-string (CS) attributes can be checked"
                )
        return tags


class ImageCleanSpec(Strict):
    """How clean decodes and checks images.

    Attributes:
        channels: 1 (grayscale) or 3 (RGB, grayscale replicated).
        min_side: smaller images are quarantined.
        max_pixels: larger images are quarantined (decompression bomb guard).
        dicom: header checks on DICOM files (modality, body part, view, photometric).
    """

    channels: Literal[1, 3]
    min_side: int = Field(ge=1)
    max_pixels: int = Field(ge=1)
    dicom: DicomHeaderSpec


class CleanSpec(Strict):
    """Clean: label normalisation and image conversion.

    ``label_aliases`` maps raw labels (folder names, CSV values; compared case-insensitively)
    onto ``model.classes``; a label equal to a class name needs no alias.
    """

    label_aliases: dict[str, str] = {}
    image: ImageCleanSpec | None = None


class Bounds(Strict):
    min: float | None = None
    max: float | None = None

    def holds(self, value: float) -> bool:
        """``value`` is within the bounds (inclusive; an absent bound does not limit)."""
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)

    def describe(self) -> str:
        """The bounds in words: ``between 0 and 60``, ``at least 0``, ``at most 60``, ``any value``."""
        if self.min is not None and self.max is not None:
            return f"between {self.min:g} and {self.max:g}"
        if self.min is not None:
            return f"at least {self.min:g}"
        if self.max is not None:
            return f"at most {self.max:g}"
        return "any value"


class ImageValidateSpec(Strict):
    width: Bounds
    height: Bounds
    mean_intensity: Bounds
    std_intensity: Bounds


class ValidateSpec(Strict):
    """Validate: the data quality gate (Great Expectations suites built from these)."""

    min_new_items: int = Field(ge=0)
    min_total_items: int = Field(ge=0)
    max_null_fraction: float = Field(ge=0.0, le=1.0)
    # Of the newest batch, the largest share that clean may quarantine before the gate fails.
    max_quarantined_fraction: float = Field(ge=0.0, le=1.0)
    class_fraction: Bounds
    image: ImageValidateSpec | None = None


class TestSetSpec(Strict):
    """How big the frozen test set must be before it judges promotions.

    Attributes:
        min_items: items it must hold at least.
        min_cases_per_class: cases of each class it must hold at least; ``auto`` derives it from
            ``precision``: enough cases that the 95% Wilson interval of a proportion at the
            sensitivity floor (``promote.min_sensitivity``) is at most ``precision`` wide on
            each side.
        precision: the interval half-width ``auto`` aims at.
    """

    __test__ = False  # a config class, not a pytest test class

    min_items: int = Field(ge=1)
    min_cases_per_class: int | Literal["auto"]
    precision: float = Field(gt=0.0, lt=0.5)

    @field_validator("min_cases_per_class")
    @classmethod
    def _positive(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError(f"expected a whole number >= 1 or 'auto', got {value}")
        return value


class PreprocessSpec(Strict):
    """Preprocess: patient-level split, frozen test set, shards and scaling."""

    seed: int
    test_fraction: float = Field(gt=0.0, lt=1.0)
    validation_fraction: float = Field(gt=0.0, lt=1.0)
    test_set: TestSetSpec
    image_size: tuple[int, int] | None = None
    shard_size: int = Field(ge=1)

    @model_validator(mode="after")
    def _fractions(self) -> "PreprocessSpec":
        if self.test_fraction + self.validation_fraction >= 1.0:
            raise ValueError("test_fraction + validation_fraction must be below 1")
        return self


class AugmentationSpec(Strict):
    """Training-time augmentation suited to radiographs (no left-right flip by default: anatomy
    is not symmetric, a flipped chest shows the heart on the wrong side)."""

    rotation_degrees: float = Field(ge=0.0, le=45.0)
    zoom: float = Field(ge=0.0, lt=1.0)
    contrast: float = Field(ge=0.0, lt=1.0)
    horizontal_flip: bool


class TrainSpec(Strict):
    """Train: the model and how it is fitted.

    ``architecture``: ``seed_cnn`` (the reference pneumonia CNN), ``cxr_small`` (medloop's
    default chest X-ray CNN: batch norm, global pooling) or ``mlp`` (tabular).
    ``mixed_precision``: ``auto`` uses float16 compute on a GPU and float32 on a CPU.
    ``calibration``: the post-hoc calibration fitted on the validation split after training
    (`pipelines.model.calibration`): ``temperature``, ``platt``, ``isotonic`` or ``none``.
    ``distribution``: ``mirrored`` (every GPU of this host, one replica each; the default
    device alone without a GPU), ``none`` (the default device alone) or ``multi_worker``
    (``MultiWorkerMirroredStrategy``: one process per host or per slot, all started with the
    same params; the cluster comes from ``TF_CONFIG`` if set, else from ``workers``, with this
    process's place in it from the environment variable ``MEDLOOP_WORKER_INDEX``; worker 0 is
    the chief, the only one that logs to MLflow and saves the model).
    ``workers``: ``host:port`` of every worker, the chief first (``multi_worker`` only).
    """

    architecture: Literal["seed_cnn", "cxr_small", "mlp"]
    seed: int
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    learning_rate: float = Field(gt=0.0)
    early_stopping_patience: int = Field(ge=0)
    mlp_hidden_units: int = Field(ge=1)
    augmentation: AugmentationSpec | None = None
    mixed_precision: Literal["auto", "on", "off"]
    deterministic: bool
    calibration: Literal["temperature", "platt", "isotonic", "none"]
    # Defaults: a workspace made before multi-worker training existed keeps its behaviour.
    distribution: Literal["none", "mirrored", "multi_worker"] = "mirrored"
    workers: list[str] = Field(default_factory=list)

    @field_validator("workers")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        for address in value:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"train.workers: {address!r} is not host:port (e.g. 10.0.0.5:12345)")
        return value

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_on_off(cls, value: Any) -> Any:
        # YAML 1.1 reads an unquoted on/off as a boolean.
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


class ComputeSpec(Strict):
    """Where the data stages' per-item work runs (`pipelines.ops.compute`); the outputs are the
    same whichever, so this is no DVC param.

    ``workers``: 1 works in this process (with its cores for large batches); more starts a Dask
    ``LocalCluster`` of that many worker processes for each stage.
    ``scheduler``: a Dask scheduler's address to use its cluster instead: ``tls://host:8786``
    (TLS settings from Dask's own config, ``DASK_DISTRIBUTED__COMM__TLS__*``), or ``tcp://`` on
    this machine only, because collect sends images before de-identification and the salt.
    """

    workers: int = Field(default=1, ge=1)
    scheduler: str | None = None

    @field_validator("scheduler")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is None:
            return value
        scheme, _, rest = value.partition("://")
        if not rest:
            raise ValueError(f"compute.scheduler {value!r} is not an address like tls://host:8786")
        host = rest.rsplit(":", 1)[0].strip("[]") if ":" in rest else rest
        if scheme == "tcp" and host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"compute.scheduler {value!r} is plain TCP to another host: the data stages send it "
                             "images before de-identification and the salt; use tls://host:port with Dask's TLS "
                             "settings (DASK_DISTRIBUTED__COMM__TLS__CA_FILE, ...)")
        return value


class TrackingSpec(Strict):
    """MLflow: where runs and registered models live.

    ``uri`` may be relative to the workspace (``sqlite:///.medloop/mlflow.db`` is resolved
    against the workspace root) or a server (``http://127.0.0.1:5000``). ``artifact_root`` is a
    folder (relative to the workspace) or a URI (``s3://bucket/x``) for the experiments medloop
    creates; with a server, a folder is not used: the server's ``--artifacts-destination`` holds
    them, proxied. A server's credentials come from ``MLFLOW_TRACKING_USERNAME`` and
    ``MLFLOW_TRACKING_PASSWORD``, never from params.
    """

    uri: str
    artifact_root: str
    experiment: str


class EvaluateSpec(Strict):
    """Evaluate: on the frozen test set, with the threshold chosen on validation."""

    target_sensitivity: float = Field(gt=0.0, le=1.0)
    bootstrap_samples: int = Field(ge=0)
    calibration_bins: int = Field(ge=2)
    subgroups: list[str]
    gradcam_per_class: int = Field(ge=0)


class PromoteSpec(Strict):
    """Promote: the clinical gates a model must pass to be registered and made champion."""

    min_auroc: float = Field(ge=0.0, le=1.0)
    min_sensitivity: float = Field(ge=0.0, le=1.0)
    min_specificity: float = Field(ge=0.0, le=1.0)
    max_ece: float = Field(ge=0.0, le=1.0)
    subgroup_min_count: int = Field(ge=1)
    subgroup_min_auroc: float = Field(ge=0.0, le=1.0)
    subgroup_min_sensitivity: float = Field(ge=0.0, le=1.0)
    non_inferiority_margin: float = Field(ge=0.0, le=1.0)


class StorageSpec(Strict):
    """Where DVC pushes data: a local folder (relative to the workspace) or ``s3://bucket/x``.

    Attributes:
        dvc_remote: the folder or ``s3://bucket/prefix``.
        s3_endpoint_url: for S3-compatible stores (SeaweedFS, Ceph, ...); credentials come from
            the environment (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``) or
            ``AWS_SHARED_CREDENTIALS_FILE``, never from params.
        s3_server_side_encryption: ask S3 to encrypt what DVC pushes and what MLflow uploads
            directly (``AES256`` or ``aws:kms``); null asks nothing (the bucket's default holds).
        s3_kms_key_id: the KMS key with ``aws:kms`` (an id or ARN, not a secret).
    """

    dvc_remote: str
    s3_endpoint_url: str | None = None
    s3_server_side_encryption: Literal["AES256", "aws:kms"] | None = None
    s3_kms_key_id: str | None = None

    @model_validator(mode="after")
    def _kms_key_with_kms(self) -> "StorageSpec":
        if self.s3_kms_key_id and self.s3_server_side_encryption != "aws:kms":
            raise ValueError("s3_kms_key_id goes with s3_server_side_encryption: aws:kms")
        return self


class ScheduleSpec(Strict):
    """The nightly retrain: when it runs (a Prefect deployment with a cron schedule), on which
    work pool, and where failures are reported.

    Attributes:
        cron: five fields, ``minute hour day-of-month month day-of-week`` (``0 2 * * *``: 02:00).
        timezone: IANA name the cron is read in (``Europe/London``); daylight saving is followed.
        work_pool: the Prefect work pool whose worker runs it (a ``process`` pool by default).
        deployment: the deployment's name (the flow is ``retrain``).
        notify_url_env: the environment variable that holds an Apprise URL (``mailto://...``,
            ``slack://...``, ``json://host/path``) to notify on failure; the URL is a secret, so it
            is never written in params. Nothing is sent while the variable is unset.
        train_work_pool: a Prefect work pool that runs the train stage as its own job (a
            Kubernetes pool whose base job template requests ``gpu_count`` NVIDIA GPUs, see
            infra/k8s/), while the other stages stay on ``work_pool``; null trains where the flow runs.
        train_gpus: the GPUs that job asks for (the pool's ``gpu_count`` job variable).
    """

    cron: str
    timezone: str
    work_pool: str = Field(min_length=1)
    deployment: str = Field(min_length=1)
    notify_url_env: str | None = None
    train_work_pool: str | None = None  # default: train where the other stages run (as before)
    train_gpus: int = Field(default=0, ge=0)

    @field_validator("cron")
    @classmethod
    def _five_fields(cls, value: str) -> str:
        return _cron(value)

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (use an IANA name such as 'Europe/London' or 'UTC')") from None
        return value


class TlsSpec(Strict):
    """The certificate the service presents: ``medloop serve`` then speaks HTTPS only (a plain
    HTTP request to its port is refused by the TLS handshake).

    Attributes:
        certfile: PEM certificate chain (relative paths are inside the workspace).
        keyfile: PEM private key; readable by its owner only (mode 0600 or 0400).
        keyfile_password_env: the environment variable (or ``<name>_FILE``) holding the key's
            passphrase, when it has one.
    """

    certfile: str
    keyfile: str
    keyfile_password_env: str | None = None


class ServingSpec(Strict):
    """The prediction service (``medloop serve``) and its feedback store.

    Attributes:
        store_url: the feedback store: ``sqlite:///<path>`` (relative paths are inside the
            workspace) or a PostgreSQL URL.
        tokens_file: hashed bearer tokens with their roles (``medloop token add``), relative to
            the workspace unless absolute.
        reload_seconds: how often the service checks whether ``champion`` moved.
        max_request_bytes: larger requests are refused with 413.
        max_batch: most inputs in one /predict request.
        url: where the service runs (``http://127.0.0.1:8000``); when set, deploy asks it to
            reload at once (with the admin token from ``admin_token_env``) instead of waiting for
            its next check.
        admin_token_env: the environment variable holding an admin token of the service.
        batch_max_size: the service scores requests that arrive together as one batch, up to
            this many inputs (1 turns micro-batching off).
        batch_max_wait_ms: how long the first request of a batch waits for others to join.
        shadow: a candidate that also scores every request, its answers logged, not returned:
            a registered version (``"7"``) or a run (``"run:<mlflow run id>"``, e.g. a refused
            model); ``null`` for none.
        max_missing_share: a tabular instance missing (absent or null) more than this share of
            the features is refused with 422 rather than decided on imputed training medians.
        docs: serve the interactive API pages ``/docs`` and ``/redoc`` (they load their scripts
            from a public CDN); the OpenAPI document ``/openapi.json`` is served either way.
        session_idle_minutes: a clinician's session on the pages (``/pages``) ends after this
            long without a request; they sign in with their token again.
        tls: the certificate and key to serve HTTPS with; null serves plain HTTP (on 127.0.0.1,
            or behind a proxy that ends TLS).
        store_retry_seconds: while the feedback store does not answer (a PostgreSQL restart),
            storing a prediction or feedback is tried again for this long; after that the
            request is answered 503 with Retry-After, and the client sends it again.
    """

    store_url: str
    tokens_file: str
    reload_seconds: float = Field(gt=0)
    max_request_bytes: int = Field(ge=1024)
    max_batch: int = Field(ge=1)
    url: str | None = None
    admin_token_env: str = "MEDLOOP_SERVICE_TOKEN"
    batch_max_size: int = Field(ge=1)
    batch_max_wait_ms: float = Field(ge=0.0, le=1000.0)
    shadow: str | None = Field(default=None, pattern=r"^([0-9]+|run:[0-9A-Za-z]+)$")
    max_missing_share: float = Field(default=0.2, ge=0.0, le=1.0)
    docs: bool = False
    session_idle_minutes: float = Field(default=30.0, gt=0.0, le=24 * 60)
    tls: TlsSpec | None = None
    store_retry_seconds: float = Field(default=5.0, ge=0.0, le=60.0)


class MonitoringSpec(Strict):
    """Live monitoring: input drift against the training reference, and prediction drift.

    Attributes:
        window_days: the served inputs of the last this many days are compared with the reference.
        min_inputs: below this many served inputs in the window, drift is not judged.
        bins: quantile bins of the reference for the population stability index.
        psi_threshold: a feature (or prediction) drifts when its PSI is over this
            (0.1 slight, 0.2 significant is the usual reading).
        ks_pvalue: ... or when the two-sample Kolmogorov-Smirnov p-value is under this.
        reference_size: at most this many training items make the reference.
    """

    window_days: float = Field(gt=0)
    min_inputs: int = Field(ge=1)
    bins: int = Field(ge=2, le=100)
    psi_threshold: float = Field(gt=0)
    ks_pvalue: float = Field(gt=0.0, lt=1.0)
    reference_size: int = Field(ge=10)


class RetrainPolicySpec(Strict):
    """When to retrain outside the nightly schedule (a Prefect flow checks it on ``check_cron``).

    Attributes:
        check_cron: when the policy is checked (five cron fields, in ``schedule.timezone``).
        min_new_labels: retrain once this many confirmed labels are waiting for export.
        on_drift: retrain when input or prediction drift is over the monitoring thresholds.
        cooldown_hours: never start a retrain within this long of the last one (any trigger).
        deployment: the policy check's own Prefect deployment name.
    """

    check_cron: str
    min_new_labels: int = Field(ge=1)
    on_drift: bool
    cooldown_hours: float = Field(ge=0)
    deployment: str = Field(min_length=1)

    @field_validator("check_cron")
    @classmethod
    def _five_fields(cls, value: str) -> str:
        return _cron(value)


class Params(Strict):
    """The whole of params.yaml."""

    model: ModelSpec
    source: SourceSpec
    deid: DeidSpec
    tabular: TabularSchema | None = None
    clean: CleanSpec
    validate_: ValidateSpec = Field(alias="validate")
    preprocess: PreprocessSpec
    train: TrainSpec
    compute: ComputeSpec = Field(default_factory=ComputeSpec)  # older workspaces: serial, as before
    tracking: TrackingSpec
    evaluate: EvaluateSpec
    promote: PromoteSpec
    storage: StorageSpec
    schedule: ScheduleSpec
    serving: ServingSpec
    monitoring: MonitoringSpec
    retrain_policy: RetrainPolicySpec

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _modality_fits(self) -> "Params":
        image_kinds = {"image_folder", "synthetic_cxr"}
        tabular_kinds = {"csv", "parquet", "sql", "builtin_breast_cancer"}
        kind = self.source.kind
        if self.model.modality == "image":
            if kind in tabular_kinds:
                raise ValueError(f"source.kind {kind!r} gives tables, but model.modality is image")
            for key, value in (
                ("clean.image", self.clean.image),
                ("validate.image", self.validate_.image),
                ("preprocess.image_size", self.preprocess.image_size),
            ):
                if value is None:
                    raise ValueError(f"{key} is required when model.modality is image")
        else:
            if kind in image_kinds:
                raise ValueError(f"source.kind {kind!r} gives images, but model.modality is tabular")
            if self.tabular is None:
                raise ValueError("tabular is required when model.modality is tabular")
        self._identifier_rules_hold_everywhere()
        self._subgroups_have_a_source()
        for raw, target in self.clean.label_aliases.items():
            if target not in self.model.classes:
                raise ValueError(
                    f"clean.label_aliases.{raw} maps to {target!r}, not one of {self.model.classes}"
                )
        return self

    def _identifier_rules_hold_everywhere(self) -> None:
        """A Safe Harbor rule on a column holds wherever the column is used: a column whose rule
        drops, pseudonymises or bands it cannot also be kept as the label, a feature or a
        subgroup, where its raw value would be stored."""
        schema = self.tabular
        if schema is None:
            return
        kept_as_value = {"age": "whole years, ages over 89 become 90", "year": "its year only"}
        uses = [("tabular.label", [schema.label]), ("tabular.features", list(schema.features)),
                ("tabular.subgroups", list(schema.subgroups))]
        for column, action in self.deid.columns.items():
            if action in kept_as_value:
                continue  # the feature or subgroup gets the de-identified value
            for section, names in uses:
                if column in names:
                    raise ValueError(
                        f"{section} uses {column!r}, but deid.columns.{column} is {action!r}: the "
                        f"column would reach the data with its raw, identifying values. Keep it "
                        f"under one of the two: "
                        + (f"`deid.columns.{column}: age` keeps it as a number ({kept_as_value['age']}), "
                           f"or use the subgroup age_band" if action == "age_band" else
                           f"take it out of {section}, or give it a rule that keeps a safe value "
                           f"({', '.join(f'{k}: {v}' for k, v in kept_as_value.items())})"))

    def _subgroups_have_a_source(self) -> None:
        """Every subgroup comes from somewhere: a column of the source (checked when it is read),
        ``age_band`` from an ``age_band`` rule, or, for images, the DICOM metadata."""
        if self.tabular is not None:
            if "age_band" in self.tabular.subgroups and "age_band" not in self.deid.columns.values():
                raise ValueError("tabular.subgroups names 'age_band', but no deid.columns rule is "
                                 "'age_band' to make it (e.g. `deid.columns.age: age_band`)")
            available, where = self.tabular.subgroups, "tabular.subgroups"
        else:
            available, where = list(METADATA_SUBGROUPS), "the image metadata"
        missing = [name for name in self.evaluate.subgroups if name not in available]
        if missing:
            raise ValueError(f"evaluate.subgroups names {', '.join(repr(m) for m in missing)}, which "
                             f"{where} does not give ({', '.join(available) or 'none'}): add it there, or "
                             f"remove it from evaluate.subgroups")

    @property
    def validate_spec(self) -> ValidateSpec:
        """The ``validate`` section (``validate`` is a pydantic method name, hence the alias)."""
        return self.validate_

    def digest(self) -> str:
        """A stable hash of the resolved params, for lineage."""
        payload = json.dumps(self.model_dump(mode="json", by_alias=True), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()


def _cron(value: str) -> str:
    """A cron expression of five fields that parses (cronsim), so a typo is caught when params are read."""
    from datetime import datetime

    from cronsim import CronSim, CronSimError

    expected = f"expected five cron fields 'minute hour day month weekday', got {value!r}"
    if len(value.split()) != 5:
        raise ValueError(expected)
    try:
        CronSim(value, datetime(2000, 1, 1))  # parsing checks it; the start time does not matter
    except CronSimError as error:
        raise ValueError(f"{expected} ({error})") from None
    return value


def load_params(path: str | Path = DEFAULT_PARAMS_FILE) -> Params:
    """Read and check a params file.

    Args:
        path: the YAML file.

    Returns:
        The typed configuration.

    Raises:
        ConfigError: the file is missing or unreadable, or a key is unknown, missing or of the
            wrong type; the message names the file and every offending key.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}{where}: not valid YAML: {problem} (check the brackets, quotes and "
                          f"indentation there)") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return parse_params(raw, origin=str(path))


def parse_params(raw: dict[str, Any], origin: str = "params") -> Params:
    """Check a params mapping (already parsed from YAML) against the schema."""
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{origin}: invalid params:\n" + _describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        # Discriminated unions put the chosen kind into the location; keep only real keys.
        raw_loc = error["loc"]
        loc = [
            str(part)
            for index, part in enumerate(raw_loc)
            if not (index == 1 and raw_loc[0] == "source" and part in _SOURCE_KINDS)
        ]
        key = ".".join(loc) or "(top level)"
        kind = error["type"]
        if kind == "missing":
            message = "missing key"
        elif kind == "extra_forbidden":
            message = "unknown key"
        else:
            message = error["msg"]
            if "input" in error and kind not in ("model_type", "dict_type") and not isinstance(error["input"], dict):
                given = mask_credentials(repr(error["input"]))
                message += f" (got {given if len(given) <= 120 else given[:117] + '...'})"
            if isinstance(error.get("input"), bool) and kind == "string_type":
                message += (f"; YAML reads an unquoted yes/no, on/off or true/false as a boolean: "
                            f"quote it (\"{'Yes' if error['input'] else 'No'}\")")
        lines.append(f"  - {key}: {message}")
    return "\n".join(lines)


_SOURCE_KINDS = {
    "image_folder",
    "csv",
    "parquet",
    "sql",
    "s3",
    "builtin_breast_cancer",
    "synthetic_cxr",
}
