"""Writing CSV for people to open in a spreadsheet: the one writer every export uses.

Cells hold what people typed (Telegram names, titles, ticket texts). A spreadsheet takes a cell
starting with ``=``, ``+``, ``-`` or ``@`` (or a tab or carriage return before one) as a formula,
so ``=HYPERLINK(…)`` or ``@SUM(1+1)*cmd|…`` in a name would run when staff open the file. Such a
cell is written with a leading apostrophe, as OWASP recommends: it shows as text, unchanged.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from typing import Any

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(value: Any) -> Any:
    """``value`` as a cell no spreadsheet runs: text starting like a formula gets a leading ``'``."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


class SafeWriter:
    """A ``csv.writer`` whose every text cell goes through :func:`safe_cell`."""

    def __init__(self, out: Any, **options: Any) -> None:
        self._writer = csv.writer(out, **options)

    def writerow(self, row: Iterable[Any]) -> Any:
        return self._writer.writerow([safe_cell(value) for value in row])

    def writerows(self, rows: Iterable[Iterable[Any]]) -> None:
        for row in rows:
            self.writerow(row)


def writer(out: Any, **options: Any) -> SafeWriter:
    """The CSV writer for every export (same options as ``csv.writer``)."""
    return SafeWriter(out, **options)
