"""A partner library for the tests: a small ISO 18626 peer on real HTTP, in the test's process.

It plays both roles the standard defines: as a supplier it receives the bot's ``request`` and
``requestingAgencyMessage``s and sends ``supplyingAgencyMessage``s; as a requester it sends its own
``request``s and receives the bot's ``supplyingAgencyMessage``s. It writes its messages from XML
templates of its own (not with the bot's builder) and checks every message it receives, and every
answer it gets, against the published schema with lxml. ``down = True`` makes it answer 503, as a
partner that is down for a while.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

import aiohttp
from aiohttp import web
from lxml import etree

NS = "http://illtransactions.org/2013/iso18626"
XSD = Path(__file__).resolve().parents[2] / "storage" / "schemas" / "ISO-18626-v1_2.xsd"
_SCHEMA: etree.XMLSchema | None = None
_clock = itertools.count()


def schema() -> etree.XMLSchema:
    global _SCHEMA
    if _SCHEMA is None:
        _SCHEMA = etree.XMLSchema(etree.parse(str(XSD)))
    return _SCHEMA


def assert_valid(data: bytes) -> etree._Element:
    """The document, after checking it against the ISO 18626 v1.2 schema (AssertionError if invalid)."""
    root = etree.fromstring(data)
    checker = schema()
    assert checker.validate(root), f"not valid ISO 18626: {checker.error_log}\n{data.decode()[:2000]}"
    assert root.get(f"{{{NS}}}version") == "1.2"
    return root


def text(root: etree._Element, path: str) -> str:
    """The text at an ``a/b/c`` path under the root (namespace added), '' when absent."""
    found = root.find(".//" + "/".join(f"{{{NS}}}{p}" for p in path.split("/")))
    return (found.text or "") if found is not None else ""


def kind(root: etree._Element) -> str:
    return etree.QName(root[0]).localname


def _stamp() -> str:
    # Distinct timestamps: a partner's new message never looks like a repeat of its previous one.
    at = dt.datetime(2026, 1, 1, tzinfo=dt.UTC) + dt.timedelta(seconds=next(_clock))
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


def _agency(name: str, agency_id: str) -> str:
    kind_, _, value = agency_id.partition(":")
    return (f"<{name}><agencyIdType>{escape(kind_)}</agencyIdType>"
            f"<agencyIdValue>{escape(value)}</agencyIdValue></{name}>")


def _header(supplier: str, requester: str, request_id: str, stamp: str) -> str:
    return (f"<header>{_agency('supplyingAgencyId', supplier)}{_agency('requestingAgencyId', requester)}"
            f"<multipleItemRequestId></multipleItemRequestId><timestamp>{stamp}</timestamp>"
            f"<requestingAgencyRequestId>{escape(request_id)}</requestingAgencyRequestId></header>")


def _document(body: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<ISO18626Message xmlns="{NS}" '
            f'xmlns:ill="{NS}" ill:version="1.2">{body}</ISO18626Message>').encode()


@dataclass
class Received:
    """One message the partner got, parsed for the assertions."""

    kind: str
    root: etree._Element
    raw: bytes

    def get(self, path: str) -> str:
        return text(self.root, path)


@dataclass
class PartnerLibrary:
    agency_id: str  # this partner, TYPE:VALUE
    library_agency_id: str  # the bot's library
    down: bool = False
    received: list[Received] = field(default_factory=list)
    refused_while_down: int = 0
    answer_error: str = ""  # answer every message ERROR with this errorType
    _runner: web.AppRunner | None = None
    port: int = 0
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    # -- serving --------------------------------------------------------------------------------

    async def start(self, port: int = 0) -> str:
        app = web.Application()
        app.router.add_post("/iso18626", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self.endpoint

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/iso18626"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.Response:
        data = await request.read()
        if self.down:
            self.refused_while_down += 1
            return web.Response(status=503, text="down for maintenance")
        root = assert_valid(data)
        got = Received(kind(root), root, data)
        self.received.append(got)
        self._arrived.set()
        confirmation = got.kind + "Confirmation"
        status = "ERROR" if self.answer_error else "OK"
        error = f"<errorData><errorType>{self.answer_error}</errorType></errorData>" if self.answer_error else ""
        extra = ""
        if got.kind == "supplyingAgencyMessage":
            extra = f"<reasonForMessage>{got.get('messageInfo/reasonForMessage')}</reasonForMessage>"
        elif got.kind == "requestingAgencyMessage":
            extra = f"<action>{got.get('action')}</action>"
        body = (f"<{confirmation}><confirmationHeader><timestamp>{_stamp()}</timestamp>"
                f"<requestingAgencyRequestId>{escape(got.get('header/requestingAgencyRequestId'))}</requestingAgencyRequestId>"
                f"<timestampReceived>{_stamp()}</timestampReceived><messageStatus>{status}</messageStatus>"
                f"</confirmationHeader>{extra}{error}</{confirmation}>")
        answer = _document(body)
        assert_valid(answer)
        return web.Response(body=answer, content_type="application/xml")

    def of_kind(self, wanted: str) -> list[Received]:
        return [m for m in self.received if m.kind == wanted]

    async def wait_for(self, count: int, wanted: str | None = None, seconds: float = 30.0) -> list[Received]:
        """Wait until ``count`` messages (of a kind) have arrived; the messages."""
        async with asyncio.timeout(seconds):
            while True:
                found = self.of_kind(wanted) if wanted else list(self.received)
                if len(found) >= count:
                    return found
                self._arrived.clear()
                await self._arrived.wait()

    # -- speaking -------------------------------------------------------------------------------

    def supplying_message(
        self, request_id: str, status: str, *, reason: str = "StatusChange", unfilled: str = "", answer: str = "",
        note: str = "",
    ) -> bytes:
        """As the supplier: a supplyingAgencyMessage about the library's request ``request_id``."""
        stamp = _stamp()
        info = f"<reasonForMessage>{reason}</reasonForMessage>"
        if answer:
            info += f"<answerYesNo>{answer}</answerYesNo>"
        if note:
            info += f"<note>{escape(note)}</note>"
        if unfilled:
            info += f"<reasonUnfilled>{escape(unfilled)}</reasonUnfilled>"
        body = (f"<supplyingAgencyMessage>{_header(self.agency_id, self.library_agency_id, request_id, stamp)}"
                f"<messageInfo>{info}</messageInfo>"
                f"<statusInfo><status>{status}</status><lastChange>{stamp}</lastChange></statusInfo>"
                f"</supplyingAgencyMessage>")
        return _document(body)

    def request(self, request_id: str, title: str, *, service: str = "Loan", author: str = "", isbn: str = "",
                need_before: str = "2027-01-31T00:00:00Z") -> bytes:
        """As the requester: a request to borrow ``title`` from the library."""
        biblio = f"<title>{escape(title)}</title>" + (f"<author>{escape(author)}</author>" if author else "")
        if isbn:
            biblio += (f"<bibliographicItemId><bibliographicItemIdentifier>{isbn}</bibliographicItemIdentifier>"
                       f"<bibliographicItemIdentifierCode>ISBN</bibliographicItemIdentifierCode></bibliographicItemId>")
        body = (f"<request>{_header(self.library_agency_id, self.agency_id, request_id, _stamp())}"
                f"<bibliographicInfo>{biblio}</bibliographicInfo>"
                f"<serviceInfo><requestType>New</requestType><serviceType>{service}</serviceType>"
                f"<needBeforeDate>{need_before}</needBeforeDate></serviceInfo></request>")
        return _document(body)

    def requesting_message(self, request_id: str, action: str) -> bytes:
        """As the requester: a requestingAgencyMessage about its request ``request_id`` to the library."""
        body = (f"<requestingAgencyMessage>{_header(self.library_agency_id, self.agency_id, request_id, _stamp())}"
                f"<action>{action}</action></requestingAgencyMessage>")
        return _document(body)

    async def post(self, url: str, data: bytes) -> etree._Element:
        """POST a message to the library; its confirmation (checked against the schema)."""
        async with aiohttp.ClientSession() as http, http.post(
            url, data=data, headers={"Content-Type": "application/xml"}
        ) as response:
            assert response.status == 200, response.status
            return assert_valid(await response.read())


def status_of(confirmation: etree._Element) -> tuple[str, str]:
    """(messageStatus, errorType) of a confirmation."""
    return text(confirmation, "confirmationHeader/messageStatus"), text(confirmation, "errorData/errorType")
