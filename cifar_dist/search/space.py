"""The search-space language of `tune/space.yaml`: each key a `Config` setting (any train.py flag, with
underscores) or one of three architecture keys; each value fixed or `{choice|grid|uniform|loguniform|
randint: [...]}`. Checked in full before Ray starts anything, then turned into Ray Tune's domains.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from cifar_dist.config import MODEL_FIELDS, TOP_FIELDS, Config, ConfigError, load_yaml, resolve

ARCH_KEYS = ("stages", "blocks_per_stage", "base_width")
KINDS = ("choice", "grid", "uniform", "loguniform", "randint")


class SearchError(ValueError):
    """Bad input to the search; one line that names the problem."""


def load_space(path: Path) -> dict[str, Any]:
    try:
        return load_yaml(path)
    except ConfigError as e:
        raise SearchError(f"search space: {e}") from None


def candidates(key: str, spec: Any) -> list[Any]:
    """The values a spec can take that are worth checking (all choices, or the bounds)."""
    if not isinstance(spec, dict):
        return [spec]
    if len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise SearchError(f"search space: {key} must be a value or one of {{{', '.join(KINDS)}: ...}}, got {spec}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise SearchError(f"search space: {key} {kind} is empty")
    if kind in ("uniform", "loguniform", "randint"):
        if len(values) != 2 or not all(isinstance(v, (int, float)) for v in values):
            raise SearchError(f"search space: {key} {kind} needs [low, high], got {values}")
        lo, hi = values
        if not lo < hi:
            raise SearchError(f"search space: {key} {kind} bounds are reversed or equal: [{lo}, {hi}]")
        if kind == "loguniform" and lo <= 0:
            raise SearchError(f"search space: {key} loguniform needs positive bounds, got [{lo}, {hi}]")
        if kind != "randint" and integer(key):
            raise SearchError(f"search space: {key} takes whole numbers; use randint (high end excluded), not {kind}")
        return [lo, hi - 1] if kind == "randint" else [lo, hi]
    return values


def integer(key: str) -> bool:
    """Whether a setting takes whole numbers (a uniform sample would fail inside the trial)."""
    return key in ARCH_KEYS or (TOP_FIELDS.get(key) or MODEL_FIELDS.get(key) or (None,))[0] is int


def overrides(params: dict[str, Any]) -> dict[str, Any]:
    """Sampled parameters -> Config overrides (the three architecture keys build widths/blocks/strides)."""
    out = {k: v for k, v in params.items() if k not in ARCH_KEYS}
    if any(k in params for k in ARCH_KEYS):
        try:
            stages, blocks, width = (int(params.get("stages", 3)), int(params.get("blocks_per_stage", 1)),
                                     int(params.get("base_width", 32)))
        except (TypeError, ValueError):
            raise SearchError(f"search space: stages, blocks_per_stage and base_width must be integers, "
                              f"got {params}") from None
        for name, value in (("stages", stages), ("blocks_per_stage", blocks), ("base_width", width)):
            if value <= 0:
                raise SearchError(f"search space: {name} must be positive, got {value}")
        out.update(stem_width=width, widths=[width * 2**i for i in range(stages)], blocks=[blocks] * stages,
                   strides=[1] + [2] * (stages - 1))
    return out


def check_space(space: dict[str, Any], base: dict[str, Any]) -> None:
    """Every key known and every candidate value a valid Config, before Ray starts anything."""
    for key in space:
        if key not in ARCH_KEYS and key not in TOP_FIELDS and key not in MODEL_FIELDS:
            raise SearchError(f"search space: unknown setting {key!r}")
    explicit = sorted({"stem_width", "widths", "blocks", "strides"} & space.keys())
    if explicit and any(k in space for k in ARCH_KEYS):
        raise SearchError(f"search space: {', '.join(explicit)} conflict with {', '.join(ARCH_KEYS)}; use one form")
    firsts = {key: candidates(key, spec)[0] for key, spec in space.items()}
    for key, spec in space.items():  # each value of each key, with the first value of every other key
        for value in candidates(key, spec):
            try:
                resolve([], {**base, **overrides({**firsts, key: value})})
            except ConfigError as e:
                raise SearchError(f"search space: {key}={value!r}: {e}") from None


def to_tune(space: dict[str, Any]) -> dict[str, Any]:
    from ray import tune

    made = {}
    for key, spec in space.items():
        if not isinstance(spec, dict):
            made[key] = spec
            continue
        kind, values = next(iter(spec.items()))
        if kind in ("choice", "grid"):
            made[key] = tune.choice(values) if kind == "choice" else tune.grid_search(values)
        else:
            made[key] = getattr(tune, kind)(*values)
    return made


def trial_config(params: dict[str, Any], base: dict[str, Any], trial_dir: Path | None = None) -> Config:
    """A trial's Config: the search's shared settings, then the sampled parameters."""
    extra = {"output_dir": str(trial_dir)} if trial_dir else {}
    return resolve([], {**base, **overrides(params), **extra})
