"""``librarybot``: the command line (see ``librarybot --help``)."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from bot.logs import configure_logging
from bot.settings import Settings
from storage.db import Database, utcnow
from storage.models import create_schema
from storage.people import Role, add_staff, create_invite, list_staff, remove_staff
from storage.policy import Policy, PolicyError, load_policy
from storage.quality import remember_staff


class CliError(Exception):
    """A failure explained in one line; the command exits with status 1."""


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(f"{err['loc'][0]}: {err['msg']}" for err in exc.errors(include_url=False))
        raise CliError(f"bad configuration: {problems}") from None


def _policy(settings: Settings) -> Policy:
    try:
        return load_policy(settings.policy_file)
    except PolicyError as exc:
        raise CliError(f"bad policy file: {exc}") from None


async def _database(settings: Settings) -> Database:
    db = Database(settings.database_url)
    if not await db.ping():
        await db.dispose()
        raise CliError("the database is not reachable: check LIBRARYBOT_DATABASE_URL")
    await create_schema(db)
    return db


async def _with_db(work: Callable[[Database, Settings, Policy], Awaitable[int | None]]) -> int:
    settings = _settings()
    policy = _policy(settings)
    db = await _database(settings)
    try:
        return await work(db, settings, policy) or 0
    finally:
        await db.dispose()


# --- commands -----------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from bot.demo import run_demo

    asyncio.run(run_demo(args.host, args.port, Path(args.data_dir)))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from bot.runner import run

    settings = _settings()
    policy = _policy(settings)
    try:
        settings.token()
    except ValueError as exc:
        raise CliError(str(exc)) from None
    secrets = [settings.token(), settings.webhook_secret.get_secret_value() if settings.webhook_secret else ""]
    configure_logging(settings.log_level, secrets)
    from telegram.error import InvalidToken, NetworkError

    try:
        asyncio.run(run(settings, policy, webhook=args.webhook))
    except InvalidToken:  # its message holds the token: never printed
        raise CliError("Telegram rejected the bot token: check TELEGRAM_BOT_TOKEN (@BotFather shows the current one)") from None
    except NetworkError:
        raise CliError("the Bot API is not reachable: check the network and LIBRARYBOT_TELEGRAM_API_URL") from None
    return 0


def cmd_db_upgrade(_args: argparse.Namespace) -> int:
    async def work(db: Database, _s: Settings, _p: Policy) -> None:
        print("database schema is up to date")

    return asyncio.run(_with_db(work))


def cmd_staff(args: argparse.Namespace) -> int:
    async def work(db: Database, _s: Settings, _p: Policy) -> int:
        async with db.session() as session:
            if args.staff_command == "add":
                role = _role(args.role)
                await add_staff(session, args.telegram_id, role, args.name or "")
                print(f"{args.telegram_id} is now {role.label}")
            elif args.staff_command == "invite":
                role = _role(args.role)
                code = await create_invite(session, role, utcnow())
                username = args.bot_username or "YOUR_BOT"
                print(f"one-time invite for the role {role.label}, valid 24 hours:")
                print(f"https://t.me/{username}?start=inv_{code}")
            elif args.staff_command == "list":
                members = await list_staff(session)
                if not members:
                    print("no staff yet")
                for m in members:
                    print(f"{m.telegram_id}\t{m.role}\t{m.name}")
            elif args.staff_command == "remove":
                await remember_staff(session, args.telegram_id)  # the quality report keeps their name (#18)
                if not await remove_staff(session, args.telegram_id):
                    raise CliError(f"{args.telegram_id} is not a staff member")
                print(f"{args.telegram_id} removed from the staff")
        return 0

    return asyncio.run(_with_db(work))


def _role(name: str) -> Role:
    try:
        role = Role.parse(name)
    except KeyError:
        role = Role.VISITOR
    if role < Role.STAFF:
        raise CliError(f"unknown role {name!r}: use staff, duty_officer or admin")
    return role


def cmd_import(args: argparse.Namespace) -> int:
    async def work(db: Database, settings: Settings, policy: Policy) -> int:
        report: Any
        if args.kind == "catalog":
            from storage.catalog_import import CatalogImportError, import_catalog

            try:
                report = await import_catalog(db, [Path(p) for p in args.paths], args.format, progress=sys.stderr.isatty())
            except CatalogImportError as exc:
                raise CliError(str(exc)) from None
        else:
            from storage import circ_import

            importer = {"readers": circ_import.import_readers, "items": circ_import.import_items, "loans": circ_import.import_loans}[args.kind]
            path = Path(args.paths[0])
            if not path.is_file():
                raise CliError(f"file not found: {path}")
            try:
                report = await importer(
                    db, path, policy=policy, now=utcnow(), staff_chat_id=settings.staff_chat_id, tz=settings.tz
                )
            except circ_import.CircImportError as exc:
                raise CliError(str(exc)) from None
        for line in report.lines():
            print(line)
        return 0

    return asyncio.run(_with_db(work))


def cmd_circ(args: argparse.Namespace) -> int:
    async def work(db: Database, settings: Settings, policy: Policy) -> int:
        from storage import circulation

        result: Any
        async with db.session() as session:
            if args.circ_command == "checkout":
                result = await circulation.checkout(session, args.barcode, args.card, policy, utcnow(), settings.tz)
            else:
                result = await circulation.checkin(session, args.barcode, policy, utcnow(), settings.tz)
        print(result.describe())
        return 0 if result.ok else 1

    return asyncio.run(_with_db(work))


def cmd_notices(args: argparse.Namespace) -> int:
    async def work(db: Database, settings: Settings, policy: Policy) -> int:
        from bot.i18n import t
        from storage.ils import make_circulation_service
        from storage.notices import run_notice_cycle

        day = _date(args.date) if args.date else utcnow().astimezone(settings.tz).date()
        # With LIBRARYBOT_ILS=sip2 the loans come from the library's system: its service feeds the cycle.
        circulation = None
        if settings.ils == "sip2":
            circulation = make_circulation_service(settings.ils, db, policy, settings.tz, settings)
        try:
            # The digests are composed from the catalogue here; storage never imports bot/, so it gets t.
            report = await run_notice_cycle(db, policy, day, settings.tz, render=t, staff_chat_id=settings.staff_chat_id)
        finally:
            if circulation is not None:
                await circulation.close()  # type: ignore[attr-defined]
        for line in report.lines():
            print(line)
        print("notices are queued; the running bot delivers them")
        return 0

    return asyncio.run(_with_db(work))


def cmd_stats(args: argparse.Namespace) -> int:
    async def work(db: Database, settings: Settings, _p: Policy) -> int:
        from storage.stats import FIRST_DAY, LAST_DAY, PeriodOutOfRange, service_stats

        since = _date(args.since) if args.since else None
        until = _date(args.until) if args.until else None
        try:
            async with db.session() as session:
                report = await service_stats(session, since, until, settings.tz, utcnow(), policy=_p)
        except PeriodOutOfRange:
            from bot.i18n import t

            arg = " ".join(filter(None, (args.since, args.until)))
            texts = (t(lang, "stats.cli_out_of_range", first=FIRST_DAY, last=LAST_DAY, arg=arg) for lang in ("en", "zh"))
            raise CliError(" / ".join(texts)) from None
        print(report.to_csv() if args.format == "csv" else report.to_text())
        return 0

    return asyncio.run(_with_db(work))


def cmd_events(args: argparse.Namespace) -> int:
    """``events import PATH.csv`` / ``events list`` / ``events cancel ID`` (#17)."""

    async def work(db: Database, settings: Settings, policy: Policy) -> int:
        from storage import events

        now = utcnow()
        if args.events_command == "import":
            path = Path(args.path)
            if not path.is_file():
                raise CliError(f"no such file: {path}")
            async with db.session() as session:
                try:
                    report = await events.import_events(session, path, tz=settings.tz, policy=policy, now=now)
                except (ValueError, UnicodeDecodeError) as exc:
                    raise CliError(f"{path}: {exc}") from None
            for reason in report.skipped:
                print(f"skipped {reason}")
            print(f"imported {report.imported}, skipped {len(report.skipped)}")
            return 1 if report.skipped and not report.imported else 0
        if args.events_command == "cancel":
            async with db.session() as session:
                done = await events.cancel_event(session, args.event_id, now=now, tz=settings.tz, policy=policy)
            if done.event is None:
                raise CliError(f"no scheduled event with id {args.event_id}")
            print(f"event {args.event_id} cancelled; {done.told} registrants will be told by the running bot")
            return 0
        async with db.session() as session:
            rows = await events.all_events(session)
        print("id\tstarts\tstatus\tseats\tcategory\ttitle")
        for event in rows:
            seats = f"{event.seats_taken}/{event.capacity or '-'}"
            print(f"{event.id}\t{events.local_time(event.starts_at, settings.tz)}\t{event.status}\t{seats}\t{event.category}\t{event.title_zh} / {event.title_en}")
        return 0

    return asyncio.run(_with_db(work))


def cmd_survey(args: argparse.Namespace) -> int:
    """``survey import PATH.toml`` / ``survey send SURVEY_ID …`` / ``survey results SURVEY_ID …`` (#18)."""

    async def work(db: Database, settings: Settings, _p: Policy) -> int:
        from bot.quality_render import plain, survey_chart_png, survey_results_text
        from storage import surveys

        if args.survey_command == "import":
            path = Path(args.path)
            if not path.is_file():
                raise CliError(f"no such file: {path}")
            async with db.session() as session:
                try:
                    imported = await surveys.import_survey(session, path)
                except surveys.SurveyFileError as exc:
                    raise CliError(f"{path}: {exc}") from None
                print(f"survey {imported.id} ({imported.code}): {len(imported.questions)} questions, open until {imported.closes_on}")
            return 0
        async with db.session() as session:
            survey = await surveys.find_survey(session, args.survey_id)
            if survey is None:
                raise CliError(f"no survey {args.survey_id}")
            if args.survey_command == "send":
                if args.sample is not None and args.sample < 1 or args.active_days is not None and args.active_days < 0:
                    raise CliError("--sample must be at least 1 and --active-days at least 0")
                sent = await surveys.send_survey(session, survey, now=utcnow(), tz=settings.tz, audience=args.audience,
                                                 sample=args.sample, active_days=args.active_days)
                if sent.closed:
                    raise CliError(f"survey {survey.id} is closed")
                print(f"survey {survey.id}: {sent.invited} invited of {sent.eligible} not yet invited; "
                      "the running bot sends the invitations, one a second")
                return 0
            results = await surveys.survey_results(session, survey)
        if args.format == "csv":
            sys.stdout.write(surveys.results_csv(results))
        elif args.format == "png":
            png = survey_chart_png(results, settings.language)
            if png is None:
                raise CliError(f"survey {survey.id} has no scored answers to chart yet")
            out = Path(args.out or f"survey-{survey.id}.png")
            out.write_bytes(png)
            print(f"chart written to {out}")
        else:
            print(plain(survey_results_text(results, settings.language, with_answers=True)))
        return 0

    return asyncio.run(_with_db(work))


def cmd_quality(args: argparse.Namespace) -> int:
    """``quality report [--month YYYY-MM] [--format text|csv|pdf] [--out PATH]`` (#18)."""

    async def work(db: Database, settings: Settings, _p: Policy) -> int:
        from bot.quality_render import plain, report_pdf, report_text
        from storage import quality

        try:
            month = quality.parse_month(args.month) if args.month else quality.month_of(utcnow(), settings.tz)
        except ValueError as exc:
            raise CliError(str(exc)) from None
        async with db.session() as session:
            report = await quality.monthly_report(session, month, settings.tz)
        if args.format == "pdf":
            out = Path(args.out or f"quality-{report.label}.pdf")
            out.write_bytes(report_pdf(report))
            print(f"report written to {out}")
            return 0
        text = quality.report_csv(report) if args.format == "csv" else plain(report_text(report, settings.language)) + "\n"
        if args.out:
            Path(args.out).write_text(text, encoding="utf-8")
            print(f"report written to {args.out}")
        else:
            sys.stdout.write(text)
        return 0

    return asyncio.run(_with_db(work))


def cmd_sip2_check(_args: argparse.Namespace) -> int:
    from storage.ils_sip2 import sip2_config
    from storage.sip2.client import run_check

    settings = _settings()  # LIBRARYBOT_SIP2_* from the environment (and .env), as the bot reads them
    try:
        config = sip2_config(settings)
    except ValueError as exc:
        raise CliError(f"bad SIP2 configuration: {exc}") from None
    quiet = logging.getLogger("storage.sip2")
    level, quiet.level = quiet.level, logging.CRITICAL  # the screen tells it all, once
    try:
        # Transaction dates go out in the library's time zone, as the bot sends them; the check
        # compares the server's clock with it (#15).
        tz = settings.tz
        check = asyncio.run(run_check(config, lambda: dt.datetime.now(tz).replace(tzinfo=None), tz=tz))
    finally:
        quiet.setLevel(level)
    print(check.report)
    if not check.ok:
        # The screen ends with the reason (the server's or ours); the exit status says it failed.
        lines = [line.strip() for line in check.report.splitlines() if line.strip()]
        reason = lines[-1] if check.status is None else "the server says it is offline"
        raise CliError(f"SIP2 check failed: {reason}")
    return 0


def cmd_doctor(_args: argparse.Namespace) -> int:
    from bot.doctor import run_doctor

    findings = asyncio.run(run_doctor(_settings()))
    for finding in findings:
        print(finding.line())
    failed = [f.name for f in findings if not f.ok]
    if failed:
        raise CliError(f"something is wrong: {', '.join(failed)}")
    return 0
def cmd_faq(args: argparse.Namespace) -> int:
    """The reference desk's answer base (#16): ``faq import PATH.csv`` and ``faq export PATH.csv``."""
    from storage.reference import FaqError, export_faq, import_faq

    async def work(db: Database, _s: Settings, _p: Policy) -> int:
        path = Path(args.path)
        async with db.session() as session:
            if args.faq_command == "export":
                text = await export_faq(session)
                try:
                    path.write_text(text, encoding="utf-8")
                except OSError as exc:
                    raise CliError(f"cannot write {path}: {exc.strerror}") from None
                print(f"exported {text.count(chr(10)) - 1} entries to {path}")
                return 0
            try:
                result = await import_faq(session, path, utcnow())
            except FaqError as exc:
                raise CliError(str(exc)) from None
        for reason in result.skipped:
            print(f"skipped {reason}")
        print(f"added {result.added}, updated {result.updated}, unchanged {result.unchanged}, skipped {len(result.skipped)}")
        return 0

    return asyncio.run(_with_db(work))


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise CliError(f"not a date (YYYY-MM-DD): {text}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="librarybot", description="The library's messaging front desk on Telegram.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="everything embedded: a web chat page talking to the real bot")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=8080)
    demo.add_argument("--data-dir", default=".librarybot-demo")
    demo.set_defaults(func=cmd_demo)

    run = sub.add_parser("run", help="the production bot against Telegram")
    run.add_argument("--webhook", action="store_true", help="serve the webhook instead of long polling")
    run.set_defaults(func=cmd_run)

    db = sub.add_parser("db", help="database schema")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    db_sub.add_parser("upgrade", help="apply the migrations").set_defaults(func=cmd_db_upgrade)

    imp = sub.add_parser("import", help="load catalog records, readers, items or loans")
    imp_sub = imp.add_subparsers(dest="kind", required=True)
    catalog = imp_sub.add_parser("catalog", help="MARC 21, MARCXML, CNMARC XML or CSV; .gz read directly")
    catalog.add_argument("paths", nargs="+")
    catalog.add_argument("--format", default="auto", choices=["auto", "marc21", "marcxml", "cnmarc", "csv"])
    for kind, columns in (
        ("readers", "card_number,name,pin,category,expires_on"),
        ("items", "barcode,record_id,location,call_number,item_type,status"),
        ("loans", "barcode,card_number,checked_out_at,due_at,renewals"),
    ):
        p = imp_sub.add_parser(kind, help=f"CSV with columns {columns}")
        p.add_argument("paths", nargs=1, metavar="PATH.csv")
    imp.set_defaults(func=cmd_import)

    circ = sub.add_parser("circ", help="minimal circulation")
    circ_sub = circ.add_subparsers(dest="circ_command", required=True)
    co = circ_sub.add_parser("checkout", help="lend an item to a card")
    co.add_argument("barcode")
    co.add_argument("card")
    ret = circ_sub.add_parser("return", help="return an item (fills the next hold)")
    ret.add_argument("barcode")
    circ.set_defaults(func=cmd_circ)

    staff = sub.add_parser("staff", help="staff management")
    staff_sub = staff.add_subparsers(dest="staff_command", required=True)
    add = staff_sub.add_parser("add", help="grant a role to a Telegram user id")
    add.add_argument("telegram_id", type=int)
    add.add_argument("--role", required=True)
    add.add_argument("--name", default="")
    invite = staff_sub.add_parser("invite", help="a one-time invite deep link (24 hours)")
    invite.add_argument("--role", required=True)
    invite.add_argument("--bot-username", default=None, help="the bot's @username, for the link")
    staff_sub.add_parser("list", help="list staff")
    remove = staff_sub.add_parser("remove", help="withdraw every staff right")
    remove.add_argument("telegram_id", type=int)
    staff.set_defaults(func=cmd_staff)

    notices = sub.add_parser("notices", help="the daily notice cycle")
    notices_sub = notices.add_subparsers(dest="notices_command", required=True)
    nrun = notices_sub.add_parser("run", help="run the cycle now (idempotent)")
    nrun.add_argument("--date", default=None)
    notices.set_defaults(func=cmd_notices)

    stats = sub.add_parser("stats", help="service statistics")
    stats.add_argument("--since", default=None)
    stats.add_argument("--until", default=None)
    stats.add_argument("--format", default="text", choices=["text", "csv"])
    stats.set_defaults(func=cmd_stats)

    events = sub.add_parser("events", help="programmes and events")
    events_sub = events.add_subparsers(dest="events_command", required=True)
    ev_import = events_sub.add_parser("import", help="CSV with columns " + ",".join((
        "title_zh", "title_en", "description_zh", "description_en", "starts_at", "ends_at", "place",
        "capacity", "category", "audience", "registration_opens", "registration_closes")))
    ev_import.add_argument("path", metavar="PATH.csv")
    events_sub.add_parser("list", help="every event with its seats")
    ev_cancel = events_sub.add_parser("cancel", help="cancel an event and tell every registrant")
    ev_cancel.add_argument("event_id", type=int, metavar="ID")
    events.set_defaults(func=cmd_events)
    faq = sub.add_parser("faq", help="the reference desk's answer base")
    faq_sub = faq.add_subparsers(dest="faq_command", required=True)
    for verb, text in (("import", "load (re-import updates by question)"), ("export", "write")):
        faq_sub.add_parser(verb, help=f"{text} a CSV: question_zh,question_en,answer_zh,answer_en,tags").add_argument("path", metavar="PATH.csv")
    faq.set_defaults(func=cmd_faq)

    survey = sub.add_parser("survey", help="satisfaction surveys (anonymous)")
    survey_sub = survey.add_subparsers(dest="survey_command", required=True)
    sv_import = survey_sub.add_parser("import", help="a survey as TOML (questions likert, nps, choice, text, gap)")
    sv_import.add_argument("path", metavar="PATH.toml")
    sv_send = survey_sub.add_parser("send", help="invite a random sample, or everyone, through the outbox")
    sv_send.add_argument("survey_id", metavar="SURVEY_ID")
    sv_send.add_argument("--audience", choices=["readers", "everyone"], default="readers")
    sv_send.add_argument("--sample", type=int, metavar="N")
    sv_send.add_argument("--active-days", type=int, metavar="D", dest="active_days")
    sv_results = survey_sub.add_parser("results", help="response rate, means with 95% CIs, NPS, gap scores")
    sv_results.add_argument("survey_id", metavar="SURVEY_ID")
    sv_results.add_argument("--format", choices=["text", "csv", "png"], default="text")
    sv_results.add_argument("--out", metavar="PATH", help="where the PNG goes (default survey-ID.png)")
    survey.set_defaults(func=cmd_survey)

    quality = sub.add_parser("quality", help="service quality per staff member")
    quality_sub = quality.add_subparsers(dest="quality_command", required=True)
    q_report = quality_sub.add_parser("report", help="the monthly report: per staff member, the team, recognition")
    q_report.add_argument("--month", metavar="YYYY-MM")
    q_report.add_argument("--format", choices=["text", "csv", "pdf"], default="text")
    q_report.add_argument("--out", metavar="PATH")
    quality.set_defaults(func=cmd_quality)

    sip2 = sub.add_parser("sip2", help="the link to the library system")
    sip2_sub = sip2.add_subparsers(dest="sip2_command", required=True)
    sip2_sub.add_parser("check", help="log in, ask SC status and show what the server supports").set_defaults(func=cmd_sip2_check)

    sub.add_parser(
        "doctor", help="check the token, database, staff group, webhook and SIP2, one line each"
    ).set_defaults(func=cmd_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command not in ("run", "demo"):
        configure_logging("WARNING")
    try:
        result: Any = args.func(args)
        return int(result or 0)
    except CliError as exc:
        print(f"librarybot: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
