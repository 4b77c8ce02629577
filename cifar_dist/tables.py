"""The one plain-text table renderer: the model summary, the search's results and every bench script."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def cell(value: Any) -> str:
    """None -> blank, floats to 4 significant digits, anything else as str()."""
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def text_table(rows: Iterable[dict[str, Any]], columns: list[str], right: Iterable[str] = ()) -> str:
    """Header, a rule, one line per row; columns as wide as their widest cell, `right` ones right-aligned."""
    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    right = set(right)

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if c in right else v.ljust(w) for c, v, w in zip(columns, values, widths)).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(r) for r in cells)])
