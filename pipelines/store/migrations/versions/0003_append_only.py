"""Append-only in the database, and idempotency keys per author.

- Idempotency keys are unique per reviewer (the token's holder), not across the store: one
  clinician's key can no longer collide with another's.
- An adjudication's resolution moves out of its row into ``adjudication_resolutions`` (one row
  per resolved case; the resolved cases of 0002 are copied there), so that no row of the audit
  trail is ever updated.
- Triggers refuse UPDATE and DELETE on every table of the store (and TRUNCATE on PostgreSQL),
  with an error that names the table and says the store is append-only.

SQLite drops a table's triggers with the table, and Alembic's batch mode on SQLite rebuilds a
table to alter it: a later migration that alters one of these tables there must create its
triggers again (`create_triggers`).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# Frozen with this revision (a migration never imports the models it predates).
APPEND_ONLY_TABLES = ("predictions", "feedback", "adjudications", "adjudication_resolutions", "deployments",
                      "shadow_predictions")
POSTGRES_FUNCTION = "medloop_refuse_change"


def refusal(table: str, operation: str) -> str:
    return (f"the feedback store is append-only: {operation} on {table} is refused (a correction is a new "
            f"feedback row, a resolution a new adjudication_resolutions row)")


def create_triggers(tables: tuple[str, ...] = APPEND_ONLY_TABLES) -> None:
    """Triggers that refuse UPDATE and DELETE on ``tables`` (and TRUNCATE on PostgreSQL)."""
    if op.get_bind().dialect.name == "sqlite":
        for table in tables:
            for operation in ("UPDATE", "DELETE"):
                op.execute(f"CREATE TRIGGER {table}_append_only_{operation.lower()} BEFORE {operation} ON {table} "
                           f"BEGIN SELECT RAISE(ABORT, '{refusal(table, operation)}'); END")
        return
    # restrict_violation (SQLSTATE 23001) so that drivers raise an integrity error, as SQLite's does.
    message = refusal("%", "%").replace("'", "''")
    op.execute(f"""
        CREATE OR REPLACE FUNCTION {POSTGRES_FUNCTION}() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION '{message}', TG_OP, TG_TABLE_NAME
                USING ERRCODE = 'restrict_violation';
        END $$""")
    for table in tables:
        op.execute(f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
                   f"FOR EACH ROW EXECUTE FUNCTION {POSTGRES_FUNCTION}()")
        op.execute(f"CREATE TRIGGER {table}_append_only_truncate BEFORE TRUNCATE ON {table} "
                   f"FOR EACH STATEMENT EXECUTE FUNCTION {POSTGRES_FUNCTION}()")


def drop_triggers(tables: tuple[str, ...] = APPEND_ONLY_TABLES) -> None:
    if op.get_bind().dialect.name == "sqlite":
        for table in tables:
            for operation in ("update", "delete"):
                op.execute(f"DROP TRIGGER IF EXISTS {table}_append_only_{operation}")
        return
    for table in tables:
        op.execute(f"DROP TRIGGER IF EXISTS {table}_append_only ON {table}")
        op.execute(f"DROP TRIGGER IF EXISTS {table}_append_only_truncate ON {table}")
    op.execute(f"DROP FUNCTION IF EXISTS {POSTGRES_FUNCTION}()")


def upgrade() -> None:
    with op.batch_alter_table("feedback") as batch:
        batch.drop_constraint("uq_feedback_idempotency_key", type_="unique")
        batch.create_unique_constraint("uq_feedback_reviewer_idempotency_key", ["reviewer_id", "idempotency_key"])

    # Read the resolutions before their columns go: on SQLite the table is rebuilt, and a table
    # referring to it would stop the rebuild (foreign keys are on).
    resolved = op.get_bind().execute(sa.text(
        "SELECT id, resolved_at, resolved_label, resolved_by, reason FROM adjudications "
        "WHERE status = 'resolved' ORDER BY resolved_at, id")).mappings().all()
    with op.batch_alter_table("adjudications") as batch:
        batch.drop_index("ix_adjudications_status")
        for column in ("status", "resolved_label", "resolved_by", "resolved_at", "reason"):
            batch.drop_column(column)
    op.create_table(
        "adjudication_resolutions",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("adjudication_id", sa.Integer(), sa.ForeignKey("adjudications.id"), nullable=False, unique=True),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("resolved_label", sa.String(100), nullable=False),
        sa.Column("resolved_by", sa.String(200), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
    )
    if resolved:  # values as the database gave them (text on SQLite), so raw SQL rather than typed binds
        op.get_bind().execute(sa.text(
            "INSERT INTO adjudication_resolutions (adjudication_id, resolved_at, resolved_label, resolved_by, reason) "
            "VALUES (:id, :resolved_at, :resolved_label, :resolved_by, :reason)"), [dict(row) for row in resolved])
    create_triggers()


def downgrade() -> None:
    """Back to 0002; refused by the old unique constraint when two reviewers used the same key."""
    drop_triggers()
    resolved = op.get_bind().execute(sa.text(
        "SELECT adjudication_id, resolved_at, resolved_label, resolved_by, reason FROM adjudication_resolutions"
    )).mappings().all()
    op.drop_table("adjudication_resolutions")
    with op.batch_alter_table("adjudications") as batch:
        batch.add_column(sa.Column("status", sa.String(20), nullable=False, server_default="open"))
        batch.add_column(sa.Column("resolved_label", sa.String(100), nullable=True))
        batch.add_column(sa.Column("resolved_by", sa.String(200), nullable=True))
        batch.add_column(sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("reason", sa.Text(), nullable=True))
        batch.create_index("ix_adjudications_status", ["status"])
    with op.batch_alter_table("adjudications") as batch:
        batch.alter_column("status", existing_type=sa.String(20), server_default=None)
    for row in resolved:
        op.get_bind().execute(sa.text(
            "UPDATE adjudications SET status = 'resolved', resolved_label = :resolved_label, "
            "resolved_by = :resolved_by, resolved_at = :resolved_at, reason = :reason WHERE id = :adjudication_id"),
            dict(row))
    with op.batch_alter_table("feedback") as batch:
        batch.drop_constraint("uq_feedback_reviewer_idempotency_key", type_="unique")
        batch.create_unique_constraint("uq_feedback_idempotency_key", ["idempotency_key"])
