"""What Conduit keeps between calls: stored Responses (and, later, Files and Batches), in one SQL
database that every ingress replica shares.

`Database` (db.py) owns the engine, the versioned migrations (Alembic, migrations/) and the
retention sweep; each kind of record has its own small repository on top of it (responses.py:
`ResponseStore`). Embedded SQLite is the default; any SQLAlchemy URL works (PostgreSQL for a
cluster, where replicas on several nodes must see the same rows)."""

from app.store.batches import BatchStore
from app.store.db import Database
from app.store.files import FileStore
from app.store.responses import ResponseStore

__all__ = ["BatchStore", "Database", "FileStore", "ResponseStore"]
