"""Benchmark: matching readers' questions against the reference desk's answer base.

    python bench/faq.py [--repeat 5]

The answer base has 500 bilingual entries: the 100 questions of ``bench/faq_data.CORE`` (from real
library FAQ pages) and 400 per-branch, per-database and per-material questions of the kind real FAQ
pages list, which are the hard distractors ("How do I access Web of Science off campus?" beside
"How do I access e-resources off campus?"). The 200 test questions are the readers' paraphrases of
the core entries written by hand, 100 in English and 100 in Chinese (some in traditional characters,
pinyin or with typos). Each one is matched by ``storage.reference.AnswerIndex`` and, in the same run,
by plain rapidfuzz ``WRatio`` over the 1,000 questions of the base (both languages), keeping the best
three distinct entries. A question is answered at top-1 when the first entry is the one it was
written from, at top-3 when it is among the first three. Latency per question: p50 and p95 over
``--repeat`` passes.

Last recorded: see the README's benchmark table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from faq_data import BRANCHES, CORE, DATABASES, MATERIALS  # noqa: E402
from rapidfuzz import fuzz, process  # noqa: E402

from storage.reference import AnswerIndex, Candidate  # noqa: E402

BRANCH_QUESTIONS = [
    ("What are the opening hours of the {en}?", "{zh}的开放时间是什么？"),
    ("Where is the {en}?", "{zh}在哪里？"),
    ("Can I borrow books at the {en}?", "{zh}可以借书吗？"),
    ("Does the {en} have group study rooms?", "{zh}有研讨室吗？"),
    ("Is there printing at the {en}?", "{zh}可以打印吗？"),
    ("What is the phone number of the {en}?", "{zh}的电话是多少？"),
    ("Is the {en} open on weekends?", "{zh}周末开放吗？"),
    ("Can I return books to the {en}?", "可以在{zh}还书吗？"),
    ("Is there Wi-Fi at the {en}?", "{zh}有无线网络吗？"),
    ("Is there parking at the {en}?", "{zh}有停车位吗？"),
]
DATABASE_QUESTIONS = [
    ("How do I access {db} off campus?", "校外如何访问{db}？"),
    ("Who can use {db}?", "谁可以使用{db}？"),
    ("How do I download full text from {db}?", "如何从{db}下载全文？"),
    ("Why can't I log in to {db}?", "{db}无法登录怎么办？"),
    ("Does the library subscribe to {db}?", "图书馆订购了{db}吗？"),
    ("Is there a tutorial for {db}?", "有{db}的使用教程吗？"),
    ("Can I use {db} on my phone?", "手机上可以用{db}吗？"),
]
MATERIAL_QUESTIONS = [
    ("Can I borrow {en}?", "{zh}可以外借吗？"),
    ("How long can I borrow {en}?", "{zh}的借期是多长？"),
    ("Where are the {en}?", "{zh}在哪里？"),
    ("How many {en} can I borrow?", "{zh}最多能借几件？"),
    ("Can I renew {en}?", "{zh}可以续借吗？"),
    ("What is the fine for overdue {en}?", "{zh}逾期的罚款是多少？"),
]


def answer_base() -> list[Candidate]:
    """The 500 entries: the core first (ids 1–100), then the distractors."""
    questions = [(en, zh) for en, zh, _, _ in CORE]
    questions += [(q.format(en=en), z.format(zh=zh)) for en, zh in BRANCHES for q, z in BRANCH_QUESTIONS]
    questions += [(q.format(db=db), z.format(db=db)) for db in DATABASES for q, z in DATABASE_QUESTIONS]
    questions += [(q.format(en=en), z.format(zh=zh)) for en, zh in MATERIALS for q, z in MATERIAL_QUESTIONS]
    questions = questions[:500]
    assert len(questions) == 500 and len({en for en, _ in questions}) == 500, "the answer base must have 500 distinct questions"
    return [Candidate(i, zh, en) for i, (en, zh) in enumerate(questions, 1)]


def tests() -> list[tuple[str, str, int]]:
    """(language, question, the entry it was written from)."""
    out = [("en", para_en, i) for i, (_, _, para_en, _) in enumerate(CORE, 1)]
    out += [("zh", para_zh, i) for i, (_, _, _, para_zh) in enumerate(CORE, 1)]
    return out


def wratio_matcher(entries: list[Candidate]) -> Callable[[str], list[int]]:
    """Plain rapidfuzz WRatio over every question of the base (both languages), three distinct entries."""
    choices: list[str] = []
    owners: list[int] = []
    for entry in entries:
        for question in (entry.question_en, entry.question_zh):
            choices.append(question)
            owners.append(entry.id)

    def match(question: str) -> list[int]:
        found: list[int] = []
        for _, _, index in process.extract(question, choices, scorer=fuzz.WRatio, limit=12):
            if owners[index] not in found:
                found.append(owners[index])
            if len(found) == 3:
                break
        return found

    return match


def run(name: str, match: Callable[[str], list[int]], cases: list[tuple[str, str, int]], repeat: int) -> dict[str, float]:
    timings: list[float] = []
    top1 = {"en": 0, "zh": 0}
    top3 = {"en": 0, "zh": 0}
    for attempt in range(repeat):
        for lang, question, expected in cases:
            start = time.perf_counter()
            found = match(question)
            timings.append((time.perf_counter() - start) * 1000)
            if attempt == 0:
                top1[lang] += bool(found) and found[0] == expected
                top3[lang] += expected in found[:3]
    n = {lang: sum(1 for c in cases if c[0] == lang) for lang in ("en", "zh")}
    quantiles = statistics.quantiles(timings, n=100)
    result = {
        "top1_en": top1["en"] / n["en"], "top1_zh": top1["zh"] / n["zh"], "top1": sum(top1.values()) / len(cases),
        "top3_en": top3["en"] / n["en"], "top3_zh": top3["zh"] / n["zh"], "top3": sum(top3.values()) / len(cases),
        "p50": statistics.median(timings), "p95": quantiles[94],
    }
    print(
        f"{name:<22} top-1 {result['top1']:.3f} (en {result['top1_en']:.2f}, zh {result['top1_zh']:.2f})"
        f"  top-3 {result['top3']:.3f} (en {result['top3_en']:.2f}, zh {result['top3_zh']:.2f})"
        f"  p50 {result['p50']:.2f} ms  p95 {result['p95']:.2f} ms"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="passes over the 200 questions for the latency")
    args = parser.parse_args()
    entries = answer_base()
    cases = tests()
    start = time.perf_counter()
    index = AnswerIndex(entries)
    built = (time.perf_counter() - start) * 1000
    print(f"answer base: {len(entries)} entries ({len(entries) * 2} questions), index built in {built:.0f} ms; "
          f"{len(cases)} paraphrased questions ({sum(c[0] == 'en' for c in cases)} en, {sum(c[0] == 'zh' for c in cases)} zh)")
    index.match("warm up")
    run("answer index", lambda q: [s.entry_id for s in index.match(q, 3)], cases, args.repeat)
    run("rapidfuzz WRatio", wratio_matcher(entries), cases, args.repeat)


if __name__ == "__main__":
    main()
