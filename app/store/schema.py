"""The tables, as SQLAlchemy Core metadata: what the migrations (migrations/versions/) create and
what the repositories query. A change here needs a new migration, so an upgrade keeps stored rows."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()
# JSON, not PostgreSQL's JSONB: JSONB refuses text holding U+0000, which a request may carry
Json = sa.JSON()

# One row per stored response: its whole wire object in `body`, the columns that are queried beside it.
responses = sa.Table(
    "responses",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("owner", sa.String(128), nullable=False),  # the API key's id that created it
    sa.Column("created_at", sa.Float, nullable=False, index=True),  # epoch seconds; the retention sweep's key
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("previous_id", sa.String(64), nullable=True),  # the response it continued
    sa.Column("body", Json, nullable=False),
)

# A response's items in order: its input (`kind` 0), then its output (1). A conversation continued
# by previous_response_id is the chain's items, oldest response first.
INPUT, OUTPUT = 0, 1
response_items = sa.Table(
    "response_items",
    metadata,
    sa.Column("response_id", sa.String(64), sa.ForeignKey("responses.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("kind", sa.SmallInteger, primary_key=True),
    sa.Column("position", sa.Integer, primary_key=True),
    sa.Column("item_id", sa.String(64), nullable=False),
    sa.Column("body", Json, nullable=False),
)
