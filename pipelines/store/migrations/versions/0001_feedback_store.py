"""The feedback store: predictions, feedback, adjudications, deployments.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "predictions",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model_name", sa.String(200), nullable=False),
        sa.Column("model_version", sa.String(50), nullable=False),
        sa.Column("input_sha256", sa.String(64), nullable=False),
        sa.Column("modality", sa.String(20), nullable=False),
        sa.Column("input_metadata", sa.JSON(), nullable=False),
        sa.Column("probabilities", sa.JSON(), nullable=False),
        sa.Column("decision", sa.String(100), nullable=False),
        sa.Column("operating_threshold", sa.Float(), nullable=False),
        sa.Column("requested_by", sa.String(200), nullable=False),
    )
    op.create_index("ix_predictions_created_at", "predictions", ["created_at"])
    op.create_index("ix_predictions_model_name", "predictions", ["model_name"])
    op.create_index("ix_predictions_input_sha256", "predictions", ["input_sha256"])
    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("prediction_id", sa.String(36), sa.ForeignKey("predictions.id"), nullable=False),
        sa.Column("label", sa.String(100), nullable=False),
        sa.Column("reviewer_id", sa.String(200), nullable=False),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("idempotency_key", sa.String(200), nullable=False),
        sa.UniqueConstraint("idempotency_key", name="uq_feedback_idempotency_key"),
    )
    op.create_index("ix_feedback_created_at", "feedback", ["created_at"])
    op.create_index("ix_feedback_prediction_id", "feedback", ["prediction_id"])
    op.create_index("ix_feedback_reviewer_id", "feedback", ["reviewer_id"])
    op.create_table(
        "adjudications",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("prediction_id", sa.String(36), sa.ForeignKey("predictions.id"), nullable=False, unique=True),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("labels_in_conflict", sa.JSON(), nullable=False),
        sa.Column("resolved_label", sa.String(100), nullable=True),
        sa.Column("resolved_by", sa.String(200), nullable=True),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
    )
    op.create_index("ix_adjudications_status", "adjudications", ["status"])
    op.create_table(
        "deployments",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model_name", sa.String(200), nullable=False),
        sa.Column("model_version", sa.String(50), nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("flow_run_id", sa.String(64), nullable=True),
    )
    op.create_index("ix_deployments_at", "deployments", ["at"])
    op.create_index("ix_deployments_model_name", "deployments", ["model_name"])


def downgrade() -> None:
    for table in ("deployments", "adjudications", "feedback", "predictions"):
        op.drop_table(table)
