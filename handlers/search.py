"""Catalog search (馆藏检索): ``/search QUERY``, or any plain text outside a conversation.

Results come five a page with Prev/Next (``search:page:<n>``; the query is kept in
``user_data["search_query"]``, and per result message in ``user_data["search_queries"]``, so that
an older list still pages through its own query) and a details button per result (``search:rec:<record id>``) that
shows the full record and every copy. A reader gets a hold button (``hold:place:<record id>``,
handled by the loans module) for a title with no copy on the shelf. A search that finds nothing
offers an interlibrary loan request (``ill:new``, handled by the ILL module) with the query left in
``user_data["ill_prefill"]``.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

from telegram import Update
from telegram.ext import (
    Application,
    CallbackQueryHandler,
    CommandHandler,
    ContextTypes,
    MessageHandler,
    filters,
)

from bot.context import Who, services, who
from bot.i18n import catalogue, t
from bot.ui import Button, answer, edit, escape, paginate, parse_page, reply, trailing_id
from storage.catalog import ON_SHELF, Availability
from storage.ils import CirculationUnavailable
from storage.people import Role
from storage.search import (
    MAX_QUERY_CHARS,
    MAX_RESULTS,
    Copy,
    RecordDetails,
    SearchHit,
    SearchPage,
    record_details,
    search,
    searchable,
)

PER_PAGE = 5
QUERY = "search_query"  # user_data: the query the Prev/Next buttons page through
QUERIES = "search_queries"  # user_data: the query of each recent result list, by message id
REMEMBERED = 20
ILL_PREFILL = "ill_prefill"  # user_data: what "Request by interlibrary loan" starts from
MAX_COPIES_SHOWN = 20


async def search_command(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """/search QUERY: the first page of results (without a query: how to search)."""
    message = update.effective_message
    parts = (message.text or "").split(maxsplit=1) if message is not None else []
    query = parts[1].strip() if len(parts) > 1 else ""
    if not searchable(query):
        await reply(update, context, "search.usage")
        return
    await _first_page(update, context, query)


async def plain_text(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """A plain text message outside any conversation is a catalog search."""
    query = (update.effective_message.text or "").strip() if update.effective_message else ""
    if not searchable(query):  # "?!", an emoji: nothing to look for
        await reply(update, context, "search.usage")
        return
    await _first_page(update, context, query)


async def page_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Prev / Next: another page of the last search, in place."""
    me = await who(update, context)
    user_data = context.user_data if context.user_data is not None else {}
    message = update.callback_query.message if update.callback_query else None
    shown = user_data.get(QUERIES, {}) if isinstance(user_data.get(QUERIES), dict) else {}
    query = shown.get(str(message.message_id)) if message is not None else None
    query = query or user_data.get(QUERY)  # a list from before the per-message memory
    if not isinstance(query, str) or not query:
        await answer(update, context, "common.stale_button", alert=True, lang=me.lang)
        return
    page = min(
        parse_page(update.callback_query.data if update.callback_query else None), MAX_RESULTS // PER_PAGE
    )
    results = await _search(context, query, page)
    await answer(update, context, lang=me.lang)
    if not results.hits:
        await edit(update, context, "search.nothing", lang=me.lang, query=escape(query))
        return
    key, params, buttons = _results_message(me, results, page)
    await edit(update, context, key, buttons=buttons, lang=me.lang, **params)


async def details_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """A result's details: the full record and every copy with its location and status."""
    me = await who(update, context)
    data = update.callback_query.data if update.callback_query else ""
    record_id = trailing_id(data)
    details = None
    if record_id is not None:
        async with services(context).db.session() as session:
            details = await record_details(session, record_id)
    if details is not None:
        live = (await _live(context, [details.record_id])).get(details.record_id)
        if live is STALE:
            details = dataclasses.replace(
                details, availability=dataclasses.replace(details.availability, from_catalogue=True)
            )
        elif live is not None:
            types = {c.barcode: c.item_type for c in details.copies}
            copies = [
                Copy(c.barcode, c.location, c.call_number, c.status, types.get(c.barcode, "book"), c.due_at)
                for c in getattr(live, "copies", ())
            ]
            details = dataclasses.replace(
                details, copies=copies, availability=_summary(live, details.availability)
            )
    if details is None:  # forged or outdated button
        await answer(update, context, "search.no_such_record", alert=True, lang=me.lang)
        return
    await answer(update, context, lang=me.lang)
    buttons: list[list[Button]] = []
    if details.availability.holdable and me.role >= Role.READER:
        buttons.append([("search.hold_this", f"hold:place:{details.record_id}")])
    await reply(
        update,
        context,
        "search.details",
        buttons=buttons,
        lang=me.lang,
        **_details_params(me, context, details),
    )


async def _first_page(update: Update, context: ContextTypes.DEFAULT_TYPE, query: str) -> None:
    me = await who(update, context)
    query = query[:MAX_QUERY_CHARS]
    results = await _search(context, query, 0)
    user_data = context.user_data if context.user_data is not None else {}
    if not results.hits:
        user_data[ILL_PREFILL] = query
        await reply(
            update,
            context,
            "search.nothing",
            buttons=[[("search.ill_button", "ill:new")]],
            lang=me.lang,
            query=escape(query),
        )
        return
    user_data[QUERY] = query
    key, params, buttons = _results_message(me, results, 0)
    if not results.matched_all:
        # Only similar titles: the library probably lacks it. Say so, and offer ILL above them.
        user_data[ILL_PREFILL] = query
        params["lines"] = t(me.lang, "search.partial_only", query=escape(query)) + "\n\n" + str(params["lines"])
        buttons = [[("search.ill_button", "ill:new")], *buttons]
    sent = await reply(update, context, key, buttons=buttons, lang=me.lang, **params)
    # Each result list pages through its own query, also after a newer search.
    remembered = user_data.get(QUERIES)
    shown: dict[str, str] = remembered if isinstance(remembered, dict) else {}
    shown[str(sent.message_id)] = query
    user_data[QUERIES] = dict(list(shown.items())[-REMEMBERED:])


async def _search(context: ContextTypes.DEFAULT_TYPE, query: str, page: int) -> SearchPage:
    async with services(context).db.session() as session:
        results = await search(session, query, limit=PER_PAGE, offset=page * PER_PAGE)
    live = await _live(context, [h.record_id for h in results.hits])
    if not live:
        return results
    hits = [
        dataclasses.replace(h, availability=_summary(live[h.record_id], h.availability))
        if h.record_id in live and live[h.record_id] is not STALE
        else _stale(live, h)
        for h in results.hits
    ]
    return dataclasses.replace(results, hits=hits)


async def _live(context: ContextTypes.DEFAULT_TYPE, record_ids: list[int]) -> dict[int, Any]:
    """The copies as the library's own system (SIP2) sees them now; {} with the local store, which
    the search already read, or when that system does not answer (the store's word stands)."""
    svc = services(context)
    if not record_ids or svc.circulation is None or getattr(svc.settings, "ils", "local") == "local":
        return {}
    try:
        return dict(await svc.circulation.availability(record_ids))
    except CirculationUnavailable:
        return dict.fromkeys(record_ids, STALE)  # the catalogue's word stands, and says so


STALE = object()  # "the library's system did not answer": the stored status is shown, marked (#15)


def _stale(live: dict[int, Any], hit: Any) -> Any:
    """A hit whose live status could not be read keeps the catalogue's, marked as such."""
    if live.get(hit.record_id) is STALE:
        return dataclasses.replace(hit, availability=dataclasses.replace(hit.availability, from_catalogue=True))
    return hit


def _summary(live: Any, stored: Availability) -> Availability:
    """The circulation service's view of a title as the search shows it."""
    copies = list(getattr(live, "copies", ()))
    shelf = [c for c in copies if c.status == ON_SHELF] or copies
    where = Counter((c.location, c.call_number) for c in shelf).most_common(1)
    location, call_number = where[0][0] if where else (stored.location, stored.call_number)
    return Availability(total=live.total, on_shelf=live.on_shelf, location=location, call_number=call_number,
                        from_catalogue=bool(getattr(live, "from_catalogue", False)))


def _results_message(
    me: Who, results: SearchPage, page: int
) -> tuple[str, dict[str, object], list[list[Button]]]:
    """The text parameters and buttons of one page of results."""
    first = results.offset + 1
    lines = [_hit(me.lang, first + i, hit) for i, hit in enumerate(results.hits)]
    details: list[Button] = [
        (f"={t(me.lang, 'search.details_button', number=first + i)}", f"search:rec:{hit.record_id}")
        for i, hit in enumerate(results.hits)
    ]
    holds: list[Button] = []
    if me.role >= Role.READER:
        holds = [
            (f"={t(me.lang, 'search.hold_button', number=first + i)}", f"hold:place:{hit.record_id}")
            for i, hit in enumerate(results.hits)
            if hit.availability.holdable
        ]
    _, nav = paginate(range(results.total), page, PER_PAGE, "search:page")
    key = "search.results_many" if results.total >= MAX_RESULTS else "search.results"
    if results.total == 1:
        key = "search.results_one"  # not "results 1–1 of 1"
    elif len(results.hits) == 1 and key == "search.results":
        key = "search.results_at"
    params: dict[str, object] = {
        "query": escape(results.query),
        "first": first,
        "last": results.offset + len(results.hits),
        "total": results.total,
        "lines": "\n\n".join(lines),
    }
    return key, params, [row for row in (details, holds, nav) if row]


def _hit(lang: str, number: int, hit: SearchHit) -> str:
    latin = t(lang, "search.latin", text=escape(hit.title_latin)) if hit.title_latin else ""
    parts = [p for p in (hit.author, hit.year) if p]
    author_year = escape(" · ".join(parts))
    return t(
        lang,
        "search.hit",
        number=number,
        title=escape(hit.title),
        latin=latin,
        author_year=author_year,
        holdings=escape(_holdings(lang, hit.availability, hit.availability.call_number or hit.call_number)),
    )


def _holdings(lang: str, a: Availability, call_number: str) -> str:
    """ "2 of 3 on shelf, 3F Social Sciences, call number K249.2/…" (plain text; escape it)."""
    if a.total == 0:
        return t(lang, "search.no_copies")
    if a.total == 1:
        key = "search.available_one" if a.on_shelf else "search.none_on_shelf_one"
    elif a.on_shelf:
        key = "search.available_all" if a.on_shelf == a.total else "search.available"
    else:
        key = "search.none_on_shelf"
    return t(
        lang,
        key,
        on_shelf=a.on_shelf,
        total=a.total,
        location=a.location or "—",
        call_number=call_number or "—",
    ) + (t(lang, "sip2.from_catalogue") if a.from_catalogue else "")


def _details_params(me: Who, context: ContextTypes.DEFAULT_TYPE, d: RecordDetails) -> dict[str, object]:
    lang = me.lang

    def field(label: str, value: str) -> str | None:
        return (
            t(lang, "search.field", label=t(lang, f"search.label_{label}"), value=escape(value))
            if value
            else None
        )

    author = t(lang, "search.author_latin", author=d.author, latin=d.author_latin) if d.author and d.author_latin else d.author
    fields = [
        field("author", author),
        field("responsibility", d.responsibility),
        field("edition", d.edition),
        field("publication", d.publication),
        field("physical", d.physical),
        field("subjects", "; ".join(d.subjects)),
        field("series", "; ".join(d.series)),
        field("names", "; ".join(d.names)),
        field("isbn", ", ".join(d.isbns)),
        field("issn", ", ".join(d.issns)),
        field("call_number", d.call_number),
    ]
    tz = services(context).tz
    copies = []
    for copy in d.copies[:MAX_COPIES_SHOWN]:
        key = f"search.status_{copy.status}"
        status = t(lang, key) if key in catalogue(lang) else copy.status  # a status only the ILS knows
        if copy.due_at is not None:
            status = t(lang, "search.due", status=status, date=copy.due_at.astimezone(tz).date().isoformat())
        if copy.item_type == "reference":
            status = t(lang, "search.status_with", status=status, extra=t(lang, "search.status_reference"))
        copies.append(
            t(
                lang,
                "search.copy",
                barcode=escape(copy.barcode),
                location=escape(copy.location or "—"),
                call_number=escape(copy.call_number or "—"),
                status=escape(status),
            )
        )
    if len(d.copies) > MAX_COPIES_SHOWN:
        copies.append(t(lang, "search.copies_more", count=len(d.copies) - MAX_COPIES_SHOWN))
    return {
        "title": escape(d.title),
        "latin": t(lang, "search.latin", text=escape(d.title_latin)) if d.title_latin else "",
        "fields": "\n".join(f for f in fields if f),
        "holdings": escape(_holdings(lang, d.availability, d.call_number)),
        "copies": "\n".join(copies) or t(lang, "search.no_copy_lines"),
    }


def register(app: Application) -> None:  # type: ignore[type-arg]
    """/search and the result buttons."""
    app.add_handler(CommandHandler("search", search_command))
    app.add_handler(CallbackQueryHandler(page_pressed, pattern=r"^search:page:"))
    app.add_handler(CallbackQueryHandler(details_pressed, pattern=r"^search:rec:"))


def register_fallback(app: Application) -> None:  # type: ignore[type-arg]
    """Plain text in a private chat is a search: register after every conversation, so that text
    typed in a conversation's step reaches that conversation first."""
    app.add_handler(MessageHandler(filters.TEXT & ~filters.COMMAND & filters.ChatType.PRIVATE, plain_text))
