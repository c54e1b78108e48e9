"""ISO 18626 v1.2 (interlibrary loan transactions) on the wire: building, parsing and validating the
six messages partner libraries exchange as XML over HTTP POST.

Every message built here is checked against the published schema (``schemas/ISO-18626-v1_2.xsd``,
as shipped by ReShare's mod-rs) before it leaves; every message received is checked against it
before anything is read from it. The namespace is ``http://illtransactions.org/2013/iso18626`` and
the schema qualifies attributes, so the root carries ``ill:version="1.2"``.

The module knows nothing of the library's requests: it turns dataclasses into bytes and back.
"""

from __future__ import annotations

import datetime as dt
import enum
import functools
from dataclasses import dataclass, field
from pathlib import Path

from lxml import etree

NS = "http://illtransactions.org/2013/iso18626"
VERSION = "1.2"
SCHEMA_PATH = Path(__file__).parent / "schemas" / "ISO-18626-v1_2.xsd"
_Q = "{" + NS + "}"
MAX_MESSAGE_BYTES = 256 * 1024


class ErrorType(enum.StrEnum):
    """ISO 18626 ``errorType``: why a message was answered ``ERROR``."""

    UNSUPPORTED_ACTION_TYPE = "UnsupportedActionType"
    UNSUPPORTED_REASON_FOR_MESSAGE = "UnsupportedReasonForMessageType"
    UNRECOGNISED_DATA_ELEMENT = "UnrecognisedDataElement"
    UNRECOGNISED_DATA_VALUE = "UnrecognisedDataValue"
    BADLY_FORMED_MESSAGE = "BadlyFormedMessage"


class Kind(enum.StrEnum):
    """The message types; each of the three messages has its confirmation."""

    REQUEST = "request"
    REQUEST_CONFIRMATION = "requestConfirmation"
    SUPPLYING_AGENCY_MESSAGE = "supplyingAgencyMessage"
    SUPPLYING_AGENCY_MESSAGE_CONFIRMATION = "supplyingAgencyMessageConfirmation"
    REQUESTING_AGENCY_MESSAGE = "requestingAgencyMessage"
    REQUESTING_AGENCY_MESSAGE_CONFIRMATION = "requestingAgencyMessageConfirmation"

    @property
    def confirmation(self) -> Kind:
        """The confirmation that answers a message of this kind."""
        return Kind(self.value.removesuffix("Confirmation") + "Confirmation")


# Supplier statuses (``type_status``) and requester actions (``type_action``) used by the library.
STATUSES = (
    "RequestReceived", "ExpectToSupply", "WillSupply", "Loaned", "Overdue", "Recalled", "RetryPossible",
    "Unfilled", "CopyCompleted", "LoanCompleted", "CompletedWithoutReturn", "Cancelled",
)
ACTIONS = ("StatusRequest", "Received", "Cancel", "Renew", "ShippedReturn", "ShippedForward", "Notification")


class InvalidMessage(ValueError):
    """A message that is not valid ISO 18626 v1.2; ``error_type`` and ``value`` go into the ERROR answer."""

    def __init__(self, error_type: ErrorType, value: str, kind: Kind | None = None) -> None:
        super().__init__(f"{error_type}: {value}")
        self.error_type = error_type
        self.value = value[:200]
        self.kind = kind  # what the message was, when that much could be read


@dataclass(frozen=True)
class AgencyId:
    """An agency (library) id: ``TYPE:VALUE``, e.g. ``ISIL:CN-110000-L``."""

    type: str
    value: str

    @classmethod
    def parse(cls, text: str) -> AgencyId:
        """``TYPE:VALUE`` → AgencyId; ValueError when either half is missing."""
        kind, sep, value = text.strip().partition(":")
        if not sep or not kind.strip() or not value.strip():
            raise ValueError(f"an agency id is TYPE:VALUE (e.g. ISIL:CN-110000-L), not {text!r}")
        return cls(kind.strip(), value.strip())

    def __str__(self) -> str:
        return f"{self.type}:{self.value}"


@dataclass
class Header:
    supplying: AgencyId
    requesting: AgencyId
    requesting_request_id: str
    timestamp: dt.datetime
    supplying_request_id: str = ""


@dataclass
class Citation:
    """``bibliographicInfo`` and ``publicationInfo``, as far as the library uses them."""

    title: str = ""
    author: str = ""
    title_of_component: str = ""
    author_of_component: str = ""
    volume: str = ""
    issue: str = ""
    pages: str = ""
    identifiers: list[tuple[str, str]] = field(default_factory=list)  # (code, value): ISBN, ISSN, DOI
    publisher: str = ""
    publication_date: str = ""


@dataclass
class Request:
    header: Header
    citation: Citation
    service_type: str  # Loan, Copy or CopyOrLoan
    request_type: str = "New"
    need_before: dt.date | None = None
    copyright_compliance: str = ""
    note: str = ""
    delivery_address: str = ""  # requestedDeliveryInfo/address/physicalAddress/line1
    kind: Kind = Kind.REQUEST


@dataclass
class SupplyingAgencyMessage:
    header: Header
    reason_for_message: str  # RequestResponse, StatusChange, CancelResponse, …
    status: str  # one of STATUSES
    last_change: dt.datetime
    answer_yes_no: str = ""  # Y / N (answers to Cancel, Renew)
    note: str = ""
    reason_unfilled: str = ""
    due_date: dt.datetime | None = None
    kind: Kind = Kind.SUPPLYING_AGENCY_MESSAGE


@dataclass
class RequestingAgencyMessage:
    header: Header
    action: str  # one of ACTIONS
    note: str = ""
    kind: Kind = Kind.REQUESTING_AGENCY_MESSAGE


@dataclass
class Confirmation:
    kind: Kind  # one of the three confirmations
    timestamp: dt.datetime
    timestamp_received: dt.datetime
    ok: bool = True
    supplying: AgencyId | None = None
    requesting: AgencyId | None = None
    requesting_request_id: str = ""
    error_type: ErrorType | None = None
    error_value: str = ""
    reason_for_message: str = ""  # echoed in a supplyingAgencyMessageConfirmation
    action: str = ""  # echoed in a requestingAgencyMessageConfirmation


Message = Request | SupplyingAgencyMessage | RequestingAgencyMessage | Confirmation


# -------------------------------------------------------------------------------------------------
# The schema


@functools.cache
def schema() -> etree.XMLSchema:
    """The ISO 18626 v1.2 schema, loaded once."""
    return etree.XMLSchema(etree.parse(str(SCHEMA_PATH)))


def schema_errors(document: etree._Element) -> list[str]:
    """What makes ``document`` invalid against the schema (empty when it is valid)."""
    checker = schema()
    if checker.validate(document):
        return []
    return [f"line {e.line}: {e.message}" for e in checker.error_log]  # type: ignore[attr-defined]


def _parser() -> etree.XMLParser:
    # No entities, no DTDs, no network: a partner's message is data, never instructions to fetch.
    return etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False, remove_blank_text=True)


# -------------------------------------------------------------------------------------------------
# Building


def _ts(at: dt.datetime) -> str:
    if at.tzinfo is None:
        at = at.replace(tzinfo=dt.UTC)
    return at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _sub(parent: etree._Element, name: str, text: str | None = None) -> etree._Element:
    child = etree.SubElement(parent, _Q + name)
    if text is not None:
        child.text = text
    return child


def _opt(parent: etree._Element, name: str, text: str) -> None:
    if text:
        _sub(parent, name, text)


def _agency(parent: etree._Element, name: str, agency: AgencyId) -> None:
    element = _sub(parent, name)
    _sub(element, "agencyIdType", agency.type)
    _sub(element, "agencyIdValue", agency.value)


def _header(parent: etree._Element, header: Header) -> None:
    element = _sub(parent, "header")
    _agency(element, "supplyingAgencyId", header.supplying)
    _agency(element, "requestingAgencyId", header.requesting)
    _sub(element, "multipleItemRequestId", "")
    _sub(element, "timestamp", _ts(header.timestamp))
    _sub(element, "requestingAgencyRequestId", header.requesting_request_id)
    _opt(element, "supplyingAgencyRequestId", header.supplying_request_id)


def _root() -> etree._Element:
    root = etree.Element(_Q + "ISO18626Message", nsmap={"ill": NS})
    root.set(_Q + "version", VERSION)
    return root


def _build_request(root: etree._Element, message: Request) -> None:
    body = _sub(root, "request")
    _header(body, message.header)
    biblio = _sub(body, "bibliographicInfo")
    c = message.citation
    for name, value in (
        ("title", c.title), ("author", c.author), ("titleOfComponent", c.title_of_component),
        ("authorOfComponent", c.author_of_component), ("volume", c.volume), ("issue", c.issue),
        ("pagesRequested", c.pages),
    ):
        _opt(biblio, name, value)
    for code, value in c.identifiers:
        item = _sub(biblio, "bibliographicItemId")
        _sub(item, "bibliographicItemIdentifier", value)
        _sub(item, "bibliographicItemIdentifierCode", code)
    if c.publisher or c.publication_date:
        publication = _sub(body, "publicationInfo")
        _opt(publication, "publisher", c.publisher)
        _opt(publication, "publicationDate", c.publication_date)
    service = _sub(body, "serviceInfo")
    _sub(service, "requestType", message.request_type)
    _sub(service, "serviceType", message.service_type)
    if message.need_before is not None:
        _sub(service, "needBeforeDate", message.need_before.isoformat() + "T00:00:00Z")
    _opt(service, "copyrightCompliance", message.copyright_compliance)
    _opt(service, "note", message.note)
    if message.delivery_address:
        delivery = _sub(body, "requestedDeliveryInfo")
        address = _sub(delivery, "address")
        physical = _sub(address, "physicalAddress")
        _sub(physical, "line1", message.delivery_address)


def _build_supplying(root: etree._Element, message: SupplyingAgencyMessage) -> None:
    body = _sub(root, "supplyingAgencyMessage")
    _header(body, message.header)
    info = _sub(body, "messageInfo")
    _sub(info, "reasonForMessage", message.reason_for_message)
    _opt(info, "answerYesNo", message.answer_yes_no)
    _opt(info, "note", message.note)
    _opt(info, "reasonUnfilled", message.reason_unfilled)
    status = _sub(body, "statusInfo")
    _sub(status, "status", message.status)
    if message.due_date is not None:
        _sub(status, "dueDate", _ts(message.due_date))
    _sub(status, "lastChange", _ts(message.last_change))


def _build_requesting(root: etree._Element, message: RequestingAgencyMessage) -> None:
    body = _sub(root, "requestingAgencyMessage")
    _header(body, message.header)
    _sub(body, "action", message.action)
    _opt(body, "note", message.note)


def _build_confirmation(root: etree._Element, message: Confirmation) -> None:
    body = _sub(root, message.kind.value)
    header = _sub(body, "confirmationHeader")
    if message.supplying is not None:
        _agency(header, "supplyingAgencyId", message.supplying)
    if message.requesting is not None:
        _agency(header, "requestingAgencyId", message.requesting)
    _sub(header, "timestamp", _ts(message.timestamp))
    _opt(header, "requestingAgencyRequestId", message.requesting_request_id)
    _sub(header, "timestampReceived", _ts(message.timestamp_received))
    _sub(header, "messageStatus", "OK" if message.ok else "ERROR")
    if message.kind == Kind.SUPPLYING_AGENCY_MESSAGE_CONFIRMATION:
        _opt(body, "reasonForMessage", message.reason_for_message)
    if message.kind == Kind.REQUESTING_AGENCY_MESSAGE_CONFIRMATION:
        _opt(body, "action", message.action)
    if not message.ok:
        error = _sub(body, "errorData")
        _sub(error, "errorType", (message.error_type or ErrorType.BADLY_FORMED_MESSAGE).value)
        _opt(error, "errorValue", message.error_value[:200])


def to_xml(message: Message) -> bytes:
    """The message as an ISO 18626 v1.2 document (UTF-8), checked against the schema.

    A message that fails the schema is a bug on this side (a value outside an enumeration): it is
    refused here with ValueError rather than sent to a partner.
    """
    root = _root()
    if isinstance(message, Request):
        _build_request(root, message)
    elif isinstance(message, SupplyingAgencyMessage):
        _build_supplying(root, message)
    elif isinstance(message, RequestingAgencyMessage):
        _build_requesting(root, message)
    else:
        _build_confirmation(root, message)
    errors = schema_errors(root)
    if errors:
        raise ValueError(f"built an invalid ISO 18626 {message.kind}: {errors[0]}")
    return bytes(etree.tostring(root, xml_declaration=True, encoding="UTF-8"))


# -------------------------------------------------------------------------------------------------
# Parsing


def _text(element: etree._Element | None, path: str) -> str:
    if element is None:
        return ""
    found = element.find(_path(path))
    return (found.text or "").strip() if found is not None else ""


def _path(path: str) -> str:
    return "/".join(_Q + part for part in path.split("/"))


def _agency_of(element: etree._Element | None, name: str) -> AgencyId | None:
    if element is None:
        return None
    found = element.find(_path(name))
    if found is None:
        return None
    return AgencyId(_text(found, "agencyIdType"), _text(found, "agencyIdValue"))


def _datetime(text: str) -> dt.datetime | None:
    if not text:
        return None
    try:
        value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def _parse_header(body: etree._Element) -> Header:
    header = body.find(_path("header"))
    supplying = _agency_of(header, "supplyingAgencyId")
    requesting = _agency_of(header, "requestingAgencyId")
    assert supplying is not None and requesting is not None  # required by the schema
    return Header(
        supplying=supplying, requesting=requesting,
        requesting_request_id=_text(header, "requestingAgencyRequestId"),
        timestamp=_datetime(_text(header, "timestamp")) or dt.datetime.now(dt.UTC),
        supplying_request_id=_text(header, "supplyingAgencyRequestId"),
    )


def _parse_request(body: etree._Element) -> Request:
    biblio = body.find(_path("bibliographicInfo"))
    identifiers = [
        (_text(item, "bibliographicItemIdentifierCode"), _text(item, "bibliographicItemIdentifier"))
        for item in (biblio.findall(_path("bibliographicItemId")) if biblio is not None else [])
    ]
    citation = Citation(
        title=_text(biblio, "title"), author=_text(biblio, "author"),
        title_of_component=_text(biblio, "titleOfComponent"), author_of_component=_text(biblio, "authorOfComponent"),
        volume=_text(biblio, "volume"), issue=_text(biblio, "issue"), pages=_text(biblio, "pagesRequested"),
        identifiers=identifiers, publisher=_text(body, "publicationInfo/publisher"),
        publication_date=_text(body, "publicationInfo/publicationDate"),
    )
    need = _datetime(_text(body, "serviceInfo/needBeforeDate"))
    return Request(
        header=_parse_header(body), citation=citation,
        service_type=_text(body, "serviceInfo/serviceType") or "Loan",
        request_type=_text(body, "serviceInfo/requestType") or "New",
        need_before=need.date() if need is not None else None,
        copyright_compliance=_text(body, "serviceInfo/copyrightCompliance"),
        note=_text(body, "serviceInfo/note"),
        delivery_address=_text(body, "requestedDeliveryInfo/address/physicalAddress/line1"),
    )


def _parse_supplying(body: etree._Element) -> SupplyingAgencyMessage:
    return SupplyingAgencyMessage(
        header=_parse_header(body),
        reason_for_message=_text(body, "messageInfo/reasonForMessage"),
        answer_yes_no=_text(body, "messageInfo/answerYesNo"),
        note=_text(body, "messageInfo/note"),
        reason_unfilled=_text(body, "messageInfo/reasonUnfilled"),
        status=_text(body, "statusInfo/status"),
        due_date=_datetime(_text(body, "statusInfo/dueDate")),
        last_change=_datetime(_text(body, "statusInfo/lastChange")) or dt.datetime.now(dt.UTC),
    )


def _parse_requesting(body: etree._Element) -> RequestingAgencyMessage:
    return RequestingAgencyMessage(header=_parse_header(body), action=_text(body, "action"), note=_text(body, "note"))


def _parse_confirmation(body: etree._Element, kind: Kind) -> Confirmation:
    header = body.find(_path("confirmationHeader"))
    error = _text(body, "errorData/errorType")
    return Confirmation(
        kind=kind,
        timestamp=_datetime(_text(header, "timestamp")) or dt.datetime.now(dt.UTC),
        timestamp_received=_datetime(_text(header, "timestampReceived")) or dt.datetime.now(dt.UTC),
        ok=_text(header, "messageStatus") == "OK",
        supplying=_agency_of(header, "supplyingAgencyId"),
        requesting=_agency_of(header, "requestingAgencyId"),
        requesting_request_id=_text(header, "requestingAgencyRequestId"),
        error_type=ErrorType(error) if error else None,
        error_value=_text(body, "errorData/errorValue"),
        reason_for_message=_text(body, "reasonForMessage"),
        action=_text(body, "action"),
    )


def message_kind(data: bytes) -> Kind | None:
    """What a message claims to be (its first child element), even when it is not valid."""
    try:
        root = etree.fromstring(data, _parser())
    except etree.XMLSyntaxError:
        return None
    for child in root:
        if isinstance(child.tag, str) and child.tag.startswith(_Q):
            try:
                return Kind(child.tag[len(_Q):])
            except ValueError:
                return None
    return None


def parse(data: bytes) -> Message:
    """Read an ISO 18626 v1.2 message; InvalidMessage (BadlyFormedMessage) for anything the schema refuses."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise InvalidMessage(ErrorType.BADLY_FORMED_MESSAGE, "message too large")
    kind = message_kind(data)
    try:
        root = etree.fromstring(data, _parser())
    except etree.XMLSyntaxError as exc:
        raise InvalidMessage(ErrorType.BADLY_FORMED_MESSAGE, f"not XML: {exc}") from None
    errors = schema_errors(root)
    if errors:
        raise InvalidMessage(ErrorType.BADLY_FORMED_MESSAGE, errors[0], kind)
    body = root[0]
    kind = Kind(body.tag[len(_Q):])
    if kind == Kind.REQUEST:
        return _parse_request(body)
    if kind == Kind.SUPPLYING_AGENCY_MESSAGE:
        return _parse_supplying(body)
    if kind == Kind.REQUESTING_AGENCY_MESSAGE:
        return _parse_requesting(body)
    return _parse_confirmation(body, kind)


def confirm(
    message: Message | None,
    now: dt.datetime,
    *,
    kind: Kind | None = None,
    error: InvalidMessage | None = None,
) -> Confirmation:
    """The confirmation answering ``message`` (OK), or answering an invalid one (ERROR with ``error``)."""
    if message is not None and not isinstance(message, Confirmation):
        header = message.header
        wanted = message.kind.confirmation
        return Confirmation(
            kind=wanted, timestamp=now, timestamp_received=now, ok=error is None,
            supplying=header.supplying, requesting=header.requesting,
            requesting_request_id=header.requesting_request_id,
            error_type=error.error_type if error else None, error_value=error.value if error else "",
            reason_for_message=message.reason_for_message if isinstance(message, SupplyingAgencyMessage) else "",
            action=message.action if isinstance(message, RequestingAgencyMessage) else "",
        )
    answered = kind or Kind.REQUEST
    if answered.value.endswith("Confirmation"):
        answered = Kind.REQUEST
    return Confirmation(
        kind=answered.confirmation, timestamp=now, timestamp_received=now, ok=False,
        error_type=error.error_type if error else ErrorType.BADLY_FORMED_MESSAGE,
        error_value=error.value if error else "",
    )
