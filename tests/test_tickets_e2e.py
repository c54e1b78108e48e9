"""Complaints and feedback end to end: the real bot over HTTP through the emulator, as a reader, a
visitor, staff in the staff chat and in private chats, with the clock moved for escalation and
auto-closing."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

from sqlalchemy import select

from bot.embedded import STAFF_CHAT_ID, EmbeddedBot
from bot.emulator import Person
from storage.outbox import Delivery, DeliveryState
from storage.people import Reader, Role, User, add_staff
from storage.tickets import Labels, Ticket, TicketMessage, file_ticket, ticket_stats

READER, VISITOR, STAFF, STAFF2 = 301, 302, 9001, 9003


def texts(messages: list[dict[str, Any]]) -> str:
    return "\n".join(m["text"] or "" for m in messages if m["from_bot"])


def containing(fragment: str) -> Any:
    return lambda m: fragment in (m["text"] or "")


async def watch(env: EmbeddedBot, user_id: int, *, chat_id: int | None = None, language_code: str = "en") -> Person:
    """A person whose chat is followed from now on (pushes arriving later are seen by ``wait_for``)."""
    person = await env.person(user_id, chat_id=chat_id, language_code=language_code)
    await person.__aenter__()
    return person


async def latest(person: Person, fragment: str) -> dict[str, Any]:
    """The newest bot message containing ``fragment``: already there (it may arrive while the person's
    own last action was still being answered), or the next one to come."""
    found = [m for m in person.bot_messages() if fragment in (m["text"] or "")]
    return found[-1] if found else (await person.wait_for(containing(fragment)))[-1]


async def setup(env: EmbeddedBot) -> None:
    """A reader with a linked card (Wang Fang, C0301) and two staff members."""
    async with env.db.session() as s:
        s.add(Reader(id=1, card_number="C0301", name="Wang Fang", pin_hash="x"))
        await s.flush()
        s.add(User(telegram_id=READER, first_name="Fang", telegram_language="en", reader_id=1))
        await add_staff(s, STAFF, Role.STAFF, "Li Na")
        await add_staff(s, STAFF2, Role.STAFF, "Chen Jie")
    env.emulator.started(READER, STAFF, STAFF2)  # they pressed Start some time ago


async def ticket(env: EmbeddedBot, ticket_id: int = 1) -> Ticket:
    async with env.db.session() as s:
        found = await s.get(Ticket, ticket_id)
        assert found is not None
        return found


async def file_via_bot(person: Person, *, category: str, text: str, anonymous: bool, photo: bool = False) -> str:
    """Go through /complain; the bot's last answer."""
    assert "Choose a category" in texts(await person.send("/complain"))
    assert "describe it" in texts(await person.press(category))
    if photo:
        asked = texts(await person.send_photo(caption=text))  # the caption is the text: no photo step
    else:
        assert "add a photo" in texts(await person.send(text))
        asked = texts(await person.press("Skip"))
    assert "Where in the library" in asked
    await person.press("3F Social Sciences reading area")
    return texts(await person.press("Stay anonymous" if anonymous else "Show my name"))


async def test_named_ticket_from_filing_to_rating(bot_env: EmbeddedBot) -> None:
    await setup(bot_env)
    group = await watch(bot_env, STAFF, chat_id=STAFF_CHAT_ID)
    li = await watch(bot_env, STAFF)
    fang = await bot_env.person(READER)

    filed = await file_via_bot(fang, category="Environment and noise", text="Loud phone calls <3F>", anonymous=False, photo=True)
    assert "T-000001" in filed and "24 hours" in filed

    alert = (await group.wait_for(containing("T-000001")))[-1]
    assert "Wang Fang (C0301)" in alert["text"] and "Loud phone calls &lt;3F&gt;" in alert["text"]
    assert alert["photo"] and "三层" in alert["text"]
    await group.press_data(alert["message_id"], "tk:claim:1")
    assert "You have claimed T-000001" in group.last_callback_answer["text"]
    card = (await li.wait_for(containing("You claimed ticket T-000001")))[-1]
    assert "Wang Fang" in card["text"]
    assert "being handled" in texts(await fang.wait_for(containing("being handled")))
    assert (await ticket(bot_env)).status == "open"

    # Staff reply → the reader; the reader's answer → back to that staff member.
    assert "Write your reply" in texts(await li.press("Reply", message=card))
    assert "waits on the reader" in texts(await li.send("Which seat were you at?"))
    relayed = (await fang.wait_for(containing("Which seat")))[-1]
    assert (await ticket(bot_env)).status == "waiting_on_reader"
    assert "Write your answer" in texts(await fang.press("Reply", message=relayed))
    assert "Sent to the library staff" in texts(await fang.send("Table 12, near the window"))
    back = (await li.wait_for(containing("Table 12")))[-1]
    assert "Wang Fang" in back["text"]
    assert (await ticket(bot_env)).status == "open"

    # The reader's list, and the staff card with the conversation.
    mine = texts(await fang.send("/tickets"))
    assert "T-000001" in mine and "open" in mine
    view = texts(await li.send("/tickets T-000001"))
    assert "Which seat were you at?" in view and "Table 12" in view and "Handled by: Li Na" in view

    # Resolution with a closing message, then the rating and a comment close it.
    assert "closing message" in texts(await li.press("Resolve", message=back))
    assert "is resolved" in texts(await li.send("We put up quiet-zone signs on 3F."))
    closing = (await fang.wait_for(containing("has been resolved")))[-1]
    assert "quiet-zone signs" in closing["text"]
    assert "add a comment" in texts(await fang.press("5 ★", message=closing))
    assert "comment is saved" in texts(await fang.send("Much better now, thanks"))
    assert "rated ★★★★★" in texts(await li.wait_for(containing("rated")))
    done = await ticket(bot_env)
    assert (done.status, done.rating, done.rating_comment, done.closed_reason) == ("closed", 5, "Much better now, thanks", "rated")
    assert done.first_response_at is not None and done.escalated_at is None

    # The old Reply button on a closed ticket is refused with a clear answer.
    await fang.press("Reply", message=relayed)
    assert "resolved or closed" in fang.last_callback_answer["text"]
    await fang.press_data(closing["message_id"], "tk:rate:1:1")
    assert "already been rated" in fang.last_callback_answer["text"]

    async with bot_env.db.session() as s:
        stats = await ticket_stats(s, None, None, bot_env.now())
    assert stats.by_status["closed"] == 1 and stats.ratings == 1 and stats.average_rating == 5.0
    assert stats.sla_breaches == 0 and stats.median_first_response_hours is not None


async def test_anonymous_ticket_escalation_replies_and_auto_close(bot_env: EmbeddedBot) -> None:
    await setup(bot_env)
    group = await watch(bot_env, STAFF, chat_id=STAFF_CHAT_ID)
    li = await watch(bot_env, STAFF)
    guest = await bot_env.person(VISITOR, language_code="en")  # a visitor who never logged in

    filed = await file_via_bot(guest, category="Facilities and equipment", text="Socket at desk 4 is broken", anonymous=True)
    assert "T-000001" in filed and "anonymous" in filed
    alert = (await group.wait_for(containing("T-000001")))[-1]
    assert "匿名读者" in alert["text"] and "Test" not in alert["text"] and str(VISITOR) not in alert["text"]

    # Nobody answers: 25 hours later the staff chat is told once, with how late it is.
    bot_env.move_clock(dt.timedelta(hours=25))
    await bot_env.run_jobs()
    late = (await group.wait_for(containing("超时 1 小时 0 分钟")))[-1]
    assert "T-000001" in late["text"]
    await bot_env.run_jobs()  # a second run (or a second bot process) escalates nothing twice
    async with bot_env.db.session() as s:
        escalations = list(await s.scalars(select(Delivery).where(Delivery.text_key == "tickets.escalation")))
    assert [row.chat_id for row in escalations] == [STAFF_CHAT_ID]
    assert (await ticket(bot_env)).escalated_at is not None

    # The escalation carries a claim button; the staff card never names the reader.
    await group.press("✋ T-000001", message=late)
    card = (await li.wait_for(containing("You claimed ticket T-000001")))[-1]
    assert "Anonymous reader" in card["text"] and "Test" not in card["text"]
    await li.press("Reply", message=card)
    await li.send("Thank you, an electrician is on the way.")
    relayed = (await guest.wait_for(containing("electrician")))[-1]
    await guest.press("Reply", message=relayed)
    await guest.send("It works now")
    back = (await li.wait_for(containing("It works now")))[-1]
    assert "Anonymous reader" in back["text"] and "Test" not in back["text"]
    view = texts(await li.send("/tickets T-000001"))
    assert "Anonymous reader" in view and "Test" not in view and "late by" not in view  # answered now

    await li.press("Resolve", message=back)
    await li.send("Fixed.")
    await guest.wait_for(containing("has been resolved"))
    # No rating: closed by itself after 7 days.
    bot_env.move_clock(dt.timedelta(days=6))
    await bot_env.run_jobs()
    assert (await ticket(bot_env)).status == "resolved"
    bot_env.move_clock(dt.timedelta(days=1, minutes=1))
    await bot_env.run_jobs()
    closed = await ticket(bot_env)
    assert (closed.status, closed.closed_reason, closed.rating) == ("closed", "auto", None)

    async with bot_env.db.session() as s:
        stats = await ticket_stats(s, None, None, bot_env.now())
    assert stats.sla_breaches == 1 and stats.by_category["facilities"] == 1
    assert stats.median_first_response_hours is not None and stats.median_first_response_hours > 25


async def test_bad_input_while_filing(bot_env: EmbeddedBot) -> None:
    ann = await bot_env.person(1)
    await ann.send("/feedback")
    assert "choose a category" in texts(await ann.send("hello"))
    await ann.press("Suggestion or praise")
    assert "cannot read stickers" in texts(await ann.send_sticker())
    assert "empty" in texts(await ann.send("   "))
    too_long = texts(await ann.send("x" * 2001))
    assert "2001 characters" in too_long and "at most 2000" in too_long
    assert "kept the photo" in texts(await ann.send_photo())  # a photo without caption: words still needed
    assert "Where in the library" in texts(await ann.send("More study rooms please"))  # the photo is kept
    await ann.press("Not about a place")
    assert "T-000001" in texts(await ann.press("Show my name"))
    filed = await ticket(bot_env)
    assert filed.photo_file_id and filed.text == "More study rooms please" and filed.place is None
    await ann.send("/complain")
    assert "Cancelled" in texts(await ann.send("/cancel"))
    assert "don't know that command" not in texts(await ann.send("/tickets"))


async def test_the_daily_limit_is_explained(bot_env: EmbeddedBot) -> None:
    async with bot_env.db.session() as s:
        for n in range(5):
            filed = await file_ticket(s, 1, "other", f"note {n}", policy=bot_env.policy, now=bot_env.now(),
                                      staff_chat_id=None, labels=Labels())
            assert filed.ticket is not None
    ann = await bot_env.person(1)
    answer = texts(await ann.send("/complain"))
    assert "already filed 5 tickets" in answer and "tomorrow" in answer


async def test_forged_claims_and_the_claim_race(bot_env: EmbeddedBot) -> None:
    await setup(bot_env)
    group = await watch(bot_env, STAFF, chat_id=STAFF_CHAT_ID)
    fang = await bot_env.person(READER)
    await file_via_bot(fang, category="Service", text="Queue too long", anonymous=False)
    alert = (await group.wait_for(containing("T-000001")))[-1]

    # A reader forging the claim button (in their own chat) is refused; the ticket stays new.
    mine = await fang.send("/tickets")
    await fang.press_data(mine[-1]["message_id"], "tk:claim:1")
    assert "only for library staff" in fang.last_callback_answer["text"]
    await fang.press_data(mine[-1]["message_id"], "tk:resolve:1")
    assert "only for library staff" in fang.last_callback_answer["text"]
    assert (await ticket(bot_env)).status == "new"

    # Two staff press Claim at the same moment: exactly one wins, the other is told who has it.
    li = await bot_env.person(STAFF, chat_id=STAFF_CHAT_ID)
    chen = await bot_env.person(STAFF2, chat_id=STAFF_CHAT_ID)
    await asyncio.gather(
        li.press_data(alert["message_id"], "tk:claim:1"), chen.press_data(alert["message_id"], "tk:claim:1")
    )
    answers = sorted([li.last_callback_answer["text"], chen.last_callback_answer["text"]])
    assert answers[0].startswith("Too late: T-000001 was already claimed by")
    assert answers[1].startswith("You have claimed T-000001")
    winner = (await ticket(bot_env)).assignee_id
    assert winner in (STAFF, STAFF2)

    # The loser cannot answer or resolve it either, even with forged buttons in their private chat.
    loser = await bot_env.person(STAFF2 if winner == STAFF else STAFF)
    start = await loser.send("/tickets")
    await loser.press_data(start[-1]["message_id"], "tk:reply:1")
    assert "is being handled by" in loser.last_callback_answer["text"]
    await loser.press_data(start[-1]["message_id"], "tk:resolve:1")
    assert "is being handled by" in loser.last_callback_answer["text"]


async def test_a_reply_to_a_reader_who_blocked_the_bot_is_kept(bot_env: EmbeddedBot) -> None:
    await setup(bot_env)
    li = await watch(bot_env, STAFF)
    fang = await bot_env.person(READER)
    await file_via_bot(fang, category="Collection", text="Please buy more copies", anonymous=False)
    queue = await li.send("/tickets")
    assert "1 new" in texts(queue)
    await li.press("T-000001")
    await li.press("Claim")
    card = await latest(li, "You claimed ticket T-000001")
    bot_env.emulator.block(READER)
    await li.press("Reply", message=card)
    await li.send("We ordered two more.")

    async def undelivered() -> bool:
        async with bot_env.db.session() as s:
            rows = (await s.execute(
                select(TicketMessage, Delivery.state).join(Delivery, Delivery.id == TicketMessage.delivery_id)
            )).all()
        return len(rows) == 1 and rows[0][0].text == "We ordered two more." and rows[0][1] == DeliveryState.UNREACHABLE

    for _ in range(50):
        if await undelivered():
            break
        await asyncio.sleep(0.1)
    assert await undelivered()
    view = texts(await li.send("/tickets T-000001"))
    assert "We ordered two more." in view and "not delivered" in view
    await li.press("Reply")
    answer = texts(await li.send("Are you there?"))
    assert "blocked the bot" in answer
    assert (await ticket(bot_env)).status == "waiting_on_reader"


async def test_watching_staff_get_new_tickets_privately_and_filing_survives_a_restart(bot_env: EmbeddedBot) -> None:
    await setup(bot_env)
    chen = await watch(bot_env, STAFF2)
    assert "queue is empty" in texts(await chen.send("/tickets"))
    await chen.press("🔔 Send me new tickets")
    assert "every new ticket" in chen.last_callback_answer["text"]
    assert any(b["text"] == "🔕 Stop sending me new tickets" for row in chen.last_message()["buttons"] for b in row)

    fang = await bot_env.person(READER)
    await fang.send("/complain")
    await fang.press("Digital services")
    await bot_env.restart()  # the conversation is persisted: the next step continues it
    assert "add a photo" in texts(await fang.send("The e-book reader app crashes"))
    await fang.press("Skip")
    await fang.press("Not about a place")
    await fang.press("Show my name")
    pushed = (await chen.wait_for(containing("T-000001")))[-1]
    assert "e-book reader app crashes" in pushed["text"]
    assert any(b.get("callback_data") == "tk:claim:1" for row in pushed["buttons"] for b in row)
