"""Events and programmes: /events (5 a page, filter by category) with details, Register or join the
waiting list, /myevents with Cancel, the .ics file and the check-in QR code; staff create, change and
cancel events in a guided chat, download the registrants as CSV and /checkin CODE at the door;
attendees rate the event 1–5 with a comment; /settings offers subscriptions to categories; the job
that queues the reminders and the feedback requests.

Callback data (``ev:…``): ``l:<cat>:<page>`` list page (``-`` = every category), ``f`` category
filter, ``d:<id>`` details, ``r:<id>`` register, ``x:<id>`` cancel mine, ``ics:<id>``, ``qr:<id>``,
``my`` my events, ``rate:<reg>:<n>`` rating, ``nc`` no comment, ``subs`` and ``sub:<cat>``
subscriptions; staff: ``new``, ``e:<field>:<id>`` change time/place/capacity, ``pl:<id>:<code>`` new
place, ``csv:<id>``, ``c:<id>`` / ``cc:<id>`` cancel the event (ask, confirmed), and the form's
``np:<code>``, ``nk:<cat>``, ``na:<aud>``, ``nw``, ``ok``, ``no``.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import warnings
from typing import Any

import segno
from telegram import InputFile, Update
from telegram.constants import ParseMode
from telegram.ext import (
    Application,
    CallbackQueryHandler,
    CommandHandler,
    ContextTypes,
    ConversationHandler,
    MessageHandler,
    filters,
)
from telegram.warnings import PTBUserWarning

from bot.context import Who, services, who
from bot.i18n import localise, t
from bot.roles import requires
from bot.ui import Button, answer, edit, escape, paginate, reply
from handlers.account import cancel_fallbacks
from storage.events import (
    AUDIENCES,
    CATEGORIES,
    CheckIn,
    Event,
    EventDraft,
    EventProblem,
    EventStatus,
    Outcome,
    Rated,
    RegStatus,
    add_comment,
    cancel_event,
    cancel_registration,
    change_event,
    check_in,
    create_event,
    fill_free_seats,
    get_event,
    ics,
    local_time,
    my_registrations,
    place_name,
    queue_feedback_requests,
    queue_reminders,
    rate,
    registrants,
    registrants_csv,
    registration_of,
    set_organiser,
    subscriptions,
    toggle_subscription,
    upcoming,
    waiting_position,
    when_text,
)
from storage.events import (
    register as register_for_event,
)
from storage.people import Role
from storage.tickets import staff_name

log = logging.getLogger(__name__)

PER_PAGE = 5
JOB_EVERY = dt.timedelta(minutes=5)
STEP_TIMEOUT = dt.timedelta(hours=1)
(T_ZH, T_EN, D_ZH, D_EN, START, END, PLACE, CAPACITY, CATEGORY, AUDIENCE, WINDOW, CONFIRM,
 EDIT_TIME, EDIT_CAPACITY, COMMENT) = (f"events:{name}" for name in (
    "t_zh", "t_en", "d_zh", "d_en", "start", "end", "place", "capacity", "category", "audience", "window", "confirm",
    "edit_time", "edit_capacity", "comment"))
FORM, TARGET = "event_form", "event_target"  # keys of context.user_data (persisted as JSON)
TIME_FORMAT = "%Y-%m-%d %H:%M"


def _wake(context: ContextTypes.DEFAULT_TYPE) -> None:
    """Deliver what was just queued now rather than at the dispatcher's next poll."""
    dispatcher = context.bot_data.get("dispatcher")
    if dispatcher is not None:
        dispatcher.wake()


def _parts(update: Update) -> list[str]:
    data = update.callback_query.data if update.callback_query else ""
    return (data or "").split(":")


def _int(text: str) -> int | None:
    return int(text) if text.isdigit() and 0 < int(text) < 2**63 else None


def _category(lang: str, code: str) -> str:
    return t(lang, f"events.cat_{code}") if code in CATEGORIES else code


def _place(context: ContextTypes.DEFAULT_TYPE, lang: str, code: str) -> str:
    return escape(str(localise(lang, place_name(services(context).policy, code))))


def _seats(lang: str, event: Event) -> str:
    left = event.seats_left()
    return t(lang, "events.unlimited") if left is None else str(left)


def _parse_time(text: str, context: ContextTypes.DEFAULT_TYPE) -> dt.datetime | None:
    """``YYYY-MM-DD HH:MM`` in the library's time zone, as UTC."""
    try:
        value = dt.datetime.strptime(" ".join(text.split()), TIME_FORMAT)
    except ValueError:
        return None
    return value.replace(tzinfo=services(context).tz).astimezone(dt.UTC)


# --------------------------------------------------------------------------------------------------
# /events: the list and the details


async def events_command(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """/events: the upcoming events, five a page."""
    me = await who(update, context)
    await _show_list(update, context, me, None, 0, replace=False)


async def list_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """``ev:l:<cat>:<page>``."""
    me = await who(update, context)
    parts = _parts(update)
    category = parts[2] if len(parts) == 4 and parts[2] in CATEGORIES else None
    page = int(parts[3]) if len(parts) == 4 and parts[3].isdigit() else 0
    await answer(update, context, lang=me.lang)
    await _show_list(update, context, me, category, page, replace=True)


async def filter_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """``ev:f``: the category buttons."""
    me = await who(update, context)
    await answer(update, context, lang=me.lang)
    rows: list[list[Button]] = [[("events.btn_all", "ev:l:-:0")]]
    for i in range(0, len(CATEGORIES), 2):
        rows.append([(f"events.cat_{code}", f"ev:l:{code}:0") for code in CATEGORIES[i : i + 2]])
    await edit(update, context, "events.choose_category", buttons=rows, lang=me.lang)


async def _show_list(update: Update, context: ContextTypes.DEFAULT_TYPE, me: Who, category: str | None, page: int, *, replace: bool) -> None:
    svc = services(context)
    async with svc.db.session() as session:
        events = await upcoming(session, svc.now(), category)
    label = t(me.lang, "events.filter_label", category=_category(me.lang, category)) if category else ""
    extra: list[list[Button]] = [[("events.btn_filter", "ev:f"), ("events.btn_my", "ev:my")]]
    if me.is_staff and me.private:
        extra.append([("events.btn_new", "ev:new")])
    show = edit if replace else reply
    if not events:
        await show(update, context, "events.none_upcoming", buttons=extra, lang=me.lang, filter=label)
        return
    chunk, nav = paginate(events, page, PER_PAGE, f"ev:l:{category or '-'}")
    first = events.index(chunk[0])
    lines = [
        t(me.lang, "events.list_line", n=first + i + 1, title=escape(event.title()[me.lang]), when=when_text(event, svc.tz),
          place=_place(context, me.lang, event.place), category=_category(me.lang, event.category), seats=_seats(me.lang, event))
        for i, event in enumerate(chunk)
    ]
    head = t(me.lang, "events.list_title", filter=label, first=first + 1, last=first + len(chunk), total=len(events))
    buttons: list[list[Button]] = [[(f"={first + i + 1}. {event.title()[me.lang][:40]}", f"ev:d:{event.id}")] for i, event in enumerate(chunk)]
    await show(update, context, "events.raw", buttons=[*buttons, nav, *extra], lang=me.lang, text="\n\n".join([head, *lines]))


async def details_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """``ev:d:<id>``: one event, with what this person can do."""
    me = await who(update, context)
    event_id = _int(_parts(update)[-1])
    await answer(update, context, lang=me.lang)
    await _show_details(update, context, me, event_id, replace=False)


async def _show_details(update: Update, context: ContextTypes.DEFAULT_TYPE, me: Who, event_id: int | None, *, replace: bool) -> None:
    svc = services(context)
    async with svc.db.session() as session:
        event = await get_event(session, event_id) if event_id else None
        if event is None:
            await reply(update, context, "events.refused_not_found", lang=me.lang)
            return
        mine = await registration_of(session, event.id, me.user_id)
        position = await waiting_position(session, mine) if mine and mine.status == RegStatus.WAITLISTED else None
        everyone = await registrants(session, event.id) if me.is_staff else []
        organiser = await staff_name(session, event.organiser_staff_id) if event.organiser_staff_id else "—"
    if event.registration_opens and svc.now() < event.registration_opens:
        window = t(me.lang, "events.window_from", opens=local_time(event.registration_opens, svc.tz),
                   closes=local_time(event.registration_closes or event.starts_at, svc.tz))
    else:
        window = t(me.lang, "events.window_open", closes=local_time(event.registration_closes or event.starts_at, svc.tz))
    text = t(
        me.lang, "events.details", title=escape(event.title()[me.lang]), when=when_text(event, svc.tz),
        place=_place(context, me.lang, event.place), category=_category(me.lang, event.category),
        audience=t(me.lang, f"events.aud_{event.audience}"), seats=_seats(me.lang, event),
        capacity=event.capacity or t(me.lang, "events.unlimited"), window=window, description=escape(event.description()[me.lang]),
    )
    extra: list[str] = []
    buttons: list[list[Button]] = []
    if event.status == EventStatus.CANCELLED:
        extra.append(t(me.lang, "events.details_cancelled"))
    elif mine is not None and mine.status == RegStatus.REGISTERED:
        extra.append(t(me.lang, "events.your_registration", code=mine.code))
        buttons += [[("events.btn_qr", f"ev:qr:{event.id}"), ("events.btn_ics", f"ev:ics:{event.id}")],
                    [("events.btn_cancel_registration", f"ev:x:{event.id}")]]
    elif mine is not None and mine.status == RegStatus.WAITLISTED:
        extra.append(t(me.lang, "events.your_waitlist", position=position))
        buttons += [[("events.btn_ics", f"ev:ics:{event.id}"), ("events.btn_leave_waitlist", f"ev:x:{event.id}")]]
    else:
        full = event.seats_left() == 0
        buttons += [[("events.btn_join_waitlist" if full else "events.btn_register", f"ev:r:{event.id}"),
                     ("events.btn_ics", f"ev:ics:{event.id}")]]
    if me.is_staff and me.private:
        seated = [r for r in everyone if r.status == RegStatus.REGISTERED]
        extra.append(t(me.lang, "events.staff_line", registered=len(seated),
                       waiting=sum(r.status == RegStatus.WAITLISTED for r in everyone),
                       checked=sum(r.checked_in_at is not None for r in seated)))
        extra.append(t(me.lang, "events.organiser_line", name=escape(organiser)))
        buttons.append([("events.btn_registrants", f"ev:csv:{event.id}"), ("events.btn_organise", f"ev:org:{event.id}")])
        if event.status == EventStatus.SCHEDULED:
            buttons += [[("events.btn_edit_time", f"ev:e:time:{event.id}"), ("events.btn_edit_place", f"ev:e:place:{event.id}")],
                        [("events.btn_edit_capacity", f"ev:e:cap:{event.id}"), ("events.btn_cancel_event", f"ev:c:{event.id}")]]
    buttons.append([("events.btn_back", "ev:l:-:0")])
    show = edit if replace else reply
    await show(update, context, "events.raw", buttons=buttons, lang=me.lang, text="\n\n".join([text.rstrip(), *extra]))


# --------------------------------------------------------------------------------------------------
# Registering and cancelling


async def register_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """``ev:r:<id>``: a seat, or the waiting list with the position."""
    me = await who(update, context)
    event_id = _int(_parts(update)[-1])
    if event_id is None:
        await answer(update, context, "common.stale_button", alert=True, lang=me.lang)
        return
    svc = services(context)
    async with svc.db.session() as session:
        result = await register_for_event(session, event_id, me.user_id, name=me.name, is_reader=me.reader_id is not None or me.is_staff, now=svc.now())
        event = await get_event(session, event_id)
    await answer(update, context, lang=me.lang)
    reg = result.registration
    if event is None or result.outcome not in (Outcome.REGISTERED, Outcome.WAITLISTED, Outcome.ALREADY):
        await reply(update, context, f"events.refused_{result.outcome.value}", lang=me.lang)
        return
    params: dict[str, Any] = {"title": escape(event.title()[me.lang]), "when": when_text(event, svc.tz),
                              "place": _place(context, me.lang, event.place)}
    if result.outcome == Outcome.REGISTERED and reg is not None:
        await reply(update, context, "events.registered", lang=me.lang, code=reg.code,
                    buttons=[[("events.btn_qr", f"ev:qr:{event_id}"), ("events.btn_ics", f"ev:ics:{event_id}")]], **params)
    elif result.outcome == Outcome.WAITLISTED:
        await reply(update, context, "events.waitlisted", lang=me.lang, position=result.position, **params)
    elif reg is not None and reg.status == RegStatus.WAITLISTED:
        await reply(update, context, "events.already_waiting", lang=me.lang, position=result.position)
    else:
        await reply(update, context, "events.already", lang=me.lang)


async def cancel_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """``ev:x:<id>``: cancel my registration (the first waiting gets the seat)."""
    me = await who(update, context)
    event_id = _int(_parts(update)[-1])
    svc = services(context)
    async with svc.db.session() as session:
        cancelled = await cancel_registration(session, event_id or 0, me.user_id, now=svc.now(), tz=svc.tz, policy=svc.policy)
        event = await get_event(session, event_id) if event_id else None
    await answer(update, context, lang=me.lang)
    if cancelled is None or event is None:
        await reply(update, context, "events.nothing_to_cancel", lang=me.lang)
        return
    _wake(context)
    await edit(update, context, "events.cancelled_registration", lang=me.lang, title=escape(event.title()[me.lang]))


async def myevents_command(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """/myevents: my upcoming registrations and places on waiting lists, with Cancel."""
    me = await who(update, context)
    await _show_mine(update, context, me)


async def my_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    me = await who(update, context)
    await answer(update, context, lang=me.lang)
    await _show_mine(update, context, me)


async def _show_mine(update: Update, context: ContextTypes.DEFAULT_TYPE, me: Who) -> None:
    svc = services(context)
    async with svc.db.session() as session:
        mine = await my_registrations(session, me.user_id, svc.now())
        positions = {reg.id: await waiting_position(session, reg) for reg, _ in mine if reg.status == RegStatus.WAITLISTED}
    if not mine:
        await reply(update, context, "events.my_none", lang=me.lang)
        return
    lines = [t(me.lang, "events.my_title")]
    buttons: list[list[Button]] = []
    for n, (reg, event) in enumerate(mine, start=1):
        if reg.status == RegStatus.REGISTERED:
            status, code = t(me.lang, "events.status_registered"), t(me.lang, "events.my_code", code=reg.code)
        else:
            status, code = t(me.lang, "events.your_waitlist", position=positions[reg.id]), ""
        lines.append(t(me.lang, "events.my_line", n=n, title=escape(event.title()[me.lang]), when=when_text(event, svc.tz),
                       place=_place(context, me.lang, event.place), status=status, code=code))
        buttons.append([(f"={n}. " + t(me.lang, "events.btn_details"), f"ev:d:{event.id}"),
                        (f"={n}. " + t(me.lang, "events.btn_cancel_registration"), f"ev:x:{event.id}")])
    await reply(update, context, "events.raw", buttons=buttons, lang=me.lang, text="\n\n".join(lines))


async def ics_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """``ev:ics:<id>``: the event as a calendar file."""
    me = await who(update, context)
    event_id = _int(_parts(update)[-1])
    async with services(context).db.session() as session:
        event = await get_event(session, event_id) if event_id else None
    await answer(update, context, lang=me.lang)
    if event is None:
        await reply(update, context, "events.refused_not_found", lang=me.lang)
        return
    place = str(localise(me.lang, place_name(services(context).policy, event.place)))
    chat = update.effective_chat
    assert chat is not None
    await context.bot.send_document(
        chat.id, InputFile(ics(event, me.lang, place), filename=f"event-{event.id}.ics"),
        caption=t(me.lang, "events.ics_caption", title=escape(event.title()[me.lang])), parse_mode=ParseMode.HTML,
    )


def qr_png(code: str) -> bytes:
    """The check-in code as a QR image (PNG) for the door scanner or the staff's phone."""
    out = io.BytesIO()
    segno.make(code, error="m", micro=False).save(out, kind="png", scale=10, border=4)
    return out.getvalue()


async def qr_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """``ev:qr:<id>``: my check-in code as a QR image."""
    me = await who(update, context)
    event_id = _int(_parts(update)[-1])
    async with services(context).db.session() as session:
        event = await get_event(session, event_id) if event_id else None
        mine = await registration_of(session, event_id, me.user_id) if event_id else None
    await answer(update, context, lang=me.lang)
    if event is None or mine is None or mine.status != RegStatus.REGISTERED:
        await reply(update, context, "events.nothing_to_cancel", lang=me.lang)
        return
    chat = update.effective_chat
    assert chat is not None
    await context.bot.send_photo(
        chat.id, InputFile(qr_png(mine.code), filename=f"checkin-{mine.code}.png"),
        caption=t(me.lang, "events.qr_caption", title=escape(event.title()[me.lang]), code=mine.code), parse_mode=ParseMode.HTML,
    )


# --------------------------------------------------------------------------------------------------
# Check-in, feedback, subscriptions


@requires(Role.STAFF)
async def checkin_command(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """/checkin CODE: mark the attendance of the reader showing the code."""
    me = await who(update, context)
    code = "".join(context.args or [])
    if not code:
        await reply(update, context, "events.checkin_usage", lang=me.lang)
        return
    svc = services(context)
    async with svc.db.session() as session:
        result = await check_in(session, code, staff_id=me.user_id, now=svc.now())
    if result.outcome == CheckIn.UNKNOWN or result.event is None or result.registration is None:
        await reply(update, context, "events.checkin_unknown", lang=me.lang, code=escape(code[:20]))
        return
    key = "events.checkin_ok" if result.outcome == CheckIn.CHECKED_IN else f"events.checkin_{result.outcome.value}"
    await reply(update, context, key, lang=me.lang, name=escape(result.registration.name or str(result.registration.telegram_id)),
                title=escape(result.event.title()[me.lang]))


async def rating_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str | int:
    """``ev:rate:<reg>:<n>``: save the rating, then ask for an optional comment."""
    me = await who(update, context)
    parts = _parts(update)
    reg_id = _int(parts[2]) if len(parts) == 4 else None
    stars = int(parts[3]) if len(parts) == 4 and parts[3].isdigit() else 0
    svc = services(context)
    async with svc.db.session() as session:
        outcome = await rate(session, reg_id or 0, me.user_id, stars, now=svc.now()) if reg_id else Rated.NOT_ALLOWED
    if outcome != Rated.SAVED:
        key = "events.rated_already" if outcome == Rated.ALREADY else "events.rate_not_allowed"
        await answer(update, context, key, alert=True, lang=me.lang)
        return ConversationHandler.END
    await answer(update, context, lang=me.lang)
    context.user_data[TARGET] = reg_id  # type: ignore[index]
    await edit(update, context, "events.rated", lang=me.lang, buttons=[[("events.btn_no_comment", "ev:nc")]])
    return COMMENT


async def comment_received(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
    me = await who(update, context)
    reg_id = (context.user_data or {}).pop(TARGET, None)
    text = update.message.text if update.message else ""
    if reg_id:
        async with services(context).db.session() as session:
            await add_comment(session, int(reg_id), me.user_id, text or "")
    await reply(update, context, "events.comment_saved", lang=me.lang)
    return ConversationHandler.END


async def no_comment(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
    me = await who(update, context)
    (context.user_data or {}).pop(TARGET, None)
    await answer(update, context, lang=me.lang)
    await edit(update, context, "events.comment_skipped", lang=me.lang)
    return ConversationHandler.END


def _subscription_buttons(lang: str, chosen: set[str]) -> list[list[Button]]:
    rows: list[list[Button]] = []
    for i in range(0, len(CATEGORIES), 2):
        rows.append([
            ("=" + t(lang, "events.btn_sub_on" if code in chosen else "events.btn_sub_off", category=_category(lang, code)), f"ev:sub:{code}")
            for code in CATEGORIES[i : i + 2]
        ])
    return rows


async def subscriptions_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """``ev:subs`` (from /settings) and ``ev:sub:<cat>``: the categories to hear about, toggled."""
    me = await who(update, context)
    parts = _parts(update)
    async with services(context).db.session() as session:
        if len(parts) == 3 and await toggle_subscription(session, me.user_id, parts[2]) is None:
            await answer(update, context, "common.stale_button", alert=True, lang=me.lang)
            return
        chosen = await subscriptions(session, me.user_id)
    await answer(update, context, lang=me.lang)
    await edit(update, context, "events.subscriptions", lang=me.lang, buttons=_subscription_buttons(me.lang, chosen))


# --------------------------------------------------------------------------------------------------
# Staff: the guided form, changes, cancellation, the registrants


def _form(context: ContextTypes.DEFAULT_TYPE) -> dict[str, Any]:
    data: dict[str, Any] = context.user_data.setdefault(FORM, {})  # type: ignore[union-attr]
    return data


async def _staff(update: Update, context: ContextTypes.DEFAULT_TYPE) -> Who | None:
    me = await who(update, context)
    if me.is_staff and me.private:
        return me
    if update.callback_query is not None:
        await answer(update, context, "common.not_allowed", alert=True, lang=me.lang)
    else:
        await reply(update, context, "common.not_allowed", lang=me.lang)
    return None


async def new_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str | int:
    """``ev:new``: the first step of the form."""
    me = await _staff(update, context)
    if me is None:
        return ConversationHandler.END
    await answer(update, context, lang=me.lang)
    context.user_data[FORM] = {}  # type: ignore[index]
    await reply(update, context, "events.new_title_zh", lang=me.lang)
    return T_ZH


def _text_step(field: str, next_key: str, next_state: str, *, optional: bool = False) -> Any:
    async def step(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str:
        me = await who(update, context)
        text = (update.message.text or "").strip() if update.message else ""
        _form(context)[field] = "" if optional and text == "-" else text
        await reply(update, context, next_key, lang=me.lang, **_step_buttons(context, next_state, me.lang))
        return next_state

    step.__name__ = f"form_{field}"
    return step


def _step_buttons(context: ContextTypes.DEFAULT_TYPE, state: str, lang: str) -> dict[str, Any]:
    if state == PLACE:
        places = services(context).policy.library.places
        return {"buttons": [[(f"={p.name_zh if lang == 'zh' else p.name_en}", f"ev:np:{p.code}")] for p in places]}
    if state == CATEGORY:
        return {"buttons": [[(f"events.cat_{c}", f"ev:nk:{c}") for c in CATEGORIES[i : i + 2]] for i in range(0, len(CATEGORIES), 2)]}
    if state == AUDIENCE:
        return {"buttons": [[(f"events.aud_{a}", f"ev:na:{a}") for a in AUDIENCES]]}
    if state == WINDOW:
        return {"buttons": [[("events.btn_window_default", "ev:nw")]]}
    return {}


async def form_start(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str:
    me = await who(update, context)
    start = _parse_time((update.message.text or "") if update.message else "", context)
    if start is None:
        await reply(update, context, "events.bad_time", lang=me.lang)
        return START
    _form(context)["starts_at"] = start.isoformat()
    await reply(update, context, "events.new_end", lang=me.lang)
    return END


async def form_end(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str:
    me = await who(update, context)
    text = (update.message.text or "").strip() if update.message else ""
    start = dt.datetime.fromisoformat(_form(context)["starts_at"])
    if len(text) <= 5:
        text = f"{start.astimezone(services(context).tz):%Y-%m-%d} {text}"
    end = _parse_time(text, context)
    if end is None:
        await reply(update, context, "events.bad_time", lang=me.lang)
        return END
    _form(context)["ends_at"] = end.isoformat()
    await reply(update, context, "events.new_place", lang=me.lang, **_step_buttons(context, PLACE, me.lang))
    return PLACE


async def form_place(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str:
    me = await who(update, context)
    await answer(update, context, lang=me.lang)
    _form(context)["place"] = _parts(update)[-1]
    await reply(update, context, "events.new_capacity", lang=me.lang)
    return CAPACITY


async def form_capacity(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str:
    me = await who(update, context)
    text = (update.message.text or "").strip() if update.message else ""
    if not text.isdigit():
        await reply(update, context, "events.bad_number", lang=me.lang)
        return CAPACITY
    _form(context)["capacity"] = int(text)
    await reply(update, context, "events.new_category", lang=me.lang, **_step_buttons(context, CATEGORY, me.lang))
    return CATEGORY


async def form_category(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str:
    me = await who(update, context)
    await answer(update, context, lang=me.lang)
    _form(context)["category"] = _parts(update)[-1]
    await reply(update, context, "events.new_audience", lang=me.lang, **_step_buttons(context, AUDIENCE, me.lang))
    return AUDIENCE


async def form_audience(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str:
    me = await who(update, context)
    await answer(update, context, lang=me.lang)
    _form(context)["audience"] = _parts(update)[-1]
    await reply(update, context, "events.new_window", lang=me.lang, **_step_buttons(context, WINDOW, me.lang))
    return WINDOW


async def form_window_default(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str:
    me = await who(update, context)
    await answer(update, context, lang=me.lang)
    form = _form(context)
    form["opens"] = form["closes"] = None
    return await _preview(update, context, me)


async def form_window(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str:
    me = await who(update, context)
    words = ((update.message.text or "") if update.message else "").split()
    opens = _parse_time(" ".join(words[:2]), context) if len(words) == 4 else None
    closes = _parse_time(" ".join(words[2:]), context) if len(words) == 4 else None
    if opens is None or closes is None:
        await reply(update, context, "events.bad_window", lang=me.lang, **_step_buttons(context, WINDOW, me.lang))
        return WINDOW
    form = _form(context)
    form["opens"], form["closes"] = opens.isoformat(), closes.isoformat()
    return await _preview(update, context, me)


def _draft(form: dict[str, Any]) -> EventDraft:
    def moment(key: str) -> dt.datetime | None:
        return dt.datetime.fromisoformat(form[key]) if form.get(key) else None

    starts, ends = moment("starts_at"), moment("ends_at")
    assert starts is not None and ends is not None
    return EventDraft(
        title_zh=form.get("title_zh", ""), title_en=form.get("title_en", ""), description_zh=form.get("description_zh", ""),
        description_en=form.get("description_en", ""), starts_at=starts, ends_at=ends, place=form.get("place", ""),
        capacity=int(form.get("capacity", 0)), category=form.get("category", ""), audience=form.get("audience", "everyone"),
        registration_opens=moment("opens"), registration_closes=moment("closes"),
    )


async def _preview(update: Update, context: ContextTypes.DEFAULT_TYPE, me: Who) -> str:
    draft = _draft(_form(context))
    problem = draft.problem()
    if problem is not None:
        await reply(update, context, f"events.problem_{problem.value}", lang=me.lang)
        if problem == EventProblem.BAD_WINDOW:
            await reply(update, context, "events.new_window", lang=me.lang, **_step_buttons(context, WINDOW, me.lang))
            return WINDOW
        await reply(update, context, "events.new_start", lang=me.lang)
        return START
    svc = services(context)
    event = Event(title_zh=draft.title_zh, title_en=draft.title_en, description_zh=draft.description_zh, description_en=draft.description_en,
                  starts_at=draft.starts_at, ends_at=draft.ends_at, place=draft.place, capacity=draft.capacity, seats_taken=0,
                  category=draft.category, audience=draft.audience, registration_opens=draft.registration_opens,
                  registration_closes=draft.registration_closes)
    window = t(me.lang, "events.window_open", closes=local_time(draft.registration_closes or draft.starts_at, svc.tz))
    card = t(me.lang, "events.details", title=escape(f"{draft.title_zh} / {draft.title_en}"), when=when_text(event, svc.tz),
             place=_place(context, me.lang, draft.place), category=_category(me.lang, draft.category),
             audience=t(me.lang, f"events.aud_{draft.audience}"), seats=_seats(me.lang, event),
             capacity=draft.capacity or t(me.lang, "events.unlimited"), window=window,
             description=escape(f"{draft.description_zh}\n{draft.description_en}".strip()))
    await reply(update, context, "events.preview", lang=me.lang, card=card,
                buttons=[[("events.btn_publish", "ev:ok"), ("events.btn_discard", "ev:no")]])
    return CONFIRM


async def form_publish(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
    me = await _staff(update, context)
    if me is None:
        return ConversationHandler.END
    await answer(update, context, lang=me.lang)
    svc = services(context)
    async with svc.db.session() as session:
        created = await create_event(session, _draft(_form(context)), now=svc.now(), tz=svc.tz, policy=svc.policy,
                                     organiser_staff_id=me.user_id)
    context.user_data.pop(FORM, None)  # type: ignore[union-attr]
    if created.event is None:
        await edit(update, context, f"events.problem_{created.problem.value if created.problem else 'no_title'}", lang=me.lang)
        return ConversationHandler.END
    _wake(context)
    await edit(update, context, "events.published", lang=me.lang, id=created.event.id, announced=created.announced)
    return ConversationHandler.END


async def form_discard(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
    me = await who(update, context)
    await answer(update, context, lang=me.lang)
    context.user_data.pop(FORM, None)  # type: ignore[union-attr]
    await edit(update, context, "events.discarded", lang=me.lang)
    return ConversationHandler.END


async def text_expected(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    me = await who(update, context)
    await reply(update, context, "events.text_expected", lang=me.lang)


async def choose_first(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    me = await who(update, context)
    await reply(update, context, "events.choose_first", lang=me.lang)


async def edit_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str | int:
    """``ev:e:<field>:<id>``: change the time, the place or the capacity."""
    me = await _staff(update, context)
    if me is None:
        return ConversationHandler.END
    parts = _parts(update)
    event_id = _int(parts[-1])
    await answer(update, context, lang=me.lang)
    if event_id is None or len(parts) != 4:
        return ConversationHandler.END
    context.user_data[TARGET] = event_id  # type: ignore[index]
    if parts[2] == "place":
        places = services(context).policy.library.places
        await reply(update, context, "events.edit_place", lang=me.lang,
                    buttons=[[(f"={p.name_zh if me.lang == 'zh' else p.name_en}", f"ev:pl:{event_id}:{p.code}")] for p in places])
        return ConversationHandler.END
    if parts[2] == "cap":
        await reply(update, context, "events.edit_capacity", lang=me.lang)
        return EDIT_CAPACITY
    await reply(update, context, "events.edit_time", lang=me.lang)
    return EDIT_TIME


async def edit_time_received(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str | int:
    me = await who(update, context)
    words = ((update.message.text or "") if update.message else "").split()
    starts = _parse_time(" ".join(words[:2]), context)
    ends = _parse_time(f"{words[0]} {words[2]}", context) if starts and len(words) == 3 else None
    if starts is None or (len(words) == 3 and ends is None) or len(words) not in (2, 3):
        await reply(update, context, "events.bad_time", lang=me.lang)
        return EDIT_TIME
    return await _apply_change(update, context, me, starts_at=starts, ends_at=ends)


async def edit_capacity_received(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str | int:
    me = await who(update, context)
    text = (update.message.text or "").strip() if update.message else ""
    if not text.isdigit():
        await reply(update, context, "events.bad_number", lang=me.lang)
        return EDIT_CAPACITY
    return await _apply_change(update, context, me, capacity=int(text))


async def place_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """``ev:pl:<id>:<code>``: the new place (every registrant is told)."""
    me = await _staff(update, context)
    if me is None:
        return
    parts = _parts(update)
    codes = {p.code for p in services(context).policy.library.places}
    if len(parts) != 4 or _int(parts[2]) is None or parts[3] not in codes:
        await answer(update, context, "common.stale_button", alert=True, lang=me.lang)
        return
    await answer(update, context, lang=me.lang)
    context.user_data[TARGET] = int(parts[2])  # type: ignore[index]
    await _apply_change(update, context, me, place=parts[3])


async def _apply_change(update: Update, context: ContextTypes.DEFAULT_TYPE, me: Who, **change: Any) -> int:
    event_id = (context.user_data or {}).pop(TARGET, None)
    if not me.is_staff:  # the role may have been withdrawn since the step began
        await reply(update, context, "common.not_allowed", lang=me.lang)
        return ConversationHandler.END
    svc = services(context)
    async with svc.db.session() as session:
        changed = await change_event(session, int(event_id or 0), now=svc.now(), tz=svc.tz, policy=svc.policy, **change)
    if changed.event is None:
        await reply(update, context, "events.change_failed", lang=me.lang)
        return ConversationHandler.END
    _wake(context)
    if "capacity" in change:
        await reply(update, context, "events.changed_capacity", lang=me.lang, seats=_seats(me.lang, changed.event))
    else:
        await reply(update, context, "events.changed", lang=me.lang, told=changed.told)
    return ConversationHandler.END


async def cancel_event_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """``ev:c:<id>`` asks; ``ev:cc:<id>`` cancels the event and tells everyone."""
    me = await _staff(update, context)
    if me is None:
        return
    parts = _parts(update)
    event_id = _int(parts[-1])
    svc = services(context)
    await answer(update, context, lang=me.lang)
    async with svc.db.session() as session:
        event = await get_event(session, event_id) if event_id else None
        if event is None:
            return
        if parts[1] == "c":
            count = sum(r.status != RegStatus.CANCELLED for r in await registrants(session, event.id))
            await reply(update, context, "events.confirm_cancel", lang=me.lang, title=escape(event.title()[me.lang]), count=count,
                        buttons=[[("events.btn_confirm_cancel", f"ev:cc:{event.id}")]])
            return
        done = await cancel_event(session, event.id, now=svc.now(), tz=svc.tz, policy=svc.policy)
    if done.event is None:
        await edit(update, context, "events.change_failed", lang=me.lang)
        return
    _wake(context)
    await edit(update, context, "events.event_cancelled", lang=me.lang, id=done.event.id, told=done.told)


async def organise_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """``ev:org:<id>``: the presser becomes the staff member responsible (ratings count for them)."""
    me = await _staff(update, context)
    if me is None:
        return
    event_id = _int(_parts(update)[-1])
    async with services(context).db.session() as session:
        event = await set_organiser(session, event_id, me.user_id) if event_id else None
    if event is None:
        await answer(update, context, "common.stale_button", alert=True, lang=me.lang)
        return
    await answer(update, context, "events.organiser_set", lang=me.lang)
    await _show_details(update, context, me, event.id, replace=True)


async def csv_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """``ev:csv:<id>``: the registrants as a CSV file."""
    me = await _staff(update, context)
    if me is None:
        return
    event_id = _int(_parts(update)[-1])
    svc = services(context)
    async with svc.db.session() as session:
        event = await get_event(session, event_id) if event_id else None
        rows = await registrants(session, event.id) if event else []
    await answer(update, context, lang=me.lang)
    if event is None:
        return
    chat = update.effective_chat
    assert chat is not None
    await context.bot.send_document(
        chat.id, InputFile(registrants_csv(event, rows, svc.tz).encode("utf-8"), filename=f"event-{event.id}-registrants.csv"),
        caption=t(me.lang, "events.registrants_caption", title=escape(event.title()[me.lang])), parse_mode=ParseMode.HTML,
    )


# --------------------------------------------------------------------------------------------------
# The job


async def reminders_job(context: ContextTypes.DEFAULT_TYPE) -> None:
    """Queue the reminders and feedback requests that are due (the outbox keeps each one single)."""
    svc = services(context)
    now = svc.now()
    async with svc.db.session() as session:
        queued = await queue_reminders(session, now=now, tz=svc.tz, policy=svc.policy)
        queued += await queue_feedback_requests(session, now=now, tz=svc.tz, policy=svc.policy)
        queued += await fill_free_seats(session, now=now, tz=svc.tz, policy=svc.policy)
    if queued:
        log.info("events: %d reminders and feedback requests queued", queued)
        _wake(context)


def register(app: Application) -> None:  # type: ignore[type-arg]
    """/events, /myevents, /checkin, the event buttons, the staff's form and the reminder job."""
    words = filters.TEXT & ~filters.COMMAND
    anything = ~filters.COMMAND
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PTBUserWarning)  # buttons as entry points, tracked per chat on purpose
        conversation = ConversationHandler(
            entry_points=[
                CallbackQueryHandler(new_pressed, pattern=r"^ev:new$"),
                CallbackQueryHandler(edit_pressed, pattern=r"^ev:e:(time|place|cap):\d+$"),
                CallbackQueryHandler(rating_pressed, pattern=r"^ev:rate:\d+:\d$"),
            ],
            states={
                T_ZH: [MessageHandler(words, _text_step("title_zh", "events.new_title_en", T_EN)), MessageHandler(anything, text_expected)],
                T_EN: [MessageHandler(words, _text_step("title_en", "events.new_description_zh", D_ZH)), MessageHandler(anything, text_expected)],
                D_ZH: [MessageHandler(words, _text_step("description_zh", "events.new_description_en", D_EN, optional=True)),
                       MessageHandler(anything, text_expected)],
                D_EN: [MessageHandler(words, _text_step("description_en", "events.new_start", START, optional=True)),
                       MessageHandler(anything, text_expected)],
                START: [MessageHandler(words, form_start), MessageHandler(anything, text_expected)],
                END: [MessageHandler(words, form_end), MessageHandler(anything, text_expected)],
                PLACE: [CallbackQueryHandler(form_place, pattern=r"^ev:np:"), MessageHandler(anything, choose_first)],
                CAPACITY: [MessageHandler(words, form_capacity), MessageHandler(anything, text_expected)],
                CATEGORY: [CallbackQueryHandler(form_category, pattern=r"^ev:nk:"), MessageHandler(anything, choose_first)],
                AUDIENCE: [CallbackQueryHandler(form_audience, pattern=r"^ev:na:(everyone|readers)$"), MessageHandler(anything, choose_first)],
                WINDOW: [CallbackQueryHandler(form_window_default, pattern=r"^ev:nw$"), MessageHandler(words, form_window),
                         MessageHandler(anything, text_expected)],
                CONFIRM: [CallbackQueryHandler(form_publish, pattern=r"^ev:ok$"), CallbackQueryHandler(form_discard, pattern=r"^ev:no$"),
                          MessageHandler(anything, choose_first)],
                EDIT_TIME: [MessageHandler(words, edit_time_received), MessageHandler(anything, text_expected)],
                EDIT_CAPACITY: [MessageHandler(words, edit_capacity_received), MessageHandler(anything, text_expected)],
                COMMENT: [MessageHandler(words, comment_received), CallbackQueryHandler(no_comment, pattern=r"^ev:nc$"),
                          MessageHandler(anything, text_expected)],
            },
            fallbacks=[*cancel_fallbacks()],
            allow_reentry=True,
            conversation_timeout=STEP_TIMEOUT,  # an abandoned step must not swallow a later catalog search
            name="events",
            persistent=True,
        )
    app.add_handler(conversation)
    app.add_handler(CommandHandler("events", events_command))
    app.add_handler(CommandHandler("myevents", myevents_command))
    app.add_handler(CommandHandler("checkin", checkin_command))  # also from the staff group: the role is the sender's
    app.add_handler(CallbackQueryHandler(list_pressed, pattern=r"^ev:l:[a-z-]+:\d+$"))
    app.add_handler(CallbackQueryHandler(filter_pressed, pattern=r"^ev:f$"))
    app.add_handler(CallbackQueryHandler(details_pressed, pattern=r"^ev:d:\d+$"))
    app.add_handler(CallbackQueryHandler(register_pressed, pattern=r"^ev:r:\d+$"))
    app.add_handler(CallbackQueryHandler(cancel_pressed, pattern=r"^ev:x:\d+$"))
    app.add_handler(CallbackQueryHandler(my_pressed, pattern=r"^ev:my$"))
    app.add_handler(CallbackQueryHandler(ics_pressed, pattern=r"^ev:ics:\d+$"))
    app.add_handler(CallbackQueryHandler(qr_pressed, pattern=r"^ev:qr:\d+$"))
    app.add_handler(CallbackQueryHandler(subscriptions_pressed, pattern=r"^ev:subs?(:[a-z]+)?$"))
    app.add_handler(CallbackQueryHandler(place_pressed, pattern=r"^ev:pl:\d+:[^:]+$"))
    app.add_handler(CallbackQueryHandler(cancel_event_pressed, pattern=r"^ev:cc?:\d+$"))
    app.add_handler(CallbackQueryHandler(csv_pressed, pattern=r"^ev:csv:\d+$"))
    app.add_handler(CallbackQueryHandler(organise_pressed, pattern=r"^ev:org:\d+$"))
    if app.job_queue is not None:
        app.job_queue.run_repeating(reminders_job, interval=JOB_EVERY, first=20, name="events.reminders")

