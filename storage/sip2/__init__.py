"""SIP2 (3M Standard Interchange Protocol 2.00): talking to the library's own system.

``protocol`` builds and parses messages (pure), ``client`` talks over asyncio with a connection
pool, ``replay`` is a small server answering as a recorded real one did (tests, demo, benchmark).
The circulation interface builds on ``Sip2Pool``; ``check_report`` is ``librarybot sip2 check``.
"""

from storage.sip2.client import Sip2Check, Sip2Client, Sip2Config, Sip2Pool, check_report, run_check
from storage.sip2.errors import (
    Sip2ChecksumError,
    Sip2Error,
    Sip2Exception,
    Sip2LoginRefused,
    Sip2LoginUnanswered,
    Sip2Unavailable,
)
from storage.sip2.protocol import (
    EndSessionResult,
    HoldResult,
    ItemInfo,
    PatronInfo,
    PatronStatus,
    RenewAllResult,
    RenewResult,
    ScStatus,
    Sip2BadRequest,
    Sip2Message,
    build,
    checksum,
    parse,
)

__all__ = [
    "EndSessionResult",
    "HoldResult",
    "ItemInfo",
    "PatronInfo",
    "PatronStatus",
    "RenewAllResult",
    "RenewResult",
    "ScStatus",
    "Sip2BadRequest",
    "Sip2Check",
    "Sip2ChecksumError",
    "Sip2Client",
    "Sip2Config",
    "Sip2Error",
    "Sip2Exception",
    "Sip2LoginRefused",
    "Sip2LoginUnanswered",
    "Sip2Message",
    "Sip2Pool",
    "Sip2Unavailable",
    "build",
    "check_report",
    "checksum",
    "parse",
    "run_check",
]
