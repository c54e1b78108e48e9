"""Service quality as people read it: survey results and the monthly report as chat text (from the
catalogue, in either language), the survey chart (PNG) and the report as a bilingual PDF with charts.
Used by ``handlers/quality.py`` and by the CLI (``librarybot survey results``, ``quality report``).

Charts are drawn with matplotlib (Agg for PNG, its PDF backend for the report). Chinese needs a CJK
font: it is looked up by file (fontconfig's ``fc-match``, then the usual Noto CJK paths) and added
to matplotlib's font list; without one the PDF falls back to English only rather than empty boxes.
"""

from __future__ import annotations

import datetime as dt
import functools
import io
import shutil
import subprocess
from pathlib import Path
from typing import Any

from bot.i18n import t
from bot.ui import escape
from storage.quality import RECOGNITION_MIN_RATINGS, Figures, QualityReport, label
from storage.surveys import Estimate, SurveyResults

CJK_FONT_FILES = (
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/opentype/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
)


# --------------------------------------------------------------------------------------------------
# Numbers


def number(lang: str, value: float | None, digits: int = 2) -> str:
    return t(lang, "quality.none") if value is None else f"{value:.{digits}f}"


def share(lang: str, value: float | None) -> str:
    return t(lang, "quality.none") if value is None else f"{100 * value:.0f}%"


def duration(lang: str, value: dt.timedelta | None) -> str:
    return t(lang, "quality.none") if value is None else t(lang, "quality.minutes", n=round(value.total_seconds() / 60))


def _ci(lang: str, e: Estimate | None) -> str:
    if e is None or e.low is None or e.high is None:
        return t(lang, "quality.none")
    return f"{e.low:.2f}–{e.high:.2f}"


# --------------------------------------------------------------------------------------------------
# Survey results


def survey_results_text(results: SurveyResults, lang: str, *, with_answers: bool = False) -> str:
    """Response rate and every question's figures (written answers listed when ``with_answers``)."""
    survey = results.survey
    lines = [t(lang, "quality.results_head", title=escape(survey.title()[lang]), id=survey.id,
               status=t(lang, f"quality.status_{survey.status}"), closes=survey.closes_on.isoformat(),
               invited=results.invited, finished=results.finished, rate=share(lang, results.response_rate))]
    for q in results.questions:
        question, n = escape(q.text[lang]), q.answered
        common = {"number": q.index + 1, "question": question, "n": n}
        e = q.estimate
        if q.kind == "likert" and e is not None:
            lines.append(t(lang, "quality.results_mean", mean=number(lang, e.mean), low=number(lang, e.low), high=number(lang, e.high), **common))
        elif q.kind == "nps" and e is not None:
            lines.append(t(lang, "quality.results_nps", nps=number(lang, q.nps, 0), mean=number(lang, e.mean),
                           low=number(lang, e.low), high=number(lang, e.high), **common))
        elif q.kind == "choice":
            rows = [t(lang, "quality.results_choice_line", option=escape(option[lang]), count=count,
                      share=share(lang, count / n if n else None)) for option, count in q.choices]
            lines.append(t(lang, "quality.results_choice", lines="\n".join(rows), **common))
        elif q.kind == "text":
            written = [t(lang, "quality.results_answer", text=escape(text)) for text in q.texts] if with_answers else []
            lines.append("\n".join([t(lang, "quality.results_text", **common), *written]))
        elif q.gap is not None:
            g = q.gap
            lines.append(t(lang, "quality.results_gap", minimum=number(lang, g.minimum.mean), desired=number(lang, g.desired.mean),
                           perceived=number(lang, g.perceived.mean), adequacy=number(lang, g.adequacy.mean),
                           adequacy_ci=_ci(lang, g.adequacy), superiority=number(lang, g.superiority.mean),
                           superiority_ci=_ci(lang, g.superiority), **common))
    return "\n\n".join(lines)


@functools.cache
def cjk_font() -> str | None:
    """The family name of a Chinese font matplotlib can use (added from its file), or None."""
    from matplotlib import font_manager

    candidates: list[str] = []
    if shutil.which("fc-match"):
        try:
            found = subprocess.run(["fc-match", "-f", "%{file}", "Noto Sans CJK SC:lang=zh-cn"], capture_output=True,
                                   text=True, timeout=10, check=False).stdout.strip()
            if found:
                candidates.append(found)
        except (OSError, subprocess.SubprocessError):
            pass
    candidates += list(CJK_FONT_FILES)
    for path in candidates:
        if not Path(path).is_file():
            continue
        try:
            font_manager.fontManager.addfont(path)
            name = font_manager.FontProperties(fname=path).get_name()
        except (OSError, RuntimeError, ValueError):
            continue
        if any(ch in name for ch in ("CJK", "Hei", "Song", "Kai", "Ming")) or "noto" in path.lower() or "wqy" in path.lower():
            return name
    return None


def _style(font: str | None) -> Any:  # matplotlib types rc keys as literals
    return {"font.family": "sans-serif", "font.sans-serif": [font, "DejaVu Sans"]} if font else {}


def survey_chart_png(results: SurveyResults, lang: str) -> bytes | None:
    """Every scored question's mean with its 95 % confidence interval, as a PNG; None when nothing was scored."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    font = cjk_font()
    lang = lang if lang != "zh" or font else "en"
    bars: list[tuple[str, Estimate]] = []
    for q in results.questions:
        text = q.text[lang] if len(q.text[lang]) <= 28 else q.text[lang][:27] + "…"
        if q.kind in ("likert", "nps") and q.estimate is not None and q.estimate.n:
            bars.append((f"{q.index + 1}. {text} ({'1–5' if q.kind == 'likert' else '0–10'})", q.estimate))
        elif q.gap is not None:
            for part in ("minimum", "desired", "perceived"):
                estimate = getattr(q.gap, part)
                if estimate.n:
                    bars.append((f"{q.index + 1}. {text}: {t(lang, 'quality.gap_label_' + part)} (1–9)", estimate))
    if not bars:
        return None
    with matplotlib.rc_context(_style(font)):
        figure = Figure(figsize=(9, 1.2 + 0.5 * len(bars)), dpi=100)
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        positions = list(range(len(bars)))[::-1]
        means = [e.mean or 0.0 for _, e in bars]
        errors = [[(e.mean or 0) - (e.low if e.low is not None else e.mean or 0) for _, e in bars],
                  [(e.high if e.high is not None else e.mean or 0) - (e.mean or 0) for _, e in bars]]
        axes.barh(positions, means, xerr=errors, color="#4C72B0", capsize=4)
        axes.set_yticks(positions, [name for name, _ in bars], fontsize=8)
        for y, (_, e) in zip(positions, bars, strict=True):
            axes.text((e.mean or 0) + 0.05, y + 0.25, f"{e.mean:.2f} (n={e.n})", fontsize=7)
        axes.set_title(f"{results.survey.title()[lang]}: {t(lang, 'quality.chart_title')}", fontsize=10)
        figure.tight_layout()
        out = io.BytesIO()
        figure.savefig(out, format="png")
    return out.getvalue()


# --------------------------------------------------------------------------------------------------
# The monthly report


def _staff_line(lang: str, f: Figures) -> str:
    return t(lang, "quality.report_staff_line", name=escape(f.name), former=t(lang, "quality.former") if f.former else "",
             interactions=f.interactions, average=number(lang, f.average), ratings=f.ratings,
             first=duration(lang, f.first_response), complaints=f.complaints)


def report_text(report: QualityReport, lang: str) -> str:
    """The monthly report as chat text: per staff member, the team, the trend and the recognition list."""
    month = report.label
    parts = [f"📈 <b>{t(lang, 'quality.report_title', month=month)}</b>"]
    if not report.staff:
        parts.append(t(lang, "quality.report_none", month=month))
    else:
        parts.append("\n".join([t(lang, "quality.report_staff_head"), *(_staff_line(lang, f) for f in report.staff)]))
        team = report.team
        parts.append(t(lang, "quality.report_team", interactions=team.interactions, average=number(lang, team.average),
                       ratings=team.ratings, first=duration(lang, team.first_response), complaints=team.complaints))
    parts.append("\n".join([t(lang, "quality.report_trend_head"), *(
        t(lang, "quality.report_trend_line", month=label(m), interactions=f.interactions, average=number(lang, f.average), ratings=f.ratings)
        for m, f in report.trend)]))
    if report.recognition:
        parts.append("\n".join([t(lang, "quality.report_recognition_head", minimum=RECOGNITION_MIN_RATINGS), *(
            t(lang, "quality.report_recognition_line", place=i, name=escape(f.name), average=number(lang, f.average), ratings=f.ratings)
            for i, f in enumerate(report.recognition, start=1))]))
    else:
        parts.append(t(lang, "quality.report_recognition_none", minimum=RECOGNITION_MIN_RATINGS))
    return "\n\n".join(parts)


def plain(text: str) -> str:
    """Chat text without its HTML markup (for the terminal)."""
    import html
    import re

    return html.unescape(re.sub(r"</?(b|i|code)>", "", text))


def myratings_text(report: QualityReport, staff_id: int, lang: str) -> str:
    """One staff member's own figures of the month beside the team median (nobody else's figures)."""
    mine = report.of(staff_id)
    month = report.label
    if mine.interactions == 0:
        return t(lang, "quality.myratings_none", month=month)
    median = report.median
    return "\n\n".join([
        t(lang, "quality.myratings_head", month=month, members=median.members),
        t(lang, "quality.myratings_body", interactions=mine.interactions, team_interactions=number(lang, median.interactions, 1),
          average=number(lang, mine.average), ratings=mine.ratings, team_average=number(lang, median.average),
          first=duration(lang, mine.first_response), team_first=duration(lang, median.first_response), complaints=mine.complaints),
        t(lang, "quality.myratings_sources", **{s: mine.by_source.get(s, 0) for s in ("ticket", "ill", "event", "reference")}),
    ])


def report_pdf(report: QualityReport) -> bytes:
    """The monthly report as a PDF in both languages: a table per staff member, the team and the
    recognition list, then the charts (average rating per staff member, the team by month)."""
    import matplotlib
    from matplotlib.backends.backend_pdf import FigureCanvasPdf, PdfPages
    from matplotlib.figure import Figure
    from matplotlib.transforms import Bbox

    font = cjk_font()
    langs = ("zh", "en") if font else ("en",)

    def both(key: str, **params: Any) -> str:
        return " / ".join(plain(t(lang, key, **params)) for lang in langs)

    def col(key: str) -> str:
        return "\n".join(plain(t(lang, key)) for lang in langs)

    out = io.BytesIO()
    with matplotlib.rc_context(_style(font) | {"pdf.fonttype": 42 if font is None else 3}), PdfPages(out) as pdf:
        # Page 1: the table, the team and the recognition list.
        page = Figure(figsize=(8.27, 11.69))
        FigureCanvasPdf(page)
        page.text(0.5, 0.965, both("quality.report_title", month=report.label), ha="center", fontsize=15, weight="bold")
        header = [col(f"quality.col_{name}") for name in ("name", "interactions", "average", "ratings", "first", "complaints")]
        rows = [[f.name + (" †" if f.former else ""), str(f.interactions), number("en", f.average), str(f.ratings),
                 str(round(f.first_response.total_seconds() / 60)) if f.first_response else "—", str(f.complaints)]
                for f in report.staff] or [["—"] * 6]
        team = report.team
        rows.append(["Σ", str(team.interactions), number("en", team.average),
                     str(team.ratings), str(round(team.first_response.total_seconds() / 60)) if team.first_response else "—",
                     str(team.complaints)])
        height = min(0.8, 0.03 * (len(rows) + 2))  # the table as tall as its rows, the rest follows under it
        axes = page.add_axes((0.06, 0.92 - height, 0.88, height))
        axes.axis("off")
        table = axes.table(cellText=rows, colLabels=header, bbox=Bbox.from_bounds(0, 0, 1, 1), cellLoc="center")
        table.auto_set_font_size(False)
        table.set_fontsize(9)
        for (r, _c), cell in table.get_celld().items():
            if r == 0:
                cell.set_facecolor("#DDE6F3")
        y = 0.92 - height - 0.04
        if any(f.former for f in report.staff):
            page.text(0.06, y, "† " + " / ".join(plain(t(lang, "quality.former")).strip(" ()（）") for lang in langs), fontsize=9)
            y -= 0.03
        page.text(0.06, y, plain(both("quality.report_recognition_head", minimum=RECOGNITION_MIN_RATINGS)).replace("🏅 ", ""),
                  fontsize=11, weight="bold")
        y -= 0.03
        for place, f in enumerate(report.recognition, start=1):
            page.text(0.08, y, f"{place}. {f.name}: {f.average:.2f} ({f.ratings})", fontsize=10)
            y -= 0.025
        if not report.recognition:
            page.text(0.08, y, plain(both("quality.report_recognition_none", minimum=RECOGNITION_MIN_RATINGS)).replace("🏅 ", ""), fontsize=10)
            y -= 0.025
        y -= 0.02
        page.text(0.06, y, plain(both("quality.report_trend_head")), fontsize=11, weight="bold")
        for m, f in report.trend:
            y -= 0.025
            page.text(0.08, y, plain(t("en", "quality.report_trend_line", month=label(m), interactions=f.interactions,
                                         average=number("en", f.average), ratings=f.ratings)), fontsize=10)
        pdf.savefig(page)

        # Page 2: the charts.
        charts = Figure(figsize=(8.27, 11.69))
        FigureCanvasPdf(charts)
        top = charts.add_axes((0.3, 0.56, 0.62, 0.36))
        names = [f.name for f in report.staff]
        averages = [f.average or 0.0 for f in report.staff]
        positions = list(range(len(names)))[::-1]
        top.barh(positions, averages, color="#4C72B0")
        top.set_yticks(positions, names, fontsize=9)
        top.set_xlim(0, 5.5)
        for y_pos, f in zip(positions, report.staff, strict=True):
            top.text((f.average or 0) + 0.05, y_pos, f"{number('en', f.average)} (n={f.ratings})", va="center", fontsize=8)
        top.set_title(both("quality.chart_ratings"), fontsize=11)
        bottom = charts.add_axes((0.1, 0.08, 0.78, 0.36))
        months = [label(m) for m, _ in report.trend]
        bottom.bar(months, [f.interactions for _, f in report.trend], color="#A8C5E5")
        bottom.set_ylabel(col("quality.col_interactions"), fontsize=9)
        line = bottom.twinx()
        line.plot(months, [f.average if f.average is not None else float("nan") for _, f in report.trend], color="#C44E52", marker="o")
        line.set_ylim(1, 5)
        line.set_ylabel(col("quality.col_average"), fontsize=9, color="#C44E52")
        bottom.set_title(both("quality.chart_trend"), fontsize=11)
        bottom.tick_params(axis="x", labelsize=8)
        pdf.savefig(charts)
    return out.getvalue()
