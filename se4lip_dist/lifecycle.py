"""The model lifecycle, one path for ``train`` and ``tune``: log -> register -> gate -> alias.

1. **log** the best validated epoch's weights (the caller picks them with
   :func:`validation.is_better` over the run's history) as a model output of the run;
2. **register** it as a version of the registered model, once per source (the run and epoch it
   came from, tag ``se4lip.source``): a resumed command finds the version instead of adding one;
3. **gate** it: the new version, the current ``champion`` and a random-init encoder of the new
   version's architecture are scored in this process with one :class:`validation.Protocol` on
   the same validation clips;
4. **alias** it: ``champion`` when it is above chance and beats the champion (or there is none),
   else ``challenger``. The scores, the protocol and the reason go into the version's ``gate.*``
   tags and description, and the command says the same.

A model at chance level is never promoted: its offset accuracy's 95 % lower bound must exceed
both a random encoder's score on the same clips and the uniform chance of the offset search. Any
error while gating promotes nothing and raises :class:`GateError`; the version stays registered
without an alias and the same command run again (``--resume``) gates it again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from se4lip_dist.config import Config
from se4lip_dist.models import build_model
from se4lip_dist.registry import (
    SOURCE_TAG,
    RegistryError,
    find_version,
    load_model_state,
    log_model,
    register_model,
    version_info,
)
from se4lip_dist.storage import redact_uri
from se4lip_dist.tracking import existing_store, resolve_tracking_uri
from se4lip_dist.validation import (
    METRICS,
    ValidationResult,
    ValidationSet,
    is_better,
    score_state,
)

CHAMPION = "champion"
"""The version the gate promoted: what ``models:/NAME@champion`` (extract, evaluate) follows."""
CHALLENGER = "challenger"
"""The latest version the gate did not promote."""
CHANCE_SEED = 1234
"""Seed of the random-init encoder whose score is the gate's chance floor."""
LOGGED_TAG = "se4lip.logged_model"
"""Run tag ``<source> <models:/m-...>``: the model already logged for a source."""
SCORE_KEYS = ("val/offset_acc", "val/offset_acc_ci_low", "val/offset_acc_ci_high",
              "val/offset_trials", "val/clips", "val/sync_acc", "val/loss", "val/hard_neg_acc",
              "val/lse_c")
"""Scores recorded in the version tags and printed by ``models compare``."""


class GateError(RuntimeError):
    """Registering or gating failed: nothing was promoted (the message says what to rerun)."""


@dataclass
class Candidate:
    """A trained model ready to publish."""

    model_state: dict[str, Any]
    """Whole SE4Lip ``state_dict`` of the selected epoch."""
    cfg: Config
    run_id: str
    source: str
    """Idempotency key: the run (or tune trial) and epoch the weights come from."""
    epoch: int
    """The selected (best validated) epoch."""
    epochs: int
    """Epochs the run trained."""
    selected_by: str
    """``metric (mode)`` that selected the epoch."""
    tags: dict[str, Any] = field(default_factory=dict)
    """Extra version tags (data hash, tune name, search space...)."""


def format_score(v: Any) -> str:
    """How scores are written into version tags (and compared with them)."""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}" if abs(v) >= 10 else f"{v:.4f}"
    return str(v)


_f = format_score


def _score_line(m: dict[str, float]) -> str:
    return (f"val/offset_acc {_f(m['val/offset_acc'])} "
            f"[{_f(m['val/offset_acc_ci_low'])}, {_f(m['val/offset_acc_ci_high'])}] over "
            f"{int(m['val/offset_trials'])} trials ({int(m['val/clips'])} clips), val/sync_acc "
            f"{_f(m['val/sync_acc'])}, val/loss {_f(m['val/loss'])}")


def log_once(tracking_uri: str, cand: Candidate) -> str:
    """Log the candidate's model into its run unless this source was logged there already."""
    client = MlflowClient(tracking_uri=tracking_uri)
    prior = client.get_run(cand.run_id).data.tags.get(LOGGED_TAG, "")
    src, _, uri = prior.partition(" ")
    if src == cand.source and uri:
        return uri
    uri = log_model(tracking_uri, cand.run_id, cand.cfg, cand.model_state, step=cand.epoch,
                    tags={SOURCE_TAG: cand.source, "se4lip.epoch": cand.epoch})
    client.set_tag(cand.run_id, LOGGED_TAG, f"{cand.source} {uri}")
    return uri


def publish(tracking_uri: str, cand: Candidate, *, register: str | None, data_dir: str,
            metric: str, mode: str) -> dict[str, Any]:
    """Log, register, gate and alias a trained model (each step at most once per source).

    Args:
        tracking_uri: resolved tracking URI.
        cand: the model and where it came from.
        register: registered model name; None logs the model only.
        data_dir: prepared shards whose validation clips the gate scores.
        metric: the ranking metric (see :data:`validation.METRICS`).
        mode: ``max`` or ``min``.

    Returns:
        ``model_uri`` (the logged model) and, when registering: ``name``, ``version``, ``alias``,
        ``reason``, ``scores``, ``champion`` (version and scores, or None), ``chance``,
        ``protocol``, ``registered_uri``.

    Raises:
        GateError: registration or gating failed (nothing was promoted).
    """
    model_uri = log_once(tracking_uri, cand)
    out: dict[str, Any] = {"model_uri": model_uri}
    if not register:
        return out
    try:
        version = find_version(tracking_uri, register, cand.source)
        if version is None:
            version = register_model(
                tracking_uri, model_uri, register, run_id=cand.run_id,
                tags={SOURCE_TAG: cand.source, "se4lip.preset": cand.cfg.preset,
                      "se4lip.epoch": cand.epoch, "se4lip.epochs": cand.epochs,
                      "se4lip.selected_by": cand.selected_by, **cand.tags},
                description=f"Registered from run {cand.run_id}, epoch {cand.epoch} of "
                            f"{cand.epochs} (best by {cand.selected_by}); not gated yet.")
    except Exception as e:
        raise GateError(f"could not register {register}: {e}; nothing was promoted") from e
    out.update({"name": register, "version": version,
                "registered_uri": f"models:/{register}/{version}"})
    decided = _decided(tracking_uri, register, version)
    if decided is not None:
        out.update(decided)
        return out
    try:
        out.update(gate(tracking_uri, register, version, cand, data_dir, metric, mode))
    except Exception as e:
        _record_failure(tracking_uri, register, version, e)
        raise GateError(
            f"registered {register} v{version} but the quality gate failed: {e}. Nothing was "
            "promoted; run the same command again with --resume to gate that version again "
            "(no new version is registered)") from e
    return out


def _decided(tracking_uri: str, name: str, version: int) -> dict[str, Any] | None:
    """The gate decision a version already carries (a resumed command repeats it)."""
    tags = dict(version_info(tracking_uri, name, version).tags or {})
    if tags.get("gate.decision") not in (CHAMPION, CHALLENGER):
        return None
    scores = {k: float(tags[f"gate.{k}"]) for k in SCORE_KEYS if f"gate.{k}" in tags}
    return {"alias": tags["gate.decision"], "reason": tags.get("gate.reason", ""),
            "scores": scores, "protocol": tags.get("gate.protocol", "")}


def _record_failure(tracking_uri: str, name: str, version: int, error: Exception) -> None:
    try:
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        client.set_model_version_tag(name, str(version), "gate.decision", "error")
        client.set_model_version_tag(name, str(version), "gate.reason", str(error)[:4000])
    except Exception:  # the store itself may be what failed; the raised GateError says it all
        return


def champion_version(tracking_uri: str, name: str) -> int | None:
    """The version ``champion`` points at, None when there is none.

    Raises:
        Any registry error other than "no such model" (the gate must not read it as "none").
    """
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        aliases = client.get_registered_model(name).aliases or {}
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return int(aliases[CHAMPION]) if CHAMPION in aliases else None


def chance_scores(cfg: Config, vset: ValidationSet) -> ValidationResult:
    """Scores of a random-init encoder of ``cfg``'s architecture (seeded) on ``vset``."""
    torch.manual_seed(CHANCE_SEED)
    model = build_model(cfg.model, sample_rate=cfg.data.sample_rate,
                        window_frames=cfg.train.window_frames)
    return score_state(model.state_dict(), cfg, vset)


def gate(tracking_uri: str, name: str, version: int, cand: Candidate, data_dir: str,
         metric: str, mode: str) -> dict[str, Any]:
    """Score the new version, the champion and chance on the same clips; set the alias.

    Returns:
        ``alias``, ``reason``, ``scores``, ``champion``, ``chance``, ``protocol``.
    """
    vset = ValidationSet.load(data_dir, cand.cfg)
    protocol = vset.protocol
    new = score_state(cand.model_state, cand.cfg, vset)
    chance = chance_scores(cand.cfg, vset)
    floor = max(chance.metrics["val/offset_acc"], new.metrics["val/offset_chance"])
    champ_v = champion_version(tracking_uri, name)
    champ: ValidationResult | None = None
    caveat = ""
    if champ_v is not None and champ_v != version:
        state, champ_cfg = load_model_state(f"models:/{name}/{champ_v}", tracking_uri)
        champ = score_state(state, champ_cfg, vset)  # the same clips, shifts and pairs
        champ_data = (version_info(tracking_uri, name, champ_v).tags or {}).get(
            "se4lip.data_manifest_hash")
        if champ_data and champ_data != protocol.data_hash:
            caveat = (f" ({CHAMPION} v{champ_v} was trained on other data, {champ_data}: some "
                      "of these validation clips may be in its training set)")
    m = new.metrics
    direction = "higher" if mode == "max" else "lower"
    if not (m["val/offset_acc_ci_low"] > floor):
        alias = CHALLENGER
        reason = (f"at chance level: the 95 % lower bound of val/offset_acc "
                  f"{_f(m['val/offset_acc_ci_low'])} does not exceed chance "
                  f"{_f(floor)} (random-init encoder {_f(chance.metrics['val/offset_acc'])},"
                  f" uniform {_f(m['val/offset_chance'])})")
        if champ_v is not None:
            reason += f"; {CHAMPION} stays at v{champ_v}"
    elif champ is None:
        alias = CHAMPION
        reason = (f"no {CHAMPION} yet and above chance ({_f(floor)}): "
                  f"{_score_line(m)}")
    elif is_better(m, champ.metrics, metric, mode):
        alias = CHAMPION
        tie = m[metric] == champ.metrics[metric]
        why = (f"tied on {metric} ({_f(m[metric])}), lower val/loss" if tie else
               f"{metric} {_f(m[metric])} vs {_f(champ.metrics[metric])} ({direction} is "
               "better)")
        reason = f"beats {CHAMPION} v{champ_v} on the same clips: {why}; promoted{caveat}"
    else:
        alias = CHALLENGER
        reason = (f"not better than {CHAMPION} v{champ_v} on the same clips: {metric} "
                  f"{_f(m[metric])} vs {_f(champ.metrics[metric])} ({direction} is better);"
                  f" {CHAMPION} stays at v{champ_v}{caveat}")

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    tags: dict[str, str] = {
        "gate.decision": alias, "gate.reason": reason, "gate.metric": f"{metric} ({mode})",
        "gate.protocol": protocol.digest, "gate.protocol_text": protocol.describe(),
        "gate.data": redact_uri(data_dir), "gate.chance.val/offset_acc": _f(floor),
        "se4lip.data_manifest_hash": protocol.data_hash,
    }
    tags.update({f"gate.{k}": _f(m[k]) for k in SCORE_KEYS})
    if champ is not None:
        tags["gate.champion_version"] = str(champ_v)
        tags.update({f"gate.champion.{k}": _f(champ.metrics[k]) for k in SCORE_KEYS})
    for k, v in tags.items():
        client.set_model_version_tag(name, str(version), k, v)
    lines = [f"**{alias}**: {reason}.", "",
             f"- this version: {_score_line(m)}"]
    if champ is not None:
        lines.append(f"- {CHAMPION} v{champ_v} on the same clips: {_score_line(champ.metrics)}")
    lines += [f"- chance: {_f(floor)} (random-init encoder and uniform offset guess)",
              f"- protocol {protocol.digest}: {protocol.describe()}",
              f"- trained by run {cand.run_id}, epoch {cand.epoch} of {cand.epochs} "
              f"(selected by {cand.selected_by})"]
    client.update_model_version(name, str(version), description="\n".join(lines))
    if alias == CHAMPION:
        client.set_registered_model_alias(name, CHAMPION, str(version))
    else:
        client.set_registered_model_alias(name, CHALLENGER, str(version))
    return {"alias": alias, "reason": reason, "scores": {k: m[k] for k in SCORE_KEYS},
            "champion": ({"version": champ_v, "scores": {k: champ.metrics[k]
                                                         for k in SCORE_KEYS}}
                         if champ is not None else None),
            "chance": floor, "protocol": protocol.digest}


def promote(name: str, version: int, alias: str = CHAMPION,
            tracking_uri: str | None = None) -> int | None:
    """Point ``alias`` at ``version`` by hand (no gate); returns the version it pointed at.

    Raises:
        RegistryError: no such model or version.
    """
    uri = resolve_tracking_uri(tracking_uri)
    existing_store(uri)
    version_info(uri, name, version)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    previous = client.get_registered_model(name).aliases.get(alias)
    client.set_registered_model_alias(name, alias, str(version))
    client.set_model_version_tag(name, str(version), "gate.decision", f"{alias} (by hand)")
    return int(previous) if previous is not None else None


def compare(name: str, versions: tuple[int, int], *, data_dir: str | None = None,
            tracking_uri: str | None = None) -> dict[str, Any]:
    """Score two versions on the same clips with the gate's protocol, side by side.

    The protocol's settings are the newer version's and the data defaults to the shards its gate
    scored (``gate.data``), so on those the numbers equal the gate's tags.

    Raises:
        RegistryError: unknown version, or no data to score on.
    """
    uri = resolve_tracking_uri(tracking_uri)
    existing_store(uri)
    newer = max(versions)
    newer_tags = dict(version_info(uri, name, newer).tags or {})
    data = data_dir or newer_tags.get("gate.data")
    if not data:
        raise RegistryError(f"{name} v{newer} records no gate data: pass --data SHARDS")
    _, protocol_cfg = load_model_state(f"models:/{name}/{newer}", uri)
    vset = ValidationSet.load(data, protocol_cfg)
    results: dict[int, ValidationResult] = {}
    for v in versions:
        state, cfg = load_model_state(f"models:/{name}/{v}", uri)
        results[v] = score_state(state, cfg, vset)
    rows = []
    for k in SCORE_KEYS:
        rows.append({"metric": k, **{f"v{v}": results[v].metrics[k] for v in versions},
                     "better": METRICS.get(k)})
    return {"name": name, "versions": list(versions), "data": redact_uri(data),
            "protocol": vset.protocol.digest, "protocol_text": vset.protocol.describe(),
            "rows": rows,
            "tags": {v: {k: t for k, t in (version_info(uri, name, v).tags or {}).items()
                         if k.startswith("gate.")} for v in versions}}


__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "SCORE_KEYS",
    "Candidate",
    "GateError",
    "champion_version",
    "chance_scores",
    "compare",
    "format_score",
    "gate",
    "log_once",
    "promote",
    "publish",
]
