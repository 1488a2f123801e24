"""Log, register and load back the speech encoder on a sqlite store in tmp_path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from se4lip_dist.config import load_config
from se4lip_dist.models import build_model
from se4lip_dist.registry import (
    embed_waveforms,
    load_encoder,
    log_model,
    register_model,
    speech_state_dict,
)
from se4lip_dist.tracking import redact_uri, start_run


@pytest.mark.timeout(180)
def test_log_register_load_any_length(tmp_path) -> None:
    import mlflow.pyfunc

    cfg = load_config("cpu-small", overrides=["model.gru_layers=1", "model.embed_dim=16"])
    torch.manual_seed(0)
    model = build_model(cfg.model, sample_rate=16000, window_frames=cfg.train.window_frames)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = start_run(uri, "reg-test", "r1", params={"a.b": 1}, tags={},
                       config_yaml=cfg.to_yaml())
    state = speech_state_dict(model.state_dict())
    model_uri = log_model(uri, run_id, cfg, state)
    version = register_model(uri, model_uri, "se4lip-test", tags={"val_loss": 0.5})
    assert version == 1

    from se4lip_dist.registry import _using

    with _using(uri):
        pyf = mlflow.pyfunc.load_model("models:/se4lip-test@candidate")
    enc, cfg2 = load_encoder("models:/se4lip-test@candidate", tracking_uri=uri)
    assert cfg2 == cfg
    rng = np.random.default_rng(0)
    for n in (3200, 8000, 16000 * 3 + 17):
        wav = (0.1 * rng.standard_normal((2, n))).astype(np.float32)
        out = np.asarray(pyf.predict(wav))
        assert out.shape == (2, 16) and out.dtype == np.float32
        np.testing.assert_allclose(out, embed_waveforms(enc, wav, cfg), rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            ref = model.speech.eval()(torch.from_numpy(wav)).numpy()
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)

    # A fresh process resolves the pickled pyfunc class by reference (lazy module attribute).
    import subprocess
    import sys
    code = (f"import mlflow, numpy as np; mlflow.set_tracking_uri({uri!r});"
            f"mlflow.set_registry_uri({uri!r});"
            "m = mlflow.pyfunc.load_model('models:/se4lip-test/1');"
            "print(m.predict(np.zeros((1, 5000), np.float32)).shape)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("(1, 16)")

    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    mv = client.get_model_version_by_alias("se4lip-test", "candidate")
    assert mv.tags["val_loss"] == "0.5"


def test_redact_uri() -> None:
    assert redact_uri("http://bob:s3cret@mlflow.local:5000/x") == "http://mlflow.local:5000/x"
    assert redact_uri("sqlite:///tmp/a.db") == "sqlite:///tmp/a.db"
