"""Log the trained encoders to MLflow as a model, register versions, and load them back.

The model is an MLflow *pyfunc* logged from code (:mod:`se4lip_dist.pyfunc_model`, MLflow's
"models from code"), whose artifacts are the speech and lip encoders' ``state_dict`` files
(plain tensors, read with ``torch.load(weights_only=True)``) and the resolved config YAML.
Loading it never unpickles anything. The pytorch flavour's default ``pt2`` export is avoided on
purpose: ``torch.export`` specialises the GRU's sequence length, and the encoder must embed
waveforms of any length.

- ``mlflow.pyfunc.load_model("models:/NAME@ALIAS").predict({"waveform_16k": wav})`` with ``wav``
  float32 ``[batch, samples]`` at 16 kHz returns ``[batch, embed_dim]`` embeddings.
- :func:`load_encoder` / :func:`load_sync_model` give the torch modules themselves.

Everything goes through an ``MlflowClient`` bound to the caller's tracking URI: no module-level
MLflow state is read or changed. Which version carries which alias is decided in
:mod:`se4lip_dist.lifecycle`.
"""

from __future__ import annotations

import datetime
import os
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow.artifacts
import mlflow.pyfunc
import numpy as np
import torch
import yaml
from mlflow import MlflowClient
from mlflow.entities import LoggedModelOutput
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.types import Schema, TensorSpec

from se4lip_dist.config import Config
from se4lip_dist.models import SpeechEncoder, build_model
from se4lip_dist.storage import redact_uri
from se4lip_dist.tracking import existing_store, none_if_missing, resolve_tracking_uri
from se4lip_dist.weights import (
    RegistryError,
    build_speech_encoder,
    embed_waveforms,
    load_files,
    load_weights,
)

WEIGHTS_FILE = "speech_encoder.pt"
LIPS_FILE = "lip_encoder.pt"
"""The lip encoder's weights, logged beside the speech encoder so ``evaluate`` and the tune
quality gate can score AV sync with a registered model (the pyfunc itself only uses speech)."""
CONFIG_FILE = "config.yaml"
MODEL_NAME = "model"
CODE_FILE = Path(__file__).with_name("pyfunc_model.py")
"""The pyfunc's code (models from code): MLflow runs it on load instead of unpickling a class."""
INPUT_NAME = "waveform_16k"
OUTPUT_NAME = "embedding"


def _quiet() -> None:
    """No tqdm bars from MLflow's artifact copies (logging and loading models), unless asked."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _pip_requirements() -> list[str]:
    reqs = []
    for pkg in ("torch", "torchaudio", "numpy", "pyyaml", "mlflow", "se4lip-dist"):
        try:
            reqs.append(f"{pkg}=={version(pkg).split('+')[0]}")
        except PackageNotFoundError:
            reqs.append(pkg)
    return reqs


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


def __getattr__(name: str) -> Any:
    # Models logged by earlier versions pickled ``se4lip_dist.registry.SpeechEmbedder``.
    if name == "SpeechEmbedder":
        from se4lip_dist.pyfunc_model import SpeechEmbedder

        return SpeechEmbedder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def log_model(
    tracking_uri: str,
    run_id: str,
    cfg: Config,
    state: dict[str, torch.Tensor],
    *,
    step: int = 0,
    tags: dict[str, Any] | None = None,
) -> str:
    """Log the encoders as a pyfunc model (an MLflow LoggedModel) output by ``run_id``.

    Args:
        tracking_uri: resolved tracking URI.
        run_id: the run that produced the model (its output at ``step``).
        cfg: the config the model was trained with.
        state: the whole :class:`SE4Lip` ``state_dict`` (speech and lip encoders; the lip
            weights are logged as an extra artifact), or the speech encoder's alone.
        step: the epoch the weights come from (shown beside the model in the run).
        tags: tags of the logged model.

    Returns:
        The logged model's URI (``models:/m-...``).
    """
    _quiet()
    lips_state = _part(state, "lips.") if _is_whole_model(state) else None
    speech_state = speech_state_dict(state) if lips_state is not None else state
    # Strict load first, so a mismatched state never reaches the registry.
    encoder = build_speech_encoder(cfg, speech_state)
    if lips_state is not None:
        from se4lip_dist.models import build_model

        build_model(cfg.model, sample_rate=cfg.data.sample_rate,
                    window_frames=cfg.train.window_frames).lips.load_state_dict(lips_state)
    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.get_run(run_id)
    logged = client.create_logged_model(
        run.info.experiment_id, name=MODEL_NAME, source_run_id=run_id,
        tags={k: str(v) for k, v in (tags or {}).items()}, model_type="se4lip-speech-encoder")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = _save_pyfunc(Path(tmp), cfg, speech_state, lips_state, encoder.embed_dim,
                               logged, run_id)
            client.log_model_artifacts(logged.model_id, str(out))
        client.finalize_logged_model(logged.model_id, "READY")
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step)])
    except BaseException:
        client.finalize_logged_model(logged.model_id, "FAILED")
        raise
    return f"models:/{logged.model_id}"


def _save_pyfunc(tmp: Path, cfg: Config, speech_state: dict[str, torch.Tensor],
                 lips_state: dict[str, torch.Tensor] | None, embed_dim: int, logged: Any,
                 run_id: str) -> Path:
    """Write the pyfunc model folder (weights, config, signature, example) under ``tmp``."""
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1), name=INPUT_NAME)]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, embed_dim), name=OUTPUT_NAME)]),
    )
    # One lip window's worth of audio: what the encoder embeds per video frame.
    window = cfg.train.window_frames * cfg.data.samples_per_frame
    example = {INPUT_NAME: np.zeros((1, window), np.float32)}
    src = tmp / "src"
    src.mkdir()
    torch.save({k: v.detach().cpu().contiguous() for k, v in speech_state.items()},
               src / WEIGHTS_FILE)
    (src / CONFIG_FILE).write_text(cfg.to_yaml())
    artifacts = {"weights": str(src / WEIGHTS_FILE), "config": str(src / CONFIG_FILE)}
    if lips_state is not None:
        torch.save({k: v.detach().cpu().contiguous() for k, v in lips_state.items()},
                   src / LIPS_FILE)
        artifacts["lips"] = str(src / LIPS_FILE)
    out = tmp / "model"
    mlflow.pyfunc.save_model(
        path=str(out),
        python_model=str(CODE_FILE),
        artifacts=artifacts,
        signature=signature,
        input_example=example,
        pip_requirements=_pip_requirements(),
        metadata={"embed_dim": embed_dim, "sample_rate": cfg.data.sample_rate,
                  "window_frames": cfg.train.window_frames, "preset": cfg.preset},
        mlflow_model=Model(artifact_path=logged.artifact_location, run_id=run_id,
                           model_id=logged.model_id),
    )
    return out


def register_model(
    tracking_uri: str,
    model_uri: str,
    name: str,
    *,
    run_id: str | None = None,
    tags: dict[str, Any] | None = None,
    description: str | None = None,
) -> int:
    """Register ``model_uri`` as a new version of ``name`` (created if missing), no alias.

    Returns:
        The new version number.
    """
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        client.create_registered_model(name, description=MODEL_DESCRIPTION)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    model_id = model_uri[len("models:/"):] if model_uri.startswith("models:/m-") else None
    source = model_uri
    if model_id is not None:
        # MLflow's sqlite registry resolves a models:/m-... source through the process-global
        # tracking URI; the artifact location resolved with our own client avoids that.
        logged = MlflowClient(tracking_uri=tracking_uri).get_logged_model(model_id)
        source, run_id = logged.artifact_location, run_id or logged.source_run_id
    all_tags = {k: str(v) for k, v in (tags or {}).items()}
    if model_id is not None:
        all_tags[LOGGED_MODEL_TAG] = model_uri
    mv = client.create_model_version(
        name, source=source, run_id=run_id, model_id=model_id, description=description,
        tags=all_tags)
    return int(mv.version)


MODEL_DESCRIPTION = (
    "SE4Lip speech encoders (se4lip-dist). Aliases: `champion` is the version the quality gate "
    "promoted (use `models:/NAME@champion`), `challenger` the latest version it did not promote. "
    "Each version's description and `gate.*` tags give the scores and the reason."
)


def find_version(tracking_uri: str, name: str, source: str) -> int | None:
    """The version of ``name`` registered from ``source`` (tag ``se4lip.source``), if any."""
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    versions = none_if_missing(lambda: client.search_model_versions(f"name = '{name}'"))
    if versions is None:
        return None
    found = [int(v.version) for v in versions if (v.tags or {}).get(SOURCE_TAG) == source]
    return max(found) if found else None


LOCK_SUFFIX = ".gate-lock"
"""A registered model named ``NAME.gate-lock`` is the registry gate's lock on ``NAME``
(:func:`se4lip_dist.lifecycle.gate_lock`), not a model: listings leave it out."""
LOGGED_MODEL_TAG = "se4lip.logged_model"
"""Version tag with the ``models:/m-...`` LoggedModel the version was registered from."""
SOURCE_TAG = "se4lip.source"
"""Version tag naming the run (and epoch) a version came from: registration is idempotent."""


def resolve_version(client: MlflowClient, model_uri: str) -> tuple[Any, Any]:
    """The one reading of a ``models:/`` URI: ``(LoggedModel, None)`` for ``models:/m-...``,
    ``(None, ModelVersion)`` for ``models:/NAME@ALIAS``, ``NAME/VERSION`` or ``NAME/latest``.

    Raises:
        RegistryError: ``NAME/latest`` of a model without versions.
        MlflowException: the registry does not know the name, alias, version or model.
    """
    ref = model_uri[len("models:/"):].rstrip("/")
    if ref.startswith("m-"):
        return client.get_logged_model(ref.split("/")[0]), None
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return None, client.get_model_version_by_alias(name, alias)
    name, _, version = ref.rpartition("/")
    if version != "latest":
        return None, client.get_model_version(name, version)
    versions = client.search_model_versions(f"name = '{name}'")
    if not versions:
        raise RegistryError(f"{model_uri}: no versions registered")
    return None, max(versions, key=lambda v: int(v.version))


def resolve_artifacts(model_uri: str, tracking_uri: str) -> str:
    """The artifact location behind a model URI, resolved with a client bound to
    ``tracking_uri`` (``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``models:/m-...``);
    other URIs (``runs:/``, folders, ``s3://``) are returned as they are."""
    if not model_uri.startswith("models:/"):
        return model_uri
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    logged, mv = resolve_version(client, model_uri)
    if logged is not None:
        return logged.artifact_location
    if mv.source.startswith("models:/m-"):
        return client.get_logged_model(mv.source[len("models:/"):]).artifact_location
    return mv.source


def pin_model(model_uri: str, tracking_uri: str) -> dict[str, Any]:
    """What a model URI points at now: an alias or ``latest`` becomes a fixed version.

    Returns:
        ``uri`` (as given), ``pinned_uri`` and, when known, ``name``, ``version``, ``run_id``,
        ``model_id`` (the LoggedModel, for MLflow lineage).

    Raises:
        RegistryError: the registry does not know the model.
    """
    info: dict[str, Any] = {"uri": model_uri, "pinned_uri": model_uri}
    if model_uri.startswith(("models:/", "runs:/")):
        existing_store(tracking_uri)  # reading must not create an empty store
    if model_uri.startswith("runs:/"):
        info["run_id"] = model_uri[len("runs:/"):].split("/")[0]
        return info
    if not model_uri.startswith("models:/"):
        if "://" not in model_uri:
            info["pinned_uri"] = str(Path(model_uri).resolve())
        return info
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        logged, mv = resolve_version(client, model_uri)
    except RegistryError:
        raise
    except Exception as e:
        raise RegistryError(f"cannot resolve {model_uri} on {redact_uri(tracking_uri)}: "
                            f"{e}") from e
    if logged is not None:
        info.update(model_id=logged.model_id, run_id=logged.source_run_id)
        return info
    logged_uri = (mv.tags or {}).get(LOGGED_MODEL_TAG, "")
    info.update(name=mv.name, version=int(mv.version), run_id=mv.run_id,
                pinned_uri=f"models:/{mv.name}/{mv.version}")
    if logged_uri.startswith("models:/m-"):
        info["model_id"] = logged_uri[len("models:/"):]
    return info


def _download(model_uri: str, tracking_uri: str | None, dst: str) -> tuple[Path, Path, str]:
    """Download a logged model; returns (speech weights, config) paths and the tracking URI."""
    uri = resolve_tracking_uri(tracking_uri)
    _quiet()
    if model_uri.startswith(("models:/", "runs:/")):
        from se4lip_dist.tracking import TrackingError, existing_store

        try:
            existing_store(uri)  # reading must not create an empty store
        except TrackingError as e:
            raise RegistryError(f"cannot load {model_uri}: {e}") from e
    try:
        location = resolve_artifacts(model_uri, uri)
        local = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=location, dst_path=dst, tracking_uri=uri))
    except Exception as e:
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
        return load_files(weights, config, model_uri)


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
    state, cfg = load_model_state(model_uri, tracking_uri)
    model = build_model(cfg.model, sample_rate=cfg.data.sample_rate,
                        window_frames=cfg.train.window_frames)
    model.load_state_dict(state)
    return model.eval(), cfg


def _reader(tracking_uri: str | None) -> tuple[Any, str]:
    """A registry client for an existing store (reading never creates an empty one)."""
    uri = resolve_tracking_uri(tracking_uri)
    existing_store(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


def list_models(tracking_uri: str | None = None) -> dict[str, Any]:
    """Registered models of a store: name, latest version, aliases, last update.

    Returns:
        ``{"tracking_uri": ..., "models": [...]}`` (the URI with credentials removed).

    Raises:
        TrackingError: no store at that URI.
    """
    client, uri = _reader(tracking_uri)
    rows = []
    for m in client.search_registered_models():
        if m.name.endswith(LOCK_SUFFIX):
            continue
        versions = [int(v.version) for v in (m.latest_versions or [])]
        rows.append({
            "name": m.name,
            "latest_version": max(versions) if versions else None,
            "aliases": {a: int(v) for a, v in (m.aliases or {}).items()},
            "updated": datetime.datetime.fromtimestamp(
                (m.last_updated_timestamp or 0) / 1000).isoformat(timespec="seconds"),
        })
    return {"tracking_uri": redact_uri(uri), "models": rows}


def show_model(name: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """Every version of ``name`` with its aliases, description, tags and source run.

    Raises:
        RegistryError: no such registered model.
        TrackingError: no store at that URI.
    """
    client, uri = _reader(tracking_uri)
    try:
        model = client.get_registered_model(name)
    except MlflowException as e:
        known = [m.name for m in client.search_registered_models()]
        raise RegistryError(f"no registered model {name!r} at {redact_uri(uri)}; registered "
                            f"there: {known or 'none'}") from e
    by_version: dict[int, list[str]] = {}
    for alias, v in (model.aliases or {}).items():
        by_version.setdefault(int(v), []).append(alias)
    versions = sorted(client.search_model_versions(f"name = '{name}'"),
                      key=lambda v: int(v.version), reverse=True)
    return {
        "name": name,
        "tracking_uri": redact_uri(uri),
        "description": model.description or "",
        "versions": [{"version": int(v.version),
                      "aliases": sorted(by_version.get(int(v.version), [])),
                      "run_id": v.run_id, "source": v.source,
                      "description": v.description or "", "tags": dict(v.tags or {})}
                     for v in versions],
    }


def version_info(tracking_uri: str, name: str, version: int) -> Any:
    """The MLflow ``ModelVersion`` (tags, run id, source) of ``name`` ``version``.

    Raises:
        RegistryError: no such model or version.
    """
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as e:
        raise RegistryError(f"{name} has no version {version}") from e


__all__ = [
    "CODE_FILE",
    "INPUT_NAME",
    "LOCK_SUFFIX",
    "LOGGED_MODEL_TAG",
    "MODEL_DESCRIPTION",
    "OUTPUT_NAME",
    "SOURCE_TAG",
    "RegistryError",
    "build_speech_encoder",
    "embed_waveforms",
    "find_version",
    "list_models",
    "load_encoder",
    "load_files",
    "load_model_state",
    "load_sync_model",
    "load_weights",
    "log_model",
    "pin_model",
    "register_model",
    "resolve_artifacts",
    "resolve_version",
    "show_model",
    "speech_state_dict",
    "version_info",
]
