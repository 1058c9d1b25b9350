"""Status output for people (aligned tables) and machines (--json)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "(none)"
    cols = list(columns or rows[0].keys())
    cells = [[_cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip()]
    for row in cells:
        lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list | tuple):
        return ",".join(_cell(v) for v in value)
    return str(value)


def render(doc: Any, *, as_json: bool) -> str:
    """A status document: {"name": ..., "fields": {...}, "tables": {"title": [rows]}}, or any
    JSON-able value (printed as key: value lines)."""
    if as_json:
        return json.dumps(doc, indent=2, sort_keys=True, default=str)
    if not isinstance(doc, Mapping):
        return str(doc)
    out: list[str] = []
    for key, value in doc.items():
        if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            out.append(f"{key}:")
            out.extend("  " + line for line in table(value).splitlines())
        elif isinstance(value, Mapping):
            out.append(f"{key}:")
            out.extend(f"  {k}: {_cell(v)}" for k, v in value.items())
        else:
            out.append(f"{key}: {_cell(value)}")
    return "\n".join(out)
