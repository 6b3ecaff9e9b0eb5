"""``ttconv._table.render_table``, the one renderer of the reports' text and Markdown tables."""

from __future__ import annotations

import random

import pytest

from ttconv._table import render_table


def _random_table(rng):
    columns = rng.randint(1, 5)
    header = [rng.choice(["a", "name", "rel. error", "x" * rng.randint(1, 12)]) for _ in range(columns)]
    rows = [[rng.choice(["", "-", "1.25", "(3, 3)", "layer.0.conv", "y" * rng.randint(0, 15)]) for _ in range(columns)]
            for _ in range(rng.randint(0, 6))]
    align = "".join(rng.choice("<>") for _ in range(columns))
    return header, rows, align


@pytest.mark.parametrize("seed", range(40))
def test_text_columns_line_up_and_every_cell_is_where_its_alignment_says(seed):
    rng = random.Random(seed)
    header, rows, align = _random_table(rng)
    footer = [["total"] + [""] * (len(header) - 1)] if rng.random() < 0.5 else []
    lines = render_table(header, rows, align=align, footer=footer).split("\n")
    widths = [max(len(r[i]) for r in [header, *rows, *footer]) for i in range(len(header))]
    starts = [sum(widths[:i]) + 2 * i for i in range(len(header))]
    rule = "  ".join("-" * w for w in widths)
    expected_rows = [header, None, *rows] + ([None, *footer] if footer else [])
    assert len(lines) == len(expected_rows)
    for line, row in zip(lines, expected_rows):
        assert line == line.rstrip()
        if row is None:
            assert line == rule
            continue
        padded = line.ljust(len(rule))
        for cell, start, width, side in zip(row, starts, widths, align):
            field = padded[start:start + width]
            assert field == (cell.ljust(width) if side == "<" else cell.rjust(width)), (line, cell)
        assert all(padded[start - 2:start] == "  " for start in starts[1:])


def test_default_alignment_is_a_name_then_numbers():
    table = render_table(["layer", "params"], [["a", "10"], ["long.name", "7"]])
    assert table.split("\n") == ["layer      params", "---------  ------", "a              10", "long.name       7"]


@pytest.mark.parametrize("seed", range(20))
def test_markdown_is_a_table_with_one_alignment_marker_per_column(seed):
    header, rows, align = _random_table(random.Random(seed))
    lines = render_table(header, rows, align=align, markdown=True).split("\n")
    assert len(lines) == len(rows) + 2
    cells = [line[2:-2].split(" | ") for line in (lines[0], *lines[2:])]
    assert [[c.strip() for c in row] for row in cells] == [header, *rows]
    assert len({len(line) for line in lines}) == 1  # aligned in the source too
    markers = lines[1].strip("|").split("|")
    assert [m.endswith(":") for m in markers] == [side == ">" for side in align]
    assert all(set(m) <= {"-", ":"} and m.count("-") >= 3 for m in markers)


def test_rows_of_the_wrong_length_and_bad_alignments_are_refused():
    with pytest.raises(ValueError, match="every row needs 2 cells"):
        render_table(["a", "b"], [["1"]])
    with pytest.raises(ValueError, match="align must be"):
        render_table(["a", "b"], [], align="<")
    with pytest.raises(ValueError, match="align must be"):
        render_table(["a", "b"], [], align="<^")
