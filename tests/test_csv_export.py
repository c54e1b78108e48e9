"""CSV exports never hold a cell a spreadsheet would run as a formula (OWASP CSV injection, #13)."""

from __future__ import annotations

import csv
import datetime as dt
import io

from hypothesis import given
from hypothesis import strategies as st

from storage.csv_export import FORMULA_STARTS, safe_cell, writer
from storage.notices import overdue_csv
from storage.policy import Policy

EVIL = ['=HYPERLINK("http://evil.example","x")', "@SUM(1+1)*cmd|' /C calc'!A0", "+1+1", "-1+1", "\t=1", "\r=1"]


def _cells(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text.lstrip("\ufeff"), newline="")))


@given(st.text())
def test_a_cell_never_starts_like_a_formula_and_keeps_its_text(value: str) -> None:
    cell = safe_cell(value)
    assert not cell.startswith(FORMULA_STARTS)
    assert cell == value or cell == "'" + value


def test_numbers_stay_numbers() -> None:
    assert safe_cell(-3) == -3 and safe_cell(2.5) == 2.5 and safe_cell(None) is None


def test_the_writer_neutralises_every_cell() -> None:
    out = io.StringIO()
    writer(out).writerows([EVIL, ["plain", "2026-12-04", 7]])
    rows = _cells(out.getvalue())
    assert rows[0] == ["'" + value for value in EVIL]
    assert rows[1] == ["plain", "2026-12-04", "7"]


def test_the_overdue_list_holds_no_formula() -> None:
    rows = [("=B1", EVIL[0], "+861234", EVIL[1], dt.date(2026, 11, 1), 3, 150)]
    cells = _cells(overdue_csv(rows, Policy()).decode("utf-8"))
    assert cells[1][:4] == ["'=B1", "'" + EVIL[0], "'+861234", "'" + EVIL[1]]
    assert not [c for row in cells for c in row if c.startswith(FORMULA_STARTS)]
