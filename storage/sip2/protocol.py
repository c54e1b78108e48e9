"""SIP2 messages (3M Standard Interchange Protocol 2.00): building, parsing, checksums.

A message is a two-character command code, then fixed-length fields in an order the code decides,
then variable fields ``XXvalue|`` in any order (unknown and repeated ones are allowed), then — with
error detection on — ``AYn`` (sequence digit 0-9) and ``AZxxxx`` (checksum), then a CR::

    23 001 20261126    052910 AOUWOLS|AAdjfiander|AC|AD6789| AY2 AZF034 <CR>
    ^^ ^^^^^^^^^^^^^^^^^^^^^^ ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^ ^^^^^^^^^^
    code  fixed fields        variable fields                 error detection

The checksum is the two's complement of the sum of the message's bytes up to and including
``AZ``, as four uppercase hex digits. Everything here is pure (no I/O): ``client`` does the
talking, ``replay`` plays a recorded server.
"""

from __future__ import annotations

import codecs
import datetime as dt
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from storage.sip2.errors import Sip2Error

# --------------------------------------------------------------------------------------------
# The vocabulary of the protocol

#: Message codes and their names in the 2.00 specification.
MESSAGE_NAMES: dict[str, str] = {
    "93": "login",
    "94": "login response",
    "99": "SC status",
    "98": "ACS status",
    "23": "patron status request",
    "24": "patron status response",
    "63": "patron information",
    "64": "patron information response",
    "17": "item information",
    "18": "item information response",
    "11": "checkout",
    "12": "checkout response",
    "09": "checkin",
    "10": "checkin response",
    "29": "renew",
    "30": "renew response",
    "65": "renew all",
    "66": "renew all response",
    "15": "hold",
    "16": "hold response",
    "35": "end patron session",
    "36": "end session response",
    "97": "request ACS resend",
    "96": "request SC resend",
    "01": "block patron",
    "25": "patron enable",
    "26": "patron enable response",
    "19": "item status update",
    "20": "item status update response",
    "37": "fee paid",
    "38": "fee paid response",
}

_DATE = ("transaction_date", 18)

#: Fixed-length fields of each message, in order, as (name, width).
FIXED_LAYOUTS: dict[str, tuple[tuple[str, int], ...]] = {
    # requests (SC -> ACS)
    "93": (("uid_algorithm", 1), ("pwd_algorithm", 1)),
    "99": (("status_code", 1), ("max_print_width", 3), ("protocol_version", 4)),
    "23": (("language", 3), _DATE),
    "63": (("language", 3), _DATE, ("summary", 10)),
    "17": (_DATE,),
    "11": (("sc_renewal_policy", 1), ("no_block", 1), _DATE, ("nb_due_date", 18)),
    "09": (("no_block", 1), _DATE, ("return_date", 18)),
    "29": (("third_party_allowed", 1), ("no_block", 1), _DATE, ("nb_due_date", 18)),
    "65": (_DATE,),
    "15": (("hold_mode", 1), _DATE),
    "35": (_DATE,),
    "97": (),
    "01": (("card_retained", 1), _DATE),
    "25": (_DATE,),
    "19": (_DATE,),
    "37": (_DATE, ("fee_type", 2), ("payment_type", 2), ("currency_type", 3)),
    # responses (ACS -> SC)
    "94": (("ok", 1),),
    "98": (
        ("online_status", 1),
        ("checkin_ok", 1),
        ("checkout_ok", 1),
        ("acs_renewal_policy", 1),
        ("status_update_ok", 1),
        ("offline_ok", 1),
        ("timeout_period", 3),
        ("retries_allowed", 3),
        ("date_time_sync", 18),
        ("protocol_version", 4),
    ),
    "24": (("patron_status", 14), ("language", 3), _DATE),
    "64": (
        ("patron_status", 14),
        ("language", 3),
        _DATE,
        ("hold_items_count", 4),
        ("overdue_items_count", 4),
        ("charged_items_count", 4),
        ("fine_items_count", 4),
        ("recall_items_count", 4),
        ("unavailable_holds_count", 4),
    ),
    "18": (("circulation_status", 2), ("security_marker", 2), ("fee_type", 2), _DATE),
    "12": (("ok", 1), ("renewal_ok", 1), ("magnetic_media", 1), ("desensitize", 1), _DATE),
    "10": (("ok", 1), ("resensitize", 1), ("magnetic_media", 1), ("alert", 1), _DATE),
    "30": (("ok", 1), ("renewal_ok", 1), ("magnetic_media", 1), ("desensitize", 1), _DATE),
    "66": (("ok", 1), ("renewed_count", 4), ("unrenewed_count", 4), _DATE),
    "16": (("ok", 1), ("available", 1), _DATE),
    "36": (("end_session", 1), _DATE),
    "96": (),
    "26": (("patron_status", 14), ("language", 3), _DATE),
    "20": (("item_properties_ok", 1), _DATE),
    "38": (("payment_accepted", 1), _DATE),
}

#: Variable field identifiers of SIP2 2.00, plus extensions common in the field (marked).
FIELD_NAMES: dict[str, str] = {
    "AA": "patron identifier",
    "AB": "item identifier",
    "AC": "terminal password",
    "AD": "patron password",
    "AE": "personal name",
    "AF": "screen message",
    "AG": "print line",
    "AH": "due date",
    "AJ": "title identifier",
    "AL": "blocked card msg",
    "AM": "library name",
    "AN": "terminal location",
    "AO": "institution id",
    "AP": "current location",
    "AQ": "permanent location",
    "AS": "hold items",
    "AT": "overdue items",
    "AU": "charged items",
    "AV": "fine items",
    "AY": "sequence number",
    "AZ": "checksum",
    "BD": "home address",
    "BE": "e-mail address",
    "BF": "home phone number",
    "BG": "owner",
    "BH": "currency type",
    "BI": "cancel",
    "BK": "transaction id",
    "BL": "valid patron",
    "BM": "renewed items",
    "BN": "unrenewed items",
    "BO": "fee acknowledged",
    "BP": "start item",
    "BQ": "end item",
    "BR": "queue position",
    "BS": "pickup location",
    "BT": "fee type",
    "BU": "recall items",
    "BV": "fee amount",
    "BW": "expiration date",
    "BX": "supported messages",
    "BY": "hold type",
    "BZ": "hold items limit",
    "CA": "overdue items limit",
    "CB": "charged items limit",
    "CC": "fee limit",
    "CD": "unavailable hold items",
    "CF": "hold queue length",
    "CG": "fee identifier",
    "CH": "item properties",
    "CI": "security inhibit",
    "CJ": "recall date",
    "CK": "media type",
    "CL": "sort bin",
    "CM": "hold pickup date",
    "CN": "login user id",
    "CO": "login password",
    "CP": "location code",
    "CQ": "valid patron password",
    # Extensions seen from 3M, Koha and Evergreen servers; never required by this client.
    "CS": "call number (extension)",
    "CT": "destination location (extension)",
    "CV": "alert type (extension)",
    "CY": "hold patron id (extension)",
    "DA": "hold patron name (extension)",
    "PA": "patron expiry date (extension)",
    "PB": "patron birth date (extension)",
    "PC": "patron profile (extension)",
    "PI": "patron internet privileges (extension)",
}

#: The 14 positions of the "patron status" fixed field; a 'Y' at a position means it applies.
PATRON_STATUS_FLAGS: tuple[str, ...] = (
    "charge privileges denied",
    "renewal privileges denied",
    "recall privileges denied",
    "hold privileges denied",
    "card reported lost",
    "too many items charged",
    "too many items overdue",
    "too many renewals",
    "too many claims of items returned",
    "too many items lost",
    "excessive outstanding fines",
    "excessive outstanding fees",
    "recall overdue",
    "too many items billed",
)

#: The 16 positions of BX (supported messages) in the ACS status, in order.
SUPPORTED_MESSAGES: tuple[str, ...] = (
    "patron status",
    "checkout",
    "checkin",
    "block patron",
    "SC/ACS status",
    "request SC/ACS resend",
    "login",
    "patron information",
    "end patron session",
    "fee paid",
    "item information",
    "item status update",
    "patron enable",
    "hold",
    "renew",
    "renew all",
)

#: Circulation status of an item (18 response).
CIRCULATION_STATUSES: dict[int, str] = {
    1: "other",
    2: "on order",
    3: "available",
    4: "charged",
    5: "charged; not to be recalled until earliest recall date",
    6: "in process",
    7: "recalled",
    8: "waiting on hold shelf",
    9: "waiting to be re-shelved",
    10: "in transit between library locations",
    11: "claimed returned",
    12: "lost",
    13: "missing",
}

#: Media types (CK).
MEDIA_TYPES: dict[str, str] = {
    "000": "other",
    "001": "book",
    "002": "magazine",
    "003": "bound journal",
    "004": "audio tape",
    "005": "video tape",
    "006": "CD/CDROM",
    "007": "diskette",
    "008": "book with diskette",
    "009": "book with CD",
    "010": "book with audio tape",
}

#: Positions of the patron information "summary" field (63): which item list to return.
SUMMARY_POSITIONS: dict[str, int] = {
    "hold": 0,
    "overdue": 1,
    "charged": 2,
    "fine": 3,
    "recall": 4,
    "unavailable": 5,
}

#: Field that carries the items of each summary in the 64 response.
SUMMARY_FIELDS: dict[str, str] = {
    "hold": "AS",
    "overdue": "AT",
    "charged": "AU",
    "fine": "AV",
    "recall": "BU",
    "unavailable": "CD",
}

#: Fields whose values must never reach a log: patron password, login password, terminal password.
SECRET_FIELDS: frozenset[str] = frozenset({"AD", "CO", "AC"})

#: Requests that can be sent twice without changing anything in the library's system.
IDEMPOTENT_CODES: frozenset[str] = frozenset({"93", "99", "23", "63", "17", "97"})

#: The response each request is answered with.
RESPONSE_CODES: dict[str, str] = {
    "93": "94",
    "99": "98",
    "23": "24",
    "63": "64",
    "17": "18",
    "11": "12",
    "09": "10",
    "29": "30",
    "65": "66",
    "15": "16",
    "35": "36",
    "01": "24",
    "25": "26",
    "19": "20",
    "37": "38",
}

DEFAULT_ITEMS_PER_PAGE = 100
_NO_DATE = " " * 18


class Sip2BadRequest(Sip2Error, ValueError):
    """A request cannot be built: e.g. a value contains ``|`` or CR, which would forge fields."""


# --------------------------------------------------------------------------------------------
# Checksums, timestamps


def checksum(msg: str | bytes, encoding: str = "utf-8") -> str:
    """Return the SIP2 checksum of ``msg``: the two's complement of its byte sum, 4 uppercase hex.

    ``msg`` is everything up to and including ``AZ``. A ``str`` is encoded with ``encoding`` first,
    because the checksum covers the bytes on the wire (two bytes per character in gb18030).
    """
    data = msg.encode(encoding) if isinstance(msg, str) else msg
    return f"{-sum(data) & 0xFFFF:04X}"


def check_encoding(encoding: str) -> str:
    """Return the codec's canonical name, or raise ``ValueError`` if it cannot carry SIP2.

    SIP2 framing (``|``, CR, the ASCII field codes) needs an ASCII-compatible encoding: utf-8,
    gb18030, gbk, big5, latin-1 and cp125x are; utf-16 is not.
    """
    try:
        info = codecs.lookup(encoding)
    except LookupError:
        raise ValueError(f"unknown text encoding {encoding!r} (try utf-8 or gb18030)") from None
    probe = "AZ09|\r"
    if probe.encode(info.name) != probe.encode("ascii"):
        raise ValueError(f"encoding {encoding!r} is not ASCII-compatible and cannot carry SIP2")
    return info.name


def format_timestamp(when: dt.datetime) -> str:
    """Format a SIP2 date-time: ``YYYYMMDDZZZZHHMMSS`` (18 characters).

    A naive datetime is local time (zone blank, as most servers send); an aware one is sent as
    UTC with zone ``   Z``.
    """
    if when.tzinfo is None:
        zone = "    "
    else:
        when = when.astimezone(dt.UTC)
        zone = "   Z"
    return f"{when:%Y%m%d}{zone}{when:%H%M%S}"


_TIMESTAMP = re.compile(r"([0-9]{8})(.{4})([0-9]{6})")
_OTHER_DATE_FORMATS = (
    "%Y%m%d",
    "%Y-%m-%d",
    "%Y-%m-%d %H:%M:%S",
    "%Y-%m-%d %H:%M",
    "%Y%m%d%H%M%S",
    "%m/%d/%Y",
)


def parse_timestamp(text: str | None) -> dt.datetime | None:
    """Read a SIP2 date-time (``YYYYMMDDZZZZHHMMSS``) or a few common variants; ``None`` if unreadable.

    Due dates (AH) are free text in the specification and servers differ, so this never raises.
    """
    if not text or not text.strip():
        return None
    match = _TIMESTAMP.fullmatch(text)
    if match:
        day, zone, clock = match.groups()
        try:
            value = dt.datetime.strptime(day + clock, "%Y%m%d%H%M%S")
        except ValueError:
            return None
        return value.replace(tzinfo=dt.UTC) if zone.strip() in ("Z", "UTC", "GMT") else value
    for fmt in _OTHER_DATE_FORMATS:
        try:
            return dt.datetime.strptime(text.strip(), fmt)
        except ValueError:
            continue
    return None


# --------------------------------------------------------------------------------------------
# Building


def build(
    code: str,
    fixed: str | Sequence[str],
    fields: Iterable[tuple[str, str]],
    seq: int | None = None,
    error_detection: bool = True,
    encoding: str = "utf-8",
) -> str:
    """Build a SIP2 message (without the terminating CR).

    ``fixed`` is the fixed-length part, as one string or the list of its fields in order; its
    length is checked against the code's layout when the code is known. ``fields`` are
    ``(code, value)`` pairs, each written as ``CODEvalue|``. With ``error_detection``, ``AY<seq>``
    (when ``seq`` is given) and ``AZ<checksum>`` end the message.

    Raises ``Sip2BadRequest`` when a value holds ``|`` or CR (they would forge fields or end the
    message early) or when the fixed part has the wrong length. (The request builders below also
    refuse LF, which some servers take as a terminator.)
    """
    if len(code) != 2:
        raise Sip2BadRequest(f"a message code has two characters, got {code!r}")
    fixed_text = fixed if isinstance(fixed, str) else "".join(fixed)
    layout = FIXED_LAYOUTS.get(code)
    if layout is not None:
        width = sum(w for _, w in layout)
        if len(fixed_text) != width:
            raise Sip2BadRequest(
                f"a {code} ({MESSAGE_NAMES[code]}) message has {width} characters of fixed fields, got {len(fixed_text)}"
            )
    _refuse_delimiters("fixed fields", fixed_text)
    parts = [code, fixed_text]
    for field_code, value in fields:
        if len(field_code) != 2:
            raise Sip2BadRequest(f"a field code has two characters, got {field_code!r}")
        _refuse_delimiters(field_code, field_code + value)
        parts.append(f"{field_code}{value}|")
    if not error_detection:
        return "".join(parts)
    if seq is not None:
        if not 0 <= seq <= 9:
            raise Sip2BadRequest(f"the sequence number is one digit 0-9, got {seq}")
        parts.append(f"AY{seq}")
    parts.append("AZ")
    head = "".join(parts)
    return head + checksum(head, encoding)


def _refuse_delimiters(what: str, value: str) -> None:
    for bad, name in (("|", "'|'"), ("\r", "CR")):
        if bad in value:
            raise Sip2BadRequest(f"{what} contains {name}, which SIP2 cannot carry")


class Sip2Request(NamedTuple):
    """A request before framing: the client adds the sequence number and checksum per connection."""

    code: str
    fixed: str
    fields: list[tuple[str, str]]

    @property
    def idempotent(self) -> bool:
        """True when sending it twice cannot change anything (lookups, status, login)."""
        return self.code in IDEMPOTENT_CODES

    @property
    def name(self) -> str:
        """The message's name in the specification, e.g. ``renew``."""
        return MESSAGE_NAMES.get(self.code, self.code)

    def build(self, seq: int | None = None, error_detection: bool = True, encoding: str = "utf-8") -> str:
        """The message text, as ``build`` makes it."""
        return build(self.code, self.fixed, self.fields, seq, error_detection, encoding)


def _request(code: str, fixed: str, fields: list[tuple[str, str]]) -> Sip2Request:
    """A request from user-supplied values, refusing the characters that would break framing."""
    for field_code, value in fields:
        for bad, name in (("|", "'|'"), ("\r", "CR"), ("\n", "LF")):
            if bad in value:
                label = FIELD_NAMES.get(field_code, field_code)
                raise Sip2BadRequest(
                    f"{label} ({field_code}) contains {name}, which cannot be sent over SIP2"
                )
    return Sip2Request(code, fixed, fields)


def _patron_password(pin: str) -> list[tuple[str, str]]:
    """AD with the reader's PIN, or nothing when there is none.

    An empty AD is not "no password": Evergreen's SIPServer (and Koha's, which tests
    ``defined($patron_pwd)``) check an AD that is present, so renew all and hold are refused with
    "Invalid patron password" when it is empty, and accepted when it is left out.
    """
    return [("AD", pin)] if pin else []


def _yn(flag: bool) -> str:
    return "Y" if flag else "N"


def login_request(
    user: str, password: str, location: str = "", *, uid_algorithm: str = "0", pwd_algorithm: str = "0"
) -> Sip2Request:
    """93 Login: ``CN`` user, ``CO`` password, ``CP`` location code."""
    return _request("93", uid_algorithm + pwd_algorithm, [("CN", user), ("CO", password), ("CP", location)])


def sc_status_request(
    status: int = 0, max_print_width: int = 30, protocol_version: str = "2.00"
) -> Sip2Request:
    """99 SC Status: 0 = SC OK, 1 = printer out of paper, 2 = about to shut down."""
    return _request("99", f"{status:1d}{max_print_width:03d}{protocol_version:4.4s}", [])


def patron_status_request(
    institution: str,
    patron: str,
    pin: str,
    *,
    now: dt.datetime,
    terminal_password: str = "",
    language: str = "001",
) -> Sip2Request:
    """23 Patron Status Request."""
    return _request(
        "23",
        language + format_timestamp(now),
        [("AO", institution), ("AA", patron), ("AC", terminal_password), *_patron_password(pin)],
    )


def summary_field(summary: str | None) -> str:
    """The 10-character summary of a 63 request: 'Y' at the position of the wanted item list.

    ``summary`` is one of ``hold``, ``overdue``, ``charged``, ``fine``, ``recall``,
    ``unavailable``, or ``None`` for no list.
    """
    chars = [" "] * 10
    if summary is not None:
        try:
            chars[SUMMARY_POSITIONS[summary]] = "Y"
        except KeyError:
            raise Sip2BadRequest(
                f"unknown summary {summary!r}; use one of {', '.join(SUMMARY_POSITIONS)}"
            ) from None
    return "".join(chars)


def patron_information_request(
    institution: str,
    patron: str,
    pin: str,
    *,
    now: dt.datetime,
    summary: str | None = None,
    start: int | None = 1,
    end: int | None = None,
    terminal_password: str = "",
    language: str = "001",
) -> Sip2Request:
    """63 Patron Information; with a ``summary``, ``BP``/``BQ`` ask for items ``start``..``end``
    (``end`` defaults to ``start`` + 99; ``start=None`` leaves the range to the server)."""
    fields = [("AO", institution), ("AA", patron), ("AC", terminal_password), *_patron_password(pin)]
    if summary is not None and start is not None:
        last = end if end is not None else start + DEFAULT_ITEMS_PER_PAGE - 1
        fields += [("BP", str(start)), ("BQ", str(last))]
    return _request("63", language + format_timestamp(now) + summary_field(summary), fields)


def item_information_request(
    institution: str, item: str, *, now: dt.datetime, terminal_password: str = ""
) -> Sip2Request:
    """17 Item Information."""
    return _request(
        "17", format_timestamp(now), [("AO", institution), ("AB", item), ("AC", terminal_password)]
    )


def renew_request(
    institution: str,
    patron: str,
    pin: str,
    item: str,
    *,
    now: dt.datetime,
    third_party_allowed: bool = False,
    no_block: bool = False,
    fee_acknowledged: bool | None = False,
    title: str | None = None,
    item_properties: str | None = None,
    terminal_password: str = "",
) -> Sip2Request:
    """29 Renew one item (by barcode ``AB``; ``title`` adds ``AJ``)."""
    fields = [("AO", institution), ("AA", patron), *_patron_password(pin), ("AB", item)]
    if title is not None:
        fields.append(("AJ", title))
    fields.append(("AC", terminal_password))
    if item_properties is not None:
        fields.append(("CH", item_properties))
    if fee_acknowledged is not None:
        fields.append(("BO", _yn(fee_acknowledged)))
    fixed = _yn(third_party_allowed) + _yn(no_block) + format_timestamp(now) + _NO_DATE
    return _request("29", fixed, fields)


def renew_all_request(
    institution: str,
    patron: str,
    pin: str,
    *,
    now: dt.datetime,
    fee_acknowledged: bool | None = False,
    terminal_password: str = "",
) -> Sip2Request:
    """65 Renew All."""
    fields = [("AO", institution), ("AA", patron), *_patron_password(pin), ("AC", terminal_password)]
    if fee_acknowledged is not None:
        fields.append(("BO", _yn(fee_acknowledged)))
    return _request("65", format_timestamp(now), fields)


HOLD_MODES = {"+": "add", "-": "delete", "*": "change"}


def hold_request(
    institution: str,
    patron: str,
    pin: str,
    *,
    now: dt.datetime,
    mode: str = "+",
    item: str | None = None,
    title: str | None = None,
    expiration: dt.datetime | None = None,
    pickup_location: str | None = None,
    hold_type: int | None = None,
    fee_acknowledged: bool | None = None,
    terminal_password: str = "",
) -> Sip2Request:
    """15 Hold: ``mode`` ``+`` place, ``-`` cancel, ``*`` change; on an item (AB) or a title (AJ).

    ``hold_type``: 1 other, 2 any copy of the title, 3 this copy, 4 any copy at one branch.
    """
    if mode not in HOLD_MODES:
        raise Sip2BadRequest(f"hold mode is '+', '-' or '*', got {mode!r}")
    if item is None and title is None:
        raise Sip2BadRequest("a hold needs an item barcode or a title")
    fields: list[tuple[str, str]] = []
    if expiration is not None:
        fields.append(("BW", format_timestamp(expiration)))
    if pickup_location is not None:
        fields.append(("BS", pickup_location))
    if hold_type is not None:
        fields.append(("BY", str(hold_type)))
    fields += [("AO", institution), ("AA", patron), *_patron_password(pin)]
    if item is not None:
        fields.append(("AB", item))
    if title is not None:
        fields.append(("AJ", title))
    fields.append(("AC", terminal_password))
    if fee_acknowledged is not None:
        fields.append(("BO", _yn(fee_acknowledged)))
    return _request("15", mode + format_timestamp(now), fields)


def end_session_request(
    institution: str, patron: str, pin: str, *, now: dt.datetime, terminal_password: str = ""
) -> Sip2Request:
    """35 End Patron Session."""
    fields = [("AO", institution), ("AA", patron), ("AC", terminal_password), *_patron_password(pin)]
    return _request("35", format_timestamp(now), fields)


def resend_request() -> Sip2Request:
    """97 Request ACS Resend: carries a checksum (with error detection) but no sequence number."""
    return _request("97", "", [])


# --------------------------------------------------------------------------------------------
# Parsing


@dataclass(frozen=True)
class Sip2Message:
    """One parsed SIP2 message.

    ``fixed`` maps the code's fixed field names (see ``FIXED_LAYOUTS``) to their raw text;
    ``fields`` keeps the variable fields in order, unknown and repeated ones included.
    ``checksum_ok`` is None when the message carried no checksum, False when it was wrong or
    mangled. ``decode_errors`` is True when the bytes were not valid in the expected encoding
    (the text then holds replacement characters). ``terminated`` is False when the last field
    had no ``|`` (tolerated; see ``parse``). Two messages are equal when their content is
    (code, fixed, fields, sequence and whether error detection was on), whatever the checksum.
    """

    code: str
    fixed: Mapping[str, str]
    fields: list[tuple[str, str]]
    sequence: int | None = None
    error_detection: bool = False
    checksum: str | None = field(default=None, compare=False)
    checksum_ok: bool | None = field(default=None, compare=False)
    decode_errors: bool = field(default=False, compare=False)
    terminated: bool = field(default=True, compare=False)
    raw: str = field(default="", compare=False, repr=False)

    @property
    def name(self) -> str:
        """The message's name in the specification, e.g. ``patron information response``."""
        return MESSAGE_NAMES.get(self.code, self.code)

    def get(self, code: str, default: str | None = None) -> str | None:
        """The first value of field ``code``, or ``default`` when absent."""
        for field_code, value in self.fields:
            if field_code == code:
                return value
        return default

    def get_all(self, code: str) -> list[str]:
        """Every value of field ``code``, in order (AU, AF and friends repeat)."""
        return [value for field_code, value in self.fields if field_code == code]

    def unknown_fields(self) -> list[tuple[str, str]]:
        """The fields this module has no name for (kept, never an error)."""
        return [(c, v) for c, v in self.fields if c not in FIELD_NAMES]

    def to_raw(self, encoding: str = "utf-8") -> str:
        """Build the message again (canonical form: every field ends with ``|``)."""
        layout = FIXED_LAYOUTS[self.code]
        fixed = [self.fixed[name] for name, _ in layout]
        return build(self.code, fixed, self.fields, self.sequence, self.error_detection, encoding)


_TRAILER = re.compile(r"(?:AY([0-9]))?AZ([0-9A-Fa-f]{4})\Z")


def parse(raw: str | bytes, encoding: str = "utf-8") -> Sip2Message:
    """Parse one SIP2 message (a trailing CR/LF is allowed).

    Given bytes, the checksum is checked over the bytes as received and the text decoded with
    ``encoding``; bytes that do not decode become U+FFFD and set ``decode_errors`` rather than
    failing, so a wrong ``LIBRARYBOT_SIP2_ENCODING`` shows up as odd titles, not as an outage.
    Unknown fields, repeated fields and a missing ``|`` before the ``AY``/``AZ`` trailer are
    tolerated. A wrong or mangled checksum sets ``checksum_ok=False`` (the caller asks for a
    resend). A last field without its ``|`` is kept (``terminated=False``). Raises ``Sip2Error``
    for what cannot be read: an unknown code, a message shorter than its fixed fields, a field
    shorter than its two-character code.
    """
    decode_errors = False
    if isinstance(raw, bytes):
        data = raw.lstrip(b"\n").rstrip(b"\r\n")
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError:
            text = data.decode(encoding, errors="replace")
            decode_errors = True
    else:
        text = raw.lstrip("\n").rstrip("\r\n")
        data = None
    if len(text) < 2:
        raise Sip2Error(f"truncated SIP2 message: {text!r}")
    if "\r" in text:
        raise Sip2Error("a CR inside a SIP2 message: two messages run together?")
    code = text[:2]
    layout = FIXED_LAYOUTS.get(code)
    if layout is None:
        raise Sip2Error(f"unknown SIP2 message code {code!r}")
    width = sum(w for _, w in layout)
    if len(text) < 2 + width:
        raise Sip2Error(
            f"truncated {code} ({MESSAGE_NAMES[code]}): {len(text) - 2} characters of fixed fields, {width} expected"
        )
    fixed_text = text[2 : 2 + width]
    if "|" in fixed_text:
        raise Sip2Error(
            f"malformed {code} ({MESSAGE_NAMES[code]}): fixed fields too short (found '|' among them)"
        )
    fixed: dict[str, str] = {}
    pos = 0
    for name, w in layout:
        fixed[name] = fixed_text[pos : pos + w]
        pos += w

    rest = text[2 + width :]
    sequence: int | None = None
    checksum_value: str | None = None
    checksum_ok: bool | None = None
    error_detection = False
    trailer = _TRAILER.search(rest)
    if trailer:
        error_detection = True
        fields_text = rest[: trailer.start()]
        sequence = int(trailer.group(1)) if trailer.group(1) else None
        checksum_value = trailer.group(2)
        # The checksum covers the bytes as sent, up to and including "AZ" (the last 4 are the sum).
        covered = data[:-4] if data is not None else text[:-4].encode(encoding, errors="replace")
        checksum_ok = checksum(covered) == checksum_value.upper()
    else:
        fields_text = rest

    *terminated, tail = fields_text.split("|")
    if tail[:2] in ("AY", "AZ") and not trailer:
        # A trailer is there but mangled (cut short, not hex): treat it as a failed checksum so the
        # caller asks for a resend instead of reading "AY2AZE7" as a field.
        error_detection = True
        checksum_ok = False
        tail = ""
    if tail:
        # Clients and servers in the field often leave the last field without its '|' (the
        # recordings do, without error detection); keep it, and say so: without a checksum it may
        # also mean the message was cut short, which the client weighs.
        terminated.append(tail)
    fields: list[tuple[str, str]] = []
    for part in terminated:
        if not part:
            continue  # "||" or a stray '|' before AY: nothing there to keep
        if len(part) < 2:
            raise Sip2Error(
                f"malformed {code} ({MESSAGE_NAMES[code]}): field {part!r} is shorter than its code"
            )
        fields.append((part[:2], part[2:]))
    return Sip2Message(
        code=code,
        fixed=fixed,
        fields=fields,
        sequence=sequence,
        error_detection=error_detection,
        checksum=checksum_value,
        checksum_ok=checksum_ok,
        decode_errors=decode_errors,
        terminated=not tail,
        raw=text,
    )


_BYTES_TRAILER = re.compile(rb"(?:AY[0-9])?AZ([0-9A-Fa-f]{4})\Z")


def trailer_check(data: bytes) -> bool | None:
    """Check a received message's ``AY``/``AZ`` trailer on its bytes, before anything else is read.

    True: the checksum is right. False: it is wrong, or the trailer is there but mangled. None: the
    message has no trailer. Checked first so that a corrupted message code is asked for again (97)
    like any other corruption, instead of failing as an unknown code.
    """
    body = data.lstrip(b"\n").rstrip(b"\r\n")
    match = _BYTES_TRAILER.search(body)
    if match:
        return checksum(body[:-4]) == match.group(1).decode("ascii").upper()
    tail = body.rsplit(b"|", 1)[-1]
    return False if tail[:2] in (b"AY", b"AZ") else None


def guess_encoding(data: bytes, configured: str) -> str | None:
    """The encoding ``data`` seems to be in when it is not ``configured``, else None.

    Only non-ASCII bytes tell: text that is valid UTF-8 while we read gb18030 (or another legacy
    code page) is almost surely UTF-8 (GB text is rarely valid UTF-8), and bytes that are not valid
    UTF-8 but read cleanly as gb18030 are most likely GB text.
    """
    if data.isascii():
        return None
    name = check_encoding(configured)
    try:
        data.decode("utf-8")
        valid_utf8 = True
    except UnicodeDecodeError:
        valid_utf8 = False
    if name != "utf-8":
        return "utf-8" if valid_utf8 else None
    if valid_utf8:
        return None
    try:
        data.decode("gb18030")
    except UnicodeDecodeError:
        return None
    return "gb18030"


def strip_error_detection(raw: str) -> str:
    """The message without its ``AYn``/``AZxxxx`` trailer (and CR)."""
    text = raw.rstrip("\r\n")
    return _TRAILER.sub("", text)


def mask(raw: str | bytes, encoding: str = "utf-8") -> str:
    """The message with passwords (AD patron, CO login, AC terminal) replaced by ``****``, for logs."""
    text = raw.decode(encoding, errors="replace") if isinstance(raw, bytes) else raw
    text = text.rstrip("\r\n")
    try:
        msg = parse(text, encoding)
    except Sip2Error:
        # Unreadable, so field boundaries are unknown: mask whatever looks like a secret field.
        return re.sub(r"(AD|CO|AC)[^|]+", r"\1****", text)
    masked = [(c, "****" if c in SECRET_FIELDS and v else v) for c, v in msg.fields]
    if masked == msg.fields:
        return text
    head = build(msg.code, [msg.fixed[n] for n, _ in FIXED_LAYOUTS[msg.code]], masked, error_detection=False)
    if msg.error_detection:
        head += (f"AY{msg.sequence}" if msg.sequence is not None else "") + f"AZ{msg.checksum or '????'}"
    return head


# --------------------------------------------------------------------------------------------
# Typed responses


def _flag(value: str | None) -> bool | None:
    """Y/N (and 1/0) to a bool; anything else (U, blank, absent) is None."""
    if value is None:
        return None
    value = value.strip().upper()
    if value in ("Y", "1"):
        return True
    if value in ("N", "0"):
        return False
    return None


def _count(value: str | None) -> int | None:
    if value is None:
        return None
    value = value.strip()
    return int(value) if value.isascii() and value.isdigit() else None


def _expect(msg: Sip2Message, code: str) -> None:
    if msg.code != code:
        raise Sip2Error(f"expected a {code} ({MESSAGE_NAMES[code]}), got {msg.code} ({msg.name})")


@dataclass(frozen=True)
class LoginResult:
    """94 Login Response."""

    ok: bool
    message: Sip2Message = field(repr=False, compare=False)

    @classmethod
    def from_message(cls, msg: Sip2Message) -> LoginResult:
        """Read a 94."""
        _expect(msg, "94")
        return cls(ok=msg.fixed["ok"] == "1", message=msg)


@dataclass(frozen=True)
class ScStatus:
    """98 ACS Status: what the library's system is and what it allows."""

    online: bool
    checkin_ok: bool
    checkout_ok: bool
    renewal_policy: bool  # the SC may renew items on its own (ACS renewal policy)
    status_update_ok: bool
    offline_ok: bool
    timeout_period: int | None  # tenths of a second; None when not a number
    retries_allowed: int | None  # 999 means unknown
    date_time_sync: dt.datetime | None
    protocol_version: str
    institution: str | None
    library_name: str | None
    terminal_location: str | None
    supported_messages: list[str]  # names from SUPPORTED_MESSAGES whose BX position is 'Y'
    supported_raw: str | None
    screen_messages: list[str]
    print_lines: list[str]
    message: Sip2Message = field(repr=False, compare=False)

    def supports(self, name: str) -> bool:
        """True when BX says the server supports message ``name`` (e.g. ``renew``).

        Without BX (servers older than 2.00) nothing can be told, so this says True.
        """
        if self.supported_raw is None:
            return True
        return name in self.supported_messages

    @classmethod
    def from_message(cls, msg: Sip2Message) -> ScStatus:
        """Read a 98."""
        _expect(msg, "98")
        f = msg.fixed
        bx = msg.get("BX")
        supported = [
            name for name, ch in zip(SUPPORTED_MESSAGES, bx or "", strict=False) if ch.upper() == "Y"
        ]
        return cls(
            online=_flag(f["online_status"]) is True,
            checkin_ok=_flag(f["checkin_ok"]) is True,
            checkout_ok=_flag(f["checkout_ok"]) is True,
            renewal_policy=_flag(f["acs_renewal_policy"]) is True,
            status_update_ok=_flag(f["status_update_ok"]) is True,
            offline_ok=_flag(f["offline_ok"]) is True,
            timeout_period=_count(f["timeout_period"]),
            retries_allowed=_count(f["retries_allowed"]),
            date_time_sync=parse_timestamp(f["date_time_sync"]),
            protocol_version=f["protocol_version"].strip(),
            institution=msg.get("AO"),
            library_name=msg.get("AM"),
            terminal_location=msg.get("AN"),
            supported_messages=supported,
            supported_raw=bx,
            screen_messages=msg.get_all("AF"),
            print_lines=msg.get_all("AG"),
            message=msg,
        )


def _status_flags(value: str) -> list[str]:
    return [name for name, ch in zip(PATRON_STATUS_FLAGS, value, strict=False) if ch.upper() == "Y"]


@dataclass(frozen=True)
class PatronStatus:
    """24 Patron Status Response (also the answer to Block Patron)."""

    patron_id: str | None
    name: str | None
    valid_patron: bool | None  # BL; False: the library's system does not know this reader
    valid_password: bool | None  # CQ; False: wrong PIN
    status_flags: list[str]  # names from PATRON_STATUS_FLAGS that apply
    language: str
    transaction_date: dt.datetime | None
    institution: str | None
    currency: str | None
    fee_amount: str | None  # BV, as sent: amounts are decimal text, not floats
    screen_messages: list[str]
    print_lines: list[str]
    message: Sip2Message = field(repr=False, compare=False)

    @property
    def known(self) -> bool:
        """True unless the server said the patron is not valid (BL N)."""
        return self.valid_patron is not False

    @property
    def blocked(self) -> bool:
        """True when charge privileges are denied (the reader cannot borrow)."""
        return "charge privileges denied" in self.status_flags

    @classmethod
    def from_message(cls, msg: Sip2Message) -> PatronStatus:
        """Read a 24."""
        _expect(msg, "24")
        return cls(**_patron_common(msg))


def _patron_common(msg: Sip2Message) -> dict[str, Any]:
    f = msg.fixed
    return {
        "patron_id": msg.get("AA"),
        "name": msg.get("AE"),
        "valid_patron": _flag(msg.get("BL")),
        "valid_password": _flag(msg.get("CQ")),
        "status_flags": _status_flags(f["patron_status"]),
        "language": f["language"],
        "transaction_date": parse_timestamp(f["transaction_date"]),
        "institution": msg.get("AO"),
        "currency": msg.get("BH"),
        "fee_amount": msg.get("BV"),
        "screen_messages": msg.get_all("AF"),
        "print_lines": msg.get_all("AG"),
        "message": msg,
    }


@dataclass(frozen=True)
class PatronInfo(PatronStatus):
    """64 Patron Information Response: the reader, their counts and one list of items.

    Only the list asked for in the request's summary is filled; the others are empty. Lists hold
    what the server sent — item barcodes for most servers, sometimes with a title appended.
    """

    hold_items_count: int | None = None
    overdue_items_count: int | None = None
    charged_items_count: int | None = None
    fine_items_count: int | None = None
    recall_items_count: int | None = None
    unavailable_holds_count: int | None = None
    hold_items: list[str] = field(default_factory=list)  # AS
    overdue_items: list[str] = field(default_factory=list)  # AT
    charged_items: list[str] = field(default_factory=list)  # AU
    fine_items: list[str] = field(default_factory=list)  # AV
    recall_items: list[str] = field(default_factory=list)  # BU
    unavailable_hold_items: list[str] = field(default_factory=list)  # CD
    hold_items_limit: int | None = None  # BZ
    overdue_items_limit: int | None = None  # CA
    charged_items_limit: int | None = None  # CB
    fee_limit: str | None = None  # CC
    home_address: str | None = None  # BD
    email: str | None = None  # BE
    phone: str | None = None  # BF

    @classmethod
    def from_message(cls, msg: Sip2Message) -> PatronInfo:
        """Read a 64."""
        _expect(msg, "64")
        f = msg.fixed
        return cls(
            **_patron_common(msg),
            hold_items_count=_count(f["hold_items_count"]),
            overdue_items_count=_count(f["overdue_items_count"]),
            charged_items_count=_count(f["charged_items_count"]),
            fine_items_count=_count(f["fine_items_count"]),
            recall_items_count=_count(f["recall_items_count"]),
            unavailable_holds_count=_count(f["unavailable_holds_count"]),
            hold_items=msg.get_all("AS"),
            overdue_items=msg.get_all("AT"),
            charged_items=msg.get_all("AU"),
            fine_items=msg.get_all("AV"),
            recall_items=msg.get_all("BU"),
            unavailable_hold_items=msg.get_all("CD"),
            hold_items_limit=_count(msg.get("BZ")),
            overdue_items_limit=_count(msg.get("CA")),
            charged_items_limit=_count(msg.get("CB")),
            fee_limit=msg.get("CC"),
            home_address=msg.get("BD"),
            email=msg.get("BE"),
            phone=msg.get("BF"),
        )


@dataclass(frozen=True)
class ItemInfo:
    """18 Item Information Response."""

    item_id: str | None
    title: str | None
    circulation_status: int | None
    security_marker: str
    fee_type: str
    transaction_date: dt.datetime | None
    due_date_text: str | None  # AH as sent
    due_date: dt.datetime | None  # AH read, when it is in a known format
    hold_queue_length: int | None
    recall_date: dt.datetime | None
    hold_pickup_date: dt.datetime | None
    owner: str | None
    currency: str | None
    fee_amount: str | None
    media_type: str | None
    permanent_location: str | None
    current_location: str | None
    call_number: str | None  # CS, an extension some servers send
    item_properties: str | None
    screen_messages: list[str]
    print_lines: list[str]
    message: Sip2Message = field(repr=False, compare=False)

    @property
    def status_name(self) -> str:
        """The circulation status in the specification's words (``available``, ``charged``, …)."""
        if self.circulation_status is None:
            return "unknown"
        return CIRCULATION_STATUSES.get(self.circulation_status, f"status {self.circulation_status:02d}")

    @property
    def found(self) -> bool:
        """False when the server does not know the item.

        SIP2 has no "not found" flag; servers answer status 01 (other) with an empty title, so
        that is what this reads.
        """
        return not (self.circulation_status in (None, 1) and not self.title)

    @classmethod
    def from_message(cls, msg: Sip2Message) -> ItemInfo:
        """Read an 18."""
        _expect(msg, "18")
        f = msg.fixed
        due = msg.get("AH")
        return cls(
            item_id=msg.get("AB"),
            title=msg.get("AJ"),
            circulation_status=_count(f["circulation_status"]),
            security_marker=f["security_marker"],
            fee_type=f["fee_type"],
            transaction_date=parse_timestamp(f["transaction_date"]),
            due_date_text=due,
            due_date=parse_timestamp(due),
            hold_queue_length=_count(msg.get("CF")),
            recall_date=parse_timestamp(msg.get("CJ")),
            hold_pickup_date=parse_timestamp(msg.get("CM")),
            owner=msg.get("BG"),
            currency=msg.get("BH"),
            fee_amount=msg.get("BV"),
            media_type=msg.get("CK"),
            permanent_location=msg.get("AQ"),
            current_location=msg.get("AP"),
            call_number=msg.get("CS"),
            item_properties=msg.get("CH"),
            screen_messages=msg.get_all("AF"),
            print_lines=msg.get_all("AG"),
            message=msg,
        )


@dataclass(frozen=True)
class RenewResult:
    """30 Renew Response. ``ok`` False means refused; ``screen_messages`` (AF) usually say why."""

    ok: bool
    renewal_ok: bool  # the item was already charged to this patron, so this was a renewal
    magnetic_media: bool | None  # None: unknown (U)
    desensitize: bool | None
    transaction_date: dt.datetime | None
    patron_id: str | None
    item_id: str | None
    title: str | None
    due_date_text: str | None
    due_date: dt.datetime | None
    fee_type: str | None
    fee_amount: str | None
    currency: str | None
    transaction_id: str | None
    media_type: str | None
    screen_messages: list[str]
    print_lines: list[str]
    message: Sip2Message = field(repr=False, compare=False)

    @classmethod
    def from_message(cls, msg: Sip2Message) -> RenewResult:
        """Read a 30."""
        _expect(msg, "30")
        f = msg.fixed
        due = msg.get("AH")
        return cls(
            ok=f["ok"] == "1",
            renewal_ok=_flag(f["renewal_ok"]) is True,
            magnetic_media=_flag(f["magnetic_media"]),
            desensitize=_flag(f["desensitize"]),
            transaction_date=parse_timestamp(f["transaction_date"]),
            patron_id=msg.get("AA"),
            item_id=msg.get("AB"),
            title=msg.get("AJ"),
            due_date_text=due,
            due_date=parse_timestamp(due),
            fee_type=msg.get("BT"),
            fee_amount=msg.get("BV"),
            currency=msg.get("BH"),
            transaction_id=msg.get("BK"),
            media_type=msg.get("CK"),
            screen_messages=msg.get_all("AF"),
            print_lines=msg.get_all("AG"),
            message=msg,
        )


@dataclass(frozen=True)
class RenewAllResult:
    """66 Renew All Response."""

    ok: bool
    renewed_count: int | None
    unrenewed_count: int | None
    transaction_date: dt.datetime | None
    renewed_items: list[str]  # BM
    unrenewed_items: list[str]  # BN
    screen_messages: list[str]
    print_lines: list[str]
    message: Sip2Message = field(repr=False, compare=False)

    @classmethod
    def from_message(cls, msg: Sip2Message) -> RenewAllResult:
        """Read a 66."""
        _expect(msg, "66")
        f = msg.fixed
        return cls(
            ok=f["ok"] == "1",
            renewed_count=_count(f["renewed_count"]),
            unrenewed_count=_count(f["unrenewed_count"]),
            transaction_date=parse_timestamp(f["transaction_date"]),
            renewed_items=msg.get_all("BM"),
            unrenewed_items=msg.get_all("BN"),
            screen_messages=msg.get_all("AF"),
            print_lines=msg.get_all("AG"),
            message=msg,
        )


@dataclass(frozen=True)
class HoldResult:
    """16 Hold Response."""

    ok: bool
    available: bool | None  # the item is available now
    transaction_date: dt.datetime | None
    expiration_date: dt.datetime | None  # BW
    queue_position: int | None  # BR
    pickup_location: str | None  # BS
    patron_id: str | None
    item_id: str | None
    title: str | None
    screen_messages: list[str]
    print_lines: list[str]
    message: Sip2Message = field(repr=False, compare=False)

    @classmethod
    def from_message(cls, msg: Sip2Message) -> HoldResult:
        """Read a 16."""
        _expect(msg, "16")
        f = msg.fixed
        return cls(
            ok=f["ok"] == "1",
            available=_flag(f["available"]),
            transaction_date=parse_timestamp(f["transaction_date"]),
            expiration_date=parse_timestamp(msg.get("BW")),
            queue_position=_count(msg.get("BR")),
            pickup_location=msg.get("BS"),
            patron_id=msg.get("AA"),
            item_id=msg.get("AB"),
            title=msg.get("AJ"),
            screen_messages=msg.get_all("AF"),
            print_lines=msg.get_all("AG"),
            message=msg,
        )


@dataclass(frozen=True)
class EndSessionResult:
    """36 End Session Response."""

    ended: bool
    patron_id: str | None
    screen_messages: list[str]
    print_lines: list[str]
    message: Sip2Message = field(repr=False, compare=False)

    @classmethod
    def from_message(cls, msg: Sip2Message) -> EndSessionResult:
        """Read a 36."""
        _expect(msg, "36")
        return cls(
            ended=_flag(msg.fixed["end_session"]) is True,
            patron_id=msg.get("AA"),
            screen_messages=msg.get_all("AF"),
            print_lines=msg.get_all("AG"),
            message=msg,
        )
