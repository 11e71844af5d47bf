"""Relay policy: pure decisions, no I/O. Each check returns a Reply to refuse with, or None.

Submission (RFC 6409 section 8) lets the server enforce that an authenticated user sends only as
addresses it owns: here, addresses in the user's own domain, and only while that domain passes DNS
verification (``verified``, or ``failing`` within its grace period).
"""

from __future__ import annotations

import email.utils
import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from relay import grammar, replies, userrules
from relay.grammar import HeaderField
from relay.replies import Reply
from relay.store.domains import SENDING_STATES

# The originator fields (RFC 5322 3.6.2, 3.6.6): each address in them must be the user's.
_SENDERS = ("sender", "resent-from", "resent-sender")
_CHECKED = ("from", *_SENDERS)
_NAMES = {"sender": "Sender", "resent-from": "Resent-From", "resent-sender": "Resent-Sender"}


@dataclass(frozen=True)
class Senders:
    """Who a user may send as: any address of its domain, or (with an allow-list, relay/
    userrules.py) only the addresses and ``*@domain`` entries the list names, which may be of a
    subdomain of its domain. ``login`` names the user in a refusal."""

    user_domain: str
    allow_from: tuple[str, ...] = ()
    login: str = ""

    def owns(self, domain: str) -> bool:
        own = self.user_domain.lower()
        if not self.allow_from:
            return domain == own
        return domain == own or domain in userrules.list_domains(self.allow_from)

    def allows(self, address: str) -> bool:
        return userrules.sender_allowed(self.allow_from, address)

    def refusal(self, template: Reply, **fields: str) -> Reply:
        allowed = controls_text(self.allow_from)
        return template.fill(login=self.login, allowed=allowed, **fields)


def controls_text(allow_from: tuple[str, ...], shown: int = 5) -> str:
    """The allow-list as a refusal names it: the first few entries, then how many more."""
    more = len(allow_from) - shown
    text = ", ".join(allow_from[:shown])
    return f"{text} (and {more} more)" if more > 0 else text


def _senders(user: str | Senders) -> Senders:
    return user if isinstance(user, Senders) else Senders(user)


def check_sender(user: str | Senders, mail_from: str, domain_state: str | None) -> Reply | None:
    """MAIL FROM: the envelope sender must be the user's to use (its domain, or its allow-list),
    and the user's domain may send."""
    senders = _senders(user)
    if mail_from in ("", "<>"):  # aiosmtpd hands the null reverse-path over as "<>"
        return replies.NULL_SENDER_REFUSED
    sender_domain = grammar.mailbox_domain(mail_from)
    if sender_domain is None:
        return replies.BAD_SENDER_SYNTAX
    if not senders.owns(sender_domain):
        if senders.allow_from:
            return senders.refusal(replies.SENDER_NOT_ALLOWED)
        return replies.SENDER_NOT_OWNED
    if not senders.allows(mail_from):
        return senders.refusal(replies.SENDER_NOT_ALLOWED)
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
    """The addresses in the From header, or None if there is no one From field with some."""
    return from_addresses(grammar.header_fields(message, ("from",)))


def _addresses(field: HeaderField) -> list[str]:
    text = field.text()
    if len(text) > _KEPT_TEXT:
        return list(_parsed(text))
    return list(_kept(text))


_KEPT_TEXT = 1000  # characters: a From or Sender value longer than this is parsed each time


def _parsed(text: str) -> tuple[str, ...]:
    return tuple(addr for _name, addr in email.utils.getaddresses([text]) if addr)


# An app sends from the same From for every message: its parse (15 us) is kept.
_kept = functools.lru_cache(maxsize=256)(_parsed)


def from_addresses(fields: Sequence[HeaderField] | None) -> list[str] | None:
    """The addresses of the one From field among ``fields`` (RFC 5322 3.6: exactly one), or
    None. A field written "From :" (obs-syntax, RFC 5322 4.5.2) is a From field: the parser
    reads it as one, as a receiver may, so beside a regular From it makes two."""
    if fields is None:
        return None
    values = [f for f in fields if f.key == "from"]
    if len(values) != 1:
        return None
    return _addresses(values[0]) or None


def check_header_from(user: str | Senders, addresses: Iterable[str] | None) -> Reply | None:
    """DATA: every header From address must be in the sender's domain (DMARC alignment), and
    on the user's allow-list if it has one."""
    # None: no From at all; an empty list: an empty group ("undisclosed-senders: ;").
    found = [] if addresses is None else list(addresses)
    return _aligned(
        found, _senders(user), replies.HEADER_FROM_MISSING, replies.HEADER_FROM_MISMATCH, "From"
    )


def check_senders(user: str | Senders, fields: Sequence[HeaderField]) -> Reply | None:
    """DATA: Sender (at most one, RFC 5322 3.6), Resent-From and Resent-Sender (any number: one
    per resent block) hold to the From rule: some address, and every address in the user's
    domain. A receiver shows "Sender on behalf of From"; a signature d= the user's domain must
    not vouch for someone else there either."""
    if sum(f.key == "sender" for f in fields) > 1:
        return replies.HEADER_SENDER_INVALID
    for field in fields:
        if field.key not in _SENDERS:
            continue
        refusal = _aligned(
            _addresses(field),
            _senders(user),
            replies.HEADER_SENDER_INVALID,
            replies.HEADER_SENDER_MISMATCH,
            _NAMES[field.key],  # our spelling: a reply never echoes the client's
        )
        if refusal is not None:
            return refusal
    return None


def _aligned(
    addresses: Sequence[str], senders: Senders, invalid: Reply, foreign: Reply, name: str
) -> Reply | None:
    """Some address, each one a mailbox (else ``invalid``) in the user's domain (else
    ``foreign``) and on its allow-list if it has one: the rule every originator field is held
    to. ``name``: the field, as a refusal names it."""
    if not addresses:
        return invalid
    for addr in addresses:
        dom = grammar.mailbox_domain(addr)
        if dom is None:
            return invalid
        if not senders.owns(dom):
            return (
                senders.refusal(replies.HEADER_NOT_ALLOWED, field=name)
                if (senders.allow_from)
                else foreign
            )
        if not senders.allows(addr):
            return senders.refusal(replies.HEADER_NOT_ALLOWED, field=name)
    return None


def check_header(user: str | Senders, message: bytes) -> Reply | None:
    """DATA: the header section is made of header fields only (554 5.6.0: nothing a receiver
    might read otherwise), then the From rule, then Sender and the Resent- originators."""
    fields = grammar.header_fields(message, _CHECKED)
    if fields is None:
        return replies.HEADER_SYNTAX
    senders = _senders(user)
    return check_header_from(senders, from_addresses(fields)) or check_senders(senders, fields)


def check_line_endings(message: bytes) -> Reply | None:
    """Only CRLF line endings and no NUL (SMTP smuggling defence; RFC 5321 2.3.8)."""
    if b"\0" in message:
        return replies.NUL_IN_MESSAGE
    crlf = message.count(b"\r\n")
    if message.count(b"\n") != crlf or message.count(b"\r") != crlf:
        return replies.BARE_LINE_ENDING
    return None
