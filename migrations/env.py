"""Alembic environment: the connection comes from the caller (subledger db upgrade), never from a file.

`target_metadata` is the schema as the models declare it (store/models.py), with the comparison
options autogenerate needs to see every column type and server default: `alembic check` run through
here (tests/test_schema_models.py does) reports a migration and a model that disagree. Upgrades do
not read the metadata; they run the versions as written.
"""

from alembic import context

from subledger.store import models

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through `subledger db upgrade`, which supplies the connection")

context.configure(connection=connection, target_metadata=models.metadata, transaction_per_migration=True,
                  **models.COMPARISON)
with context.begin_transaction():
    context.run_migrations()
