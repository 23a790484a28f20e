"""app/store/files.py's bytes on each kind of store.files_dir, on real fsspec filesystems: a plain
path, a file:// URL and memory:// (as an object store: no rename). Written, read whole and in chunks,
staged then added, discarded, deleted and swept, each checked in the filesystem itself; and a
files_dir that fsspec cannot open is a config error naming the field."""

import asyncio
import uuid

import fsspec
import pytest

from app.config import PROJECT_ROOT, ConfigError, StoreConfig, parse_app_config
from app.store import Database, FileStore
from app.store.files import files_url

BIG = b"".join(b'{"line": %d, "pad": "%s"}\n' % (i, b"x" * 1000) for i in range(3000))  # ~3 MiB


@pytest.fixture(params=["path", "file_url", "memory"])
def files_dir(request, tmp_path):
    """(store.files_dir, the fsspec filesystem and root that the test checks the bytes in)."""
    if request.param == "memory":
        url = f"memory://conduit-test-{uuid.uuid4().hex}/files"
        yield url, fsspec.filesystem("memory"), fsspec.core.url_to_fs(url)[1]
        for key in fsspec.filesystem("memory").find(fsspec.core.url_to_fs(url)[1]):
            fsspec.filesystem("memory").rm_file(key)
        return
    local = tmp_path / "files"
    yield (str(local) if request.param == "path" else local.as_uri()), fsspec.filesystem("file"), str(local)


def run(tmp_path, files_dir: str, body):
    async def main():
        db = Database(StoreConfig(url=f"sqlite:///{tmp_path / 'conduit.db'}", files_dir=files_dir,
                                  retention_days=1000))
        files = FileStore(db, db.config.files_dir)
        await db.start()
        try:
            return await body(files)
        finally:
            await db.close()

    return asyncio.run(main())


def test_bytes_live_under_files_dir_and_go_with_their_file(files_dir, tmp_path):
    url, fs, root = files_dir

    async def body(files):
        made = await files.write("a", BIG, "batch_output", "out.jsonl")
        assert made["bytes"] == len(BIG) and (await files.get("a", made["id"]))["bytes"] == len(BIG)
        assert fs.cat_file(f"{root}/{made['id']}") == BIG  # in the filesystem named, under its id
        assert await files.read(made["id"]) == BIG
        size, source = files.open(made["id"])
        with source:
            chunks = list(iter(lambda: source.read(1 << 20), b""))
        assert size == len(BIG) and len(chunks) == 3 and b"".join(chunks) == BIG
        assert fs.find(root) == [f"{root}/{made['id']}"]  # nothing staged is left behind
        assert not await files.delete("b", made["id"]) and fs.exists(f"{root}/{made['id']}")
        assert await files.delete("a", made["id"])
        assert not fs.exists(f"{root}/{made['id']}") and await files.read(made["id"]) is None
        with pytest.raises(FileNotFoundError):
            files.open(made["id"])

    run(tmp_path, url, body)


def test_an_upload_is_a_file_only_once_added(files_dir, tmp_path):
    url, fs, root = files_dir

    async def body(files):
        staged = files.stage()
        with files.open_staged(staged) as out:
            out.write(b'{"a": 1}\n')
        # a directory stages beside the files and renames; an object store writes the final key
        assert (staged.key == files.key(staged.file_id)) == (url.startswith("memory://"))
        assert await files.get("a", staged.file_id) is None
        made = await files.add("a", staged, "batch", "in.jsonl")
        assert made["id"] == staged.file_id and made["bytes"] == 9
        assert fs.find(root) == [f"{root}/{made['id']}"]

        refused = files.stage()
        with files.open_staged(refused) as out:
            out.write(b"half an upload")
        await files.discard(refused)
        assert fs.find(root) == [f"{root}/{made['id']}"]

        async with files.db.begin() as conn:
            assert await files.expire(conn, made["created_at"] + 1) == 1
        assert fs.find(root) == [] and await files.get("a", made["id"]) is None

    run(tmp_path, url, body)


def test_a_plain_path_is_taken_from_the_project_root():
    assert files_url("data/files") == str(PROJECT_ROOT / "data/files")
    assert files_url("/srv/files") == "/srv/files"
    assert files_url("s3://bucket/files") == "s3://bucket/files"


@pytest.mark.parametrize("files_dir,why", [("nosuch://bucket/files", "Protocol not known"),
                                           ("s3://bucket/files", "s3fs"),  # its driver is not installed here
                                           ("simplecache::gs://bucket/files", "gcsfs")])
def test_a_files_dir_fsspec_cannot_open_is_a_config_error(files_dir, why):
    with pytest.raises(ConfigError) as e:
        parse_app_config({"models": [{"name": "m", "source": "x"}], "store": {"files_dir": files_dir}})
    assert "args.store.files_dir" in str(e.value) and why in str(e.value)
    parse_app_config({"models": [{"name": "m", "source": "x"}], "store": {"files_dir": "memory://bucket/files"}})
