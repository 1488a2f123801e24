"""audit on the loopback stand-in of a production cluster (slow): prepared shards on S3,
audited on an autoscaling Ray that starts with no worker node, the corrected copy and the
report written back to S3, the run on an MLflow server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest
from audit_fixtures import Clip, write_clips
from shard_fixtures import TINY_MODEL, register_random_model

from se4lip_dist import storage
from se4lip_dist.config import load_config

pytestmark = pytest.mark.slow

DRIVER = """
    import json, os
    from se4lip_dist.audit import AuditSettings, run_audit

    s = run_audit([os.environ["DATA"]], os.environ["MODEL"], fix_out=os.environ["FIX"],
                  tracking_uri=os.environ["TRACKING"], workers=2, placement_timeout_s=300,
                  undecidable="keep",
                  settings=AuditSettings(min_confidence=0.0))
    print(json.dumps(s.to_json()))
"""


@pytest.mark.timeout(600)
def test_audit_s3_shards_on_an_autoscaling_cluster(
        autoscaling_ray_factory: Any, s3_server: Any, mlflow_sqlite_server: Any,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    from se4lip_dist.manifest import Manifest

    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    s3_server.create_bucket("se4lip-audit")
    prefix = f"s3://se4lip-audit/{uuid.uuid4().hex[:8]}"
    write_clips(tmp_path / "shards", [Clip(f"c{k:+d}", shift=k) for k in (-4, 0, 4)]
                + [Clip("short", frames=15)], clips_per_shard=2)
    for f in (tmp_path / "shards").iterdir():
        storage.write_atomic(f"{prefix}/shards/{f.name}", f.read_bytes())
    uri = mlflow_sqlite_server.url
    model = register_random_model(uri, load_config("cpu-small", overrides=[
        *TINY_MODEL, "data.crop_size=48"]), "tiny")
    cluster = autoscaling_ray_factory(idle_timeout_minutes=0.5, env_vars=s3_server.env())
    assert cluster.alive_worker_nodes() == []
    env = {**os.environ, **s3_server.env(), **cluster.env(), "DATA": f"{prefix}/shards",
           "MODEL": model, "FIX": f"{prefix}/fixed", "TRACKING": uri}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(DRIVER)], env=env,
                          capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    assert res["clips"] == 4 and res["counts"]["undecidable"] >= 1, res
    assert res["report"]["table"] == f"{prefix}/fixed/audit/audit.parquet"
    assert storage.exists(res["report"]["markdown"])
    fixed = Manifest.load(f"{prefix}/fixed").clips
    # Every clip kept (undecidable ones flagged), each naming the model that measured it.
    assert len(fixed) == 4 and {r.audit_model for r in fixed.values()} == {model}
    short = fixed["short"]
    assert (short.audit_status, short.audit_offset, short.frames) == ("undecidable", None, 15)
    for cid, rec in fixed.items():
        assert rec.audit_status in ("in_sync", "offset", "undecidable")
        assert (rec.audit_offset is None) == (rec.audit_status == "undecidable"), cid
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(res["mlflow_run_id"]).info.status == "FINISHED"
    assert "audit/audit.parquet" in {f.path for f in client.list_artifacts(
        res["mlflow_run_id"], "audit")}
