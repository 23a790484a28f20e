"""Reading a batch input into Ray Data rows {"text": the line, "line": its number, "utf8": whether it
decoded}, keeping only the lines the output does not answer yet (resume).

JSONL is split on "\\n" alone (JSON text may hold U+2028 and other characters that
`str.splitlines` would also split on, which Ray's own `read_text` does) and read in blocks as it
streams, so a large file is not held whole. A line that is not UTF-8 stays a row of its own and
gets its error line; it never fails the read. Parquet rows (columns custom_id, method, url, body:
a JSON string or a struct) become the same JSON lines."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from ray.data.datasource import FileBasedDatasource

from app.batch.lines import Answered

ROWS_PER_BLOCK = 256
READ_BYTES = 1 << 20
READ_CPUS = 0.25  # reading is light: it must not wait for CPUs that the engine actors hold
NODE_ID_LABEL = "ray.io/node-id"  # every Ray node's label with its own id


class JsonLines(FileBasedDatasource):
    def __init__(self, paths: str | list[str], done: Answered, **kwargs):
        super().__init__(paths, **kwargs)
        self.done = done

    def _read_stream(self, f, path: str) -> Iterator:
        rows: list[tuple[str, int, bool]] = []
        for number, raw in enumerate(split_lines(f), start=1):
            row = decode(raw, number)
            if row[0].strip() and not self.done.answers(row[0], row[2]):
                rows.append(row)
            if len(rows) >= ROWS_PER_BLOCK:
                yield _block(rows)
                rows = []
        if rows:
            yield _block(rows)


def split_lines(f) -> Iterator[bytes]:
    """Lines of a binary stream (anything with `read(n)`), split on b"\\n" only, without it."""
    rest = b""
    while chunk := f.read(READ_BYTES):
        *lines, rest = (rest + chunk).split(b"\n")
        yield from lines
    if rest:
        yield rest


def decode(raw: bytes, number: int) -> tuple[str, int, bool]:
    raw = raw.removesuffix(b"\r")
    try:
        return raw.decode("utf-8"), number, True
    except UnicodeDecodeError:
        return raw.decode("utf-8", "replace"), number, False


def _block(rows: list[tuple[str, int, bool]]):
    import pyarrow as pa

    text, line, utf8 = zip(*rows)
    return pa.table({"text": list(text), "line": list(line), "utf8": list(utf8)})


# Parquet ---------------------------------------------------------------------------------------
def parquet_to_lines(batch, done: Answered):
    """map_batches over read_parquet's rows: each row as its JSON line (pyarrow batches in and out)."""
    import pyarrow as pa

    rows = []
    for row in batch.to_pylist():
        text = json.dumps({key: _body(value) if key == "body" else value for key, value in row.items()},
                          ensure_ascii=False)
        if not done.answers(text):
            rows.append((text, 0, True))  # Parquet has no line numbers
    return _block(rows) if rows else pa.table({"text": pa.array([], pa.string()), "line": pa.array([], pa.int64()),
                                                "utf8": pa.array([], pa.bool_())})


def _body(value):
    """A JSON string as its object; a struct with its nulls dropped (Parquet fills every field a
    row lacks with null, so null there means absent)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return _drop_nulls(value)


def _drop_nulls(value):
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def is_parquet(path: str) -> bool:
    return Path(path.split("?")[0]).suffix.lower() in (".parquet", ".pq")


def read_input(path: str, done: Answered):
    """The Ray Data dataset of `path`'s pending lines. A path without a scheme is read on this (the
    driver's) node, so the other nodes need not see it; a URL (s3://, gs://, ...) is read anywhere."""
    import ray
    import ray.data

    where = {"num_cpus": READ_CPUS}
    if "://" not in path:
        path = str(Path(path).resolve())
        where["label_selector"] = {NODE_ID_LABEL: ray.get_runtime_context().get_node_id()}
    if is_parquet(path):
        return ray.data.read_parquet(path, **where).map_batches(parquet_to_lines, batch_format="pyarrow",
                                                                fn_kwargs={"done": done}, num_cpus=READ_CPUS)
    return ray.data.read_datasource(JsonLines(path, done=done), **where)


def count_lines(path: str) -> int | None:
    """Non-blank lines (rows, for Parquet) of a local input, for the progress bar; None elsewhere."""
    if "://" in path:
        return None
    if is_parquet(path):
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    with open(path, "rb") as f:
        return sum(1 for raw in split_lines(f) if raw.strip())
