"""``librarybot demo``: everything embedded — a SQLite database in the data directory, the sample
catalog shipped with the project, sample readers, staff and a duty officer, the Bot API emulator
and its web chat page — running the production bot. No token, no network."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

from bot.embedded import STAFF_CHAT_ID, EmbeddedBot
from bot.logs import configure_logging
from bot.runner import wait_for_signal
from storage.db import Database, utcnow
from storage.models import MODULES, create_schema
from storage.people import Role, User, add_staff
from storage.policy import Policy
from storage.surveys import invite_demo_readers

log = logging.getLogger(__name__)
DEMO_DATA = Path(__file__).parent / "demo_data"

STAFF_ID = 9001
DUTY_OFFICER_ID = 9002
VISITOR_ID = 7000
ADMIN_ID = 9003  # made by storage.quality.seed_demo: reads the service-quality report (#18)
STAFF_NAME = "李娜 Li Na"
DUTY_OFFICER_NAME = "赵磊 Zhao Lei"
STAFF_GROUP_TITLE = "馆员群 Staff group"


@dataclass
class DemoCard:
    card_number: str
    pin: str
    name: str
    telegram_id: int | None = None  # the demo persona already linked to it
    note: str = ""
    note_zh: str = ""


@dataclass
class DemoSeed:
    """What the seeding steps made, for the personas and the printed summary."""

    cards: list[DemoCard] = field(default_factory=list)


async def seed(db: Database, policy: Policy) -> DemoSeed:
    """Fill an empty demo database: catalog, copies, readers and loans, staff, requests, tickets."""
    result = DemoSeed()
    now = utcnow()
    rng = random.Random(2026)
    try:
        from storage.catalog_import import import_catalog, seed_demo_items

        files = sorted(p for p in DEMO_DATA.glob("*") if p.suffix in (".mrc", ".xml", ".gz", ".csv"))
        if files:
            await import_catalog(db, files, "auto", progress=False)
        async with db.session() as session:
            await seed_demo_items(session, rng)
    except ImportError:
        log.warning("catalog import not available in this build")
    async with db.session() as session:
        # Names as people have them, in both scripts: they appear inside Chinese and English texts alike.
        await add_staff(session, STAFF_ID, Role.STAFF, STAFF_NAME)
        await add_staff(session, DUTY_OFFICER_ID, Role.DUTY_OFFICER, DUTY_OFFICER_NAME)
        for uid, name, lang in ((STAFF_ID, "Li Na", "zh"), (DUTY_OFFICER_ID, "Zhao Lei", "zh")):
            session.add(User(telegram_id=uid, first_name=name, telegram_language=lang))
    try:
        from storage.circ_import import seed_demo_circulation

        async with db.session() as session:
            cards = await seed_demo_circulation(session, policy, now)
        result.cards = [DemoCard(c.card_number, c.pin, c.name, c.telegram_id, c.note, c.note_zh) for c in cards]
    except ImportError:
        log.warning("circulation not available in this build")
    # Every other module that has demo data (requests, tickets, incidents) adds it the same way.
    for module in MODULES:
        hook = getattr(module, "seed_demo", None)
        if hook is not None:
            async with db.session() as session:
                await hook(session, policy, now, rng, [c.telegram_id for c in result.cards if c.telegram_id])
    return result


def personas(cards: list[DemoCard]) -> list[dict[str, object]]:
    """Who a person can be on the demo page."""
    people: list[dict[str, object]] = []
    linked = [card for card in cards if card.telegram_id is not None]
    for n, card in enumerate(linked):
        # Half the sample readers have an English Telegram, half a Chinese one (the page's language
        # button switches the persona's language as well).
        people.append({
            "user_id": card.telegram_id, "first_name": card.name.split()[0], "language_code": "en" if n % 2 else "zh-hans",
            "label_zh": f"读者 {card.name}（{card.card_number}）", "label_en": f"Reader {card.name} ({card.card_number})",
            "description_zh": card.note_zh or "已绑定读者证的示例读者", "description_en": card.note or "a sample reader with a linked card",
        })
    people += [
        {"user_id": STAFF_ID, "first_name": "Li Na", "language_code": "zh", "label_zh": "馆员 李娜", "label_en": "Staff: Li Na",
         "description_zh": "处理工单、馆际互借与逾期", "description_en": "works tickets, ILL and overdues"},
        {"user_id": DUTY_OFFICER_ID, "first_name": "Zhao Lei", "language_code": "zh", "label_zh": "值班人员 赵磊", "label_en": "Duty officer: Zhao Lei",
         "description_zh": "发布应急通知与演练", "description_en": "sends emergency notices and drills"},
        {"user_id": ADMIN_ID, "first_name": "Sun Wei", "language_code": "zh", "label_zh": "管理员 孙伟", "label_en": "Admin: Sun Wei",
         "description_zh": "查看服务质量报告（/quality）", "description_en": "reads the service-quality report (/quality)"},
        {"user_id": STAFF_ID, "chat_id": STAFF_CHAT_ID, "chat_type": "group", "chat_title": STAFF_GROUP_TITLE,
         "first_name": "Li Na", "language_code": "zh",
         "label_zh": "馆员群（告警）", "label_en": "Staff group (alerts)",
         "description_zh": "接收逾期、工单、事件告警的馆员群", "description_en": "the group that receives staff alerts"},
        {"user_id": VISITOR_ID, "first_name": "Guest", "language_code": "en", "label_zh": "访客（未登录）", "label_en": "Visitor (not logged in)",
         "description_zh": "可检索、查看开放时间、报告事件，或用示例读者证登录", "description_en": "can search, see hours, report incidents, or /login with a sample card"},
    ]
    return people


async def run_demo(host: str, port: int, data_dir: Path) -> None:
    """Start the demo and run until Ctrl-C."""
    configure_logging("INFO")
    data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(f"sqlite+aiosqlite:///{(data_dir / 'demo.db').resolve()}")
    await create_schema(db)
    policy = Policy()
    marker = data_dir / "seeded.txt"
    if not marker.exists():
        print("preparing the demo library (first run only)…", flush=True)
        made = await seed(db, policy)
        async with db.session() as session:  # the sample readers are invited to the sample survey (#18)
            await invite_demo_readers(session, [c.telegram_id for c in made.cards if c.telegram_id], utcnow())
        marker.write_text("\n".join(f"{c.card_number}\t{c.pin}\t{c.name}\t{c.telegram_id or ''}\t{c.note}\t{c.note_zh}" for c in made.cards), encoding="utf-8")
    cards = [DemoCard(*_fields(line)) for line in marker.read_text(encoding="utf-8").splitlines() if line.strip()]
    env = await EmbeddedBot.start(db, policy=policy, host=host, port=port)
    env.emulator.personas = personas(cards)
    # The sample people have pressed Start (Telegram lets a bot write only to them).
    env.emulator.started(*(int(str(p["user_id"])) for p in env.emulator.personas))
    print(f"\nlibrarybot demo is running: open http://{host}:{env.emulator.port}/ in a browser", flush=True)
    print("sample library cards (card number / PIN) for /login:")
    for card in cards:
        print(f"  {card.card_number} / {card.pin}  {card.name}  {card.note}")
    print("stop with Ctrl-C", flush=True)
    try:
        await wait_for_signal()
    finally:
        await env.stop()


def _fields(line: str) -> tuple[str, str, str, int | None, str, str]:
    parts = (line.split("\t") + [""] * 6)[:6]
    return parts[0], parts[1], parts[2], int(parts[3]) if parts[3] else None, parts[4], parts[5]
