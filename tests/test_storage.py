"""The filesystem layer: the same operations and atomicity on local paths, a real S3 API on
loopback (moto server) and an fsspec-only scheme (memory://)."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from se4lip_dist import storage

BUCKET = "se4lip-data"


@pytest.fixture(params=["local", "s3", "memory"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty folder: local, a fresh prefix in a loopback S3 bucket, or a memory:// folder."""
    if request.param == "local":
        return str(tmp_path / "root")
    if request.param == "s3":
        s3 = request.getfixturevalue("s3_env")
        s3.create_bucket(BUCKET)
        return f"s3://{BUCKET}/t-{uuid.uuid4().hex[:8]}"
    return f"memory://se4lip-{uuid.uuid4().hex[:8]}"


def _boto(s3) -> object:  # type: ignore[no-untyped-def]
    import boto3

    return boto3.client("s3", endpoint_url=s3.endpoint)


def _keys(s3, prefix: str) -> list[str]:  # type: ignore[no-untyped-def]
    resp = _boto(s3).list_objects_v2(Bucket=BUCKET, Prefix=prefix)  # type: ignore[attr-defined]
    return sorted(o["Key"] for o in resp.get("Contents", []))


# ---------------------------------------------------------------- names


def test_names_keep_the_scheme(tmp_path: Path) -> None:
    assert storage.join("s3://b/x/", "y", "z.npy") == "s3://b/x/y/z.npy"
    assert storage.join(str(tmp_path), "a", "b") == str(tmp_path / "a" / "b")
    assert storage.basename("s3://b/x/clip.mp4") == "clip.mp4"
    assert storage.parent("s3://b/x/clip.mp4") == "s3://b/x"
    assert storage.parent("s3://b/x") == "s3://b"
    assert storage.absolute("s3://b/x/") == "s3://b/x"
    assert storage.absolute("file:///data/x") == "/data/x"
    assert storage.absolute("rel/x") == os.path.abspath("rel/x")
    assert storage.is_local("rel/x") and storage.is_local("file:///x")
    assert not storage.is_local("s3://b/x") and storage.scheme("S3://b") == "s3"
    assert storage.is_absolute("s3://b/x") and storage.is_absolute("/x")
    assert not storage.is_absolute("clips/x.mp4")


def test_unknown_scheme_is_named() -> None:
    with pytest.raises(storage.StorageError, match=r"nosuchfs://x/y: no filesystem for scheme"):
        storage.read_bytes("nosuchfs://x/y")


# ---------------------------------------------------------------- every backend


def test_write_read_list_delete(root: str) -> None:
    a = storage.join(root, "sub", "a.json")
    w = storage.write_atomic(a, '{"x": 1}')
    assert w.size == 8 and w.sha256 == hashlib.sha256(b'{"x": 1}').hexdigest()
    assert storage.read_text(a) == '{"x": 1}' and storage.sha256(a) == w.sha256
    assert storage.exists(a) and storage.is_file(a) and not storage.is_dir(a)
    assert storage.is_dir(storage.join(root, "sub")) and storage.exists(root)
    assert storage.size(a) == 8
    assert storage.stat(a).mtime_ns > 0 or root.startswith("memory:")  # memory has no mtime
    storage.write_atomic(storage.join(root, "sub", "b.parquet"), b"p")
    storage.write_atomic(storage.join(root, "sub", "deep", "c.mp4"), b"v")
    assert storage.listdir(storage.join(root, "sub")) == ["a.json", "b.parquet", "deep"]
    assert [storage.basename(u) for u in storage.list_files(root)] == \
        ["a.json", "b.parquet", "c.mp4"]
    assert storage.list_files(root)[0] == a  # listings give back locations of the same form
    assert storage.glob(storage.join(root, "sub", "*.json")) == [a]
    storage.write_atomic(a, b"replaced")
    assert storage.read_bytes(a) == b"replaced"
    storage.delete(a)
    storage.delete(a)  # missing_ok
    with pytest.raises(storage.StorageNotFoundError):
        storage.delete(a, missing_ok=False)
    assert not storage.exists(a)
    with pytest.raises(storage.StorageNotFoundError, match=r"a\.json: no such file"):
        storage.read_bytes(a)
    with pytest.raises(FileNotFoundError):  # callers may catch the builtin too
        storage.stat(a)
    assert storage.listdir(storage.join(root, "nothing-here")) == []
    assert storage.list_files(storage.join(root, "nothing-here")) == []


def test_failed_writer_publishes_nothing_and_keeps_the_old_content(root: str) -> None:
    target = storage.join(root, "manifest.json")

    def half(f) -> None:  # type: ignore[no-untyped-def]
        f.write(b"half of a new")
        raise RuntimeError("writer died")

    with pytest.raises(RuntimeError, match="writer died"):
        storage.write_atomic_with(target, half)
    assert not storage.exists(target)
    storage.write_atomic(target, "old")

    def interrupted(f) -> None:  # type: ignore[no-untyped-def]
        f.write(b"half of a new")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        storage.write_atomic_with(target, interrupted)
    assert storage.read_text(target) == "old"
    assert storage.listdir(root) == ["manifest.json"]  # no temp file left behind


def test_local_copy(root: str, tmp_path: Path) -> None:
    src = storage.join(root, "clips", "talk.mp4")
    storage.write_atomic(src, b"video bytes")
    with storage.local_copy(src) as local:
        assert Path(local).read_bytes() == b"video bytes"
        assert local.endswith("talk.mp4")  # decoders sniff the extension
    if storage.is_local(src):
        assert local == src
    else:
        assert not Path(local).exists()  # the download is removed afterwards


def test_parquet_through_fs_and_paths(root: str) -> None:
    table = pa.table({"x": list(range(10))})
    urls = [storage.join(root, f"part-{i}.parquet") for i in range(2)]
    for u in urls:
        storage.write_atomic_with(u, lambda f: pq.write_table(table, f))
    fs, paths = storage.fs_and_paths(urls)
    if storage.is_local(root):
        assert fs is None and paths == urls
    else:
        assert isinstance(fs, pafs.FileSystem) and "://" not in paths[0]
    assert pq.read_table(paths[1], filesystem=fs).num_rows == 10
    with storage.open_input(urls[0]) as f:
        assert pq.ParquetFile(f).metadata.num_rows == 10


def test_fs_and_paths_refuses_mixed_filesystems(tmp_path: Path) -> None:
    assert storage.fs_and_paths([]) == (None, [])
    with pytest.raises(storage.StorageError, match="different filesystems"):
        storage.fs_and_paths([str(tmp_path / "a"), "s3://b/a"])


# ---------------------------------------------------------------- local specifics


def test_local_write_creates_folders_and_cleans_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "x.npy"
    storage.write_atomic(str(target), b"1")
    assert target.read_bytes() == b"1"
    (tmp_path / "a" / "b" / ".x.npy.123.abcd.tmp").write_bytes(b"from a killed writer")
    (tmp_path / "a" / "b" / "keep.tmp").write_bytes(b"not ours: no leading dot")
    assert storage.remove_temp_files(str(tmp_path / "a" / "b")) == 1
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == ["keep.tmp", "x.npy"]
    assert storage.remove_temp_files(str(tmp_path / "missing")) == 0


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes whatever the mode")
def test_local_permission_error_names_the_path(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(storage.StorageError, match=r"locked/x: permission denied"):
            storage.write_atomic(str(locked / "x"), b"1")
    finally:
        locked.chmod(0o700)


_KILLED_WRITER = textwrap.dedent("""
    import sys, time
    from se4lip_dist import storage

    def slow(f):
        f.write(b"x" * 1_000_000)
        f.flush()
        print("writing", flush=True)
        time.sleep(60)

    storage.write_atomic_with(sys.argv[1], slow)
""")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["local", "s3"])
def test_killed_writer_leaves_nothing_visible(where: str, tmp_path: Path,
                                              request: pytest.FixtureRequest) -> None:
    """SIGKILL mid-write: the destination keeps its old content (local: a hidden temp file at
    most, which the next run removes; S3: no new object, no marker objects)."""
    if where == "s3":
        s3 = request.getfixturevalue("s3_env")
        s3.create_bucket(BUCKET)
        prefix = f"k-{uuid.uuid4().hex[:8]}"
        target = f"s3://{BUCKET}/{prefix}/manifest.json"
    else:
        target = str(tmp_path / "out" / "manifest.json")
    storage.write_atomic(target, "old")
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, target],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert storage.read_text(target) == "old"
    if where == "s3":
        assert _keys(s3, prefix) == [f"{prefix}/manifest.json"]
    else:
        left = {p.name for p in (tmp_path / "out").iterdir()} - {"manifest.json"}
        assert left and all(storage.is_temp_name(n) for n in left)
        storage.remove_temp_files(str(tmp_path / "out"))
        assert [p.name for p in (tmp_path / "out").iterdir()] == ["manifest.json"]


# ---------------------------------------------------------------- S3 specifics


def test_s3_errors_name_the_url_and_problem(s3_env) -> None:  # type: ignore[no-untyped-def]
    s3_env.create_bucket(BUCKET)
    with pytest.raises(storage.BucketNotFoundError,
                       match=r"s3://no-such-bucket-x/k: bucket 'no-such-bucket-x' does not exist"):
        storage.read_bytes("s3://no-such-bucket-x/k")
    with pytest.raises(storage.BucketNotFoundError, match="does not exist"):
        storage.write_atomic("s3://no-such-bucket-x/k", b"1")
    with pytest.raises(storage.StorageNotFoundError, match=r"s3://se4lip-data/nope: no such"):
        storage.read_bytes(f"s3://{BUCKET}/nope")
    with pytest.raises(storage.StorageError, match="no bucket in the URL"):
        storage.resolve("s3:///key")


@pytest.mark.timeout(120)
def test_s3_unreachable_endpoint_fails_in_bounded_time(s3_env,  # type: ignore[no-untyped-def]
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    t0 = time.monotonic()
    with pytest.raises(storage.StorageError, match="cannot reach the storage endpoint"):
        storage.read_bytes(f"s3://{BUCKET}/x")
    assert time.monotonic() - t0 < 60


def test_s3_writes_only_the_objects_asked_for(s3_env) -> None:  # type: ignore[no-untyped-def]
    """No folder-marker objects; credentials never end up in a pickled filesystem."""
    import pickle

    s3_env.create_bucket(BUCKET)
    prefix = f"m-{uuid.uuid4().hex[:8]}"
    storage.makedirs(f"s3://{BUCKET}/{prefix}/empty")
    storage.write_atomic(f"s3://{BUCKET}/{prefix}/a/b/c.txt", b"1")
    assert _keys(s3_env, prefix) == [f"{prefix}/a/b/c.txt"]
    fs, _ = storage.resolve(f"s3://{BUCKET}/{prefix}")
    assert os.environ["AWS_SECRET_ACCESS_KEY"].encode() not in pickle.dumps(fs)


def test_s3_filesystem_cache_follows_the_environment(s3_env,  # type: ignore[no-untyped-def]
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    s3_env.create_bucket(BUCKET)
    fs1, path = storage.resolve(f"s3://{BUCKET}/x/y")
    assert path == f"{BUCKET}/x/y"
    assert storage.resolve(f"s3://{BUCKET}/other")[0] is fs1  # cached per bucket
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env.endpoint + "/")
    assert storage.resolve(f"s3://{BUCKET}/x/y")[0] is not fs1
