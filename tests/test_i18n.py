"""The translation catalogue: both languages complete and consistent."""

from __future__ import annotations

import re
import string

from bot.i18n import LANGUAGES, both, catalogue, language_for, t


def _fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def test_every_message_exists_in_both_languages() -> None:
    zh, en = catalogue("zh"), catalogue("en")
    assert sorted(set(zh) - set(en)) == [], "message ids only in Chinese"
    assert sorted(set(en) - set(zh)) == [], "message ids only in English"


def test_both_languages_use_the_same_placeholders() -> None:
    zh, en = catalogue("zh"), catalogue("en")
    mismatched = [key for key in en if _fields(en[key]) != _fields(zh[key])]
    assert mismatched == []


def test_no_message_is_left_empty_or_untranslated() -> None:
    for lang in LANGUAGES:
        assert [k for k, v in catalogue(lang).items() if not v.strip()] == []
    zh = catalogue("zh")
    # A Chinese text with no Chinese character at all is an English text left in place.
    words = {k: re.sub(r"\{[^}]*\}|<[^>]*>", "", v) for k, v in zh.items()}
    untranslated = [
        k for k, v in words.items()
        if sum(ch.isalpha() for ch in v) > 15 and not any("\u4e00" <= ch <= "\u9fff" for ch in v)
    ]
    assert untranslated == []


def test_language_choice_order() -> None:
    assert language_for("en", "zh-hans", "zh") == "en"  # the /language choice wins
    assert language_for(None, "zh-hant", "en") == "zh"
    assert language_for(None, "en-GB", "zh") == "en"
    assert language_for(None, "fr", "zh") == "zh"  # neither: the library's default
    assert language_for(None, None, "en") == "en"


def test_rendering_fills_parameters_and_bilingual_values() -> None:
    assert "Wang" in t("en", "account.login_ok", name="Wang")
    assert "王" in t("zh", "account.login_ok", name="王")
    note = both("account.role_staff")
    assert t("zh", "account.invite_granted", role=note) != t("en", "account.invite_granted", role=note)
    assert "馆员" in t("zh", "account.invite_granted", role=note)


def test_a_missing_parameter_never_crashes() -> None:
    assert "{name}" in t("en", "account.login_ok")
