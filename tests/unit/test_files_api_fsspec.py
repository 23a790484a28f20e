"""/v1/files through the official `openai` SDK on the Files adapter's real routes (no Ray: its
FastAPI router in-process), with store.files_dir on a plain path and on memory:// (an object store):
uploads checked as JSONL while they stream in, content streamed back with its length, refused
uploads leaving nothing behind; and the JSONL check across chunk boundaries."""

import io
import uuid

import fsspec
import openai
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from openai import OpenAI

from app.api.errors import ConduitError
from app.api.wire.files import JsonlCheck, routes
from app.config import parse_app_config

MAX_FILE_BYTES = 4 * 2**20
BIG = b"".join(b'{"custom_id": "%d", "pad": "%s"}\n' % (i, b"x" * 1000) for i in range(3000))  # ~3 MiB


@pytest.fixture(params=["path", "memory"])
def api(request, tmp_path):
    """(an SDK client, a raw HTTP client, the filesystem and root the bytes go to)."""
    if request.param == "memory":
        files_dir = f"memory://conduit-test-{uuid.uuid4().hex}/files"
        fs, root = fsspec.filesystem("memory"), fsspec.core.url_to_fs(files_dir)[1]
    else:
        files_dir = str(tmp_path / "files")
        fs, root = fsspec.filesystem("file"), files_dir
    config = parse_app_config({"models": [{"name": "m", "source": "x"}],
                               "store": {"url": f"sqlite:///{tmp_path / 'conduit.db'}", "files_dir": files_dir,
                                         "max_file_bytes": MAX_FILE_BYTES}})
    # No batch is created here, so the adapter's batch runner never calls the pipeline it is given.
    built = routes(None, config)
    app = FastAPI()
    app.include_router(built.router)
    app.add_exception_handler(ConduitError, lambda _request, err: built.error_response(err))
    with TestClient(app) as http:
        yield OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0), http, fs, root
    for key in fs.find(root):
        fs.rm_file(key)


def test_upload_and_content_round_trip_through_files_dir(api):
    client, http, fs, root = api
    made = client.files.create(file=("big.jsonl", io.BytesIO(BIG)), purpose="batch")
    assert made.bytes == len(BIG) and client.files.retrieve(made.id).filename == "big.jsonl"
    assert fs.find(root) == [f"{root}/{made.id}"] and fs.cat_file(f"{root}/{made.id}") == BIG
    assert client.files.content(made.id).content == BIG
    with http.stream("GET", f"/v1/files/{made.id}/content") as response:
        assert response.headers["content-length"] == str(len(BIG))
        assert response.headers["content-type"] == "application/octet-stream"
        assert b"".join(response.iter_bytes()) == BIG
    assert client.files.delete(made.id).deleted and fs.find(root) == []
    with pytest.raises(openai.NotFoundError):
        client.files.content(made.id)


def test_refused_uploads_leave_nothing_behind(api):
    client, http, fs, root = api
    kept = client.files.create(file=("ok.jsonl", io.BytesIO(b'{"a": 1}\n')), purpose="batch")
    bad_late = BIG + b"[1, 2]\n"  # the bad line comes in the upload's last chunk
    for data, line in ((b'{"a": 1}\nnot json\n', 2), (bad_late, 3001), (b"\xff\xfe\n", 1)):
        with pytest.raises(openai.BadRequestError) as raised:
            client.files.create(file=("x.jsonl", io.BytesIO(data)), purpose="batch")
        assert raised.value.code == "invalid_file_format" and f"line {line} " in raised.value.message
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("x.jsonl", io.BytesIO(b"")), purpose="batch")
    with pytest.raises(openai.APIStatusError) as raised:
        client.files.create(file=("x.jsonl", io.BytesIO(BIG + BIG)), purpose="batch")
    assert raised.value.status_code == 413
    assert fs.find(root) == [f"{root}/{kept.id}"]
    assert [f.id for f in client.files.list()] == [kept.id]
    fs.rm_file(f"{root}/{kept.id}")  # bytes gone from under their record: a 404, not a 500
    assert http.get(f"/v1/files/{kept.id}/content").status_code == 404


@pytest.mark.parametrize("size", [1, 3, 7, 1 << 20])
def test_jsonl_check_counts_lines_across_chunks(size):
    text = b'{"a": 1}\n\n{"b": [1, 2]}\r\n  \n{"c": "x"}'  # blank lines count; the last needs no newline
    check = JsonlCheck()
    for start in range(0, len(text), size):
        check.feed(text[start:start + size])
    check.end()
    assert check.number == 5
    for bad, line in ((text.replace(b"  \n", b'"s"\n'), 4), (text + b"}", 5)):  # the last line, unended
        check = JsonlCheck()
        with pytest.raises(ConduitError, match=f"line {line} is not a JSON object"):
            for start in range(0, len(bad), size):
                check.feed(bad[start:start + size])
            check.end()
