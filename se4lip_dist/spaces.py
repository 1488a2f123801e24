"""Search spaces: YAML files in ``tune/`` over dotted config keys, validated before Ray starts.

A space names a base preset, the metric to optimise and ``params``: each dotted key maps to
``{choice: [...]}``, ``{grid: [...]}``, ``{uniform: [lo, hi]}``, ``{loguniform: [lo, hi]}``,
``{randint: [lo, hi]}`` or a fixed value. Every candidate value is checked against the config
dataclasses here, so a typo fails in a second instead of inside trial 7.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from ray import tune

from se4lip_dist.config import Config, ConfigError, list_presets, load_config
from se4lip_dist.validation import HEADLINE, METRICS, ValidationError, metric_name

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
SCHEDULERS = ("asha", "fifo", "pbt")


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space."""

    path: str
    preset: str
    metric: str
    mode: str
    num_samples: int
    scheduler: str
    params: dict[str, Any]
    description: str = ""
    fixed: dict[str, Any] = field(default_factory=dict)

    def param_space(self) -> dict[str, Any]:
        """The Ray Tune ``param_space`` (flat dotted keys -> tune domains)."""
        out: dict[str, Any] = {}
        for key, spec in self.params.items():
            (kind, arg), = spec.items()
            if kind == "grid":
                out[key] = tune.grid_search(list(arg))
            elif kind == "choice":
                out[key] = tune.choice(list(arg))
            elif kind == "uniform":
                out[key] = tune.uniform(*arg)
            elif kind == "loguniform":
                out[key] = tune.loguniform(*arg)
            else:
                out[key] = tune.randint(arg[0], arg[1] + 1)  # inclusive upper bound in YAML
        return {**self.fixed, **out}

    def base_config(self, overrides: list[str] | None = None) -> Config:
        """The preset with the space's fixed values and user overrides applied."""
        cfg = load_config(self.preset, overrides=overrides)
        return cfg.override(self.fixed) if self.fixed else cfg


def load_space(path: str | Path, preset: str | None = None) -> SearchSpace:
    """Read and validate a search-space YAML (against ``preset`` instead of its own if given).

    Raises:
        ConfigError: naming the file and the offending key or value.
    """
    p = Path(path)
    try:
        d = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{p}: cannot read search space: {e}") from e
    if not isinstance(d, dict):
        raise ConfigError(f"{p}: a search space must be a mapping")
    unknown = set(d) - {"description", "preset", "metric", "mode", "num_samples", "scheduler",
                        "params"}
    if unknown:
        raise ConfigError(f"{p}: unknown top-level key(s) {sorted(unknown)}")
    preset = preset or d.get("preset", "cpu-small")
    if preset not in list_presets():
        raise ConfigError(f"{p}: unknown preset {preset!r}; choose one of {list_presets()}")
    try:
        metric = metric_name(d.get("metric", HEADLINE))
    except ValidationError as e:
        raise ConfigError(f"{p}: {e}") from e
    mode = d.get("mode", METRICS[metric])
    if mode not in ("max", "min"):
        raise ConfigError(f"{p}: mode must be max|min, got {mode!r}")
    scheduler = d.get("scheduler", "asha")
    if scheduler not in SCHEDULERS:
        raise ConfigError(f"{p}: scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
    num_samples = d.get("num_samples", 1)
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ConfigError(f"{p}: num_samples must be a positive integer")
    raw = d.get("params")
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{p}: 'params' must map dotted config keys to distributions")

    base = load_config(preset)
    params: dict[str, Any] = {}
    fixed: dict[str, Any] = {}
    for key, spec in raw.items():
        where = f"{p}: params.{key}"
        if isinstance(spec, dict):
            if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
                raise ConfigError(f"{where}: use exactly one of {DISTRIBUTIONS}, got {spec}")
            (kind, arg), = spec.items()
            candidates = _candidates(kind, arg, where)
            params[key] = {kind: arg}
        else:
            candidates = [spec]
            fixed[key] = spec
        for value in candidates:
            try:
                base.override({key: value})
            except ConfigError as e:
                raise ConfigError(f"{where}: value {value!r} is invalid: {e}") from e
    return SearchSpace(
        path=str(p), preset=preset, metric=metric, mode=mode, num_samples=num_samples,
        scheduler=scheduler, params=params, description=str(d.get("description", "")),
        fixed=fixed,
    )


def _candidates(kind: str, arg: Any, where: str) -> list[Any]:
    """Values to validate: every listed value, or the ends of a range."""
    if kind in ("choice", "grid"):
        if not isinstance(arg, list) or not arg:
            raise ConfigError(f"{where}: {kind} needs a non-empty list")
        return list(arg)
    if not isinstance(arg, list) or len(arg) != 2:
        raise ConfigError(f"{where}: {kind} needs [low, high]")
    lo, hi = arg
    if not all(isinstance(v, int | float) for v in arg) or lo >= hi:
        raise ConfigError(f"{where}: {kind} needs numbers with low < high, got {arg}")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"{where}: loguniform needs low > 0")
    if kind == "randint" and not all(isinstance(v, int) for v in arg):
        raise ConfigError(f"{where}: randint needs integers")
    return [lo, hi]
