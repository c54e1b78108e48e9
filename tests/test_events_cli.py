"""``librarybot events import|list|cancel``: the command line on a real SQLite file."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.cli import main
from storage.events import CSV_COLUMNS


@pytest.fixture
def library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # no .env of the developer's
    monkeypatch.setenv("LIBRARYBOT_DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}")
    monkeypatch.setenv("LIBRARYBOT_TIMEZONE", "Asia/Shanghai")
    return tmp_path


def test_import_list_and_cancel(library: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = library / "events.csv"
    path.write_text(
        ",".join(CSV_COLUMNS) + "\n"
        "读书会,Book club,每月一次,Monthly,2031-04-01T19:00,2031-04-01T21:00,4F,12,reading,everyone,,\n"
        "坏,Bad,,,2031-04-01T19:00,2031-04-01T18:00,4F,12,reading,everyone,,\n"
        "亲子,Story hour,,,2031-04-02 10:00,2031-04-02 11:00,1F,0,children,readers,2031-03-01T09:00,2031-04-01T12:00\n",
        encoding="utf-8",
    )
    assert main(["events", "import", str(path)]) == 0
    out = capsys.readouterr().out
    assert "skipped line 3: ends before start" in out and "imported 2, skipped 1" in out

    assert main(["events", "list"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[1].split("\t")[:5] == ["1", "2031-04-01 19:00", "scheduled", "0/12", "reading"]
    assert listing[2].split("\t")[3] == "0/-"

    assert main(["events", "cancel", "1"]) == 0
    assert "event 1 cancelled" in capsys.readouterr().out
    assert main(["events", "cancel", "1"]) == 1
    assert "no scheduled event with id 1" in capsys.readouterr().err


def test_bad_files_fail_with_one_line(library: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["events", "import", str(library / "missing.csv")]) == 1
    assert "no such file" in capsys.readouterr().err
    wrong = library / "wrong.csv"
    wrong.write_text("title,when\nx,y\n", encoding="utf-8")
    assert main(["events", "import", str(wrong)]) == 1
    assert "missing columns: title_zh" in capsys.readouterr().err
