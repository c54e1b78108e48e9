"""No ``{…}`` is ever left in a text a person sees (#20: "your library card expired on {expired_on}").

Every call in the code that names a catalogue message literally is found (by its syntax tree) with
the parameters it passes (keywords, or a literal dict after the message id); the message is
rendered with them in both languages and must have no placeholder left. Calls whose parameters are
built elsewhere (``**details``, a dict in a variable) are covered end to end, below and in the
feature tests."""

from __future__ import annotations

import ast
import datetime as dt
import re
from pathlib import Path
from typing import Any

from bot.embedded import EmbeddedBot
from bot.i18n import LANGUAGES, catalogue, t
from storage import circulation as circ
from tests.test_loans_e2e import lend, reader

ROOT = Path(__file__).resolve().parent.parent
PLACEHOLDER = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}")


def _calls() -> list[tuple[str, int, str, set[str]]]:
    """(file, line, message id, parameters) of every call naming a message with known parameters."""
    ids = set(catalogue("en"))
    found = []
    for path in sorted(p for room in ("bot", "handlers", "storage") for p in (ROOT / room).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call) or any(k.arg is None for k in node.keywords):
                continue
            for n, arg in enumerate(node.args):
                named = [b.value for b in (arg.body, arg.orelse) if isinstance(b, ast.Constant)] if isinstance(arg, ast.IfExp) else (
                    [arg.value] if isinstance(arg, ast.Constant) else [])
                keys = [k for k in named if isinstance(k, str) and k in ids]
                if not keys:
                    continue
                params = {k.arg for k in node.keywords if k.arg}
                rest = node.args[n + 1 :]
                callee = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                if callee.startswith("_") and not rest and not params:
                    continue  # a private helper that renders the message with parameters of its own
                if any(not isinstance(a, ast.Constant | ast.Dict) for a in rest):
                    continue  # parameters built elsewhere
                if any(None in a.keys or not all(isinstance(k, ast.Constant) for k in a.keys) for a in rest if isinstance(a, ast.Dict)):
                    continue
                params |= {k.value for a in rest if isinstance(a, ast.Dict) for k in a.keys if isinstance(k, ast.Constant)}
                found += [(str(path.relative_to(ROOT)), node.lineno, key, params) for key in keys]
    return found


def test_the_scan_finds_the_calls_it_checks() -> None:
    calls = _calls()
    assert len({key for _, _, key, _ in calls}) > 300
    assert any(key == "account.login_ok" and params >= {"name"} for _, _, key, params in calls)
    assert any(key == "account.already_linked" and params >= {"card", "name"} for _, _, key, params in calls)
    assert any(key == "account.logout_ok" for _, _, key, _ in calls)  # one of ``a if x else b``


def test_every_message_rendered_with_its_callers_parameters_has_no_placeholder_left() -> None:
    left = []
    for path, line, key, params in _calls():
        for lang in LANGUAGES:
            text = t(lang, key, **{p: "·" for p in params if p != "lang"})
            if PLACEHOLDER.search(text):
                left.append(f"{path}:{line} {key} [{lang}]: {PLACEHOLDER.findall(text)}")
    assert left == []


def test_a_renewal_refusal_renders_with_the_details_the_rules_give() -> None:
    """The reasons' parameters come from ``storage.circulation.renew``'s details, never written in a call."""
    from handlers.loans import _reason  # noqa: F401  (the function that renders them: kept importable)

    for reason, details in {
        "card_expired": {"expired_on": "2026-01-31"},
        "limit_reached": {"renewals": 2, "max_renewals": 2},
        "overdue_too_long": {"overdue_days": 40, "limit_days": 30},
        "fines_too_high": {"fines": "12.00", "limit": "10.00"},
        "too_early": {"days": 3, "from": "2026-02-01"},
        "not_renewable": {"item_type": "reference"},
    }.items():
        for lang in LANGUAGES:
            text = t(lang, f"loans.reason_{reason}", currency="¥", due="2026-02-01", **details)
            assert not PLACEHOLDER.search(text), (reason, lang, text)


def _texts(messages: list[dict[str, Any]]) -> str:
    return "\n".join(m["text"] or "" for m in messages if m["from_bot"])


async def test_an_expired_card_s_loans_and_renewal_name_the_date_in_both_languages(bot_env: EmbeddedBot) -> None:
    now = bot_env.now()
    expired = circ.local_date(now) - dt.timedelta(days=3)
    for telegram_id, card, lang in ((501, "X0501", "en"), (502, "X0502", "zh")):
        reader_id = await reader(bot_env.db, telegram_id, card, "Dan", expires_on=expired)
        await lend(bot_env.db, reader_id, f"B-{telegram_id}", "Expired's book", 5, now)
        person = await bot_env.person(telegram_id, language_code=lang)
        listed = _texts(await person.send("/loans"))
        renewed = _texts(await person.send(f"/renew B-{telegram_id}"))
        for text in (listed, renewed):
            assert not PLACEHOLDER.search(text), text
            assert expired.isoformat() in text
    # the other refusals known in advance, as the list shows them
    fined = await reader(bot_env.db, 503, "X0503", "Fay", fines_cents=5000)
    await lend(bot_env.db, fined, "B-503", "Fined book", 5, now)
    late = await reader(bot_env.db, 504, "X0504", "Lee")
    await lend(bot_env.db, late, "B-504", "Late book", -60, now)
    for telegram_id in (503, 504):
        for lang in LANGUAGES:
            person = await bot_env.person(telegram_id, language_code=lang)
            await person.send("/language")
            await person.press("中文" if lang == "zh" else "English")
            text = _texts(await person.send("/loans"))
            assert "⚠️" in text and not PLACEHOLDER.search(text), text
