"""Fits the progress fields into a terminal's width: one line when it fits, else two, dropping by priority.

Pure text arithmetic, no terminal: the live display and its tests both call `fit`. Every field has a
priority; a line that is too wide loses its lowest-priority field first, so done/total and the ETA are
the last to go. The bar is elastic: it takes what the other fields leave, and is dropped below `MIN_BAR`.
"""

from __future__ import annotations

from dataclasses import dataclass

SEP = "  "
MIN_BAR = 10
MAX_BAR = 40
BAR = "\0bar"  # the text of the elastic bar field; `fit` returns its width, the renderer draws it


@dataclass(frozen=True)
class Field:
    text: str
    priority: int  # higher survives longer
    style: str = ""


@dataclass(frozen=True)
class Line:
    fields: list[Field]
    bar_width: int  # 0: no bar on this line

    def plain(self, fraction: float = 0.0) -> str:
        """The line as text, the bar drawn with `#` and `-` (for logs and tests)."""
        filled = round(self.bar_width * min(1.0, max(0.0, fraction)))
        bar = "#" * filled + "-" * (self.bar_width - filled)
        return SEP.join(bar if f.text == BAR else f.text for f in self.fields)


def _width(fields: list[Field], bar: int) -> int:
    return sum(bar if f.text == BAR else len(f.text) for f in fields) + len(SEP) * max(0, len(fields) - 1)


def _fit_line(fields: list[Field], width: int) -> Line:
    """Drop the lowest-priority fields until the line fits (the bar at its minimum), then grow the bar."""
    kept = list(fields)
    while kept and _width(kept, MIN_BAR) > width:
        kept.remove(min(kept, key=lambda f: f.priority))
    if not any(f.text == BAR for f in kept):
        return Line(kept, 0)
    if len(kept) == 1:  # a bar alone says nothing
        return Line([], 0)
    return Line(kept, min(MAX_BAR, MIN_BAR + width - _width(kept, MIN_BAR)))


def fit(head: list[Field], stats: list[Field], width: int) -> list[Line]:
    """One line if everything fits with a full bar, else head and stats on a line each."""
    one = head + stats
    if _width(one, MAX_BAR if any(f.text == BAR for f in one) else 0) <= width:
        return [_fit_line(one, width)]
    lines = [_fit_line(head, width)]
    if stats:
        lines.append(_fit_line(stats, width))
    return [line for line in lines if line.fields]
