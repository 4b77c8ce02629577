"""The search-space language of `tune/space.yaml`: each key a `Config` setting (any train.py flag, with
underscores) or one of three architecture keys; each value fixed or `{choice|grid|uniform|loguniform|
randint: [...]}`. A `mutate:` section names the settings population-based training may change during a
trial, and how (their first values are sampled from the same spec). Checked in full before Ray starts
anything, then turned into Ray Tune's domains.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from cifar_dist.config import MODEL_FIELDS, TOP_FIELDS, Config, ConfigError, load_yaml, resolve
from cifar_dist.settings import with_role

ARCH_KEYS = ("stages", "blocks_per_stage", "base_width")
KINDS = ("choice", "grid", "uniform", "loguniform", "randint")
RANGES = ("uniform", "loguniform", "randint")
MUTATE = "mutate"  # the space file's section of settings a PBT trial may change as it trains


class SearchError(ValueError):
    """Bad input to the search; one line that names the problem."""


def load_space(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The sampled settings and the `mutate:` section. A mutated setting takes its first value from its
    own entry when it has one, else from the mutate spec."""
    try:
        raw = load_yaml(path)
    except ConfigError as e:
        raise SearchError(f"search space: {e}") from None
    mutations = raw.pop(MUTATE, None) or {}
    if not isinstance(mutations, dict):
        raise SearchError(f"search space: {MUTATE}: must map settings to specs, got {mutations!r}")
    return raw, mutations


ARCHITECTURE = "an architecture setting: a copied checkpoint must fit the model"  # why it never mutates
NAMED_SETS = {"preset": ARCHITECTURE,
              "recipe": "it defines the run (a recipe sets the optimizer and batch size)"}  # tables of settings


def mutable(base: dict[str, Any]) -> list[str]:
    """The settings a trial may change mid-run: those of role "result" (a resumed run takes a new value
    from the step it resumes), less what the search fixes for every trial (budget, evaluation) and the
    names of whole sets of settings (a preset or recipe would change the model or the optimizer)."""
    return [k for k in with_role(Config, "result") if k not in base and k not in NAMED_SETS]


def check_mutations(mutations: dict[str, Any], base: dict[str, Any], scheduler: str) -> None:
    """Every mutated setting may change during a run and has a spec the scheduler can perturb."""
    allowed = mutable(base)
    for key, spec in mutations.items():
        if key not in allowed:
            raise SearchError(f"search space: {MUTATE}: {key} cannot change during a trial ({why_fixed(key, base)}); "
                              f"settings that can: {', '.join(allowed)}")
        kinds = RANGES if scheduler == "pb2" else ("choice", *RANGES)
        if not isinstance(spec, dict) or next(iter(spec), None) not in kinds:
            raise SearchError(f"search space: {MUTATE}: {key} needs one of {{{', '.join(kinds)}: ...}} "
                              f"(--scheduler {scheduler}), got {spec!r}")


def why_fixed(key: str, base: dict[str, Any]) -> str:
    if key in NAMED_SETS:
        return NAMED_SETS[key]
    if key in ARCH_KEYS or key in MODEL_FIELDS:
        return ARCHITECTURE
    if key not in TOP_FIELDS:
        return "unknown setting"
    role = TOP_FIELDS[key][1]["role"]
    if role == "identity":
        return "it defines the run: a copied checkpoint would not fit it"
    return "the search sets it for every trial" if key in base else "it does not change the result"


def merged(space: dict[str, Any], mutations: dict[str, Any]) -> dict[str, Any]:
    """What Tune samples a trial's first settings from: a mutated setting's own entry, else its mutate spec."""
    return {**mutations, **space}


def candidates(key: str, spec: Any) -> list[Any]:
    """The values a spec can take that are worth checking (all choices, or the bounds)."""
    if not isinstance(spec, dict):
        return [spec]
    if len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise SearchError(f"search space: {key} must be a value or one of {{{', '.join(KINDS)}: ...}}, got {spec}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise SearchError(f"search space: {key} {kind} is empty")
    if kind in RANGES:
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
            if key == "preset" and value == "auto":
                raise SearchError("search space: preset='auto' is train.py's choice for a time budget; a search "
                                  "compares the presets it lists itself")
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


def mutations_for(scheduler: str, mutations: dict[str, Any]) -> dict[str, Any]:
    """The mutate section as PBT takes it (a choice shifts to a neighbouring value, a range is multiplied
    by 0.8 or 1.2 or resampled), or as PB2's bounds."""
    from ray import tune

    made: dict[str, Any] = {}
    for key, spec in mutations.items():
        kind, values = next(iter(spec.items()))
        if scheduler == "pb2":
            made[key] = list(values)
        else:
            made[key] = list(values) if kind == "choice" else getattr(tune, kind)(*values)
    return made


def clip(config: dict[str, Any], bounds: dict[str, tuple[str, float, float]]) -> dict[str, Any]:
    """PBT's explore step multiplies a range by 0.8 or 1.2, which can leave the range: bring it back (a
    randint's high end is excluded)."""
    for key, (kind, lo, hi) in bounds.items():
        if kind == "randint":
            config[key] = int(min(max(round(config[key]), lo), hi - 1))
        else:
            config[key] = float(min(max(config[key], lo), hi))
    return config


def range_bounds(mutations: dict[str, Any]) -> dict[str, tuple[str, float, float]]:
    return {k: (kind, *values) for k, spec in mutations.items() for kind, values in spec.items() if kind in RANGES}


def population(space: dict[str, Any], num_samples: int) -> int:
    """How many trials a search runs: samples times grid points."""
    points = 1
    for spec in space.values():
        if isinstance(spec, dict) and "grid" in spec:
            points *= len(spec["grid"])
    return num_samples * points


def trial_config(params: dict[str, Any], base: dict[str, Any], trial_dir: Path | None = None) -> Config:
    """A trial's Config: the search's shared settings, then the sampled parameters."""
    extra = {"output_dir": str(trial_dir)} if trial_dir else {}
    return resolve([], {**base, **overrides(params), **extra})
