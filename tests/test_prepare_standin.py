"""prepare on the loopback stand-in of a production cluster (slow): S3 videos to S3 shards on an
autoscaling Ray that starts with no worker node, a worker node killed mid-run, and a driver
that never reads a video nor writes a shard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from se4lip_dist import storage
from se4lip_dist.synthetic import speech_like_audio, write_clip

pytestmark = pytest.mark.slow

N_CLIPS = 10

DRIVER = """
    import json, os
    from se4lip_dist.config import load_config
    from se4lip_dist.prepare import run_prepare

    def io():
        lines = open("/proc/self/io").read().splitlines()
        return {k: int(v) for k, v in (line.split(": ") for line in lines)}

    seen = []

    def on_result(outcome):
        seen.append(outcome.status)
        if len(seen) == 1:
            open(os.environ["FIRST"], "w").write("1")

    cfg = load_config("cpu-small", overrides=["face.backend=none"])
    before = io()
    s = run_prepare([os.environ["VIDEOS"]], os.environ["OUT"], cfg, clips_per_shard=2,
                    placement_timeout_s=300, on_result=on_result)
    after = io()
    print(json.dumps({"summary": s.to_json(), "statuses": seen,
                      "read": after["rchar"] - before["rchar"],
                      "written": after["wchar"] - before["wchar"]}))
"""


@pytest.mark.timeout(600)
def test_prepare_s3_to_s3_grows_from_zero_and_survives_a_lost_node(
        autoscaling_ray_factory: Any, s3_server: Any, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from se4lip_dist.manifest import Manifest
    from se4lip_dist.shards import iter_rows

    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    s3_server.create_bucket("se4lip-data")
    prefix = f"s3://se4lip-data/{uuid.uuid4().hex[:8]}"
    video_bytes = 0
    for i in range(N_CLIPS):
        # Noise compresses badly: videos far larger than what Ray's own traffic and the
        # driver's lazy imports read, so the driver's I/O tells whether it touched them.
        frames = np.random.default_rng(i).integers(0, 256, (75, 320, 320, 3), dtype=np.uint8)
        write_clip(tmp_path / f"c{i}.mp4", frames, speech_like_audio(3.0, 16000, i)[0], 25,
                   16000)
        video_bytes += storage.write_atomic(f"{prefix}/videos/c{i}.mp4",
                                            (tmp_path / f"c{i}.mp4").read_bytes()).size
    # The nodes bring their own credentials (an instance profile in production).
    cluster = autoscaling_ray_factory(idle_timeout_minutes=0.5, env_vars=s3_server.env())
    assert cluster.alive_worker_nodes() == []
    first = tmp_path / "first"
    env = {**os.environ, **s3_server.env(), **cluster.env(), "FIRST": str(first),
           "VIDEOS": f"{prefix}/videos", "OUT": f"{prefix}/shards"}
    driver = subprocess.Popen([sys.executable, "-c", textwrap.dedent(DRIVER)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not first.exists():
            assert driver.poll() is None, driver.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no clip was prepared"
            time.sleep(0.5)
        # Clips are being prepared on worker nodes (the head has no CPU): lose one of them.
        (victim, *_) = [n["node_id"] for n in cluster.alive_worker_nodes()]
        cluster.kill_node(victim)
        out, err = driver.communicate(timeout=400)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.communicate()
    assert driver.returncode == 0, err[-3000:]
    res = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    s = res["summary"]
    assert (s["prepared"], s["failed"], s["total_clips"]) == (N_CLIPS, 0, N_CLIPS), s
    out = f"{prefix}/shards"
    m = Manifest.load(out)
    rows = [r["clip_id"] for u in m.shard_paths(out) for r in iter_rows(u, ["clip_id"])]
    assert sorted(rows) == sorted(set(rows)) and len(rows) == N_CLIPS  # none lost, none twice
    shard_bytes = m.total_bytes
    # The driver moved neither the videos nor the shards: its reads and writes (files and
    # sockets, Ray's own traffic included) stay well under either.
    print(f"driver read {res['read']:,} B, wrote {res['written']:,} B; videos {video_bytes:,} B, "
          f"shards {shard_bytes:,} B")
    assert res["read"] < video_bytes / 2 and res["written"] < shard_bytes / 2, res
