"""What a prepared-shards folder holds: ``manifest.json`` and one Parquet index file per shard.

Layout (the folder may be local or a URL, ``s3://...``)::

    manifest.json                   totals, config, schema version, one entry per shard
    shard-<id>.parquet              clip rows (:mod:`se4lip_dist.shards`)
    index-shard-<id>.parquet        one record per clip of that shard (:data:`INDEX_SCHEMA`)

The per-clip records live in the index files, never in ``manifest.json``, so committing a shard
rewrites a file whose size grows with the number of shards, not clips, and readers load only
the columns they need (:meth:`Manifest.clips_table`). Every file is published atomically
(:mod:`se4lip_dist.storage`), a shard before its index and an index before the manifest names
it: a shard without an index is an orphan (its clips are redone), an index the manifest does not
name yet is adopted by the next ``prepare`` (:func:`recover`), so a crash at any point loses
nothing and duplicates nothing. A clip is done when a committed index holds it; a rerun of
``prepare`` skips those and only adds what is missing.

Folders written before the index existed (``manifest.json`` with a ``clips`` object) are read as
they are and rewritten in this layout by the next ``prepare`` into them
(``se4lip-dist prepare --out FOLDER`` with no inputs does only that).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from se4lip_dist import __version__, storage
from se4lip_dist.shards import (
    SCHEMA_VERSION,
    SHARD_GLOB,
    ShardInfo,
    ShardSchemaError,
    ShardWriter,
    check_schema,
)

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FAILURES = "failures.jsonl"
LAYOUT_VERSION = 2
"""1: per-clip records inside ``manifest.json``; 2: per-shard Parquet index files."""
INDEX_PREFIX = "index-"
INDEX_GLOB = f"{INDEX_PREFIX}*.parquet"
META_SHARD = b"se4lip.shard"


class ManifestError(ValueError):
    """A manifest that is missing, unreadable or incompatible with the requested run."""


@dataclass
class ClipRecord:
    """One prepared clip."""

    source: str
    """Absolute path (or URL) of the input video when it was prepared."""
    frames: int
    segments: int
    shard: str
    speaker: str | None = None
    split: str | None = None
    duration_s: float | None = None
    src_fps: float | None = None
    vfr: bool = False
    missing_fraction: float = 0.0
    mean_det_score: float = 0.0
    audit_status: str | None = None
    """What ``audit --fix`` found: ``in_sync``, ``offset`` (corrected) or ``undecidable`` (kept
    and flagged); None when the clip was never audited."""
    audit_offset: int | None = None
    """Frames the audio was advanced by to correct the clip (its measured offset; 0 when in
    sync, None when not measured)."""
    audit_model: str | None = None
    """The pinned model URI that measured the offset."""


INDEX_SCHEMA = pa.schema([
    pa.field("clip_id", pa.string(), nullable=False),
    pa.field("source", pa.string()),
    pa.field("frames", pa.int32()),
    pa.field("segments", pa.int32()),
    pa.field("shard", pa.string()),
    pa.field("speaker", pa.string()),
    pa.field("split", pa.string()),
    pa.field("duration_s", pa.float64()),
    pa.field("src_fps", pa.float64()),
    pa.field("vfr", pa.bool_()),
    pa.field("missing_fraction", pa.float64()),
    pa.field("mean_det_score", pa.float64()),
    pa.field("audit_status", pa.string()),
    pa.field("audit_offset", pa.int32()),
    pa.field("audit_model", pa.string()),
])
"""One row per clip: ``clip_id`` plus the fields of :class:`ClipRecord` (index files written
before the ``audit_*`` columns existed read them as nulls)."""
_RECORD_FIELDS = [f.name for f in fields(ClipRecord)]


def index_name(shard_file: str) -> str:
    """The index file of a shard: ``shard-x.parquet`` -> ``index-shard-x.parquet``."""
    return f"{INDEX_PREFIX}{shard_file}"


def records_table(records: dict[str, ClipRecord]) -> pa.Table:
    """Clip records as an :data:`INDEX_SCHEMA` table (rows in clip-id order)."""
    ids = sorted(records)
    cols: dict[str, list[Any]] = {"clip_id": ids}
    for name in _RECORD_FIELDS:
        cols[name] = [getattr(records[c], name) for c in ids]
    return pa.Table.from_pydict(cols, schema=INDEX_SCHEMA)


def table_records(table: pa.Table) -> dict[str, ClipRecord]:
    """The inverse of :func:`records_table`."""
    cols = {name: table[name].to_pylist() for name in ["clip_id", *_RECORD_FIELDS]}
    return {cid: ClipRecord(**{k: cols[k][i] for k in _RECORD_FIELDS})
            for i, cid in enumerate(cols["clip_id"])}


def write_index(out_dir: str, info: ShardInfo, records: dict[str, ClipRecord]) -> ShardInfo:
    """Publish the index file of a written shard (atomically); returns ``info`` naming it.

    The file's metadata carries the shard's :class:`ShardInfo`, so an index the manifest never
    committed (a crash in between) is enough to adopt its shard (:func:`recover`).
    """
    info.index = index_name(info.file)
    info.clips = len(records)
    for rec in records.values():
        rec.shard = info.file
    table = records_table(records)

    def write(f: Any) -> None:
        # Small files: no Arrow schema copy, no column statistics (readers pass INDEX_SCHEMA
        # and read whole files), dictionaries only for the columns that repeat in a shard.
        with pq.ParquetWriter(f, table.schema, compression="zstd", store_schema=False,
                              write_statistics=False,
                              use_dictionary=["shard", "speaker", "split", "audit_status",
                                              "audit_model"]) as w:
            w.write_table(table)
            w.add_key_value_metadata({META_SHARD: json.dumps(asdict(info)).encode()})

    storage.write_atomic_with(storage.join(out_dir, info.index), write)
    return info


def read_index_info(url: str) -> ShardInfo:
    """The :class:`ShardInfo` an index file records about its shard (reads the footer only)."""
    with storage.open_input(url) as f:
        meta = pq.read_schema(f).metadata or {}
    if META_SHARD not in meta:
        raise ManifestError(f"{url}: not a se4lip shard index")
    return ShardInfo(**json.loads(meta[META_SHARD]))


class IndexedShardWriter:
    """Writes shards (:class:`~se4lip_dist.shards.ShardWriter`, named by content) and, right
    after each, its index file; what a ``prepare`` worker uses, so the driver never sees clip
    data."""

    def __init__(self, out_dir: str, shard_bytes: int, max_clips: int,
                 prefix: str = "shard") -> None:
        self.out_dir = storage.absolute(out_dir)
        self.shards = ShardWriter(self.out_dir, shard_bytes, prefix, max_clips=max_clips,
                                  by_content=True)
        self._records: dict[str, ClipRecord] = {}

    def add(self, clip_id: str, table: pa.Table, record: ClipRecord) -> ShardInfo | None:
        """Queue one clip; returns the shard's info when this wrote a shard and its index."""
        self._records[clip_id] = record
        return self._indexed(self.shards.add(clip_id, table))

    def flush(self) -> ShardInfo | None:
        """Write what is queued as one shard and its index (None when nothing is)."""
        return self._indexed(self.shards.flush())

    def _indexed(self, info: ShardInfo | None) -> ShardInfo | None:
        if info is None:
            return None
        records, self._records = self._records, {}
        return write_index(self.out_dir, info, records)


class Manifest:
    """In-memory view of a prepared folder: config, shard entries and (lazily) clip records.

    ``shards`` is read from ``manifest.json``; clip records are read from the index files only
    when asked for: :meth:`clips_table` (the columns a caller needs, as Arrow) or :attr:`clips`
    (every record as a dict, for tools and tests on small folders).
    """

    def __init__(self, config: dict[str, Any], *, schema_version: int = SCHEMA_VERSION,
                 code_version: str = __version__, created: float | None = None,
                 updated: float | None = None, shards: list[ShardInfo] | None = None,
                 root: str | None = None, legacy: bool = False) -> None:
        self.config = config
        self.schema_version = schema_version
        self.code_version = code_version
        self.created = time.time() if created is None else created
        self.updated = time.time() if updated is None else updated
        self.shards: list[ShardInfo] = list(shards or [])
        self.root = root
        """The folder the index files are read from (None: nothing written yet)."""
        self.legacy = legacy
        """Read from a ``manifest.json`` with per-clip records; :meth:`save` rewrites it."""
        self._clips: dict[str, ClipRecord] | None = None
        self._unindexed: dict[str, dict[str, ClipRecord]] = {}
        """Shard file -> its records, for shards whose index :meth:`save` still has to write."""

    # ------------------------------------------------------------ totals

    @property
    def total_frames(self) -> int:
        return sum(s.frames for s in self.shards)

    @property
    def total_clips(self) -> int:
        return sum(s.clips for s in self.shards)

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    # ------------------------------------------------------------ clip records

    @property
    def clips(self) -> dict[str, ClipRecord]:
        """Every clip record by clip id (all index files read on first use; the dict is then
        what :meth:`clips_table` reads, edits included)."""
        if self._clips is None:
            self._clips = table_records(self._read_index(list(INDEX_SCHEMA.names)))
        return self._clips

    def clips_table(self, columns: list[str] | None = None) -> pa.Table:
        """Clip records as an Arrow table of :data:`INDEX_SCHEMA` columns (all when None).

        Reads only those columns of the index files (in parallel), so a reader that needs the
        split and speaker of a million clips never builds a million Python objects.
        """
        columns = list(columns or INDEX_SCHEMA.names)
        if self._clips is not None:
            return records_table(self._clips).select(columns)
        return self._read_index(columns)

    def _read_index(self, columns: list[str]) -> pa.Table:
        tables = [records_table(r).select(columns) for r in self._unindexed.values()]
        files = [s.index for s in self.shards if s.file not in self._unindexed]
        if files:
            if self.root is None:
                raise ManifestError("a manifest that was never saved has no index files")
            fs, paths = storage.fs_and_paths([storage.join(self.root, f) for f in files])
            try:
                tables.append(pq.read_table(paths, filesystem=fs, columns=columns,
                                            schema=INDEX_SCHEMA))
            except (OSError, pa.ArrowInvalid) as e:
                raise ManifestError(f"{self.root}: unreadable shard index: {e}") from e
        if not tables:
            return INDEX_SCHEMA.empty_table().select(columns)
        return pa.concat_tables(tables).combine_chunks()

    # ------------------------------------------------------------ writing

    def add_shard(self, info: ShardInfo, clips: dict[str, ClipRecord] | None = None) -> None:
        """Record a shard that is already published.

        Args:
            info: the shard; ``info.index`` names its index file when one is already written.
            clips: the shard's clip records when its index is not written yet (:meth:`save`
                writes it).
        """
        if clips is not None:
            info.clips = len(clips)
            self._unindexed[info.file] = clips
        if not info.index:
            info.index = index_name(info.file)
        self.shards.append(info)
        if self._clips is not None and clips is not None:
            self._clips.update(clips)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": "se4lip-shards",
            "layout": LAYOUT_VERSION,
            "schema_version": self.schema_version,
            "code_version": self.code_version,
            "created": self.created,
            "updated": self.updated,
            "config": self.config,
            "totals": {
                "clips": self.total_clips,
                "frames": self.total_frames,
                "shards": len(self.shards),
                "bytes": self.total_bytes,
            },
            "shards": [asdict(s) for s in self.shards],
        }

    def save(self, out_dir: str | Path) -> str:
        """Write the index files still missing, then ``manifest.json`` (each atomically);
        returns the manifest's location."""
        root = storage.absolute(str(out_dir))
        for info in self.shards:
            if info.file in self._unindexed:
                write_index(root, info, self._unindexed[info.file])
        self._unindexed = {}
        self.root, self.legacy = root, False
        self.updated = time.time()
        d = self.to_json()
        shards = d.pop("shards")
        # One shard per line: the file stays readable and diffable at any size.
        head = json.dumps(d, indent=1)[:-2]
        body = ",\n".join("  " + json.dumps(s, separators=(",", ":")) for s in shards)
        text = f'{head},\n "shards": [\n{body}\n ]\n}}\n' if shards else json.dumps(
            {**d, "shards": []}, indent=1)
        path = storage.join(root, MANIFEST)
        storage.write_atomic(path, text)
        return path

    # ------------------------------------------------------------ reading

    @classmethod
    def load(cls, out_dir: str | Path) -> Manifest:
        """Read ``out_dir/manifest.json`` (either layout); :class:`ManifestError` when absent or
        unreadable. Clip records are not read here (see :meth:`clips_table`)."""
        root = storage.absolute(str(out_dir))
        path = storage.join(root, MANIFEST)
        try:
            d = json.loads(storage.read_text(path))
        except storage.BucketNotFoundError as e:
            raise ManifestError(str(e)) from e
        except storage.StorageNotFoundError as e:
            raise ManifestError(f"{path}: no manifest (run `se4lip-dist prepare` first)") from e
        except storage.StorageError as e:
            raise ManifestError(f"unreadable manifest: {e}") from e
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ManifestError(f"{path}: unreadable manifest: {e}") from e
        if not isinstance(d, dict) or d.get("format") != "se4lip-shards":
            raise ManifestError(f"{path}: not a se4lip-dist shard manifest")
        if d.get("schema_version") != SCHEMA_VERSION:
            raise ShardSchemaError(
                f"{path}: shards use schema version {d.get('schema_version')}, this se4lip-dist "
                f"reads version {SCHEMA_VERSION}; re-run `se4lip-dist prepare` into a new folder"
            )
        layout = d.get("layout", 1)
        if layout > LAYOUT_VERSION:
            raise ManifestError(f"{path}: written by a newer se4lip-dist (layout {layout}); "
                                "upgrade se4lip-dist to read it")
        m = cls(config=d["config"], schema_version=d["schema_version"],
                code_version=d.get("code_version", "?"), created=d.get("created", 0.0),
                updated=d.get("updated", 0.0), root=root, legacy=layout == 1)
        if layout == 1:
            m._load_legacy(d)
        else:
            m.shards = [ShardInfo(**s) for s in d.get("shards", [])]
        return m

    def _load_legacy(self, d: dict[str, Any]) -> None:
        """Layout 1: clip ids listed per shard, records in ``clips``; kept in memory until
        :meth:`save` writes them as index files."""
        records = {k: ClipRecord(**v) for k, v in d.get("clips", {}).items()}
        for s in d.get("shards", []):
            ids = s.pop("clips", [])
            info = ShardInfo(**s, clips=len(ids))
            self.add_shard(info, {c: records[c] for c in ids if c in records})
        self._clips = records
        log.info("%s: manifest of layout 1 (per-clip records in manifest.json); `se4lip-dist "
                 "prepare --out %s` rewrites it with index files", self.root, self.root)

    def shard_paths(self, out_dir: str | Path) -> list[str]:
        """Locations of the shards the manifest names (readers use these, not a glob).

        Absolute paths for a local folder, URLs for a remote one (``s3://bucket/x/shard-...``);
        :func:`se4lip_dist.storage.fs_and_paths` turns them into a reader's ``filesystem=``.
        """
        root = storage.absolute(str(out_dir))
        return [storage.join(root, s.file) for s in self.shards]

    def check_shards(self, out_dir: str | Path) -> None:
        """Raise :class:`ShardSchemaError` unless every named shard is readable and of this
        schema version (reads Parquet footers only)."""
        for path in self.shard_paths(out_dir):
            check_schema(path)

    def content_hash(self) -> str:
        """Short hash of the shard checksums: identifies the data a model was trained on."""
        h = hashlib.sha256()
        for s in sorted(self.shards, key=lambda s: s.file):
            h.update(f"{s.file}:{s.sha256}\n".encode())
        return h.hexdigest()[:16]


class ManifestCommitter:
    """Commits shards into ``manifest.json`` as they arrive, rewriting it only when the shards
    not yet in the file reach ``1 / ratio`` of all: the rewrites stay proportional to the number
    of shards (a constant cost per shard), and what is not in the file yet is in index files
    that :func:`recover` adopts after a crash."""

    def __init__(self, manifest: Manifest, out_dir: str, ratio: int = 8) -> None:
        self.manifest = manifest
        self.out_dir = out_dir
        self.ratio = ratio
        self.new = 0
        self.saves = 0

    def add(self, info: ShardInfo) -> None:
        """Record a shard whose index file is published."""
        self.manifest.add_shard(info)
        self.new += 1
        if self.new * self.ratio >= len(self.manifest.shards):
            self.flush()

    def flush(self) -> None:
        """Rewrite ``manifest.json`` if anything is new (it exists only once a shard does)."""
        if self.new and self.manifest.shards:
            self.manifest.save(self.out_dir)
            self.new = 0
            self.saves += 1


def recover(manifest: Manifest, out_dir: str,
            adopt: Callable[[str], bool] | None = None) -> tuple[int, int]:
    """Bring a folder left by a killed run back to a consistent state before writing to it.

    Index files the manifest does not name yet, whose shard is there with the size the index
    records (and, with ``adopt``, whose shard file name it accepts), are adopted (their clips
    count as done); shards without such an index, index files without their shard and temp
    files are deleted. Returns ``(shards adopted, files deleted)``; the caller saves the
    manifest.
    """
    named = {s.file for s in manifest.shards}
    names = set(storage.listdir(out_dir))
    deleted = storage.remove_temp_files(out_dir)
    adopted = 0
    shard_names = {n for n in names if _matches(n, SHARD_GLOB)}
    for name in sorted(n for n in names if _matches(n, INDEX_GLOB)):
        shard = name[len(INDEX_PREFIX):]
        if shard in named:
            continue
        url = storage.join(out_dir, name)
        try:
            info = read_index_info(url)
            ok = (shard in shard_names and (adopt is None or adopt(shard))
                  and storage.size(storage.join(out_dir, shard)) == info.bytes)
        except (ManifestError, OSError, pa.ArrowInvalid, json.JSONDecodeError, TypeError):
            ok = False
        if ok:
            manifest.add_shard(info)
            named.add(shard)
            adopted += 1
        else:
            storage.delete(url)
            deleted += 1
    for name in shard_names - named:
        storage.delete(storage.join(out_dir, name))
        deleted += 1
    return adopted, deleted


def _matches(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern)


def append_failures(out_dir: str | Path, records: list[dict[str, Any]]) -> None:
    """Add failure records (input, stage, error) to ``failures.jsonl``.

    Object stores cannot append, so the whole file is read, extended and rewritten atomically
    (locally too, for one behaviour); only the driver of a run writes it.
    """
    if not records:
        return
    path = storage.join(storage.absolute(str(out_dir)), FAILURES)
    try:
        old = storage.read_text(path)
    except storage.StorageNotFoundError:
        old = ""
    if old and not old.endswith("\n"):
        old += "\n"  # a line cut short by an older, appending writer stays its own line
    storage.write_atomic(path, old + "".join(json.dumps(r) + "\n" for r in records))


def append_failure(out_dir: str | Path, record: dict[str, Any]) -> None:
    """Add one failure record to ``failures.jsonl`` (see :func:`append_failures`)."""
    append_failures(out_dir, [record])
