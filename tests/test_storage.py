"""The filesystem layer: the same operations and atomicity on local paths, a real S3 API on
loopback (moto server) and an fsspec-only scheme (memory://)."""

from __future__ import annotations

import _thread
import hashlib
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

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


def test_paged_listing_matches_list_files(root: str) -> None:
    """Folders and prefixes are listed a page at a time (S3: ListObjectsV2 pages), in the
    order of list_files, nested folders included."""
    names = ["a.mp4", "b/c.mp4", "b/d/e.mp4", "b0.mp4", "z.mp4"]
    for n in names:
        storage.write_atomic(storage.join(root, "in", n), n)
    pages = list(storage.iter_files(storage.join(root, "in"), page_size=2))
    assert [len(p) for p in pages] == [2, 2, 1]
    assert [u for p in pages for u in p] == storage.list_files(storage.join(root, "in"))
    assert list(storage.iter_files(storage.join(root, "nothing-here"))) == []


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
    """SIGKILL while the writer is still producing its bytes: the destination keeps its old
    content (local: a hidden temp file at most, which the next run removes; S3: the bytes are
    still being staged locally, no S3 call has been made, so no new object and no marker
    objects). A kill in the middle of the S3 upload itself is
    ``test_s3_writer_killed_after_its_first_part``."""
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


# ---------------------------------------------------------------- S3 multipart uploads

_BIG = 25 << 20
"""More than two of pyarrow's 10 MiB upload parts: a multipart upload of three parts."""

_UPLOADER = textwrap.dedent("""
    import sys
    from se4lip_dist import storage

    storage.write_atomic(sys.argv[1], b"n" * int(sys.argv[2]))
""")


class _PartGate:
    """An HTTP proxy in front of the loopback S3 that fails or holds one part of every upload.

    Requests pass through unchanged, except ``UploadPart`` number ``part``: ``"fail"`` answers it
    with S3's 500 ``InternalError`` (the client retries, then gives up, as with a real server
    error); ``"hold"`` reads its body a trickle at a time (fast enough that the client does not
    time out) until :meth:`release`, then forwards it. The parts before it reach the server.
    """

    def __init__(self, upstream: str, mode: str, part: int = 2) -> None:
        self.upstream = urlsplit(upstream)
        self.mode, self.part = mode, part
        self.released = threading.Event()
        self.forwarded: list[tuple[str, int, int]] = []  # (key, part number, status) of parts
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.server.handle_error = lambda *_: None  # a killed client's connection: not an error
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def release(self) -> None:
        self.released.set()

    def close(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        gate = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def read(self, n: int, held: bool) -> bytes:
                out = b""
                while len(out) < n:
                    trickle = held and not gate.released.is_set()
                    got = self.rfile.read(min(16 << 10, n - len(out)) if trickle else n - len(out))
                    if not got:
                        raise ConnectionError("the client went away (killed)")
                    out += got
                    if trickle:
                        gate.released.wait(0.2)
                return out

            def body(self, held: bool) -> bytes:
                if self.headers.get("Content-Length") is not None:
                    return self.read(int(self.headers["Content-Length"]), held)
                if (self.headers.get("Transfer-Encoding") or "").lower() != "chunked":
                    return b""
                raw = []  # forwarded as sent: the S3 client signs its aws-chunked framing
                while True:
                    line = self.rfile.readline()
                    if not line:
                        raise ConnectionError("the client went away (killed)")
                    raw.append(line)
                    size = int(line.split(b";")[0], 16)
                    if size == 0:
                        while (trailer := self.rfile.readline()) not in (b"\r\n", b""):
                            raw.append(trailer)
                        raw.append(trailer)
                        return b"".join(raw)
                    raw.append(self.read(size + 2, held))

            def answer(self, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
                self.send_response_only(status)
                length = str(len(data))
                for k, v in headers:
                    if k.lower() == "content-length" and self.command == "HEAD":
                        length = v  # the object's size, not the empty body's
                    elif k.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", length)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def any(self) -> None:
                url = urlsplit(self.path)
                query = dict(parse_qsl(url.query, keep_blank_values=True))
                part = int(query["partNumber"]) if "partNumber" in query else 0
                gated = self.command == "PUT" and part == gate.part
                body = self.body(held=gated and gate.mode == "hold")
                if gated and gate.mode == "fail":
                    self.answer(500, [("Content-Type", "application/xml")],
                                b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>"
                                b"InternalError</Code><Message>We encountered an internal "
                                b"error. Please try again.</Message></Error>")
                    return
                up = http.client.HTTPConnection(gate.upstream.hostname, gate.upstream.port,
                                                timeout=60)
                try:
                    up.putrequest(self.command, self.path, skip_host=True,
                                  skip_accept_encoding=True)
                    for k, v in self.headers.items():
                        if k.lower() != "expect":  # the body is already here
                            up.putheader(k, v)
                    up.endheaders(body)
                    resp = up.getresponse()
                    data = resp.read()
                finally:
                    up.close()
                if part:
                    gate.forwarded.append((url.path.split("/", 2)[2], part, resp.status))
                self.answer(resp.status, resp.getheaders(), data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = any

        return Handler


@pytest.fixture
def part_gate(s3_env):  # type: ignore[no-untyped-def]
    """``make(mode)`` -> a started :class:`_PartGate` in front of the loopback S3."""
    gates: list[_PartGate] = []

    def make(mode: str) -> _PartGate:
        gates.append(_PartGate(s3_env.endpoint, mode))
        return gates[-1]

    yield make
    for g in gates:
        g.close()


def _uploads(s3, prefix: str) -> list[dict]:  # type: ignore[no-untyped-def]
    """Incomplete multipart uploads under ``prefix``, as the server lists them."""
    resp = _boto(s3).list_multipart_uploads(Bucket=BUCKET, Prefix=prefix)  # type: ignore[attr-defined]
    return resp.get("Uploads", [])


def _wait_for_parts(s3, key: str, writer: subprocess.Popen | None = None,  # type: ignore[no-untyped-def]
                    timeout_s: float = 60.0) -> int:
    """How many parts of ``key``'s incomplete upload the server holds, once it holds one."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert writer is None or writer.poll() is None, "the writer ended before a part landed"
        for up in _uploads(s3, key):
            parts = _boto(s3).list_parts(Bucket=BUCKET, Key=key,  # type: ignore[attr-defined]
                                         UploadId=up["UploadId"]).get("Parts", [])
            if parts:
                return len(parts)
        time.sleep(0.05)
    raise AssertionError(f"no part of {key} reached the server in {timeout_s} s")


@pytest.mark.timeout(180)
def test_s3_writer_killed_after_its_first_part(s3_env, part_gate) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL in the middle of a multipart upload, seen from the server: the old object stays,
    nothing new is visible; no cleanup can run, so the incomplete upload stays too (billed) until
    a rerun's cleanup (``remove_temp_files``, which prepare and extract call) aborts it."""
    s3_env.create_bucket(BUCKET)
    gate = part_gate("hold")
    prefix = f"u-{uuid.uuid4().hex[:8]}"
    folder, key = f"s3://{BUCKET}/{prefix}", f"{prefix}/manifest.json"
    target = f"s3://{BUCKET}/{key}"
    storage.write_atomic(target, "old")
    env = {**os.environ, "AWS_ENDPOINT_URL": gate.endpoint}  # the writer goes through the gate
    proc = subprocess.Popen([sys.executable, "-c", _UPLOADER, target, str(_BIG)], env=env,
                            start_new_session=True)
    try:
        parts = _wait_for_parts(s3_env, key, proc)
        assert parts >= 1 and proc.poll() is None  # mid-upload: part 2 is still being sent
        assert 2 not in {n for _, n, _ in gate.forwarded}
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert storage.read_text(target) == "old"
    assert _keys(s3_env, prefix) == [key]  # no new object, no temp or marker object
    (left,) = _uploads(s3_env, prefix)
    assert left["Key"] == key
    # Only uploads older than older_than go. moto lists every upload as started on 2010-11-10
    # (a constant in its responses), so the cut-off here is older than that: none.
    assert storage.abort_stale_uploads(folder, older_than=time.time()) == 0
    assert _uploads(s3_env, prefix)
    assert storage.remove_temp_files(folder) == 1  # what the rerun does
    assert _uploads(s3_env, prefix) == []
    assert storage.read_text(target) == "old"


def _old_object_behind(s3_env, gate, monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
                       name: str) -> tuple:
    """An object ``name`` holding "old" in a fresh prefix, with this process's S3 calls sent
    through ``gate``: returns ``(gate, prefix, key, url)``."""
    s3_env.create_bucket(BUCKET)
    monkeypatch.setenv("AWS_ENDPOINT_URL", gate.endpoint)
    prefix = f"g-{uuid.uuid4().hex[:8]}"
    key = f"{prefix}/{name}"
    target = f"s3://{BUCKET}/{key}"
    storage.write_atomic(target, "old")
    return gate, prefix, key, target


@pytest.mark.timeout(180)
def test_s3_failed_part_upload_raises_and_aborts_the_upload(  # type: ignore[no-untyped-def]
        s3_env, part_gate, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server fails part 2 after part 1 landed: the write raises (it does not report a
    success it did not publish), the old object stays and no incomplete upload is left."""
    gate, prefix, key, target = _old_object_behind(s3_env, part_gate("fail"), monkeypatch,
                                                   "shard-00000.parquet")
    with pytest.raises(storage.StorageError, match=rf"{re.escape(target)}: .*internal error"):
        storage.write_atomic(target, b"n" * _BIG)
    assert (key, 1, 200) in gate.forwarded  # part 1 reached the server before the failure
    assert storage.read_text(target) == "old"
    assert _keys(s3_env, prefix) == [key]
    assert _uploads(s3_env, prefix) == []


@pytest.mark.timeout(180)
def test_s3_interrupted_upload_is_aborted(  # type: ignore[no-untyped-def]
        s3_env, part_gate, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C (KeyboardInterrupt) after part 1 landed: the upload is aborted, not completed with
    what was sent, and none is left; the old object stays."""
    gate, prefix, key, target = _old_object_behind(s3_env, part_gate("hold"), monkeypatch,
                                                   "manifest.json")
    seen: list[int] = []

    def interrupt() -> None:
        try:
            seen.append(_wait_for_parts(s3_env, key))
            _thread.interrupt_main()
            deadline = time.monotonic() + 20
            while _uploads(s3_env, key) and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            gate.release()  # the held part goes on (and fails if the upload was aborted)

    # Python's own Ctrl-C handler, whatever an earlier test in this process installed.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    helper = threading.Thread(target=interrupt, daemon=True)
    helper.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            storage.write_atomic(target, b"n" * _BIG)
    finally:
        signal.signal(signal.SIGINT, previous)
    helper.join(timeout=60)
    assert seen and seen[0] >= 1
    assert storage.read_text(target) == "old"
    assert _keys(s3_env, prefix) == [key]
    assert _uploads(s3_env, prefix) == []


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
