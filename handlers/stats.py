"""``/stats [FROM [TO]]`` (staff): the service statistics of a period, as text, with a chart of
interlibrary loan requests per week by outcome and a button for the numbers as CSV."""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import io
import logging

from telegram import InputFile, Update
from telegram.constants import ParseMode
from telegram.ext import Application, CallbackQueryHandler, CommandHandler, ContextTypes

from bot.context import services, who
from bot.i18n import t
from bot.roles import requires
from bot.ui import MAX_CAPTION, answer, escape, fit, reply
from storage.people import Role
from storage.stats import FIRST_DAY, LAST_DAY, PeriodOutOfRange, StatsReport, check_period, service_stats

log = logging.getLogger(__name__)

OUTCOME_COLOURS = (("filled", "#2e7d32"), ("unfilled", "#c62828"), ("cancelled", "#9e9e9e"), ("open", "#1565c0"))
CJK_FONTS = (
    "Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei",
    "SimHei", "Microsoft YaHei", "PingFang SC", "Heiti SC", "Arial Unicode MS",
)


def parse_period(args: list[str]) -> tuple[dt.date | None, dt.date | None] | str:
    """``[FROM [TO]]`` as dates; otherwise the message id saying what is wrong."""
    dates: list[dt.date] = []
    for arg in args[:2]:
        try:
            dates.append(dt.date.fromisoformat(arg.strip()))
        except ValueError:
            return "stats.bad_date"
    if len(args) > 2:
        return "stats.usage"
    since = dates[0] if dates else None
    until = dates[1] if len(dates) > 1 else None
    if since and until and since > until:
        return "stats.bad_period"
    try:
        check_period(since, until)
    except PeriodOutOfRange:
        return "stats.out_of_range"
    return since, until


@requires(Role.STAFF)
async def stats_command(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """/stats, /stats 2026-11-01, /stats 2026-11-01 2026-11-30."""
    me = await who(update, context)
    period = parse_period(list(context.args or []))
    if isinstance(period, str):
        await reply(update, context, period, lang=me.lang, arg=escape(" ".join(context.args or [])[:40]),
                    first=FIRST_DAY.isoformat(), last=LAST_DAY.isoformat())
        return
    since, until = period
    report = await _report(context, since, until)
    data = f"stcsv:{since or '-'}:{until or '-'}"
    await reply(
        update, context, "stats.report", lang=me.lang, buttons=[[("stats.btn_csv", data)]],
        report=escape(report.to_text(me.lang)),
    )
    png = await asyncio.to_thread(render_chart, report, me.lang)
    if png is not None:
        chat = update.effective_chat
        assert chat is not None
        await context.bot.send_photo(
            chat.id, InputFile(png, filename="ill-requests-per-week.png"),
            caption=fit(t(me.lang, "stats.chart_caption", period=report.period_label(me.lang)), MAX_CAPTION),
            parse_mode=ParseMode.HTML,
        )


@requires(Role.STAFF)
async def csv_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """The numbers of the report as a CSV file."""
    me = await who(update, context)
    parts = (update.callback_query.data or "").split(":")
    period = parse_period([p for p in parts[1:3] if p and p != "-"])
    if isinstance(period, str) or len(parts) != 3 or (parts[1] == "-" and parts[2] != "-"):
        await answer(update, context, "common.stale_button", alert=True, lang=me.lang)
        return
    await answer(update, context, lang=me.lang)
    since, until = period
    report = await _report(context, since, until)
    chat = update.effective_chat
    assert chat is not None
    name = f"librarybot-stats-{since or 'start'}-{until or 'now'}.csv"
    await context.bot.send_document(
        chat.id, InputFile(report.to_csv().encode("utf-8"), filename=name),
        caption=t(me.lang, "stats.csv_caption", period=report.period_label(me.lang)), parse_mode=ParseMode.HTML,
    )


async def _report(context: ContextTypes.DEFAULT_TYPE, since: dt.date | None, until: dt.date | None) -> StatsReport:
    svc = services(context)
    async with svc.db.session() as session:
        return await service_stats(session, since, until, svc.tz, svc.now(), policy=svc.policy)


@functools.cache
def cjk_font() -> str | None:
    """A font with Chinese characters that matplotlib can use, if the system has one."""
    from matplotlib import font_manager

    names = {font.name for font in font_manager.fontManager.ttflist}
    return next((name for name in CJK_FONTS if name in names), None)


def render_chart(report: StatsReport, lang: str) -> bytes | None:
    """Requests per week, stacked by outcome, as a PNG (Agg backend); None when there is nothing to draw.

    Without a Chinese font on the system the chart is labelled in English rather than in empty boxes.
    """
    weeks = report.ill.weeks
    if not weeks or not any(week.total for week in weeks):
        return None
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    font = cjk_font() if lang == "zh" else None
    lang = lang if lang != "zh" or font else "en"
    style = {"font.family": "sans-serif", "font.sans-serif": [font, "DejaVu Sans"]} if font else {}
    with matplotlib.rc_context(style):
        figure = Figure(figsize=(9, 4.5), dpi=100)
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        positions = list(range(len(weeks)))
        bottom = [0] * len(weeks)
        for outcome, colour in OUTCOME_COLOURS:
            values = [getattr(week, outcome) for week in weeks]
            axes.bar(positions, values, bottom=bottom, color=colour, label=t(lang, f"stats.chart_{outcome}"))
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        step = max(1, len(weeks) // 16)
        axes.set_xticks(positions[::step], [week.start.strftime("%Y-%m-%d") for week in weeks][::step],
                        rotation=45, ha="right", fontsize=8)
        axes.yaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_title(t(lang, "stats.chart_title", period=report.period_label(lang)))
        axes.set_xlabel(t(lang, "stats.chart_xlabel"))
        axes.set_ylabel(t(lang, "stats.chart_ylabel"))
        axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
        figure.tight_layout()
        out = io.BytesIO()
        figure.savefig(out, format="png")
    return out.getvalue()


def register(app: Application) -> None:  # type: ignore[type-arg]
    app.add_handler(CommandHandler("stats", stats_command))
    app.add_handler(CallbackQueryHandler(csv_pressed, pattern=r"^stcsv:"))
