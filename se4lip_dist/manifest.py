"""``manifest.json``: what a prepared-shards folder holds, and the record that makes reruns resume.

The manifest is rewritten atomically (:func:`se4lip_dist.storage.write_atomic`) after every shard,
so at any moment it names only shards that are complete in the folder, and it is written only once
a shard exists. A clip is done when it appears under ``clips``; a rerun of ``prepare`` over the same
folder skips those and only adds what is missing. The folder may be local or a URL (``s3://...``).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from se4lip_dist import __version__, storage
from se4lip_dist.shards import SCHEMA_VERSION, ShardInfo, ShardSchemaError, check_schema

MANIFEST = "manifest.json"
FAILURES = "failures.jsonl"


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


@dataclass
class Manifest:
    """In-memory view of ``manifest.json``."""

    config: dict[str, Any]
    schema_version: int = SCHEMA_VERSION
    code_version: str = __version__
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    clips: dict[str, ClipRecord] = field(default_factory=dict)
    shards: list[ShardInfo] = field(default_factory=list)

    @property
    def total_frames(self) -> int:
        return sum(c.frames for c in self.clips.values())

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def add_shard(self, info: ShardInfo, clips: dict[str, ClipRecord]) -> None:
        """Record a shard that is already on disk, with the clips it holds."""
        self.shards.append(info)
        self.clips.update(clips)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": "se4lip-shards",
            "schema_version": self.schema_version,
            "code_version": self.code_version,
            "created": self.created,
            "updated": self.updated,
            "config": self.config,
            "totals": {
                "clips": len(self.clips),
                "frames": self.total_frames,
                "shards": len(self.shards),
                "bytes": self.total_bytes,
            },
            "shards": [asdict(s) for s in self.shards],
            "clips": {k: asdict(v) for k, v in sorted(self.clips.items())},
        }

    def save(self, out_dir: str | Path) -> str:
        """Write atomically to ``out_dir/manifest.json``; returns its location."""
        self.updated = time.time()
        path = storage.join(storage.absolute(str(out_dir)), MANIFEST)
        storage.write_atomic(path, json.dumps(self.to_json(), indent=1))
        return path

    @classmethod
    def load(cls, out_dir: str | Path) -> Manifest:
        """Read ``out_dir/manifest.json``; :class:`ManifestError` when absent or unreadable."""
        path = storage.join(storage.absolute(str(out_dir)), MANIFEST)
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
        return cls(
            config=d["config"],
            schema_version=d["schema_version"],
            code_version=d.get("code_version", "?"),
            created=d.get("created", 0.0),
            updated=d.get("updated", 0.0),
            clips={k: ClipRecord(**v) for k, v in d.get("clips", {}).items()},
            shards=[ShardInfo(**s) for s in d.get("shards", [])],
        )

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
