"""Every MLflow tag and alias name medloop writes or reads: the contract between train, evaluate,
promote, deploy, the retrain flow, the service and ``medloop lineage``/``reproduce``.

The strings are stored in tracking stores that outlive a release, so a name here never changes;
a new meaning gets a new name. Tags on a run are set by the stage named beside them and copied
onto the registered version by promote (every ``medloop.*`` run tag outside ``medloop.promotion.``).
"""

from __future__ import annotations

PREFIX = "medloop."

# Aliases of the registered model.
CHAMPION = "champion"                    # the version in service
PREVIOUS_CHAMPION = "previous-champion"  # the one a rollback restores

# Lineage (train, `pipelines.registry.tracking.lineage_tags`): what a run was made from.
GIT_COMMIT = PREFIX + "git_commit"              # HEAD when training started ("-dirty" when changed)
PARAMS_HASH = PREFIX + "params_hash"
DATA_RAW = PREFIX + "data.raw"                  # DVC hash of data/raw/index.json (pins every batch; of data/raw in older workspaces)
DATA_FEEDBACK = PREFIX + "data.feedback"        # DVC hash of data/feedback
DATA_PROCESSED = PREFIX + "data.processed"
DATA_FROZEN_TEST_SET = PREFIX + "data.frozen_test_set"
CLINICIAN_LABELS = PREFIX + "data.clinician_labels"
CLINICIAN_LABEL_BATCHES = PREFIX + "data.clinician_label_batches"
CLINICIAN_LABEL_BATCH_COUNT = PREFIX + "data.clinician_label_batch_count"
FLOW_RUN_ID = PREFIX + "flow_run_id"            # the Prefect flow run that made it
STAGE = PREFIX + "stage"
ARCHITECTURE = PREFIX + "architecture"
DEVICE_PREFIX = PREFIX + "device."              # + a device fact (GPUs, strategy, mixed precision)
ENV_PREFIX = PREFIX + "env."                    # + a package or platform name

# The model (train, evaluate; copied onto the version by promote).
WEIGHTS_SHA256 = PREFIX + "weights_sha256"
CALIBRATION = PREFIX + "calibration"
OPERATING_THRESHOLD = PREFIX + "operating_threshold"
THRESHOLD_SOURCE = PREFIX + "threshold_source"
FROZEN_TEST_SET_SHA256 = PREFIX + "frozen_test_set_sha256"
POSITIVE_CLASS = PREFIX + "positive_class"
RUN_ID = PREFIX + "run_id"                      # on a version: the run it was registered from
METRICS = PREFIX + "metrics"                    # on a version: metrics.json without per-case results (JSON)
TEST_METRIC_PREFIX = PREFIX + "metrics.test_"   # + auroc, sensitivity, ... on the frozen test set

# The registered model.
MODALITY = PREFIX + "modality"
CLASSES = PREFIX + "classes"                    # JSON list
DEPLOYED = PREFIX + "deployed"                  # JSON: version, at, actor, flow_run_id

# Promotion (promote): on the judged run and on the registered version.
PROMOTION_PREFIX = PREFIX + "promotion."
DECISION = PROMOTION_PREFIX + "decision"        # promoted | override | refused
VERDICTS = PROMOTION_PREFIX + "reasons"         # JSON: the gates' verdicts (failed ones on a refused run)
PROMOTION_ACTOR = PROMOTION_PREFIX + "actor"
PROMOTION_AT = PROMOTION_PREFIX + "at"
PROMOTION_REASON = PROMOTION_PREFIX + "reason"  # on a version: why (gate summary, a human's reason)
PROMOTED_VERSION = PROMOTION_PREFIX + "version" # on a run: the version registered from it
OVERRIDDEN_AT = PROMOTION_PREFIX + "overridden_at"
ROLLED_BACK = PROMOTION_PREFIX + "rolled_back"  # on a version: JSON of the rollback that demoted it
HISTORY = PROMOTION_PREFIX + "history"          # on the registered model: the newest page (JSON list)
HISTORY_PAGES = HISTORY + ".pages"              # how many full pages ``history.<k>`` there are

# The retrain flow (`pipelines.registry.lineage.record_commit`).
COMMIT = PREFIX + "commit"                      # the workspace commit holding the version's dvc.lock
GIT_TAG = PREFIX + "commit_tag"                 # the git tag on that commit (``<model>-v<version>``)
TRIGGER = PREFIX + "trigger"                    # what started the flow run (schedule, person, policy)

# A retrain run's record (`pipelines.ops.runs.record`): one MLflow run per retrain flow run (or
# failed or crashed one) in the experiment ``<tracking.experiment>-retrain-runs``, its summary the
# artifact ``retrain/summary.json``. It also carries TRIGGER, FLOW_RUN_ID, COMMIT, PARAMS_HASH and
# the DATA_* hashes. The "nothing changed" shortcut and the policy cooldown read these records.
RETRAIN_PREFIX = PREFIX + "retrain."
RETRAIN_OUTCOME = RETRAIN_PREFIX + "outcome"        # promoted | refused | data-only | nothing-changed | failed | crashed
RETRAIN_REASON = RETRAIN_PREFIX + "reason"          # why it ended so (the promotion's reason, the failure)
RETRAIN_STARTED_AT = RETRAIN_PREFIX + "started_at"  # ISO 8601, UTC
RETRAIN_FINISHED_AT = RETRAIN_PREFIX + "finished_at"
RETRAIN_JUDGED_RUN = RETRAIN_PREFIX + "judged_run"  # the training run promote judged
RETRAIN_PROMOTION = RETRAIN_PREFIX + "promotion"    # promote's action on it
RETRAIN_VERSION = RETRAIN_PREFIX + "version"        # the version it promoted or found registered
