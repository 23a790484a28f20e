"""Alembic's environment. Conduit runs it from `app.store.db.Database.migrate`, which passes an open
connection in `config.attributes["connection"]`. For a developer writing the next migration:
`alembic -c app/store/alembic.ini -x url=sqlite:///data/conduit.db revision --autogenerate -m "..."`."""

import sqlalchemy as sa
from alembic import context

from app.store.schema import metadata


def run(connection) -> None:
    # batch mode: SQLite alters a table by copying it, which Alembic does only when asked
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is not None:
    run(connection)
else:  # the alembic command line, with a synchronous driver's URL
    engine = sa.create_engine(context.get_x_argument(as_dictionary=True)["url"])
    with engine.begin() as conn:
        run(conn)
