"""Shadow answers: a candidate model's answers for the predictions the champion served.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "shadow_predictions",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("prediction_id", sa.String(36), sa.ForeignKey("predictions.id"), nullable=False),
        sa.Column("candidate", sa.String(100), nullable=False),
        sa.Column("model_name", sa.String(200), nullable=False),
        sa.Column("model_version", sa.String(50), nullable=True),
        sa.Column("run_id", sa.String(64), nullable=True),
        sa.Column("probabilities", sa.JSON(), nullable=False),
        sa.Column("decision", sa.String(100), nullable=False),
        sa.Column("operating_threshold", sa.Float(), nullable=False),
        sa.UniqueConstraint("prediction_id", "candidate", name="uq_shadow_prediction_candidate"),
    )
    op.create_index("ix_shadow_predictions_created_at", "shadow_predictions", ["created_at"])
    op.create_index("ix_shadow_predictions_prediction_id", "shadow_predictions", ["prediction_id"])
    op.create_index("ix_shadow_predictions_candidate", "shadow_predictions", ["candidate"])


def downgrade() -> None:
    op.drop_table("shadow_predictions")
