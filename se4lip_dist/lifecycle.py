"""The model lifecycle, one path for ``train`` and ``tune``: log -> register -> gate -> alias.

1. **log** the best validated epoch's weights (the caller picks them with
   :func:`validation.is_better` over the run's history) as a model output of the run;
2. **register** it as a version of the registered model, once per source (the run and epoch it
   came from, tag ``se4lip.source``): a resumed command finds the version instead of adding one;
3. **gate** it on its held-out units (clips, or pieces of a subject's held-out tail), by the
   shift-consistent offset accuracy (:data:`validation.HEADLINE`), intervals over units:

   - *enough evidence*: at least ``train.val_min_units`` units, else "too thin";
   - *above every content-blind baseline*: the 95 % lower bound must exceed the best constant
     answer, a random-init encoder of the same architecture and the version itself on clips
     whose audio belongs to another clip (:func:`content_blind_floor`);
   - *significantly better than the champion*: both are scored on the units neither trained on
     (:class:`validation.HeldOut`, from the champion's recorded data and split), and a one-sided
     exact McNemar test on per-unit hits must reach ``train.gate_alpha``. Equal evidence never
     flips the champion;
   - *within the cost budget*, when the candidate carries one (``tune --max-cost``): a version
     whose extraction cost (:mod:`se4lip_dist.cost`) exceeds it is never promoted, and a
     champion above it gives way to any version within it that clears the floor, so
     ``@champion`` is the best encoder within the budget.
4. **alias** it, compare-and-set: under a short registry lock the champion is read again; if
   another gate moved it while this one scored, this one scores against the new champion. The
   alias is written before the ``gate.*`` tags and description (a ``gate.pending`` tag marks the
   write in between), so an interrupted gate never leaves tags that claim an alias it lacks,
   and ``--resume`` completes it.

Any error while gating promotes nothing and raises :class:`GateError`; the version stays
registered without a decision and the same command run again (``--resume``) gates it again.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from se4lip_dist.config import Config
from se4lip_dist.cost import GFLOP, gflop_per_audio_s
from se4lip_dist.manifest import Manifest
from se4lip_dist.models import build_model
from se4lip_dist.registry import (
    LOCK_SUFFIX,
    SOURCE_TAG,
    RegistryError,
    find_version,
    load_model_state,
    log_model,
    register_model,
    version_info,
)
from se4lip_dist.splits import SplitRule
from se4lip_dist.storage import redact_uri
from se4lip_dist.sync import mcnemar_p
from se4lip_dist.tracking import existing_store, none_if_missing, resolve_tracking_uri
from se4lip_dist.validation import (
    HEADLINE,
    METRICS,
    HeldOut,
    ValidationError,
    ValidationResult,
    ValidationSet,
    model_from_state,
    score_shuffled,
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
SCORE_KEYS = ("val/shift_acc", "val/shift_acc_ci_low", "val/shift_acc_ci_high", "val/units",
              "val/offset_acc", "val/offset_acc_ci_low", "val/offset_acc_ci_high",
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
    costs: dict[str, float] = field(default_factory=dict)
    """Measured ``cost/*`` of the run (``cost/gflop_per_audio_s`` is computed when absent)."""
    budget: tuple[str, float] | None = None
    """``(cost metric, limit)`` the version must be within to be promoted."""

    def cost_of(self) -> dict[str, float]:
        """The candidate's ``cost/*``, the architecture's GFLOP always among them."""
        return {GFLOP: gflop_per_audio_s(self.cfg), **self.costs}


def format_score(v: Any) -> str:
    """How scores are written into version tags (and compared with them)."""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}" if abs(v) >= 10 else f"{v:.4f}"
    return str(v)


_f = format_score


def _score_line(m: dict[str, float]) -> str:
    return (f"{HEADLINE} {_f(m[HEADLINE])} [{_f(m[HEADLINE + '_ci_low'])}, "
            f"{_f(m[HEADLINE + '_ci_high'])}] over {int(m['val/units'])} units "
            f"({int(m['val/clips'])} clips); val/offset_acc {_f(m['val/offset_acc'])}, "
            f"val/sync_acc {_f(m['val/sync_acc'])}, val/loss {_f(m['val/loss'])}")


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


def publish(tracking_uri: str, cand: Candidate, *, register: str | None,
            data_dir: str) -> dict[str, Any]:
    """Log, register, gate and alias a trained model (each step at most once per source).

    Args:
        tracking_uri: resolved tracking URI.
        cand: the model and where it came from.
        register: registered model name; None logs the model only.
        data_dir: prepared shards whose validation units the gate scores (the ones the model
            was trained beside).

    Returns:
        ``model_uri`` (the logged model) and, when registering: ``name``, ``version``, ``alias``,
        ``reason``, ``scores``, ``champion`` (version and paired comparison, or None),
        ``floor`` (the content-blind baselines), ``protocol``, ``registered_uri``.

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
                      "se4lip.selected_by": cand.selected_by, DATA_TAG: redact_uri(data_dir),
                      **cand.tags},
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
        out.update(gate(tracking_uri, register, version, cand, data_dir))
    except Exception as e:
        _record_failure(tracking_uri, register, version, e)
        raise GateError(
            f"registered {register} v{version} but the quality gate failed: {e}. Nothing was "
            "promoted; run the same command again with --resume to gate that version again "
            "(no new version is registered)") from e
    return out


DATA_TAG = "se4lip.data"
"""Version tag: the shards the version was trained and gated on (the champion's held-out
frames are read from them when a later gate's data differs)."""
PENDING_TAG = "gate.pending"
"""Set while a gate writes its alias and tags: ``{"alias", "previous"}`` (JSON)."""
LOCK_WAIT_S = 120.0
"""How long a gate waits for another gate on the same name to finish writing its decision."""
LOCK_STALE_S = 600.0
"""A lock older than this was left by a killed gate and is broken."""
CAS_ATTEMPTS = 5
"""Times a gate scores again when other gates keep moving the champion while it scores."""


def _decided(tracking_uri: str, name: str, version: int) -> dict[str, Any] | None:
    """The gate decision a version already carries (a resumed command repeats it).

    Decision tags are written only after the alias, so a version that carries them got its
    alias; one interrupted in between carries ``gate.pending`` instead and is gated again.
    """
    tags = dict(version_info(tracking_uri, name, version).tags or {})
    if tags.get("gate.decision") not in (CHAMPION, CHALLENGER) or PENDING_TAG in tags:
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
    model = none_if_missing(lambda: client.get_registered_model(name))
    aliases = (model.aliases or {}) if model is not None else {}
    return int(aliases[CHAMPION]) if CHAMPION in aliases else None


def chance_scores(cfg: Config, vset: ValidationSet) -> ValidationResult:
    """Scores of a random-init encoder of ``cfg``'s architecture (seeded) on ``vset``."""
    torch.manual_seed(CHANCE_SEED)
    model = build_model(cfg.model, sample_rate=cfg.data.sample_rate,
                        window_frames=cfg.train.window_frames)
    return score_state(model.state_dict(), cfg, vset)


def content_blind_floor(cand: Candidate, vset: ValidationSet,
                        new: ValidationResult) -> dict[str, float]:
    """What scores without sync on ``vset``: the best constant answer, a random-init encoder
    and the candidate with every unit's audio taken from another unit (NaN with one unit).

    Returns:
        The three :data:`validation.HEADLINE` scores and ``floor``, the largest of them.
    """
    shuffled = score_shuffled(model_from_state(cand.model_state, cand.cfg), cand.cfg, vset)
    out = {"constant": new.metrics["val/constant_shift_acc"],
           "random_init": chance_scores(cand.cfg, vset).metrics[HEADLINE],
           "shuffled_audio": shuffled[HEADLINE]}
    out["floor"] = max(v for v in out.values() if math.isfinite(v))
    return out


@dataclass
class Versus:
    """The candidate against the champion on the units held out for both."""

    version: int
    units: int = 0
    new_hits: int = 0
    old_hits: int = 0
    new_only: int = 0
    old_only: int = 0
    p_value: float = 1.0
    scores: dict[str, float] = field(default_factory=dict)
    """The champion's scores on those units."""
    note: str = ""
    """Which units those are, when not all of the candidate's."""
    refused: str = ""
    """Why no like-for-like comparison was possible (the candidate is not promoted)."""
    costs: dict[str, float] = field(default_factory=dict)
    """The champion's ``cost/*``: its architecture's GFLOP, its gate's recorded RTF."""


def _champion_manifest(tags: dict[str, str], version: int, data_dir: str,
                       data_hash: str) -> Manifest:
    """The shards the champion was trained on (this gate's, when their content is the same).

    Raises:
        ValidationError: they cannot be read, or changed since.
    """
    champ_hash = tags.get("se4lip.data_manifest_hash", "")
    if champ_hash == data_hash:
        return Manifest.load(data_dir)
    where = tags.get(DATA_TAG) or tags.get("gate.data")
    if not where:
        raise ValidationError(f"{CHAMPION} v{version} records no training data")
    try:
        manifest = Manifest.load(where)
    except Exception as e:
        raise ValidationError(f"{CHAMPION} v{version}'s data {where} cannot be read ({e})") from e
    if champ_hash and manifest.content_hash() != champ_hash:
        raise ValidationError(f"{CHAMPION} v{version}'s data {where} changed since it trained "
                              f"({manifest.content_hash()}, recorded {champ_hash})")
    return manifest


def versus_champion(tracking_uri: str, name: str, champ_v: int, cand: Candidate, data_dir: str,
                    vset: ValidationSet, new: ValidationResult) -> Versus:
    """Score the champion like for like and compare per-unit hits with a paired exact test."""
    state, champ_cfg = load_model_state(f"models:/{name}/{champ_v}", tracking_uri)
    tags = dict(version_info(tracking_uri, name, champ_v).tags or {})
    out = Versus(version=champ_v, costs={**{
        k.removeprefix("gate."): float(v) for k, v in tags.items()
        if k.startswith("gate.cost/")}, GFLOP: gflop_per_audio_s(champ_cfg)})
    champ_rule = "unknown"
    try:
        manifest = _champion_manifest(tags, champ_v, data_dir, vset.protocol.data_hash)
        champ_rule = SplitRule.for_manifest(manifest, champ_cfg).describe()
        held = HeldOut.of(f"{CHAMPION} v{champ_v}", manifest, champ_cfg)
        both = ValidationSet.load(data_dir, cand.cfg, held_out=held)
    except ValidationError as e:
        out.refused = (f"no like-for-like comparison with {CHAMPION} v{champ_v}: {e} (its split: "
                       f"{champ_rule}; this version's: {vset.protocol.split}). Compare on data "
                       f"neither trained on with `se4lip-dist models compare {name} {champ_v} "
                       f"VERSION --data SHARDS`, and promote by hand if it is better")
        return out
    if _unit_frames(both) != _unit_frames(vset):
        new = score_state(cand.model_state, cand.cfg, both)
        out.note = (f"{len(new.clips)} of the units held out for both ({CHAMPION} v{champ_v} "
                    f"trained on the rest of this version's validation frames)")
    old = score_state(state, champ_cfg, both)
    hits_new = {c.clip_id: c.consistent for c in new.clips}
    hits_old = {c.clip_id: c.consistent for c in old.clips}
    units = sorted(set(hits_new) & set(hits_old))
    out.units = len(units)
    out.new_hits = sum(hits_new[u] for u in units)
    out.old_hits = sum(hits_old[u] for u in units)
    out.new_only = sum(hits_new[u] and not hits_old[u] for u in units)
    out.old_only = sum(hits_old[u] and not hits_new[u] for u in units)
    out.p_value = mcnemar_p(out.new_only, out.old_only)
    out.scores = {k: old.metrics[k] for k in SCORE_KEYS}
    if out.units < cand.cfg.train.val_min_units:
        out.refused = (f"only {out.units} units are held out for both this version and "
                       f"{CHAMPION} v{champ_v} (the gate needs {cand.cfg.train.val_min_units}): "
                       "too thin to compare")
    return out


def _unit_frames(vset: ValidationSet) -> list[tuple[str, int, int]]:
    return [(c, int(r["start_frame"]), int(r["n_frames"]))
            for c, rows in sorted(vset.clip_rows.items()) for r in rows]


def over_budget(budget: tuple[str, float] | None, costs: dict[str, float]) -> str:
    """Why ``costs`` exceed ``budget`` (``""`` when within it or without one); a cost that
    was never measured is over (nothing shows it within)."""
    if budget is None:
        return ""
    metric, limit = budget
    value = costs.get(metric)
    if value is None:
        return f"{metric} was not measured, so nothing shows it within the budget {limit:g}"
    return "" if value <= limit else f"{metric} {_f(value)} exceeds the budget {limit:g}"


def decide(m: dict[str, float], floor: dict[str, float], min_units: int, alpha: float,
           versus: Versus | None, budget: tuple[str, float] | None = None,
           costs: dict[str, float] | None = None) -> tuple[str, str]:
    """The alias and its reason, from the candidate's scores, its floor, the comparison and
    (with a budget) the candidate's and the champion's extraction costs."""
    lo, units = m[f"{HEADLINE}_ci_low"], int(m["val/units"])
    blind = (f"constant answer {_f(floor['constant'])}, random-init encoder "
             f"{_f(floor['random_init'])}, shuffled audio {_f(floor['shuffled_audio'])}")
    stays = f"; {CHAMPION} stays at v{versus.version}" if versus is not None else ""
    if over := over_budget(budget, costs or {}):
        return CHALLENGER, f"over the cost budget: {over}{stays}"
    if units < min_units:
        return CHALLENGER, (f"evidence too thin: {units} held-out units (the gate needs "
                            f"{min_units}; hold out more, or shorter val_chunk_frames pieces): "
                            f"{_score_line(m)}{stays}")
    if not lo > floor["floor"]:
        return CHALLENGER, (f"not above the content-blind floor: the 95 % lower bound of "
                            f"{HEADLINE} {_f(lo)} does not exceed {_f(floor['floor'])} "
                            f"({blind}){stays}")
    if versus is None:
        return CHAMPION, (f"no {CHAMPION} yet; above the content-blind floor "
                          f"{_f(floor['floor'])} ({blind}): {_score_line(m)}")
    if budget is not None and (champ_over := over_budget(budget, versus.costs)):
        # The champion is outside the budget: the best encoder within it takes its place.
        return CHAMPION, (f"{CHAMPION} v{versus.version} is over the cost budget ({champ_over})"
                          f"; this version is within it and above the content-blind floor "
                          f"{_f(floor['floor'])} ({blind}): {_score_line(m)}")
    if versus.refused:
        return CHALLENGER, f"{versus.refused}{stays}"
    paired = (f"{versus.new_hits} vs {versus.old_hits} of the same {versus.units} units "
              f"shift-consistent, {versus.new_only} won and {versus.old_only} lost, one-sided "
              f"exact McNemar p = {versus.p_value:.3g}")
    where = f" ({versus.note})" if versus.note else ""
    if versus.p_value < alpha:
        return CHAMPION, (f"significantly better than {CHAMPION} v{versus.version} "
                          f"(alpha {alpha:g}): {paired}{where}; promoted")
    return CHALLENGER, (f"not significantly better than {CHAMPION} v{versus.version} "
                        f"(alpha {alpha:g}): {paired}{where}{stays}")


@contextmanager
def gate_lock(client: MlflowClient, name: str) -> Iterator[None]:
    """Hold the registry lock of ``name`` (an empty registered model ``NAME.gate-lock``:
    creating one is atomic on every MLflow store). Held for the alias and tag writes only.

    A lock whose holder died (its process is gone from this host, or it is older than
    :data:`LOCK_STALE_S`) is broken.

    Raises:
        GateError: another gate held it for :data:`LOCK_WAIT_S`.
    """
    lock = f"{name}{LOCK_SUFFIX}"
    host, pid = socket.gethostname(), os.getpid()
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            client.create_registered_model(
                lock, tags={"holder.host": host, "holder.pid": str(pid)},
                description=f"se4lip gate lock for {name}, held by pid {pid} on {host}; "
                            "deleted when that gate ends")
            break
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        try:
            held = client.get_registered_model(lock)
        except MlflowException:
            continue  # released meanwhile
        if _holder_gone(held, host):
            _delete_lock(client, lock)
            continue
        if time.monotonic() > deadline:
            raise GateError(f"another gate on {name} held {lock} for {LOCK_WAIT_S:.0f} s; if "
                            f"no gate runs, delete that registered model and rerun with --resume")
        time.sleep(0.5)
    try:
        yield
    finally:
        _delete_lock(client, lock)


def _holder_gone(lock: Any, host: str) -> bool:
    """Whether a lock's holder is dead: gone from this host, or silent for too long."""
    if time.time() - lock.creation_timestamp / 1000 > LOCK_STALE_S:
        return True
    tags = lock.tags or {}
    if tags.get("holder.host") != host or not tags.get("holder.pid", "").isdigit():
        return False
    try:
        os.kill(int(tags["holder.pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _delete_lock(client: MlflowClient, lock: str) -> None:
    none_if_missing(lambda: client.delete_registered_model(lock))


def _previous_champion(client: MlflowClient, name: str, version: int,
                       current: int | None) -> int | None:
    """The champion this gate competes with: the current one, or, when an interrupted gate of
    this version already moved the alias here, the one it replaced (``gate.pending``)."""
    if current != version:
        return current
    tags = client.get_model_version(name, str(version)).tags or {}
    pending = json.loads(tags.get(PENDING_TAG, "{}"))
    return pending.get("previous")


def gate(tracking_uri: str, name: str, version: int, cand: Candidate,
         data_dir: str) -> dict[str, Any]:
    """Score the new version, its content-blind floor and the champion; set the alias.

    Returns:
        ``alias``, ``reason``, ``scores``, ``champion``, ``floor``, ``protocol``.

    Raises:
        GateError: the champion kept moving for :data:`CAS_ATTEMPTS` rounds.
    """
    tc = cand.cfg.train
    vset = ValidationSet.load(data_dir, cand.cfg)
    new = score_state(cand.model_state, cand.cfg, vset)
    floor = content_blind_floor(cand, vset, new)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    for _ in range(CAS_ATTEMPTS):
        seen = champion_version(tracking_uri, name)
        prior = _previous_champion(client, name, version, seen)
        versus = (versus_champion(tracking_uri, name, prior, cand, data_dir, vset, new)
                  if prior is not None else None)
        alias, reason = decide(new.metrics, floor, tc.val_min_units, tc.gate_alpha, versus,
                               cand.budget, cand.cost_of())
        with gate_lock(client, name):
            if champion_version(tracking_uri, name) != seen:
                continue  # another gate promoted meanwhile: compete with the new champion
            _write_decision(tracking_uri, name, version, alias, prior, _tags(
                alias, reason, new, floor, versus, data_dir, vset, cand),
                _description(alias, reason, new, floor, versus, vset, cand))
        return {"alias": alias, "reason": reason,
                "scores": {k: new.metrics[k] for k in SCORE_KEYS},
                "champion": (None if versus is None else
                             {"version": versus.version, "scores": versus.scores,
                              "p_value": versus.p_value, "units": versus.units}),
                "floor": floor, "protocol": vset.protocol.digest}
    raise GateError(f"{CHAMPION} of {name} changed {CAS_ATTEMPTS} times while this gate scored")


def _write_decision(tracking_uri: str, name: str, version: int, alias: str,
                    prior: int | None, tags: dict[str, str], description: str) -> None:
    """Alias first, then the decision tags and description (see the module docstring)."""
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    v = str(version)
    client.set_model_version_tag(name, v, PENDING_TAG,
                                 json.dumps({"alias": alias, "previous": prior}))
    if alias == CHAMPION:
        client.set_registered_model_alias(name, CHAMPION, v)
    else:
        if champion_version(tracking_uri, name) == version:
            # A resumed gate reversing the half-written promotion of an interrupted one.
            if prior is not None:
                client.set_registered_model_alias(name, CHAMPION, str(prior))
            else:
                client.delete_registered_model_alias(name, CHAMPION)
        client.set_registered_model_alias(name, CHALLENGER, v)
    for k, value in tags.items():
        client.set_model_version_tag(name, v, k, value)
    client.update_model_version(name, v, description=description)
    client.set_model_version_tag(name, v, "gate.decision", alias)
    client.delete_model_version_tag(name, v, PENDING_TAG)


def _tags(alias: str, reason: str, new: ValidationResult, floor: dict[str, float],
          versus: Versus | None, data_dir: str, vset: ValidationSet,
          cand: Candidate) -> dict[str, str]:
    m, protocol = new.metrics, vset.protocol
    tags: dict[str, str] = {
        **{f"gate.{k}": _f(v) for k, v in cand.cost_of().items()},
        "gate.budget": _budget_text(cand.budget),
        "gate.reason": reason, "gate.metric": f"{HEADLINE} (max), paired exact McNemar",
        "gate.protocol": protocol.digest, "gate.protocol_text": protocol.describe(),
        "gate.data": redact_uri(data_dir), "se4lip.data_manifest_hash": protocol.data_hash,
        **{f"gate.floor.{k}": _f(v) for k, v in floor.items()},
        **{f"gate.{k}": _f(m[k]) for k in SCORE_KEYS},
    }
    if versus is not None:
        tags["gate.champion_version"] = str(versus.version)
        tags.update({f"gate.champion.{k}": _f(v) for k, v in versus.scores.items()})
        if not versus.refused or versus.units:
            tags["gate.champion.p_value"] = f"{versus.p_value:.4g}"
            tags["gate.champion.units"] = str(versus.units)
    return tags


def _description(alias: str, reason: str, new: ValidationResult, floor: dict[str, float],
                 versus: Versus | None, vset: ValidationSet, cand: Candidate) -> str:
    lines = [f"**{alias}**: {reason}.", "", f"- this version: {_score_line(new.metrics)}",
             f"- content-blind floor {_f(floor['floor'])}: constant answer "
             f"{_f(floor['constant'])}, random-init encoder {_f(floor['random_init'])}, this "
             f"version on shuffled audio {_f(floor['shuffled_audio'])}"]
    if versus is not None and versus.scores:
        lines.append(f"- {CHAMPION} v{versus.version} on the same units: "
                     f"{_score_line(versus.scores)}")
    costs = ", ".join(f"{k} {_f(v)}" for k, v in sorted(cand.cost_of().items()))
    budget = ("no cost budget" if cand.budget is None else
              f"cost budget {_budget_text(cand.budget)}: {CHAMPION} is the best encoder "
              "within it")
    lines.append(f"- extraction cost: {costs}; {budget}")
    lines += [f"- protocol {vset.protocol.digest}: {vset.protocol.describe()}",
              f"- trained by run {cand.run_id}, epoch {cand.epoch} of {cand.epochs} "
              f"(selected by {cand.selected_by})"]
    return "\n".join(lines)


def _budget_text(budget: tuple[str, float] | None) -> str:
    return "none" if budget is None else f"{budget[0]} <= {budget[1]:g}"


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
    a, b = (results[v] for v in versions)
    hits_a = {c.clip_id: c.consistent for c in a.clips}
    hits_b = {c.clip_id: c.consistent for c in b.clips}
    units = sorted(set(hits_a) & set(hits_b))
    only = {v: sum(h[u] and not g[u] for u in units)
            for v, h, g in ((versions[0], hits_a, hits_b), (versions[1], hits_b, hits_a))}
    paired = {"units": len(units), "only": {f"v{v}": n for v, n in only.items()},
              "p_value": {f"v{v} better": mcnemar_p(n, only[w])
                          for (v, n), w in zip(only.items(), reversed(versions), strict=True)}}
    return {"name": name, "versions": list(versions), "data": redact_uri(data),
            "protocol": vset.protocol.digest, "protocol_text": vset.protocol.describe(),
            "rows": rows, "paired": paired,
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
    "over_budget",
    "promote",
    "publish",
]
