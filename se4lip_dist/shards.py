"""The versioned Arrow schema of the prepared shards, and the writer that produces them.

One row is one *segment* of a clip: up to ``data.segment_frames`` consecutive video frames with
their JPEG lip crops, mouth keypoints and detector scores, plus the audio that belongs to exactly
those frames (``samples_per_frame`` int16 samples per frame, so audio and lips stay aligned per
frame). Training samples windows and offsets inside a row; long clips become several rows so a row
stays small.

This module is the only place that knows the column layout: readers use :func:`decode_row` and the
column-name constants, never positional guesses.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from se4lip_dist import storage

SCHEMA_VERSION = 1
"""Bump when columns change meaning; readers refuse shards from another version."""

META_VERSION = b"se4lip.schema_version"
SHARD_GLOB = "shard-*.parquet"

SCHEMA = pa.schema(
    [
        pa.field("clip_id", pa.string(), nullable=False),
        pa.field("speaker", pa.string()),
        pa.field("split", pa.string()),
        pa.field("segment", pa.int32(), nullable=False),
        pa.field("start_frame", pa.int32(), nullable=False),
        pa.field("n_frames", pa.int32(), nullable=False),
        pa.field("clip_frames", pa.int32(), nullable=False),
        pa.field("fps", pa.int32(), nullable=False),
        pa.field("sample_rate", pa.int32(), nullable=False),
        pa.field("crop_size", pa.int32(), nullable=False),
        pa.field("lips", pa.list_(pa.binary()), nullable=False),
        pa.field("audio", pa.binary(), nullable=False),
        pa.field("keypoints", pa.list_(pa.float32()), nullable=False),
        pa.field("det_score", pa.list_(pa.float32()), nullable=False),
        pa.field("detected", pa.list_(pa.bool_()), nullable=False),
    ],
    metadata={META_VERSION: str(SCHEMA_VERSION).encode()},
)
"""``lips``: one JPEG (RGB, crop_size^2) per frame. ``audio``: little-endian int16 PCM, mono,
``n_frames * sample_rate // fps`` samples. ``keypoints``: ``n_frames * 10`` floats (5 points x
(x, y) in source-frame pixels: eyes, nose, mouth corners)."""


class ShardSchemaError(ValueError):
    """A shard written by another schema version, or not a se4lip shard at all."""


@dataclass
class Segment:
    """One shard row before encoding (see :data:`SCHEMA`)."""

    clip_id: str
    segment: int
    start_frame: int
    clip_frames: int
    fps: int
    sample_rate: int
    crop_size: int
    lips_jpeg: list[bytes]
    audio: np.ndarray
    keypoints: np.ndarray
    det_score: np.ndarray
    detected: np.ndarray
    speaker: str | None = None
    split: str | None = None

    @property
    def n_frames(self) -> int:
        return len(self.lips_jpeg)


def segments_to_table(segments: list[Segment]) -> pa.Table:
    """Encode segments into an Arrow table with :data:`SCHEMA`."""
    cols: dict[str, list[Any]] = {f.name: [] for f in SCHEMA}
    for s in segments:
        spf = s.sample_rate // s.fps
        if len(s.audio) != s.n_frames * spf:
            raise ValueError(
                f"{s.clip_id}: segment {s.segment} has {len(s.audio)} audio samples, "
                f"expected {s.n_frames * spf}"
            )
        pcm = np.clip(np.round(np.asarray(s.audio, np.float32) * 32767.0), -32768, 32767)
        cols["clip_id"].append(s.clip_id)
        cols["speaker"].append(s.speaker)
        cols["split"].append(s.split)
        cols["segment"].append(s.segment)
        cols["start_frame"].append(s.start_frame)
        cols["n_frames"].append(s.n_frames)
        cols["clip_frames"].append(s.clip_frames)
        cols["fps"].append(s.fps)
        cols["sample_rate"].append(s.sample_rate)
        cols["crop_size"].append(s.crop_size)
        cols["lips"].append(s.lips_jpeg)
        cols["audio"].append(pcm.astype("<i2").tobytes())
        cols["keypoints"].append(np.asarray(s.keypoints, np.float32).reshape(-1).tolist())
        cols["det_score"].append(np.asarray(s.det_score, np.float32).tolist())
        cols["detected"].append(np.asarray(s.detected, bool).tolist())
    return pa.Table.from_pydict(cols, schema=SCHEMA)


def decode_audio(blob: bytes) -> np.ndarray:
    """int16 PCM bytes of a row -> float32 samples in [-1, 1]."""
    return np.frombuffer(blob, dtype="<i2").astype(np.float32) / 32767.0


def decode_lips(jpegs: list[bytes]) -> np.ndarray:
    """JPEG crops of a row -> uint8 array [n_frames, crop, crop, 3] (RGB)."""
    out = []
    for j in jpegs:
        img = cv2.imdecode(np.frombuffer(j, np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            raise ShardSchemaError("a lip crop in the shard is not a decodable JPEG")
        out.append(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
    return np.stack(out)


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    """RGB uint8 image -> JPEG bytes."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


def check_schema(path: str | Path) -> None:
    """Raise :class:`ShardSchemaError` unless ``path`` (local or URL) is a shard of
    :data:`SCHEMA_VERSION`."""
    try:
        fs, p = storage.resolve(str(path))
        schema = pq.read_schema(p, filesystem=fs)
    except (OSError, pa.ArrowInvalid) as e:
        raise ShardSchemaError(f"{path}: not a readable Parquet file: {e}") from e
    version = (schema.metadata or {}).get(META_VERSION)
    if version is None:
        raise ShardSchemaError(f"{path}: not a se4lip shard (no {META_VERSION.decode()} metadata)")
    if version.decode() != str(SCHEMA_VERSION):
        raise ShardSchemaError(
            f"{path}: shard schema version {version.decode()}, this se4lip-dist reads version "
            f"{SCHEMA_VERSION}; re-run `se4lip-dist prepare` into a new --out folder"
        )
    missing = [f.name for f in SCHEMA if f.name not in schema.names]
    if missing:
        raise ShardSchemaError(f"{path}: shard lacks columns {missing}")


def iter_rows(path: str | Path, columns: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """Rows of one shard (local or URL) as dicts (for tools and tests; training uses Ray Data)."""
    check_schema(path)
    with storage.open_input(str(path)) as f:
        pf = pq.ParquetFile(f)
        for batch in pf.iter_batches(batch_size=64, columns=columns):
            yield from batch.to_pylist()


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's or object's bytes (:func:`se4lip_dist.storage.sha256`)."""
    return storage.sha256(str(path))


@dataclass
class ShardInfo:
    """What the manifest records about one written shard (its clips' records are in its index
    file, see :mod:`se4lip_dist.manifest`)."""

    file: str
    rows: int
    frames: int
    bytes: int
    sha256: str
    clips: int = 0
    """How many clips the shard holds."""
    index: str = ""
    """The shard's index file, beside it (empty until one is written)."""


def content_name(prefix: str, clip_ids: list[str]) -> str:
    """``prefix-<hash>.parquet`` from the clips a shard holds: writing the same clips again
    (a retried task) publishes the same file instead of a second copy."""
    digest = hashlib.sha256("\n".join(sorted(clip_ids)).encode()).hexdigest()[:20]
    return f"{prefix}-{digest}.parquet"


class ShardWriter:
    """Buffers clip tables and writes size-bounded shards atomically into a folder or prefix.

    Each shard is published with :func:`se4lip_dist.storage.write_atomic_with` (local: temp file,
    fsync, rename; object stores: one upload to the final key), and a clip's rows always land in
    one shard, so a shard that exists is complete for every clip it holds. Call :meth:`add` per
    clip and :meth:`flush` at the end; each write returns its :class:`ShardInfo` (holding every
    clip added since the previous write) so the caller can record it right after it is
    published.

    Names are ``prefix-00000.parquet`` counting up, never overwriting a file; with
    ``by_content`` they are :func:`content_name` of the clips, so a rewrite of the same clips
    replaces the file with the same content.
    """

    def __init__(self, out_dir: str | Path, shard_bytes: int, prefix: str, *,
                 max_clips: int | None = None, by_content: bool = False) -> None:
        self.out_dir = storage.absolute(str(out_dir))
        self.shard_bytes = shard_bytes
        self.max_clips = max_clips
        self.prefix = prefix
        self.by_content = by_content
        self._tables: list[pa.Table] = []
        self._clips: list[str] = []
        self._bytes = 0
        self._count = 0

    def add(self, clip_id: str, table: pa.Table) -> ShardInfo | None:
        """Queue one clip's rows; returns a ShardInfo when this filled and wrote a shard."""
        if table.schema != SCHEMA:
            table = table.cast(SCHEMA)
        self._tables.append(table)
        self._clips.append(clip_id)
        self._bytes += table.nbytes
        if self._bytes >= self.shard_bytes or (self.max_clips is not None
                                               and len(self._clips) >= self.max_clips):
            return self.flush()
        return None

    def flush(self) -> ShardInfo | None:
        """Write whatever is buffered as one shard (None when nothing is buffered)."""
        if not self._tables:
            return None
        table = pa.concat_tables(self._tables)
        if self.by_content:
            name = content_name(self.prefix, self._clips)
        else:
            name = f"{self.prefix}-{self._count:05d}.parquet"
            while storage.exists(storage.join(self.out_dir, name)):  # never overwrite a shard
                self._count += 1
                name = f"{self.prefix}-{self._count:05d}.parquet"
        # Small row groups keep Ray Data's read blocks small enough to stream.
        written = storage.write_atomic_with(
            storage.join(self.out_dir, name),
            lambda f: pq.write_table(table, f, row_group_size=64, compression="zstd"),
        )
        info = ShardInfo(
            file=name,
            rows=table.num_rows,
            frames=int(pa.compute.sum(table["n_frames"]).as_py() or 0),
            bytes=written.size,
            sha256=written.sha256,
            clips=len(self._clips),
        )
        self._tables, self._clips, self._bytes = [], [], 0
        self._count += 1
        return info
