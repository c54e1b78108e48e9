"""What staff ask for first: ``/overdue [BRANCH] [DAYS] [csv]``, the overdue loans most overdue
first, ten a page, with barcode, title, reader (name and card), days overdue and fine; filtered by
branch and by a minimum number of days overdue; the whole list as CSV on request. Staff only."""

from __future__ import annotations

from dataclasses import dataclass

from telegram import InputFile, Update
from telegram.constants import ParseMode
from telegram.ext import Application, CallbackQueryHandler, CommandHandler, ContextTypes

from bot.context import services, who
from bot.i18n import t
from bot.roles import requires
from bot.ui import Button, answer, edit, escape, paginate, reply
from storage import circulation as circ
from storage.overdue import OverdueLoan, find_branch, overdue_csv, overdue_loans
from storage.people import Role
from storage.policy import Branch

PER_PAGE = 10
MAX_DAYS = 36_500


@dataclass(frozen=True)
class Filters:
    branch: Branch | None = None
    min_days: int = 1

    def data(self) -> str:
        """The filters in callback data: ``BRANCH_CODE_OR_-:DAYS``."""
        return f"{self.branch.code if self.branch else '-'}:{self.min_days}"


def parse_args(context: ContextTypes.DEFAULT_TYPE, args: list[str]) -> tuple[Filters, bool] | str:
    """``[BRANCH] [DAYS] [csv]`` in any order; otherwise the message id saying what is wrong."""
    policy = services(context).policy
    branch: Branch | None = None
    min_days = 1
    as_csv = False
    for arg in args:
        word = arg.strip()
        if word.casefold() == "csv":
            as_csv = True
        elif word.isdigit():
            min_days = int(word)
            if not 1 <= min_days <= MAX_DAYS:
                return "staff.bad_days"
        elif (found := find_branch(policy, word)) is not None:
            branch = found
        else:
            return "staff.unknown_branch"
    return Filters(branch, min_days), as_csv


def parse_data(context: ContextTypes.DEFAULT_TYPE, parts: list[str]) -> Filters | None:
    """Filters from callback data (which may be forged): None when they make no sense."""
    if len(parts) != 2 or not parts[1].isdigit() or not 1 <= int(parts[1]) <= MAX_DAYS:
        return None
    branch = None
    if parts[0] != "-":
        branch = find_branch(services(context).policy, parts[0])
        if branch is None:
            return None
    return Filters(branch, int(parts[1]))


async def _loans(context: ContextTypes.DEFAULT_TYPE, filters: Filters) -> list[OverdueLoan]:
    svc = services(context)
    async with svc.db.session() as session:
        return await overdue_loans(session, svc.policy, svc.now(), svc.tz, branch=filters.branch, min_days=filters.min_days)


def _branch_name(lang: str, branch: Branch | None) -> str:
    if branch is None:
        return t(lang, "staff.all_branches")
    return branch.name_zh if lang == "zh" else branch.name_en


def _page(context: ContextTypes.DEFAULT_TYPE, lang: str, loans: list[OverdueLoan], filters: Filters, page: int) -> tuple[str, list[list[Button]]]:
    """The text and buttons of one page of the list."""
    currency = services(context).policy.circulation.currency
    chunk, nav = paginate(loans, page, PER_PAGE, f"ovd:p:{filters.data()}")
    lines = [
        t(lang, "staff.overdue_line", days=o.days, barcode=escape(o.barcode), title=escape(_short(o.title)),
          name=escape(o.name), card=escape(o.card), fine=f"{currency}{circ.money(o.fine_cents)}")
        for o in chunk
    ]
    text = "\n".join(
        [t(lang, "staff.overdue_title", count=len(loans), branch=escape(_branch_name(lang, filters.branch)), days=filters.min_days)]
        + lines
    )
    buttons: list[list[Button]] = [nav] if nav else []
    buttons.append([("staff.btn_csv", f"ovd:csv:{filters.data()}")])
    return text, buttons


@requires(Role.STAFF)
async def overdue_command(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """/overdue, /overdue 14, /overdue east, /overdue east 7 csv."""
    me = await who(update, context)
    parsed = parse_args(context, list(context.args or []))
    if isinstance(parsed, str):
        branches = ", ".join(b.code for b in services(context).policy.library.branches)
        await reply(update, context, parsed, lang=me.lang, branches=escape(branches), max=MAX_DAYS)
        return
    filters, as_csv = parsed
    loans = await _loans(context, filters)
    if not loans:
        await reply(update, context, "staff.overdue_none", lang=me.lang,
                    branch=escape(_branch_name(me.lang, filters.branch)), days=filters.min_days)
        return
    if as_csv:
        await _send_csv(update, context, me.lang, loans, filters)
        return
    text, buttons = _page(context, me.lang, loans, filters, 0)
    await reply(update, context, "staff.text", lang=me.lang, buttons=buttons, text=text)


@requires(Role.STAFF)
async def overdue_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """A page button (``ovd:p:FILTERS:PAGE``) or the CSV button (``ovd:csv:FILTERS``)."""
    me = await who(update, context)
    parts = (update.callback_query.data or "").split(":") if update.callback_query else []
    action = parts[1] if len(parts) > 1 else ""
    if action == "p" and len(parts) == 5 and parts[4].isdigit():
        filters, page = parse_data(context, parts[2:4]), int(parts[4])
    elif action == "csv" and len(parts) == 4:
        filters, page = parse_data(context, parts[2:4]), 0
    else:
        filters, page = None, 0
    if filters is None:
        await answer(update, context, "common.stale_button", alert=True, lang=me.lang)
        return
    await answer(update, context, lang=me.lang)
    loans = await _loans(context, filters)
    if action == "csv":
        await _send_csv(update, context, me.lang, loans, filters)
        return
    text, buttons = _page(context, me.lang, loans, filters, page)
    await edit(update, context, "staff.text", lang=me.lang, buttons=buttons, text=text)


async def _send_csv(update: Update, context: ContextTypes.DEFAULT_TYPE, lang: str, loans: list[OverdueLoan], filters: Filters) -> None:
    chat = update.effective_chat
    assert chat is not None
    day = services(context).now().astimezone(services(context).tz).date().isoformat()
    name = f"overdue-{day}-{filters.branch.code if filters.branch else 'all'}-{filters.min_days}d.csv"
    await context.bot.send_document(
        chat.id, InputFile(overdue_csv(loans), filename=name),
        caption=t(lang, "staff.csv_caption", count=len(loans), branch=escape(_branch_name(lang, filters.branch)), days=filters.min_days),
        parse_mode=ParseMode.HTML,
    )


def _short(title: str, limit: int = 60) -> str:
    return title if len(title) <= limit else title[: limit - 1] + "…"


def register(app: Application) -> None:  # type: ignore[type-arg]
    app.add_handler(CommandHandler("overdue", overdue_command))
    app.add_handler(CallbackQueryHandler(overdue_pressed, pattern=r"^ovd:"))
