"""CSV imports of readers, items and loans (bad rows named and skipped, the rest applied), and the
demo's sample circulation."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from storage import circulation as circ
from storage.catalog import Item, Record
from storage.circ_import import (
    CircImportError,
    import_items,
    import_loans,
    import_readers,
    seed_demo_circulation,
)
from storage.circulation import Hold, HoldStatus, Loan, RenewalRefused
from storage.db import Database
from storage.ils import LocalCirculation
from storage.people import Reader, User, pin_matches
from storage.policy import Policy
from tests.circ_helpers import card, outbox, title

TZ = circ.DEFAULT_TZ
NOW = dt.datetime(2025, 3, 10, 2, 0, tzinfo=dt.UTC)
POLICY = Policy()


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


async def test_readers_import_hashes_pins_and_names_bad_rows(db: Database, tmp_path: Path) -> None:
    path = write(tmp_path, "readers.csv", (
        "card_number,name,pin,category,expires_on\n"
        "R001,Li Lei,1111,student,2026-06-30\n"
        "R002,Han Meimei,2222,,\n"
        "R003,No Pin,,adult,\n"
        "R004,Bad Date,4444,adult,2026-13-01\n"
        ",Nameless card,5555,adult,\n"
        "R001,Twice,1111,adult,\n"
        "R005,Short row\n"
        "\n"
    ))
    report = await import_readers(db, path, policy=POLICY, now=NOW)
    assert (report.created, report.updated, report.skipped and len(report.skipped)) == (2, 0, 5)
    reasons = dict(report.skipped)
    assert reasons[4] == "card R003 is new and has no PIN"
    assert reasons[5] == "bad date in expires_on: '2026-13-01' (expected YYYY-MM-DD)"
    assert reasons[6] == "empty card_number"
    assert reasons[7] == "card R001 appears twice in the file"
    assert reasons[8] == "missing column(s) pin, category, expires_on"
    lines = report.lines()
    assert lines[0].endswith("2 created, 0 updated, 0 unchanged, 5 skipped")
    assert "  line 5: bad date in expires_on: '2026-13-01' (expected YYYY-MM-DD)" in lines
    async with db.session() as s:
        li = await s.scalar(select(Reader).where(Reader.card_number == "R001"))
        assert li is not None and li.category == "student" and li.expires_on == dt.date(2026, 6, 30)
        assert li.pin_hash != "1111" and pin_matches(li.pin_hash, "1111")
        han = await s.scalar(select(Reader).where(Reader.card_number == "R002"))
        assert han is not None and han.category == "adult" and han.expires_on is None
    # Again, with a changed name and no PIN: the PIN stays.
    again = write(tmp_path, "again.csv", "card_number,name,pin,category,expires_on\nR001,Li Lei (new),,student,2026-06-30\nR002,Han Meimei,,adult,\n")
    report = await import_readers(db, again)
    assert (report.created, report.updated, report.unchanged) == (0, 1, 1)
    async with db.session() as s:
        li = await s.scalar(select(Reader).where(Reader.card_number == "R001"))
        assert li is not None and li.name == "Li Lei (new)" and pin_matches(li.pin_hash, "1111")


async def test_missing_column_refuses_the_file(db: Database, tmp_path: Path) -> None:
    path = write(tmp_path, "bad.csv", "card_number,name,category\nR1,X,adult\n")
    with pytest.raises(CircImportError, match="missing column"):
        await import_readers(db, path)
    with pytest.raises(CircImportError, match="empty file"):
        await import_items(db, write(tmp_path, "empty.csv", ""))
    with pytest.raises(CircImportError, match="not found"):
        await import_loans(db, tmp_path / "nope.csv")


async def test_items_import_resolves_records_and_keeps_circulation_status(db: Database, tmp_path: Path) -> None:
    async with db.session() as s:
        s.add(Record(control_number="ocm001", title="Known", isbns=["9780306406157"], call_number="QA76"))
        await title(s, "LENT", "Lent out")
        await card(s, "C1")
    async with db.session() as s:
        await circ.checkout(s, "LENT-1", "C1", POLICY, NOW, TZ)
    path = write(tmp_path, "items.csv", (
        "barcode,record_id,location,call_number,item_type,status\n"
        "B1,ocm001,3F Social Sciences,,book,available\n"
        "B2,9780306406157,2F,QA76 .K2,DVD,missing\n"
        "B3,unknown-id,2F,,book,available\n"
        "LENT-1,LENT,3F,,book,available\n"
        "B1,ocm001,3F,,book,available\n"
    ))
    report = await import_items(db, path)
    assert (report.created, report.updated, report.unchanged) == (2, 0, 1)
    assert report.skipped == [
        (4, "unknown record unknown-id (no control number or ISBN matches)"),
        (6, "barcode B1 appears twice in the file"),
    ]
    async with db.session() as s:
        items = {i.barcode: i for i in await s.scalars(select(Item))}
    assert items["B1"].call_number == "QA76" and items["B1"].location == "3F Social Sciences"
    assert items["B2"].item_type == "dvd" and items["B2"].status == "missing"
    assert items["LENT-1"].status == "on_loan"  # the open loan wins over the file


async def test_items_import_by_isbn10(db: Database, tmp_path: Path) -> None:
    async with db.session() as s:
        s.add(Record(control_number="ocm002", title="By ISBN", isbns=["9780306406157"]))
    report = await import_items(db, write(tmp_path, "i.csv", "barcode,record_id,location,call_number,item_type,status\nB9,0-306-40615-2,1F,,,\n"))
    assert report.created == 1, report.lines()


async def test_loans_import_snapshot(db: Database, tmp_path: Path) -> None:
    async with db.session() as s:
        wanted = await title(s, "W", "Wanted")
        await title(s, "K", "Kept")
        await title(s, "M", "Moved")
        await title(s, "N", "New")
        await title(s, "Z", "Named on a bad line")
        await card(s, "C1")
        await card(s, "C2")
        waiting = await card(s, "C3", telegram_id=103)
    async with db.session() as s:
        for barcode in ("W-1", "K-1", "M-1", "Z-1"):
            await circ.checkout(s, barcode, "C1", POLICY, NOW - dt.timedelta(days=5), TZ)
        await circ.place_hold(s, waiting.id, wanted.id, POLICY, NOW, TZ)
    path = write(tmp_path, "loans.csv", (
        "barcode,card_number,checked_out_at,due_at,renewals\n"
        "K-1,C1,2025-03-05,2025-05-01,1\n"       # due date and renewals changed
        "M-1,C2,2025-03-09T10:00:00,2025-04-08,0\n"  # now lent to another card
        "N-1,C2,2025-03-09,2025-04-08,\n"         # new
        "Z-1,C1,2025-03-05,not-a-date,0\n"        # bad: left alone
        "X-1,C1,2025-03-05,2025-04-08,0\n"        # unknown barcode
        "N-1,C1,2025-03-05,2025-04-08,0\n"        # duplicate
        "K-1,C9,2025-03-05,2025-04-08,0\n"        # unknown card (and a duplicate barcode)
        "Q-1,C1,2025-03-05,2025-04-08,-1\n"
    ))
    report = await import_loans(db, path, policy=POLICY, now=NOW)
    assert (report.created, report.updated, report.unchanged, report.returned) == (1, 2, 0, 1)
    assert [line for line, _ in report.skipped] == [5, 6, 7, 8, 9]
    reasons = dict(report.skipped)
    assert reasons[5].startswith("bad date in due_at")
    assert reasons[6] == "unknown barcode X-1"
    assert reasons[7] == "barcode N-1 appears twice in the file"
    assert reasons[9] == "renewals is negative"
    async with db.session() as s:
        open_loans = {
            barcode: (card_number, loan.due_at, loan.renewals)
            for loan, barcode, card_number in (
                await s.execute(
                    select(Loan, Item.barcode, Reader.card_number)
                    .join(Item, Item.id == Loan.item_id)
                    .join(Reader, Reader.id == Loan.reader_id)
                    .where(Loan.returned_at.is_(None))
                )
            ).all()
        }
        assert set(open_loans) == {"K-1", "M-1", "N-1", "Z-1"}
        assert open_loans["K-1"] == ("C1", circ.end_of_day(dt.date(2025, 5, 1), TZ), 1)
        assert open_loans["M-1"][0] == "C2"
        # W-1 was not in the file: returned, and it went to the reader waiting for it.
        hold = await s.scalar(select(Hold))
        assert hold is not None and hold.status == HoldStatus.READY
        assert len(await outbox(s, 103, "loans.hold_ready_notice")) == 1
    # The same file again changes nothing.
    report = await import_loans(db, path, policy=POLICY, now=NOW)
    assert (report.created, report.updated, report.unchanged, report.returned) == (0, 0, 3, 0)


async def test_empty_loans_file_returns_nothing(db: Database, tmp_path: Path) -> None:
    async with db.session() as s:
        await title(s, "K", "Kept")
        await card(s, "C1")
    async with db.session() as s:
        await circ.checkout(s, "K-1", "C1", POLICY, NOW, TZ)
    report = await import_loans(db, write(tmp_path, "l.csv", "barcode,card_number,checked_out_at,due_at,renewals\n"), now=NOW)
    assert report.returned == 0
    async with db.session() as s:
        assert await s.scalar(select(func.count()).select_from(Loan).where(Loan.returned_at.is_(None))) == 1


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=300))
async def test_garbage_loans_never_crash(db: Database, tmp_path: Path, body: str) -> None:
    path = tmp_path / "g.csv"
    path.write_text("barcode,card_number,checked_out_at,due_at,renewals\n" + body, encoding="utf-8")
    try:
        report = await import_loans(db, path, now=NOW)
    except CircImportError as exc:  # a line that cannot be read refuses the snapshot, naming it
        assert "line " in str(exc)
        return
    assert report.created == 0  # no such items or cards exist
    assert all(isinstance(line, int) and reason for line, reason in report.skipped)


async def test_demo_circulation_has_every_state(db: Database) -> None:
    async with db.session() as s:
        cards = await seed_demo_circulation(s, POLICY, NOW)
    async with db.session() as s:
        again = await seed_demo_circulation(s, POLICY, NOW)
    assert [c.card_number for c in cards] == [c.card_number for c in again] == ["D0001", "D0002", "D0003", "D0004"]
    assert cards[0].pin == "1234" and cards[0].telegram_id == 8001 and cards[3].telegram_id is None
    async with db.session() as s:
        assert await s.scalar(select(func.count()).select_from(Reader)) == 4
        ids = {r.card_number: r.id for r in await s.scalars(select(Reader))}
        assert (await s.get(User, 8001)).reader_id == ids["D0001"]  # type: ignore[union-attr]
    service = LocalCirculation(db, POLICY, TZ, clock=lambda: NOW)
    first = await service.loans(ids["D0001"])
    reasons = [v.refusal for v in first]
    assert RenewalRefused.LIMIT_REACHED in reasons and RenewalRefused.ON_HOLD in reasons
    assert RenewalRefused.NOT_RENEWABLE in reasons
    assert sorted(v.overdue_days for v in first)[-1] == 7
    assert sum(v.renewable for v in first) == 3
    assert [h.status for h in await service.holds(ids["D0001"])] == ["ready"]
    assert [(h.status, h.position) for h in await service.holds(ids["D0002"])] == [("waiting", 1)]
    third = await service.loans(ids["D0003"])
    assert {v.overdue_days for v in third} == {14, 35}
    assert {v.refusal for v in third} == {RenewalRefused.FINES_TOO_HIGH, RenewalRefused.OVERDUE_TOO_LONG}
    fourth = await service.loans(ids["D0004"])
    assert [v.refusal for v in fourth] == [RenewalRefused.CARD_EXPIRED]


# --- stray quotes and wrong field counts (#13): exactly the shapes that lost rows --------------------


async def test_ten_stray_quotes_in_ten_thousand_readers_skip_exactly_those_ten_lines(db: Database, tmp_path: Path) -> None:
    from sqlalchemy import insert

    from tests.circ_helpers import pin_hash

    # The cards exist already (hashing 10,000 PINs would take minutes); the file renames them all.
    async with db.session() as s:
        await s.execute(insert(Reader), [
            {"card_number": f"R{n:05d}", "name": f"Old {n}", "pin_hash": pin_hash(), "category": "adult"}
            for n in range(10_000)
        ])
    stray = {n * 997 + 13 for n in range(10)}  # ten rows spread over the file, each with one unclosed quote
    rows = [
        f'R{n:05d},"Reader {n},,adult,' if n in stray else f"R{n:05d},Reader {n},,adult,"
        for n in range(10_000)
    ]
    path = write(tmp_path, "readers.csv", "card_number,name,pin,category,expires_on\n" + "\n".join(rows) + "\n")
    report = await import_readers(db, path)
    assert report.updated == 9_990
    assert [line for line, _ in report.skipped] == sorted(n + 2 for n in stray)  # line 1 is the header
    assert {reason for _, reason in report.skipped} == {'a quoted field is not closed on this line (a stray ")'}
    async with db.session() as s:
        names = dict((await s.execute(select(Reader.card_number, Reader.name))).all())
    assert sum(name.startswith("Reader ") for name in names.values()) == 9_990
    assert all(names[f"R{n:05d}"] == f"Old {n}" for n in stray)  # the broken rows changed nothing


async def test_a_row_with_too_many_fields_is_named_and_only_it_skipped(db: Database, tmp_path: Path) -> None:
    async with db.session() as s:
        s.add(Record(control_number="ocm001", title="Known", isbns=[], call_number="QA76"))
    path = write(tmp_path, "items.csv", (
        "barcode,record_id,location,call_number,item_type,status\n"
        "B1,ocm001,3F,,book,available\n"
        "B2,ocm001,3F, Social Sciences,,book,available\n"   # an unquoted comma: one field too many
        'B3,ocm001,"3F Social Sciences,,book,available\n'    # a quote left open
        "B4,ocm001,2F,,book,available\n"
        'B5,ocm001,"4F" Reading room,,book,available\n'      # text after a closing quote
        "B6,ocm001,1F,,book,available\n"
    ))
    report = await import_items(db, path)
    assert report.created == 3
    assert report.skipped == [
        (3, "7 fields where the header has 6"),
        (4, 'a quoted field is not closed on this line (a stray ")'),
        (6, "the line cannot be read as CSV (',' expected after '\"')"),
    ]


async def test_a_loans_snapshot_with_an_unreadable_line_is_refused_whole(db: Database, tmp_path: Path) -> None:
    async with db.session() as s:
        wanted = await title(s, "W", "Wanted")
        for control in ("A", "B", "C", "D", "E", "F"):
            await title(s, control, f"Title {control}")
        await card(s, "C1")
        waiting = await card(s, "C3", telegram_id=103)
    async with db.session() as s:
        for barcode in ("A-1", "B-1", "C-1", "D-1", "E-1", "F-1", "W-1"):
            await circ.checkout(s, barcode, "C1", POLICY, NOW - dt.timedelta(days=5), TZ)
        await circ.place_hold(s, waiting.id, wanted.id, POLICY, NOW, TZ)
    path = write(tmp_path, "loans.csv", (
        "barcode,card_number,checked_out_at,due_at,renewals\n"
        'A-1,"C1,2025-03-05,2025-04-08,0\n'  # one stray quote: it used to swallow the six lines below
        "B-1,C1,2025-03-05,2025-04-08,0\n"
        "C-1,C1,2025-03-05,2025-04-08,0\n"
        "D-1,C1,2025-03-05,2025-04-08,0\n"
        "E-1,C1,2025-03-05,2025-04-08,0\n"
        "F-1,C1,2025-03-05,2025-04-08,0\n"
        "W-1,C1,2025-03-05,2025-04-08,0\n"
    ))
    with pytest.raises(CircImportError, match=r"refused, nothing changed: line 2: a quoted field is not closed"):
        await import_loans(db, path, policy=POLICY, now=NOW)
    async with db.session() as s:
        assert await s.scalar(select(func.count()).select_from(Loan).where(Loan.returned_at.is_(None))) == 7
        assert (await s.scalar(select(Hold))).status == HoldStatus.WAITING  # type: ignore[union-attr]
        assert await outbox(s, 103) == []  # no false "your hold is ready"


def test_the_cli_refuses_a_broken_loans_snapshot_in_one_line(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    path = write(tmp_path, "loans.csv", 'barcode,card_number,checked_out_at,due_at,renewals\nA-1,"C1,2025-03-05,2025-04-08,0\nB-1,C1,2025-03-05,2025-04-08,0\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LIBRARYBOT_", "TELEGRAM_"))}
    env |= {"PYTHONPATH": str(root), "LIBRARYBOT_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'l.db'}"}
    subprocess.run([sys.executable, "-m", "bot.cli", "db", "upgrade"], env=env, cwd=tmp_path, check=True, capture_output=True, timeout=120)
    result = subprocess.run([sys.executable, "-m", "bot.cli", "import", "loans", str(path)], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "refused, nothing changed: line 2: a quoted field is not closed" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
