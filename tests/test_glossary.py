"""The glossary of statuses and terms (#20): one word for each, in both languages, used by every
catalogue and by the statistics, so that a status reads the same everywhere."""

from __future__ import annotations

import re
from pathlib import Path

from bot.i18n import LANGUAGES, LOCALES, catalogue, glossary, t
from storage.ill import IllStatus
from storage.stats import LABELS
from storage.tickets import CATEGORIES, TicketStatus

TERM = re.compile(r"\[\[(\w+)\]\]")


def test_every_term_has_both_languages_and_every_reference_resolves() -> None:
    terms = glossary()
    assert terms and all(set(words) == set(LANGUAGES) and all(words.values()) for words in terms.values())
    used = set()
    for lang in LANGUAGES:
        for path in (LOCALES / lang).glob("*.toml"):
            used |= set(TERM.findall(path.read_text(encoding="utf-8")))
        assert not [key for key, text in catalogue(lang).items() if "[[" in text]
        assert not [key for key, text in LABELS[lang].items() if "[[" in text]
    assert used <= set(terms), used - set(terms)
    stats_source = (Path(__file__).resolve().parents[1] / "storage" / "stats.py").read_text(encoding="utf-8")
    used |= set(TERM.findall(stats_source))
    assert set(terms) <= used, f"terms nobody uses: {set(terms) - used}"


def test_a_status_reads_the_same_everywhere() -> None:
    for lang in LANGUAGES:
        word = {name: words[lang] for name, words in glossary().items()}
        for status in IllStatus:
            assert t(lang, f"ill.status_{status.value}") == LABELS[lang][f"status_{status.value}"] == word[f"ill_{status.value}"]
        for status in TicketStatus:
            assert t(lang, f"tickets.status_{status.value}") == LABELS[lang][f"tstatus_{status.value}"] == word[f"ticket_{status.value}"]
        for category in CATEGORIES:
            assert t(lang, f"tickets.cat_{category}") == LABELS[lang][f"cat_{category}"] == word[f"cat_{category}"]
        for outcome, status in (("unfilled", "ill_unfilled"), ("cancelled", "ill_cancelled"), ("filled", "ill_filled")):
            assert t(lang, f"stats.chart_{outcome}") == word[status]
        assert word["ill_available"] in LABELS[lang]["turnaround"] and word["turnaround"] in LABELS[lang]["turnaround"]


def test_statuses_are_named_only_through_the_glossary() -> None:
    """A catalogue that spelled a status out again could drift from the others: they all refer to it."""
    for lang in LANGUAGES:
        for area, prefixes in (("ill", ("status_",)), ("tickets", ("status_", "cat_")), ("stats", ("chart_filled", "chart_unfilled", "chart_cancelled"))):
            raw = (LOCALES / lang / f"{area}.toml").read_text(encoding="utf-8")
            for key, value in re.findall(r'^(\w+) = "(.*)"$', raw, flags=re.M):
                if key.startswith(prefixes):
                    assert TERM.fullmatch(value), (lang, area, key, value)
