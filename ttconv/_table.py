"""One renderer for the text tables of the reports (spectral, conversion, calibration, demo).

Cells are strings formatted by the caller; this module only aligns them, so every report
lays its columns out the same way: a header, a rule, the rows, and optionally a rule and
footer rows (totals). ``markdown=True`` writes a GitHub table instead, aligned too.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

__all__ = ["render_table"]

LEFT, RIGHT = "<", ">"


def _pad(cell: str, width: int, align: str) -> str:
    return cell.ljust(width) if align == LEFT else cell.rjust(width)


def render_table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    align: Optional[str] = None,
    footer: Sequence[Sequence[str]] = (),
    markdown: bool = False,
) -> str:
    """Align ``header``, ``rows`` and ``footer`` (lists of strings) in columns.

    Parameters
    ----------
    header : sequence of str
        Column titles; every row has as many cells.
    rows, footer : sequences of sequences of str
        Body rows; footer rows (e.g. totals) follow a second rule (text only; in Markdown
        they are plain rows).
    align : str, optional
        One character per column, ``'<'`` (left) or ``'>'`` (right); default: the first
        column left, the others right (a name, then numbers).
    markdown : bool
        A GitHub Markdown table (``| a | b |`` with an alignment row) instead of text
        columns separated by two spaces.

    Returns
    -------
    str
        The lines joined with ``\\n``, trailing spaces removed.
    """
    columns = len(header)
    align = align if align is not None else LEFT + RIGHT * (columns - 1)
    body = [list(row) for row in rows] + [list(row) for row in footer]
    if len(align) != columns or any(a not in (LEFT, RIGHT) for a in align):
        raise ValueError(f"align must be one of '<' or '>' per column ({columns}), got {align!r}")
    for row in body:
        if len(row) != columns:
            raise ValueError(f"every row needs {columns} cells like the header {list(header)}, got {row}")
    widths = [max(len(row[i]) for row in [list(header), *body]) for i in range(columns)]
    if markdown:
        widths = [max(3, w) for w in widths]  # room for the '---' of the alignment row

        def line(cells: Sequence[str]) -> str:
            return "| " + " | ".join(_pad(c, w, a) for c, w, a in zip(cells, widths, align)) + " |"

        rule = "|" + "|".join("-" * (w + 1) + ":" if a == RIGHT else "-" * (w + 2) for w, a in zip(widths, align)) + "|"
        return "\n".join([line(header), rule, *(line(row) for row in body)])

    def text_line(cells: Sequence[str]) -> str:
        return "  ".join(_pad(c, w, a) for c, w, a in zip(cells, widths, align)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    lines: List[str] = [text_line(header), rule, *(text_line(row) for row in rows)]
    if footer:
        lines += [rule, *(text_line(row) for row in footer)]
    return "\n".join(lines)
