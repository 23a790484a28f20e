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

# Uploaded files and batch output files: the wire object's fields; the bytes live in StoreConfig.files_dir.
files = sa.Table(
    "files",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("owner", sa.String(128), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False, index=True),
    sa.Column("purpose", sa.String(32), nullable=False),
    sa.Column("filename", sa.String(512), nullable=False),
    sa.Column("bytes", sa.BigInteger, nullable=False),
)

# One row per batch: its wire object in `body`; `runner`/`lease_until`: which ingress replica runs it,
# and until when its claim holds without a heartbeat (then another replica takes it over).
batches = sa.Table(
    "batches",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("owner", sa.String(128), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False, index=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("body", Json, nullable=False),
    sa.Column("runner", sa.String(64), nullable=True),
    sa.Column("lease_until", sa.Float, nullable=True),
)

# A batch's answered input lines, each recorded as it finishes (a resumed batch skips them): the
# output line, and whether it goes to the error file.
batch_lines = sa.Table(
    "batch_lines",
    metadata,
    sa.Column("batch_id", sa.String(64), sa.ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("position", sa.Integer, primary_key=True),  # the input line's index among its non-blank lines
    sa.Column("failed", sa.Boolean, nullable=False),
    sa.Column("line", sa.Text, nullable=False),
)
