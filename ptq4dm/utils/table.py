"""Plain tables for the terminal and for README/markdown files."""

from __future__ import annotations

from typing import Any, Sequence


def _fmt(value: Any, digits: int) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 10 ** -digits or value == 0 else f"{value:.2e}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, digits: int = 3) -> str:
    """A GitHub-markdown table; missing values print as ``n/a`` (never as a number)."""
    columns = list(columns or dict.fromkeys(k for row in rows for k in row))
    cells = [[_fmt(row.get(c), digits) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(columns), "| " + " | ".join("-" * w for w in widths) + " |", *map(line, cells)])
