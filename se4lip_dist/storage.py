"""One filesystem layer for every path the stages read or write: local paths and URLs alike.

A *location* is a local path (``shards/grid``, ``/data/x.mp4``, ``file:///data``) or a URL
(``s3://bucket/prefix``, ``gs://...``, or any scheme fsspec knows: ``memory://``, ``abfs://``,
``hdfs://``...). ``s3``, ``gs`` and ``gcs`` go through ``pyarrow.fs``; every other scheme through
fsspec wrapped as a ``pyarrow.fs.PyFileSystem``, so Parquet and Ray Data read all of them alike.

Credentials and endpoints come only from the standard environment of each process
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``,
``AWS_REGION``/``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL``; ``GOOGLE_APPLICATION_CREDENTIALS``),
never from arguments, and they are never logged: Ray workers on other nodes need the same
variables (or an instance role) in their own environment.

Atomic writes (:func:`write_atomic`, :func:`write_atomic_with`) publish all or nothing:

- local: a hidden temp file ``.NAME.<pid>.<token>.tmp`` in the same folder, flushed and fsynced,
  ``os.replace``-d onto the name, then the folder is fsynced, so the rename survives a crash;
- object stores: the bytes are staged in a local temp file first, then handed to pyarrow's
  output stream for the final key in one native write, from a thread of its own that signals
  never interrupt, and the stream is closed. S3 and GCS make an object visible only when its
  upload completes (a multipart upload is invisible until completed), so a reader sees the old
  object or the new one, never a prefix of it. Staging and the single write matter: pyarrow
  completes the upload whenever its stream is closed or garbage-collected, even after an
  exception, with whatever it was given, so it must never hold a part of the payload.

A failed S3 upload raises and is aborted (``AbortMultipartUpload``), and so is one that Ctrl-C
interrupts: its stored parts would otherwise stay, invisible but billed. Aborting needs botocore
(without it a warning says what may be left). A writer killed outright leaves its upload behind;
the next run's :func:`remove_temp_files` aborts it (:func:`abort_stale_uploads`), and a bucket
lifecycle rule catches the rest (``cluster/README.md``).

Errors are :class:`StorageError` (an ``OSError``) naming the location and the problem (missing
bucket, missing object, access denied, unreachable endpoint); a missing object or file is the
subclass :class:`StorageNotFoundError` (also a ``FileNotFoundError``).
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import hashlib
import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.fs as pafs

OBJECT_STORE_SCHEMES = ("s3", "gs", "gcs")
"""Schemes served by ``pyarrow.fs`` directly; objects there have no real folders."""
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_ENV_KEYS = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
    "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
    "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "GOOGLE_APPLICATION_CREDENTIALS",
)
_CHUNK = 1 << 20
_LOCAL = pafs.LocalFileSystem()
_cache: dict[tuple[str, str, str], pafs.FileSystem] = {}
_clients: dict[tuple[str, str], Any] = {}
_cache_lock = threading.Lock()
log = logging.getLogger(__name__)


class StorageError(OSError):
    """A storage operation failed; the message names the location and the problem."""


class StorageNotFoundError(StorageError, FileNotFoundError):
    """The file, object or bucket does not exist."""


class BucketNotFoundError(StorageNotFoundError):
    """The bucket of an object-store URL does not exist."""


@dataclass(frozen=True)
class Written:
    """What an atomic write published."""

    size: int
    sha256: str


@dataclass(frozen=True)
class FileStat:
    """Size and modification time of a file or object."""

    size: int
    mtime_ns: int


# ---------------------------------------------------------------- names


def scheme(url: str) -> str:
    """The URL scheme in lower case (``s3``), or ``""`` for a plain local path."""
    m = _SCHEME.match(str(url))
    return m.group(1).lower() if m else ""


def is_local(url: str) -> bool:
    """True for local paths and ``file://`` URLs."""
    return scheme(url) in ("", "file")


def absolute(url: str) -> str:
    """Local: the absolute path (``file://`` stripped); URLs: unchanged but a trailing ``/``."""
    url = str(url)
    if is_local(url):
        if scheme(url) == "file":
            url = url[len("file://"):]
        return os.path.abspath(os.path.expanduser(url))
    rest = url[len(scheme(url)) + 3:].rstrip("/")
    return f"{scheme(url)}://{rest}"


def join(url: str, *parts: str) -> str:
    """``url`` with ``parts`` appended, keeping its scheme (``os.path.join`` for local paths)."""
    if is_local(url):
        return os.path.join(str(url), *parts)
    out = str(url).rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def basename(url: str) -> str:
    """The last component (file name) of a path or URL."""
    if is_local(url):
        return os.path.basename(str(url).rstrip(os.sep))
    return str(url).rstrip("/").rsplit("/", 1)[-1]


def parent(url: str) -> str:
    """The folder (prefix) holding ``url``."""
    if is_local(url):
        return os.path.dirname(absolute(url))
    a = absolute(url)
    head = a.rsplit("/", 1)[0]
    return head if "://" in head and len(head) > len(scheme(a)) + 3 else a


def is_absolute(url: str) -> bool:
    """True for URLs and absolute local paths (manifests resolve the rest against themselves)."""
    return not is_local(url) or os.path.isabs(str(url)) or str(url).startswith("file://")


_SECRET_QUERY_KEYS = ("token", "password", "passwd", "pwd", "secret", "key", "signature", "sig",
                      "credential", "auth")


def redact_uri(uri: str) -> str:
    """The URI without ``user:password@`` and with secret-looking query values (``?token=``,
    ``X-Amz-Signature=``, ``api_key=``...) replaced by ``REDACTED``: safe to print and log."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return uri
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_secret_key(k) for k, _ in pairs):
            query = urlencode([(k, "REDACTED" if _secret_key(k) else v) for k, v in pairs],
                              safe="/:")
    if parts.username is None and parts.password is None and query == parts.query:
        return uri
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, query, parts.fragment))


def _secret_key(name: str) -> bool:
    n = name.lower().replace("-", "_")
    return any(k in n for k in _SECRET_QUERY_KEYS)


# ---------------------------------------------------------------- filesystems


def _env_fingerprint() -> str:
    # A changed endpoint or credential gets a new filesystem; the cache never holds secrets.
    h = hashlib.sha256()
    for k in _ENV_KEYS:
        h.update(f"{k}={os.environ.get(k, '')}\n".encode())
    return h.hexdigest()


def resolve(url: str) -> tuple[pafs.FileSystem, str]:
    """The ``pyarrow.fs`` filesystem and in-filesystem path for a location.

    Filesystems are cached per scheme and bucket (and the credential variables in effect).

    Raises:
        StorageError: an unknown scheme, or a filesystem that cannot be set up (bucket region).
    """
    url = str(url)
    if is_local(url):
        return _LOCAL, absolute(url)
    sch = scheme(url)
    rest = url[len(sch) + 3:]
    if sch in OBJECT_STORE_SCHEMES:
        bucket = rest.split("/", 1)[0]
        if not bucket:
            raise StorageError(f"{url}: no bucket in the URL")
        if "@" in bucket:
            raise StorageError(
                f"{redact_uri(url)}: credentials in a URL end up in logs and process lists; "
                "set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or a profile or instance role) "
                "and use the plain URL")
        key = (sch, bucket, _env_fingerprint())
        with _cache_lock:
            fs = _cache.get(key)
        if fs is None:
            with _translated(url, None):
                fs, _ = pafs.FileSystem.from_uri(f"{sch}://{bucket}")
            with _cache_lock:
                _cache[key] = fs
        return fs, rest.rstrip("/")
    return _fsspec(url)


def _fsspec(url: str) -> tuple[pafs.FileSystem, str]:
    try:
        import fsspec
        from fsspec.core import url_to_fs
    except ImportError as e:  # pragma: no cover - fsspec ships with the package's dependencies
        raise StorageError(f"{url}: fsspec is needed for {scheme(url)}:// locations") from e
    try:
        fs_impl, path = url_to_fs(url)
    except (ImportError, ValueError) as e:
        known = "s3, gs, " + ", ".join(sorted(fsspec.available_protocols())[:12]) + ", ..."
        raise StorageError(f"{url}: no filesystem for scheme {scheme(url)!r} ({e}); "
                           f"known: {known}") from e
    key = ("fsspec", scheme(url), str(id(fs_impl)))
    with _cache_lock:
        fs = _cache.get(key)
        if fs is None:
            fs = pafs.PyFileSystem(pafs.FSSpecHandler(fs_impl))
            _cache[key] = fs
    return fs, path


def _to_url(like: str, path: str) -> str:
    """The location of in-filesystem ``path`` on the filesystem of ``like``."""
    if is_local(like):
        return path
    return f"{scheme(like)}://{path.lstrip('/')}"


def fs_and_paths(urls: list[str]) -> tuple[pafs.FileSystem | None, list[str]]:
    """``(filesystem, paths)`` for readers that take ``filesystem=`` (Ray Data, pyarrow).

    Local locations give ``(None, absolute paths)``, so readers behave as with plain paths.

    Raises:
        StorageError: the locations are on different filesystems.
    """
    if not urls:
        return None, []
    schemes = {scheme(u) if not is_local(u) else "" for u in urls}
    if len(schemes) > 1:
        raise StorageError(f"{urls[0]}: locations on different filesystems "
                           f"({', '.join(sorted(s or 'local' for s in schemes))})")
    if schemes == {""}:
        return None, [absolute(u) for u in urls]
    fs, _ = resolve(urls[0])
    return fs, [resolve(u)[1] for u in urls]


# ---------------------------------------------------------------- errors


def _credential_hint() -> str:
    if any(os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_PROFILE",
                                       "AWS_WEB_IDENTITY_TOKEN_FILE")):
        return "check the AWS credentials in the environment and the bucket policy"
    return ("no AWS credentials in the environment: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run with an instance role")


def _endpoint() -> str:
    ep = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return re.sub(r"//[^/@]*@", "//***@", ep) if ep else "the default endpoint"


def _bucket_missing(fs: pafs.FileSystem | None, url: str) -> bool:
    if fs is None or scheme(url) not in OBJECT_STORE_SCHEMES:
        return False
    bucket = url[len(scheme(url)) + 3:].split("/", 1)[0]
    try:
        return fs.get_file_info(bucket).type == pafs.FileType.NotFound
    except OSError:
        return False


def translate_error(url: str, e: BaseException, fs: pafs.FileSystem | None = None) -> StorageError:
    """A :class:`StorageError` for ``e`` that names ``url`` and what went wrong."""
    if isinstance(e, StorageError):
        return e
    text = str(e)
    url = redact_uri(url)  # a URL may carry credentials (s3://KEY:SECRET@bucket): never print them
    bucket = url[len(scheme(url)) + 3:].split("/", 1)[0] if not is_local(url) else ""
    if "NO_SUCH_BUCKET" in text:
        return BucketNotFoundError(f"{url}: bucket {bucket!r} does not exist")
    if isinstance(e, FileNotFoundError) or "NO_SUCH_KEY" in text:
        if _bucket_missing(fs, url):
            return BucketNotFoundError(f"{url}: bucket {bucket!r} does not exist")
        return StorageNotFoundError(f"{url}: no such file or object")
    if isinstance(e, PermissionError) and is_local(url):
        return StorageError(f"{url}: permission denied")
    if any(s in text for s in ("ACCESS_DENIED", "AccessDenied", "INVALID_ACCESS_KEY_ID",
                               "SIGNATURE_DOES_NOT_MATCH", "MISSING_AUTHENTICATION",
                               "EXPIRED_TOKEN", "credentials")):
        return StorageError(f"{url}: access denied ({_credential_hint()})")
    if any(s in text for s in ("NETWORK_CONNECTION", "Could not connect", "curlCode",
                               "Couldn't resolve host", "Connection refused")):
        return StorageError(f"{url}: cannot reach the storage endpoint ({_endpoint()})")
    if isinstance(e, IsADirectoryError):
        return StorageError(f"{url}: is a folder, not a file")
    detail = text or type(e).__name__
    return StorageError(f"{url}: {detail}")


@contextlib.contextmanager
def _translated(url: str, fs: pafs.FileSystem | None) -> Iterator[None]:
    try:
        yield
    except StorageError:
        raise
    except (OSError, ValueError) as e:  # pyarrow raises OSError and ArrowInvalid (ValueError)
        raise translate_error(url, e, fs) from e


# ---------------------------------------------------------------- reading


def info(url: str) -> pafs.FileInfo:
    """``pyarrow.fs.FileInfo`` of a location (``type`` is ``NotFound`` when absent)."""
    fs, path = resolve(url)
    with _translated(url, fs):
        return fs.get_file_info(path)


def kind(url: str) -> str | None:
    """``"file"``, ``"dir"`` (a folder, or a prefix holding objects) or None when absent.

    A missing bucket raises :class:`BucketNotFoundError` (otherwise it would read as absent).
    """
    t = info(url).type
    if t == pafs.FileType.NotFound:
        check_bucket(url)
        return None
    return "dir" if t == pafs.FileType.Directory else "file"


def exists(url: str) -> bool:
    """True when a file/object or a non-empty folder/prefix is there."""
    return info(url).type != pafs.FileType.NotFound


def is_file(url: str) -> bool:
    """True for an existing file or object."""
    return info(url).type == pafs.FileType.File


def is_dir(url: str) -> bool:
    """True for a folder, or a prefix that holds objects."""
    return info(url).type == pafs.FileType.Directory


def check_bucket(url: str) -> None:
    """Raise :class:`BucketNotFoundError` when an object-store URL's bucket does not exist.

    Listing or probing a key in a missing bucket reads as "not there", so a run that is about to
    write under ``url`` calls this first (local paths and other schemes: nothing to check).
    """
    if scheme(url) not in OBJECT_STORE_SCHEMES:
        return
    fs, _ = resolve(url)
    if _bucket_missing(fs, url):
        raise translate_error(url, FileNotFoundError(url), fs)


def stat(url: str) -> FileStat:
    """Size and modification time (``os.stat`` locally, the object's metadata remotely).

    Raises:
        StorageNotFoundError: nothing there (or a folder).
    """
    if is_local(url):
        try:
            st = os.stat(absolute(url))
        except OSError as e:
            raise translate_error(url, e) from e
        return FileStat(st.st_size, st.st_mtime_ns)
    fi = info(url)
    if fi.type != pafs.FileType.File:
        fs, _ = resolve(url)
        raise translate_error(url, FileNotFoundError(url), fs)
    return FileStat(int(fi.size or 0), int(fi.mtime_ns or 0))


def size(url: str) -> int:
    """Size in bytes."""
    return stat(url).size


def open_input(url: str) -> Any:
    """A seekable binary reader (``pyarrow.NativeFile``; use as a context manager)."""
    fs, path = resolve(url)
    with _translated(url, fs):
        return fs.open_input_file(path)


def read_bytes(url: str) -> bytes:
    """The whole content of a file or object."""
    fs, path = resolve(url)
    with _translated(url, fs), fs.open_input_stream(path) as f:
        return f.read()


def read_text(url: str, encoding: str = "utf-8") -> str:
    """The whole content decoded as text (``UnicodeDecodeError`` for binary content)."""
    return read_bytes(url).decode(encoding)


def sha256(url: str) -> str:
    """Hex SHA-256 of a file's or object's bytes, streamed."""
    h = hashlib.sha256()
    fs, path = resolve(url)
    with _translated(url, fs), fs.open_input_stream(path) as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def listdir(url: str) -> list[str]:
    """Sorted names of the entries directly under a folder/prefix (``[]`` when absent)."""
    fs, path = resolve(url)
    with _translated(url, fs):
        found = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in found)


def list_files(url: str, recursive: bool = True) -> list[str]:
    """Locations of the files under a folder/prefix, sorted by path components."""
    fs, path = resolve(url)
    with _translated(url, fs):
        found = fs.get_file_info(pafs.FileSelector(path, recursive=recursive,
                                                    allow_not_found=True))
    files = [_to_url(url, i.path) for i in found if i.type == pafs.FileType.File]
    return sorted(files, key=lambda u: u.split("/"))


def iter_files(url: str, page_size: int = 1000) -> Iterator[list[str]]:
    """Locations of the files under a folder/prefix (recursively), a page at a time, in the
    order of :func:`list_files`.

    Nothing beyond one page is held: S3 prefixes are read with ListObjectsV2 pages, local folders
    are walked; other schemes are listed whole and then paged.
    """
    if is_local(url):
        yield from _pages(_walk_sorted(absolute(url), url), page_size)
        return
    fs, path = resolve(url)
    client = _s3_client(fs) if scheme(url) == "s3" else None
    if client is None:
        yield from _pages(iter(list_files(url)), page_size)
        return
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, prefix = path.partition("/")
    prefix = f"{prefix.rstrip('/')}/" if prefix else ""
    pages = client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": page_size})
    try:
        for page in pages:
            keys = [c["Key"] for c in page.get("Contents", []) if not c["Key"].endswith("/")]
            if keys:
                yield [f"{scheme(url)}://{bucket}/{k}" for k in keys]
    except (ClientError, BotoCoreError) as e:
        raise translate_error(url, e, fs) from e


def _walk_sorted(folder: str, url: str) -> Iterator[str]:
    """Files under a local folder, depth first, entries by name (``list_files``' order)."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except FileNotFoundError:
        return
    except OSError as e:
        raise translate_error(url, e) from e
    for e in entries:
        if e.is_dir():
            yield from _walk_sorted(e.path, url)
        elif e.is_file():
            yield e.path


def _pages(items: Iterator[str], size: int) -> Iterator[list[str]]:
    page: list[str] = []
    for item in items:
        page.append(item)
        if len(page) >= size:
            yield page
            page = []
    if page:
        yield page


def glob(pattern: str) -> list[str]:
    """Locations in one folder whose names match ``pattern``'s last component (fnmatch)."""
    folder, pat = parent(pattern), basename(pattern)
    return [join(folder, n) for n in listdir(folder) if fnmatch.fnmatchcase(n, pat)]


@contextlib.contextmanager
def local_copy(url: str) -> Iterator[str]:
    """A local path holding the content: the path itself when local, else a temp download.

    The download keeps the file name (decoders sniff the extension) and is removed on exit.
    """
    if is_local(url):
        yield absolute(url)
        return
    fs, path = resolve(url)
    tmp = tempfile.mkdtemp(prefix="se4lip-")
    try:
        dest = os.path.join(tmp, basename(url) or "object")
        with _translated(url, fs):
            pafs.copy_files(path, dest, source_filesystem=fs, destination_filesystem=_LOCAL)
        yield dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- writing


def makedirs(url: str) -> None:
    """Create a folder and its parents (object stores have none: nothing to do there)."""
    if is_local(url):
        try:
            os.makedirs(absolute(url), exist_ok=True)
        except OSError as e:
            raise translate_error(url, e) from e
        return
    if scheme(url) in OBJECT_STORE_SCHEMES:
        return
    fs, path = resolve(url)
    with _translated(url, fs):
        fs.create_dir(path, recursive=True)


def delete(url: str, missing_ok: bool = True) -> None:
    """Delete one file or object."""
    fs, path = resolve(url)
    try:
        with _translated(url, fs):
            fs.delete_file(path)
    except StorageNotFoundError:
        if not missing_ok:
            raise


def _hash_file(path: str) -> Written:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
            n += len(block)
    return Written(n, h.hexdigest())


def _fsync_dir(folder: str) -> None:
    if not hasattr(os, "O_DIRECTORY"):  # pragma: no cover - Windows cannot fsync folders
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic_with(url: str, writer: Callable[[IO[bytes]], Any]) -> Written:
    """Publish what ``writer(file)`` writes at ``url`` all at once (see the module docstring).

    Missing parent folders are created. If ``writer`` raises, nothing is published and an
    existing file or object at ``url`` is left as it was.

    Args:
        url: destination location.
        writer: writes the content into the binary file object it is given.

    Returns:
        Size and SHA-256 of the published bytes (hashed from the staged copy, so remote
        destinations are not read back).
    """
    if is_local(url):
        return _write_local(absolute(url), writer)
    fs, path = resolve(url)
    fd, staged = tempfile.mkstemp(prefix=".se4lip-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            writer(f)
        written = _hash_file(staged)
        with _translated(url, fs):
            handler = getattr(fs, "handler", None)
            if isinstance(handler, pafs.FSSpecHandler):
                handler.fs.put_file(staged, path)
            else:
                _upload(url, fs, path, staged)
        return written
    finally:
        with contextlib.suppress(OSError):
            os.unlink(staged)


class _Upload(threading.Thread):
    """Hands a staged file to pyarrow's output stream for ``path`` in one native write.

    In a thread of its own because signals (Ctrl-C) raise only in the main thread: nothing can
    interrupt it between opening the stream and writing the whole payload, where closing would
    complete an empty or partial object. A failed part makes ``close()`` raise instead of
    completing (pyarrow's default background writes; ``copy_files`` only logs that error).
    """

    def __init__(self, fs: pafs.FileSystem, path: str, staged: str) -> None:
        super().__init__(name="se4lip-upload", daemon=True)
        self.fs, self.path, self.staged = fs, path, staged
        self.error: BaseException | None = None
        # Waited on instead of join(): a Ctrl-C inside join() can leave the thread marked as
        # stopped while it still runs (CPython 3.11), and later joins return at once.
        self.done = threading.Event()

    def run(self) -> None:
        try:
            with pa.memory_map(self.staged) as src:
                data = src.read_buffer()
                out = self.fs.open_output_stream(self.path)
                try:
                    out.write(data)
                finally:
                    out.close()
        except BaseException as e:
            self.error = e
        finally:
            self.done.set()


def _upload(url: str, fs: pafs.FileSystem, path: str, staged: str) -> None:
    """Upload ``staged`` to ``path`` whole or not at all; abort it if it fails or is interrupted."""
    upload = _Upload(fs, path, staged)
    upload.start()
    try:
        while not upload.done.wait(0.2):  # short waits, so a Ctrl-C is seen at once
            pass
    except BaseException:
        # Interrupted: abort, so the upload neither completes nor stays behind. An abort that
        # comes too early (before the upload exists) or fails lets it complete whole instead.
        aborted = _abort_quietly(url, fs, path)
        upload.done.wait()
        _abort_quietly(url, fs, path, aborted)  # parts that were in flight at the first abort
        raise
    if upload.error is not None:
        _abort_quietly(url, fs, path)
        raise upload.error


def _write_local(path: str, writer: Callable[[IO[bytes]], Any]) -> Written:
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise translate_error(folder, e) from e
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}."
                               f"{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        written = _hash_file(tmp)
        os.replace(tmp, path)
        _fsync_dir(folder)
        return written
    except OSError as e:
        raise translate_error(path, e) from e
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def write_atomic(url: str, data: bytes | str) -> Written:
    """Publish ``data`` (``str`` is written as UTF-8) at ``url`` all at once."""
    payload = data.encode() if isinstance(data, str) else bytes(data)
    return write_atomic_with(url, lambda f: f.write(payload))


def is_temp_name(name: str) -> bool:
    """True for the hidden temp files of :func:`write_atomic` (left only by a killed process)."""
    return name.startswith(".") and name.endswith(".tmp")


def remove_temp_files(folder: str) -> int:
    """Delete what a killed writer left directly in ``folder``: hidden temp files, and on S3 the
    incomplete multipart uploads of its objects (:func:`abort_stale_uploads`); returns how many.

    Uploads that cannot be listed or aborted (no botocore, no permission) only log a warning.
    """
    n = 0
    for name in listdir(folder):
        if is_temp_name(name):
            delete(join(folder, name))
            n += 1
    try:
        n += abort_stale_uploads(folder)
    except StorageError as e:
        log.warning("%s; incomplete uploads there stay until a bucket lifecycle rule removes "
                    "them", e)
    return n


# ---------------------------------------------------------------- incomplete uploads (S3)


@functools.cache
def _warn_no_botocore() -> None:
    log.warning("botocore is not installed: incomplete S3 multipart uploads (a failed or killed "
                "write's stored parts) cannot be aborted from here; a bucket lifecycle rule "
                "(AbortIncompleteMultipartUpload) removes them")


def _s3_client(fs: pafs.FileSystem) -> Any | None:
    """A botocore S3 client for the same region and environment as ``fs`` (None without it)."""
    try:
        import botocore.config
        import botocore.session
    except ImportError:
        _warn_no_botocore()
        return None
    region = getattr(fs, "region", "") or ""
    key = (region, _env_fingerprint())
    with _cache_lock:
        client = _clients.get(key)
    if client is None:
        # pyarrow addresses buckets by path on a custom endpoint (MinIO, moto): the same here.
        custom = bool(os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))
        config = botocore.config.Config(s3={"addressing_style": "path"} if custom else {})
        client = botocore.session.get_session().create_client(
            "s3", region_name=region or None, config=config)
        with _cache_lock:
            _clients[key] = client
    return client


def _abort_uploads(url: str, fs: pafs.FileSystem, prefix: str, match: Callable[[str], bool],
                   older_than: float = 0.0, again: tuple[tuple[str, str], ...] = ()
                   ) -> tuple[tuple[str, str], ...]:
    """Abort the incomplete uploads under in-filesystem ``prefix`` whose keys ``match`` (and the
    ``(key, upload id)`` pairs in ``again``); returns the pairs aborted."""
    client = _s3_client(fs)
    if client is None:
        return ()
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, key_prefix = prefix.partition("/")
    now = time.time()
    found = list(again)
    try:
        for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket,
                                                                          Prefix=key_prefix):
            for up in page.get("Uploads", []):
                if not match(up["Key"]) or (up["Key"], up["UploadId"]) in found:
                    continue
                if older_than > 0 and now - up["Initiated"].timestamp() < older_than:
                    continue
                found.append((up["Key"], up["UploadId"]))
        for key, upload_id in found:
            try:
                client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") != "NoSuchUpload":  # already gone
                    raise
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") == "NoSuchBucket":
            return ()  # no bucket, no uploads (the write's own error says so)
        raise translate_error(url, e, fs) from e
    except BotoCoreError as e:
        raise translate_error(url, e, fs) from e
    return tuple(found)


def _abort_quietly(url: str, fs: pafs.FileSystem, path: str,
                   again: tuple[tuple[str, str], ...] = ()) -> tuple[tuple[str, str], ...]:
    """Abort every incomplete upload of the object at ``path`` (a failed write's own, and any a
    killed writer of the same object left); a failure to abort only logs a warning."""
    if scheme(url) != "s3":
        return ()
    key = path.partition("/")[2]
    try:
        return _abort_uploads(url, fs, path, lambda k: k == key, again=again)
    except StorageError as e:
        log.warning("%s; the upload was not aborted: its parts stay until a bucket lifecycle "
                    "rule removes them", e)
        return again


def abort_stale_uploads(url: str, older_than: float = 0.0, recursive: bool = False) -> int:
    """Abort the incomplete multipart uploads of the objects in an S3 folder; returns how many.

    A writer killed mid-upload (SIGKILL, a lost node) leaves its upload behind: no listing or
    reader sees it, but its stored parts are billed until it is aborted. Other locations have
    none (0); without botocore nothing can be listed (a warning, 0).

    Args:
        url: the folder (prefix) whose objects' uploads to abort.
        older_than: only uploads started at least this many seconds ago (0: all; a run that
            cleans its own folder before writing there uses 0).
        recursive: also the uploads of objects in subfolders.

    Raises:
        StorageError: the uploads cannot be listed or aborted (the credentials need
            ``s3:ListBucketMultipartUploads`` and ``s3:AbortMultipartUpload``).
    """
    if scheme(url) != "s3":
        return 0
    fs, path = resolve(url)
    base = path.partition("/")[2]
    base = f"{base}/" if base else ""

    def inside(key: str) -> bool:
        return key.startswith(base) and (recursive or "/" not in key[len(base):])

    return len(_abort_uploads(url, fs, f"{path}/" if base else path, inside, older_than))


__all__ = [
    "OBJECT_STORE_SCHEMES",
    "BucketNotFoundError",
    "FileStat",
    "StorageError",
    "StorageNotFoundError",
    "Written",
    "abort_stale_uploads",
    "absolute",
    "basename",
    "check_bucket",
    "delete",
    "exists",
    "fs_and_paths",
    "glob",
    "info",
    "is_absolute",
    "is_dir",
    "is_file",
    "is_local",
    "is_temp_name",
    "iter_files",
    "join",
    "kind",
    "list_files",
    "listdir",
    "local_copy",
    "makedirs",
    "open_input",
    "parent",
    "read_bytes",
    "read_text",
    "redact_uri",
    "remove_temp_files",
    "resolve",
    "scheme",
    "sha256",
    "size",
    "stat",
    "translate_error",
    "write_atomic",
    "write_atomic_with",
]
