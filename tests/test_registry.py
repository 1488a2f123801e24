"""Log, register and load back the speech encoder on a sqlite store in tmp_path."""

from __future__ import annotations

from pathlib import Path

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
    resolve_artifacts,
    speech_state_dict,
)
from se4lip_dist.storage import redact_uri
from se4lip_dist.tracking import start_run


@pytest.mark.timeout(300)
def test_log_register_load_any_length(tmp_path) -> None:
    import warnings

    import mlflow.pyfunc
    from mlflow import MlflowClient

    cfg = load_config("cpu-small", overrides=["model.gru_layers=1", "model.embed_dim=16"])
    torch.manual_seed(0)
    model = build_model(cfg.model, sample_rate=16000, window_frames=cfg.train.window_frames)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = start_run(uri, "reg-test", "r1", params={"a.b": 1}, tags={},
                       config_yaml=cfg.to_yaml())
    state = speech_state_dict(model.state_dict())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model_uri = log_model(uri, run_id, cfg, state, step=3)
        version = register_model(uri, model_uri, "se4lip-test", run_id=run_id,
                                 tags={"val/loss": 0.5})
    # No MLflow warnings (pickle safety, missing type hints or input example) on a normal log.
    noisy = [str(w.message)[:120] for w in caught
             if not issubclass(w.category, DeprecationWarning) and "mlflow" in w.filename]
    assert noisy == []
    assert version == 1
    assert not list(tmp_path.rglob("python_model.pkl"))  # logged as code, nothing pickled

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    mv = client.get_model_version("se4lip-test", "1")
    assert mv.tags["val/loss"] == "0.5" and mv.run_id == run_id
    assert mv.tags["se4lip.logged_model"] == model_uri
    outputs = client.get_run(run_id).outputs.model_outputs
    assert [(o.model_id, o.step) for o in outputs] == [(model_uri.split("/")[-1], 3)]
    local = resolve_artifacts("models:/se4lip-test/1", uri).removeprefix("file://")
    sig = mlflow.models.Model.load(f"{local}/MLmodel").signature.to_dict()
    assert "waveform_16k" in sig["inputs"] and "embedding" in sig["outputs"]
    assert (Path(local) / "input_example.json").is_file()

    # The documented load path, in a fresh process: no pickle is executed while loading, and
    # waveforms of any length embed exactly as the torch module does.
    import subprocess
    import sys

    lengths = (3200, 8000, 16000 * 3 + 17)
    code = "\n".join([
        "import pickle, cloudpickle, mlflow, numpy as np",
        "def refuse(*a, **k): raise RuntimeError('unpickled')",
        "pickle.load = pickle.loads = cloudpickle.load = cloudpickle.loads = refuse",
        f"mlflow.set_tracking_uri({uri!r})",
        "m = mlflow.pyfunc.load_model('models:/se4lip-test/1')",
        "rng = np.random.default_rng(0)",
        f"outs = [m.predict({{'waveform_16k': (0.1 * rng.standard_normal((2, n)))"
        f".astype(np.float32)}}) for n in {lengths!r}]",
        f"np.savez({str(tmp_path / 'out.npz')!r}, *outs)",
    ])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    enc, cfg2 = load_encoder("models:/se4lip-test/1", tracking_uri=uri)
    assert cfg2 == cfg
    saved = np.load(tmp_path / "out.npz")
    rng = np.random.default_rng(0)
    for i, n in enumerate(lengths):
        wav = (0.1 * rng.standard_normal((2, n))).astype(np.float32)
        got = saved[f"arr_{i}"]
        assert got.shape == (2, 16) and got.dtype == np.float32
        np.testing.assert_allclose(got, embed_waveforms(enc, wav, cfg), rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            ref = model.speech.eval()(torch.from_numpy(wav)).numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_redact_uri() -> None:
    assert redact_uri("http://bob:s3cret@mlflow.local:5000/x") == "http://mlflow.local:5000/x"
    assert redact_uri("sqlite:///tmp/a.db") == "sqlite:///tmp/a.db"
