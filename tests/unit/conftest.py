"""Fixtures the store tests share: each database backend the store is built for, fresh per test."""

import asyncio
import itertools

import pytest
import sqlalchemy as sa

from app.store.db import async_url
from tests.pg_server import postgres_server

_names = itertools.count()


@pytest.fixture(scope="module")
def postgres():
    with postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    """A fresh, empty database of each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    server = request.getfixturevalue("postgres")
    name = f"test_{next(_names)}"

    async def create():
        engine = sa.ext.asyncio.create_async_engine(async_url(server), isolation_level="AUTOCOMMIT")
        async with engine.connect() as conn:
            await conn.execute(sa.text(f"CREATE DATABASE {name}"))
        await engine.dispose()

    asyncio.run(create())
    return server.rsplit("/", 1)[0] + "/" + name
