"""The database every ingress replica shares: its engine (SQLAlchemy asyncio), its schema brought to
the newest migration on start, and the retention sweep.

Each replica migrates on start; concurrent starts take turns (a file lock beside an SQLite file, an
advisory lock on PostgreSQL), so only the first applies a migration and the others find it done."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool

from app.config import PROJECT_ROOT, StoreConfig

log = logging.getLogger("ray.serve")
MIGRATIONS = Path(__file__).parent / "migrations"
ASYNC_DRIVERS = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg", "postgres": "postgresql+asyncpg"}
MIGRATION_LOCK_ID = 0x636F6E64  # PostgreSQL advisory lock key ("cond")


def async_url(url: str) -> URL:
    """`url` with an asyncio driver (sqlite -> aiosqlite, postgresql -> asyncpg unless one is named);
    a relative SQLite path is taken from the project's root, as `make run` creates data/ there."""
    parsed = make_url(url)
    if "+" not in parsed.drivername and parsed.drivername in ASYNC_DRIVERS:
        parsed = parsed.set(drivername=ASYNC_DRIVERS[parsed.drivername])
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        path = Path(parsed.database)
        parsed = parsed.set(database=str(path if path.is_absolute() else PROJECT_ROOT / path))
    return parsed


class Database:
    def __init__(self, config: StoreConfig):
        self.config = config
        self.url = async_url(config.url)
        self.engine: AsyncEngine | None = None
        self._sweeper: asyncio.Task | None = None
        self.expiring: list = []  # repositories with `expire(conn, cutoff)`, swept for retention

    @property
    def sqlite(self) -> bool:
        return self.url.get_backend_name() == "sqlite"

    async def start(self) -> None:
        """Connect, migrate to the newest schema, and start the retention sweep."""
        self.engine = self._create_engine()
        await self.migrate()
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="conduit-store-sweep")

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self.engine is not None:
            await self.engine.dispose()

    def _create_engine(self) -> AsyncEngine:
        if not self.sqlite:
            return create_async_engine(self.url, pool_pre_ping=True)
        memory = self.url.database in (None, "", ":memory:")
        if not memory:
            Path(self.url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(self.url, poolclass=StaticPool) if memory else create_async_engine(self.url)

        @sa.event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_connection, _record):
            cursor = dbapi_connection.cursor()
            # WAL: readers never wait for the writer; other processes (ingress replicas) wait their
            # turn to write for up to 30 s instead of failing at once
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine

    async def migrate(self) -> None:
        async with self._migration_lock(), self.engine.begin() as conn:
            if not self.sqlite:
                await conn.execute(sa.text(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_ID})"))
            await conn.run_sync(_upgrade)

    @asynccontextmanager
    async def _migration_lock(self):
        if not self.sqlite or self.url.database in (None, "", ":memory:"):
            yield
            return
        with open(f"{self.url.database}.migrate-lock", "w") as lock:
            await asyncio.to_thread(fcntl.flock, lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def begin(self):
        """A transaction: `async with db.begin() as conn: ...`."""
        return self.engine.begin()

    def connect(self):
        return self.engine.connect()

    async def sweep(self, now: float | None = None) -> int:
        """Delete every record older than the retention period; returns how many were deleted."""
        cutoff = (time.time() if now is None else now) - self.config.retention_days * 86400
        async with self.begin() as conn:
            return sum([await repository.expire(conn, cutoff) for repository in self.expiring])

    async def _sweep_forever(self) -> None:
        while True:
            try:
                deleted = await self.sweep()
                if deleted:
                    log.info("store: deleted %d records past the retention period", deleted)
            except Exception:  # a database briefly away must not end the sweeping
                log.exception("store: retention sweep failed; retrying in %s s", self.config.sweep_interval_s)
            await asyncio.sleep(self.config.sweep_interval_s)


def _upgrade(connection: sa.Connection) -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


async def current_revision(conn: AsyncConnection) -> str | None:
    """The migration the database is at (None before the first)."""
    def read(sync_conn):
        from alembic.runtime.migration import MigrationContext

        return MigrationContext.configure(sync_conn).get_current_revision()

    return await conn.run_sync(read)
