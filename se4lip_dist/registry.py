"""Log the trained speech encoder to MLflow, register it, and load it back.

The model is an MLflow *pyfunc* whose artifacts are the speech encoder's ``state_dict`` (plain
tensors, read with ``torch.load(weights_only=True)``) and the resolved config YAML. The pytorch
flavour's default ``pt2`` export is avoided on purpose: ``torch.export`` specialises the GRU's
sequence length, and the encoder must embed waveforms of any length.

- ``mlflow.pyfunc.load_model("models:/NAME@ALIAS").predict(wav)`` with ``wav`` float32
  ``[batch, samples]`` at 16 kHz returns ``[batch, embed_dim]`` embeddings.
- :func:`load_encoder` gives the torch module itself (no pickle executed) for extract/evaluate.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from se4lip_dist.config import Config

if TYPE_CHECKING:
    import torch

    from se4lip_dist.models import SpeechEncoder

WEIGHTS_FILE = "speech_encoder.pt"
LIPS_FILE = "lip_encoder.pt"
"""The lip encoder's weights, logged beside the speech encoder so ``evaluate`` and the tune
quality gate can score AV sync with a registered model (the pyfunc itself only uses speech)."""
CONFIG_FILE = "config.yaml"
MODEL_NAME = "model"
DEFAULT_ALIAS = "candidate"
"""Alias set on a newly registered version (``champion`` is for a promotion step to set)."""


class RegistryError(RuntimeError):
    """A model that cannot be logged, registered or loaded."""


@contextlib.contextmanager
def _using(tracking_uri: str) -> Iterator[None]:
    """Point MLflow's tracking and registry URIs at ``tracking_uri`` for a block, then restore.

    ``mlflow.set_*_uri`` also exports ``MLFLOW_*_URI`` env vars (inherited by Ray workers) and
    cannot unset the registry URI, so the previous module state and env are restored by hand.
    """
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved_tracking = tracking_utils._tracking_uri
    saved_registry = registry_utils._registry_uri
    saved_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        yield
    finally:
        tracking_utils.set_tracking_uri(saved_tracking)
        registry_utils._registry_uri = saved_registry
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for pkg in ("torch", "torchaudio", "numpy", "pyyaml", "mlflow", "se4lip-dist"):
        try:
            reqs.append(f"{pkg}=={version(pkg).split('+')[0]}")
        except PackageNotFoundError:
            reqs.append(pkg)
    return reqs


def build_speech_encoder(cfg: Config, state_dict: dict[str, torch.Tensor]) -> SpeechEncoder:
    """A speech encoder in eval mode with ``state_dict`` loaded (strict)."""
    from se4lip_dist.models import SpeechEncoder

    enc = SpeechEncoder(cfg.model, cfg.data.sample_rate)
    enc.load_state_dict(state_dict)
    return enc.eval()


def speech_state_dict(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The speech encoder's part of a whole-model (:class:`SE4Lip`) ``state_dict``."""
    return _part(model_state, "speech.")


def _part(model_state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    out = {k[len(prefix):]: v for k, v in model_state.items() if k.startswith(prefix)}
    if not out:
        raise RegistryError(f"the state_dict holds no '{prefix}*' weights (not an SE4Lip model?)")
    return out


def _is_whole_model(state: dict[str, Any]) -> bool:
    return any(k.startswith("speech.") for k in state) and any(k.startswith("lips.") for k in state)


def load_weights(path: str | Path, source: str | None = None) -> dict[str, Any]:
    """A ``weights_only`` ``torch.load`` (tensor state_dicts, optimizer states); anything else
    (pickled code) is refused with a :class:`RegistryError` naming ``source``, never run."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        reason = (str(e) or type(e).__name__).splitlines()[0]
        raise RegistryError(f"{source or path}: refused to load {Path(path).name}: not a plain "
                            f"tensor state_dict (weights_only load failed: {reason})") from e


def _load_files(weights: str | Path, config: str | Path,
                source: str | None = None) -> tuple[SpeechEncoder, Config]:
    cfg = Config.from_dict(yaml.safe_load(Path(config).read_text()))
    return build_speech_encoder(cfg, load_weights(weights, source)), cfg


_EMBEDDER: type | None = None


def _embedder_class() -> type:
    """The pyfunc class, created on first use so importing this module does not import MLflow.

    It is cached as the module attribute ``SpeechEmbedder`` so cloudpickle stores it by reference.
    """
    global _EMBEDDER
    if _EMBEDDER is None:
        import mlflow.pyfunc

        class SpeechEmbedder(mlflow.pyfunc.PythonModel):
            """pyfunc: float32 waveforms ``[batch, samples]`` -> embeddings ``[batch, D]``."""

            def load_context(self, context: Any) -> None:
                self.encoder, self.cfg = _load_files(context.artifacts["weights"],
                                                     context.artifacts["config"])

            # No type hints: MLflow 3 would infer a second signature from them.
            def predict(self, context, model_input, params=None):
                return embed_waveforms(self.encoder, model_input, self.cfg)

        SpeechEmbedder.__qualname__ = "SpeechEmbedder"
        SpeechEmbedder.__module__ = __name__
        _EMBEDDER = SpeechEmbedder
        globals()["SpeechEmbedder"] = SpeechEmbedder
    return _EMBEDDER


def __getattr__(name: str) -> Any:
    if name == "SpeechEmbedder":
        return _embedder_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def embed_waveforms(encoder: Any, wav: Any, cfg: Config) -> np.ndarray:
    """Embed a batch of waveforms with a speech encoder (torch, no grad, CPU or its device).

    Args:
        encoder: a :class:`~se4lip_dist.models.SpeechEncoder` (or any ``[B,S] -> [B,D]`` module).
        wav: array-like ``[batch, samples]`` or ``[samples]`` float waveform at 16 kHz.
        cfg: its config (waveforms shorter than ``n_fft`` are zero-padded to it).

    Returns:
        float32 ``[batch, D]``.
    """
    import torch

    if isinstance(wav, dict):  # a named-tensor pyfunc input
        if len(wav) != 1:
            raise ValueError(f"expected one waveform tensor, got inputs {sorted(wav)}")
        wav = next(iter(wav.values()))
    if hasattr(wav, "to_numpy"):  # pandas
        wav = wav.to_numpy()
    x = np.asarray(wav, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2:
        raise ValueError(f"expected waveforms [batch, samples], got shape {x.shape}")
    if x.shape[1] < cfg.model.n_fft:
        x = np.pad(x, ((0, 0), (0, cfg.model.n_fft - x.shape[1])))
    device = next(encoder.parameters()).device
    with torch.no_grad():
        return encoder(torch.from_numpy(x).to(device)).float().cpu().numpy()


def log_model(
    tracking_uri: str,
    run_id: str,
    cfg: Config,
    state: dict[str, torch.Tensor],
) -> str:
    """Log the speech encoder as a pyfunc model in ``run_id``.

    Args:
        tracking_uri: resolved tracking URI.
        run_id: the training run.
        cfg: the config the model was trained with.
        state: the whole :class:`SE4Lip` ``state_dict`` (speech and lip encoders; the lip
            weights are logged as an extra artifact), or the speech encoder's alone.

    Returns:
        The logged model's URI (``models:/m-...``).
    """
    import mlflow
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    lips_state = _part(state, "lips.") if _is_whole_model(state) else None
    speech_state = speech_state_dict(state) if lips_state is not None else state
    # Strict load first, so a mismatched state never reaches the registry.
    encoder = build_speech_encoder(cfg, speech_state)
    if lips_state is not None:
        from se4lip_dist.models import build_model

        build_model(cfg.model, sample_rate=cfg.data.sample_rate,
                    window_frames=cfg.train.window_frames).lips.load_state_dict(lips_state)
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, encoder.embed_dim))]),
    )
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / WEIGHTS_FILE
        config = Path(tmp) / CONFIG_FILE
        torch.save({k: v.detach().cpu().contiguous() for k, v in speech_state.items()}, weights)
        config.write_text(cfg.to_yaml())
        artifacts = {"weights": str(weights), "config": str(config)}
        if lips_state is not None:
            lips = Path(tmp) / LIPS_FILE
            torch.save({k: v.detach().cpu().contiguous() for k, v in lips_state.items()}, lips)
            artifacts["lips"] = str(lips)
        with _using(tracking_uri), mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME,
                python_model=_embedder_class()(),
                artifacts=artifacts,
                signature=signature,
                pip_requirements=_pip_requirements(),
                metadata={"embed_dim": encoder.embed_dim, "sample_rate": cfg.data.sample_rate},
            )
    return info.model_uri


def register_model(
    tracking_uri: str,
    model_uri: str,
    name: str,
    *,
    tags: dict[str, Any] | None = None,
    alias: str | None = DEFAULT_ALIAS,
) -> int:
    """Register ``model_uri`` as a new version of ``name`` with tags and an alias.

    Returns:
        The new version number.
    """
    import mlflow
    from mlflow import MlflowClient

    with _using(tracking_uri):
        mv = mlflow.register_model(model_uri, name,
                                   tags={k: str(v) for k, v in (tags or {}).items()})
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    if alias:
        client.set_registered_model_alias(name, alias, mv.version)
    return int(mv.version)


def _download(model_uri: str, tracking_uri: str | None, dst: str) -> tuple[Path, Path, str]:
    """Download a logged model; returns (speech weights, config) paths and the tracking URI."""
    import mlflow.artifacts

    from se4lip_dist.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        with _using(uri):
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=dst))
    except Exception as e:
        from se4lip_dist.tracking import redact_uri

        raise RegistryError(f"cannot download {model_uri} from {redact_uri(uri)}: {e}") from e
    weights = next(local.rglob(WEIGHTS_FILE), None)
    config = next((p for p in local.rglob(CONFIG_FILE) if p.parent == weights.parent), None) \
        if weights else None
    if weights is None or config is None:
        raise RegistryError(f"{model_uri} is not an se4lip speech encoder "
                            f"(no {WEIGHTS_FILE} + {CONFIG_FILE} artifacts)")
    return weights, config, uri


def load_encoder(
    model_uri: str, tracking_uri: str | None = None
) -> tuple[SpeechEncoder, Config]:
    """Load a logged speech encoder as a torch module (eval mode, CPU) and its config.

    Only the weights file (``weights_only=True``) and the YAML are read: no pickle is executed.

    Args:
        model_uri: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``models:/m-...``,
            ``runs:/RUN/model`` or a local model folder.
        tracking_uri: tracking URI (default: resolved as for training).

    Raises:
        RegistryError: the URI does not resolve to an se4lip speech encoder.
    """
    with tempfile.TemporaryDirectory() as tmp:
        weights, config, _ = _download(model_uri, tracking_uri, tmp)
        return _load_files(weights, config, model_uri)


def load_model_state(
    model_uri: str, tracking_uri: str | None = None
) -> tuple[dict[str, torch.Tensor], Config]:
    """The whole SE4Lip ``state_dict`` (speech + lips) of a logged model, and its config.

    Raises:
        RegistryError: the URI does not resolve, or the model was logged without lip weights.
    """
    with tempfile.TemporaryDirectory() as tmp:
        weights, config, _ = _download(model_uri, tracking_uri, tmp)
        lips = weights.parent / LIPS_FILE
        if not lips.is_file():
            raise RegistryError(f"{model_uri} was logged without its lip encoder ({LIPS_FILE}); "
                                "sync scoring needs a model logged by se4lip-dist train/tune")
        cfg = Config.from_dict(yaml.safe_load(config.read_text()))
        state = {f"speech.{k}": v for k, v in load_weights(weights, model_uri).items()}
        state.update({f"lips.{k}": v for k, v in load_weights(lips, model_uri).items()})
        return state, cfg


def load_sync_model(model_uri: str, tracking_uri: str | None = None) -> tuple[Any, Config]:
    """A logged model as a whole :class:`~se4lip_dist.models.SE4Lip` (eval, CPU) and its config."""
    from se4lip_dist.models import build_model

    state, cfg = load_model_state(model_uri, tracking_uri)
    model = build_model(cfg.model, sample_rate=cfg.data.sample_rate,
                        window_frames=cfg.train.window_frames)
    model.load_state_dict(state)
    return model.eval(), cfg


def list_models(tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """Registered models: name, latest version, aliases, last update."""
    import datetime

    from mlflow import MlflowClient

    from se4lip_dist.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    rows = []
    for m in client.search_registered_models():
        versions = [int(v.version) for v in (m.latest_versions or [])]
        rows.append({
            "name": m.name,
            "latest_version": max(versions) if versions else None,
            "aliases": {a: int(v) for a, v in (m.aliases or {}).items()},
            "updated": datetime.datetime.fromtimestamp(
                (m.last_updated_timestamp or 0) / 1000).isoformat(timespec="seconds"),
        })
    return rows


def show_model(name: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """Every version of ``name`` with its aliases, tags and source run.

    Raises:
        RegistryError: no such registered model.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from se4lip_dist.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        model = client.get_registered_model(name)
    except MlflowException as e:
        raise RegistryError(f"no registered model {name!r} at {uri}") from e
    by_version: dict[int, list[str]] = {}
    for alias, v in (model.aliases or {}).items():
        by_version.setdefault(int(v), []).append(alias)
    versions = sorted(client.search_model_versions(f"name = '{name}'"),
                      key=lambda v: int(v.version), reverse=True)
    return {
        "name": name,
        "versions": [{"version": int(v.version), "aliases": sorted(by_version.get(int(v.version),
                                                                                  [])),
                      "run_id": v.run_id, "source": v.source, "tags": dict(v.tags or {})}
                     for v in versions],
    }


def promote(name: str, version: int, alias: str = "champion",
            tracking_uri: str | None = None) -> int | None:
    """Point ``alias`` at ``version`` by hand; returns the version it pointed at before.

    Raises:
        RegistryError: no such model or version.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from se4lip_dist.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        client.get_model_version(name, str(version))
    except MlflowException as e:
        raise RegistryError(f"{name} has no version {version} at {uri}") from e
    try:
        previous: int | None = int(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        previous = None
    client.set_registered_model_alias(name, alias, str(version))
    client.set_model_version_tag(name, str(version), "gate", f"promoted to {alias} by hand")
    return previous


__all__ = [
    "DEFAULT_ALIAS",
    "RegistryError",
    "build_speech_encoder",
    "embed_waveforms",
    "list_models",
    "load_encoder",
    "load_model_state",
    "load_sync_model",
    "load_weights",
    "log_model",
    "promote",
    "register_model",
    "show_model",
    "speech_state_dict",
]
