"""The feedback store: predictions served, clinicians' feedback (an append-only audit trail),
adjudication of conflicting labels, deployments (what was served when), and a shadow candidate's
answers for the predictions served (logged, never returned).

SQLAlchemy 2 models (`models`), Alembic migrations (`migrations/`), and the engine set-up
(`db`): SQLite by default, in WAL mode with a busy timeout and immediate transactions so that
concurrent writers wait instead of failing with "database is locked"; PostgreSQL in production,
by URL. Triggers in the database refuse UPDATE and DELETE on every table (migration 0003), and a
SQLite store's files are created 0600.
"""
