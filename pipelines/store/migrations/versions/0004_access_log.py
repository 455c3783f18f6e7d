"""The access log: every view of a case (who viewed which prediction, when, on which page),
append-only like the rest of the store: the triggers of migration 0003 refuse UPDATE and DELETE
(and TRUNCATE on PostgreSQL) on it too.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

import importlib.util
from pathlib import Path

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

TABLE = "access_log"


def append_only_migration():
    """Migration 0003, whose `create_triggers` makes a table append-only (a migration file is
    not an importable module: its name starts with a digit)."""
    path = Path(__file__).resolve().parent / "0003_append_only.py"
    spec = importlib.util.spec_from_file_location("medloop_migration_0003", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def upgrade() -> None:
    op.create_table(
        TABLE,
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("viewed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("prediction_id", sa.String(36), sa.ForeignKey("predictions.id"), nullable=False),
        sa.Column("viewer", sa.String(200), nullable=False),
        sa.Column("role", sa.String(20), nullable=False),
        sa.Column("page", sa.String(50), nullable=False),
    )
    op.create_index("ix_access_log_viewed_at", TABLE, ["viewed_at"])
    op.create_index("ix_access_log_prediction_id", TABLE, ["prediction_id"])
    op.create_index("ix_access_log_viewer", TABLE, ["viewer"])
    append_only_migration().create_triggers((TABLE,))


def downgrade() -> None:
    # Dropping the table drops its triggers with it (both databases); the PostgreSQL function
    # stays, the tables of 0003 still use it.
    op.drop_table(TABLE)
