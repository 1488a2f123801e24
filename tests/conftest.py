"""Shared fixtures: where the shared real data lives, and skips when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SE4LIP_SHARED_DATA", ROOT.parent / "shared" / "data"))
INSIGHTFACE_ROOT = Path(
    os.environ.get("SE4LIP_INSIGHTFACE_ROOT", SHARED_DATA.parent / "models" / "insightface")
)

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real-video folder; skips the test when it is absent."""
    if not (SHARED_DATA / "grid_s1" / "video").is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (set SE4LIP_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def insightface_root() -> Path:
    """A model root holding models/buffalo_sc/det_500m.onnx; skips when absent."""
    if not (INSIGHTFACE_ROOT / "models" / "buffalo_sc").is_dir():
        pytest.skip(f"InsightFace model root not found at {INSIGHTFACE_ROOT}")
    return INSIGHTFACE_ROOT
