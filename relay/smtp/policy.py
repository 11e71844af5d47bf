"""Relay policy: pure decisions, no I/O. Each check returns a Reply to refuse with, or None.

Submission (RFC 6409 section 8) lets the server enforce that an authenticated user sends only as
addresses it owns: here, addresses in the user's own domain, and only while that domain passes DNS
verification (``verified``, or ``failing`` within its grace period).
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Iterable
from email.parser import BytesHeaderParser
from email.policy import compat32

from relay import grammar, replies
from relay.replies import Reply
from relay.store.domains import SENDING_STATES

_FROM_FIELD = re.compile(rb"^from[ \t]*:", re.IGNORECASE | re.MULTILINE)


def check_sender(user_domain: str, mail_from: str, domain_state: str | None) -> Reply | None:
    """MAIL FROM: the envelope sender must be in the user's domain, and that domain may send."""
    if mail_from in ("", "<>"):  # aiosmtpd hands the null reverse-path over as "<>"
        return replies.NULL_SENDER_REFUSED
    sender_domain = grammar.mailbox_domain(mail_from)
    if sender_domain is None:
        return replies.BAD_SENDER_SYNTAX
    if sender_domain != user_domain.lower():
        return replies.SENDER_NOT_OWNED
    if domain_state not in SENDING_STATES:
        return replies.SENDER_DOMAIN_UNVERIFIED
    return None


def check_recipient(address: str, count_so_far: int, max_recipients: int) -> Reply | None:
    """RCPT TO: syntax, and the per-message limit (RFC 5321 4.5.3.1.8: 452 4.5.3)."""
    if grammar.split_address(address) is None:
        return replies.BAD_RCPT_SYNTAX
    if count_so_far >= max_recipients:
        return replies.TOO_MANY_RECIPIENTS
    return None


def header_from_addresses(message: bytes) -> list[str] | None:
    """The addresses in the From header(s), or None if there is no parseable From."""
    # Only the header block: the parser reads all it is given (as str, through a StringIO), which
    # costs about 7x the size of a whole message held in memory.
    head = grammar.header_block(message)
    headers = BytesHeaderParser(policy=compat32).parsebytes(head)
    values = headers.get_all("From") or []
    # RFC 5322 3.6: exactly one From field. Counted over the raw header block too, as a receiver
    # may: the parser skips obs-syntax "From :" (4.5.2 obs-from allows WSP before the colon) and
    # every field after a line that is not a header, so a second From could hide there.
    if len(values) != 1 or len(_FROM_FIELD.findall(head)) != 1:
        return None
    pairs = email.utils.getaddresses([str(v) for v in values])
    addrs = [addr for _name, addr in pairs if addr]
    return addrs or None


def check_header_from(user_domain: str, addresses: Iterable[str] | None) -> Reply | None:
    """DATA: every header From address must be in the sender's domain (DMARC alignment)."""
    addresses = None if addresses is None else list(addresses)
    if not addresses:  # none at all, or an empty group ("undisclosed-senders: ;")
        return replies.HEADER_FROM_MISSING
    for addr in addresses:
        dom = grammar.mailbox_domain(addr)
        if dom is None:
            return replies.HEADER_FROM_MISSING
        if dom != user_domain.lower():
            return replies.HEADER_FROM_MISMATCH
    return None


def check_line_endings(message: bytes) -> Reply | None:
    """Only CRLF line endings and no NUL (SMTP smuggling defence; RFC 5321 2.3.8)."""
    if b"\0" in message:
        return replies.NUL_IN_MESSAGE
    crlf = message.count(b"\r\n")
    if message.count(b"\n") != crlf or message.count(b"\r") != crlf:
        return replies.BARE_LINE_ENDING
    return None
