"""Alembic environment of the feedback store: runs against the engine `pipelines.store.db.upgrade`
passes in (``config.attributes["engine"]``)."""

from alembic import context

from pipelines.store.models import Base

engine = context.config.attributes["engine"]
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()
