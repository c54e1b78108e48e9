"""What can go wrong when talking SIP2, as exceptions a caller can tell apart.

Two families, because the caller's answer differs: ``Sip2Unavailable`` means the library's system
could not be reached in time (down, slow, or it closed the connection) — tell the reader to try
later; ``Sip2Error`` means we reached it but the conversation itself went wrong (a refused login, a
message we cannot read) — an operator has to look. Both derive from ``Sip2Exception``.
"""

from __future__ import annotations


class Sip2Exception(Exception):
    """Base of every SIP2 failure raised by ``storage.sip2``."""


class Sip2Error(Sip2Exception):
    """A protocol problem: the server answered, but not with something we can use."""


class Sip2ChecksumError(Sip2Error):
    """A response kept failing its checksum even after asking the server to resend it (97)."""


class Sip2LoginRefused(Sip2Error):
    """The server answered the login (93) with ``940``: wrong user, password or location."""


class Sip2Unavailable(Sip2Exception):
    """The server could not be reached, did not answer in time, or closed the connection.

    ``may_have_reached_server`` is True when the request was written before things went wrong: for
    a renew or a hold the caller must then say "we do not know whether it happened", not "it
    failed", because the library's system may have acted on it.
    """

    def __init__(self, message: str, *, may_have_reached_server: bool = False) -> None:
        super().__init__(message)
        self.may_have_reached_server = may_have_reached_server


class Sip2LoginUnanswered(Sip2Unavailable):
    """The server accepted the connection but never answered our login (93).

    Servers that allow an account one connection at a time (Evergreen's SIPServer with
    ``max_servers=1``, many small Koha set-ups) behave like this for a second connection: nothing
    was sent on behalf of a reader, so the pool drops that connection and keeps the ones that work.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, may_have_reached_server=False)
