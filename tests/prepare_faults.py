"""Faults injected into ``prepare``'s workers (pickled by value into Ray actors by the tests)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from se4lip_dist.prepare import ClipResult, PrepareInput, prepare_local


def die_once(marker: str, victim: str, inp: PrepareInput, clip_id: str, local: str, cfg: Any,
             detector: Any) -> ClipResult:
    """``prepare_local``, except that the worker process dies (as on a lost node) the first
    time it reaches the input named ``victim``; ``marker`` records that it did, and every call
    leaves a file ``<marker>.calls/<input name>.<n>``."""
    calls = Path(f"{marker}.calls")
    calls.mkdir(exist_ok=True)
    (calls / f"{Path(inp.path).name}.{len(list(calls.iterdir()))}").touch()
    if Path(inp.path).name == victim and not os.path.exists(marker):
        Path(marker).write_text(str(os.getpid()))
        os._exit(1)
    return prepare_local(inp, clip_id, local, cfg, detector)
