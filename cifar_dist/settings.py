"""How a setting is declared, once: its default, a one-line help, its allowed values (a `Literal[...]`
type) and its role in what makes a run "the same run". The CLI, the YAML loader, the checks, the
run-directory guard, `bench.accuracy` and the search's retrain all read these declarations.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import field
from typing import Any, Literal

# What changing a setting does to a run (field metadata "role"):
#   identity: it is another run. A run directory holding other values is refused, and a checkpoint
#             written with other values would not fit (the architecture, the data, the seed, ...).
#   result:   the outcome changes, but a run may go on with a new value (resume with a lower --lr).
#   machine:  where the data is and how this machine evaluates it; the outcome does not change.
#   record:   how this one run is named, kept and shown; a run retrained from its config resets these.
Role = Literal["identity", "result", "machine", "record"]


def setting(default: Any, help: str, role: Role = "result", choices: tuple[str, ...] = ()) -> Any:
    """A dataclass field with its documentation. `choices` is for values that live in a table (the
    presets and recipes); every other closed set of values is the field's `Literal` type."""
    meta = {"help": help, "role": role, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def declared(cls: type) -> dict[str, tuple[Any, dict[str, Any]]]:
    """name -> (resolved type, metadata) for every field of a settings dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], dict(f.metadata)) for f in dataclasses.fields(cls)}


def allowed(typ: Any, meta: dict[str, Any]) -> tuple[Any, ...]:
    """The closed set of values a field takes, or () when it takes any value of its type."""
    if typing.get_origin(typ) is Literal:
        return typing.get_args(typ)
    return tuple(meta.get("choices", ()))


def with_role(cls: type, *roles: Role) -> list[str]:
    return [name for name, (_, meta) in declared(cls).items() if meta.get("role") in roles]


def check_choices(obj: Any, error: type[Exception], names: tuple[str, ...] = ()) -> None:
    """Raise `error` naming the first field (of `names`, or of all) whose value is outside its allowed values."""
    for name, (typ, meta) in declared(type(obj)).items():
        if names and name not in names:
            continue
        values = allowed(typ, meta)
        if values and getattr(obj, name) not in values:
            shown = ", ".join(str(v) for v in values if v != "")
            raise error(f"unknown {name} {getattr(obj, name)!r}; choose from {shown}")


def describe(typ: Any, meta: dict[str, Any]) -> str:
    """The help text, with the allowed values appended (so they are never written twice)."""
    values = [str(v) for v in allowed(typ, meta) if v != ""]
    return f"{meta['help']} {{{', '.join(values)}}}" if values else meta["help"]
