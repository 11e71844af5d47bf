"""Header integrity against the real server (issue 12, items 5 and 6).

What a receiver reads as a header field, relaybox reads as that field too, before it signs
``d=`` the user's domain:

- A field name followed by white space and a colon (``From : x``, ``X-Note<TAB>: x``: RFC 5322
  4.5.2 obsolete syntax) is that field. A second From written so is a second From (refused); alone
  and owned, it is queued written the modern way (``From:``), and its signature verifies.
- Sender, Resent-From and Resent-Sender are held to the From rule: every address in the user's
  domain, at most one Sender.
- A line of the header section that is not part of a field (no colon, a space in the name, a
  continuation with nothing to continue, 8-bit octets in a name) is refused permanently
  (``554 5.6.0``), never ``451``.

Each variant is sent through a real session on the implicit-TLS listener; the reply is compared
exactly, the spool is read (nothing queued, or exactly the message as expected), a queued message
is verified with dkimpy against the key published in the test's DNS server, and a second, clean
transaction on the same session must be queued (the refused one ended with its reply).
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import email.utils
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import dkim
import dns.resolver
import pytest

from relay import dkimkeys, replies
from relay.dkim import INLINE_LIMIT
from relay.replies import Reply
from relay.store import domains
from tests.dialogue import Dialogue
from tests.dnsserver import TestDNSServer
from tests.hostile.kit import LOGIN, authed, no_errors_logged, queued
from tests.relayserver import RelayHandle

FOREIGN = "ceo@other.test"
TAIL = b"To: someone@dest.test\r\nSubject: hello\r\n\r\nHello there.\r\nFrom : not a field here\r\n"
# A body over relay.dkim.INLINE_LIMIT: the DATA handler checks such a message in a thread.
BIG_TAIL = TAIL + (b"x" * 998 + b"\r\n") * (INLINE_LIMIT // 1000 + 10)


@dataclass(frozen=True)
class Case:
    id: str
    head: bytes  # the first header lines, as sent (TAIL follows)
    reply: Reply | None  # None: queued
    stored: bytes | None = None  # queued: the message as the spool must end (default: as sent)
    tail: bytes = TAIL

    @property
    def message(self) -> bytes:
        return self.head + self.tail


def own(field: str = "From") -> bytes:
    return f"{field}: {LOGIN}\r\n".encode()


CASES = [
    Case("plain", own(), None),
    # --- item 5: a second From written "From :" -----------------------------------------------
    Case(
        "second-from-space", own() + f"From : {FOREIGN}\r\n".encode(), replies.HEADER_FROM_MISSING
    ),
    Case("second-from-tab", own() + f"From\t: {FOREIGN}\r\n".encode(), replies.HEADER_FROM_MISSING),
    Case(
        "second-from-several",
        own() + f"from \t  \t: {FOREIGN}\r\n".encode(),
        replies.HEADER_FROM_MISSING,
    ),
    Case("second-from-owned", own() + f"FROM  : {LOGIN}\r\n".encode(), replies.HEADER_FROM_MISSING),
    Case("obs-from-first", f"From : {FOREIGN}\r\n".encode() + own(), replies.HEADER_FROM_MISSING),
    Case("obs-from-foreign-alone", f"From\t: {FOREIGN}\r\n".encode(), replies.HEADER_FROM_MISMATCH),
    Case(
        "obs-from-owned-alone",
        f"From \t: App <{LOGIN}>\r\n".encode(),
        None,
        stored=f"From: App <{LOGIN}>\r\n".encode() + TAIL,
    ),
    # --- item 5: Sender, Resent-From, Resent-Sender ---------------------------------------------
    Case("sender-owned", own() + own("Sender"), None),
    Case(
        "sender-foreign", own() + f"Sender: {FOREIGN}\r\n".encode(), replies.HEADER_SENDER_MISMATCH
    ),
    Case(
        "sender-obs-foreign",
        own() + f"Sender : {FOREIGN}\r\n".encode(),
        replies.HEADER_SENDER_MISMATCH,
    ),
    Case(
        "sender-list-one-foreign",
        own() + f"Sender: {LOGIN}, {FOREIGN}\r\n".encode(),
        replies.HEADER_SENDER_MISMATCH,
    ),
    Case("sender-twice", own() + own("Sender") + own("Sender"), replies.HEADER_SENDER_INVALID),
    Case(
        "sender-twice-obs",
        own() + own("Sender") + f"Sender\t: {LOGIN}\r\n".encode(),
        replies.HEADER_SENDER_INVALID,
    ),
    Case("sender-empty", own() + b"Sender:\r\n", replies.HEADER_SENDER_INVALID),
    Case("sender-no-address", own() + b"Sender: nobody\r\n", replies.HEADER_SENDER_INVALID),
    Case(
        "resent-from-foreign",
        own() + f"Resent-From: {FOREIGN}\r\n".encode(),
        replies.HEADER_SENDER_MISMATCH,
    ),
    Case(
        "resent-from-obs-foreign",
        own() + f"Resent-From\t : {FOREIGN}\r\n".encode(),
        replies.HEADER_SENDER_MISMATCH,
    ),
    Case(
        "resent-from-second-block-foreign",
        own("Resent-From") + f"Resent-From: {FOREIGN}\r\n".encode() + own(),
        replies.HEADER_SENDER_MISMATCH,
    ),
    Case("resent-from-two-blocks-owned", own("Resent-From") + own("Resent-From") + own(), None),
    Case(
        "resent-sender-foreign",
        own() + f"Resent-Sender: {FOREIGN}\r\n".encode(),
        replies.HEADER_SENDER_MISMATCH,
    ),
    # --- item 6: a field with white space before its colon is a field: signed so it verifies ---
    Case(
        "obs-tab-field",
        own() + b"X-Note\t: hi\r\n",
        None,
        stored=own() + b"X-Note: hi\r\n" + TAIL,
    ),
    Case(
        "obs-signed-fields",
        own() + b"Reply-To  : r@example.com\r\nDate \t: Mon, 1 Jan 2024 00:00:00 +0000\r\n",
        None,
        stored=own()
        + b"Reply-To: r@example.com\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        + TAIL,
    ),
    Case(
        "obs-folded",
        own() + b"X-Long \t: one\r\n\ttwo\r\n",
        None,
        stored=own() + b"X-Long: one\r\n\ttwo\r\n" + TAIL,
    ),
    Case(
        "obs-big-message",
        own() + b"X-Note\t: hi\r\n",
        None,
        stored=own() + b"X-Note: hi\r\n" + BIG_TAIL,
        tail=BIG_TAIL,
    ),
    Case(
        "second-from-big-message",
        own() + f"From : {FOREIGN}\r\n".encode(),
        replies.HEADER_FROM_MISSING,
        tail=BIG_TAIL,
    ),
    Case(
        "sender-foreign-big-message",
        own() + f"Sender: {FOREIGN}\r\n".encode(),
        replies.HEADER_SENDER_MISMATCH,
        tail=BIG_TAIL,
    ),
    # --- item 6: what is not a header field: refused for good -----------------------------------
    Case("no-colon", own() + b"not a header line\r\n", replies.HEADER_SYNTAX),
    Case("space-in-name", own() + b"X Note: hi\r\n", replies.HEADER_SYNTAX),
    Case("space-in-obs-name", own() + b"X Note : hi\r\n", replies.HEADER_SYNTAX),
    Case("mbox-from-line", own() + f"From {FOREIGN} Mon Jan 1\r\n".encode(), replies.HEADER_SYNTAX),
    Case("empty-name", own() + b": hi\r\n", replies.HEADER_SYNTAX),
    Case("leading-continuation", b" folded: x\r\n" + own(), replies.HEADER_SYNTAX),
    Case("eight-bit-name", own() + "X-Nöte: hi\r\n".encode(), replies.HEADER_SYNTAX),
    Case("no-colon-big-message", own() + b"no colon\r\n", replies.HEADER_SYNTAX, tail=BIG_TAIL),
    Case(
        "from-after-a-bad-line",
        own() + b"no colon here\r\n" + f"From: {FOREIGN}\r\n".encode(),
        replies.HEADER_SYNTAX,
    ),
]


def dns_resolver(dns_server: TestDNSServer) -> dns.resolver.Resolver:
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = dns_server.port
    return resolver


async def publish_key(relay: RelayHandle, dns_server: TestDNSServer, name: str) -> None:
    db = relay.server.db
    assert db is not None
    domain = await domains.get(db, name)
    assert domain is not None
    dns_server.add_txt_value(
        f"{domain.dkim_selector}._domainkey.{name}",
        dkimkeys.txt_value(domain.dkim_algorithm, domain.dkim_public_key),
    )


def verifies(signed: bytes, resolver: dns.resolver.Resolver) -> bool:
    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        answer = resolver.resolve(name.decode(), "TXT")
        return b"".join(b"".join(rd.strings) for rd in answer)

    return bool(dkim.verify(signed, dnsfunc=dnsfunc))


async def transaction(d: Dialogue, message: bytes) -> str:
    await d.expect_after(f"MAIL FROM:<{LOGIN}>", "250 2.1.0")
    await d.expect_after("RCPT TO:<someone@dest.test>", "250 2.1.5")
    await d.expect_after("DATA", "354")
    d.send_raw(message + b".\r\n")
    await d.writer.drain()
    return await d.reply()


async def stored_body(relay: RelayHandle, reply: str) -> bytes:
    assert reply.startswith("250 2.0.0 queued as "), reply
    spool = relay.server.spool
    assert spool is not None
    msg = await spool.load(reply.rsplit(" ", 1)[1])
    assert msg is not None and msg.body is not None
    return msg.body


_OBS_NAME = re.compile(rb"^[\x21-\x39\x3b-\x7e]+[ \t]+:", re.MULTILINE)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_header_variant(
    relay: RelayHandle,
    dns_server: TestDNSServer,
    caplog: pytest.LogCaptureFixture,
    case: Case,
) -> None:
    password = await relay.add_user(LOGIN)
    await publish_key(relay, dns_server, "example.com")
    resolver = dns_resolver(dns_server)
    d = await authed(relay, password)
    try:
        await check_variant(relay, d, resolver, case)
    finally:
        await d.close()
    no_errors_logged(caplog.records)


async def check_variant(
    relay: RelayHandle, d: Dialogue, resolver: dns.resolver.Resolver, case: Case
) -> None:
    reply = await transaction(d, case.message)
    if case.reply is not None:
        assert reply == str(case.reply)
        assert await queued(relay) == []
    else:
        body = await stored_body(relay, reply)
        assert body.endswith(case.stored or case.message)
        assert verifies(body, resolver)
        head = body[: body.index(b"\r\n\r\n") + 2]
        assert _OBS_NAME.search(head) is None, head  # every field written the way all read it
        parsed = email.message_from_bytes(body, policy=email.policy.compat32)
        froms = [str(v) for v in parsed.get_all("From") or []]
        assert [addr for _name, addr in email.utils.getaddresses(froms)] == [LOGIN]
        assert re.search(rb"\bd=example\.com;", body)

    # The transaction ended with that reply: the next one, on the same session, is queued.
    before = len(await queued(relay))
    clean = await transaction(d, own() + TAIL)
    assert verifies(await stored_body(relay, clean), resolver)
    assert len(await queued(relay)) == before + 1
    assert await d.reply_after("NOOP") == "250 OK"


async def test_pipelined_mail_after_a_refused_header_is_a_new_transaction(
    relay: RelayHandle,
) -> None:
    """The refusal resets the envelope at once: a MAIL pipelined right behind the DATA is
    answered 250, not 503 nested MAIL."""
    password = await relay.add_user(LOGIN)
    d = await authed(relay, password)
    try:
        await d.expect_after(f"MAIL FROM:<{LOGIN}>", "250 2.1.0")
        await d.expect_after("RCPT TO:<someone@dest.test>", "250 2.1.5")
        await d.expect_after("DATA", "354")
        d.send_raw(
            own() + b"X Note: hi\r\n" + TAIL + b".\r\n" + f"MAIL FROM:<{LOGIN}>\r\n".encode()
        )
        await d.writer.drain()
        assert await d.reply() == str(replies.HEADER_SYNTAX)
        assert await d.reply() == str(replies.SENDER_OK)
        assert await queued(relay) == []
    finally:
        await d.close()


async def test_a_key_the_signer_cannot_use_is_a_fault_that_ends_the_transaction(
    relay: RelayHandle, caplog: pytest.LogCaptureFixture
) -> None:
    """A fault in signing (here the stored key's algorithm, damaged behind the server's back) is
    a temporary failure (451 4.3.0, the client retries), and it ends the transaction like any
    other reply to DATA: the next MAIL on the session is 250, not 503 nested MAIL."""
    password = await relay.add_user(LOGIN)
    db_path: Path = relay.server.cfg.db_path

    def damage(algorithm: str) -> None:
        conn = sqlite3.connect(db_path, isolation_level=None)
        try:
            conn.execute(
                "UPDATE domains SET dkim_algorithm = ? WHERE name = ?", (algorithm, "example.com")
            )
        finally:
            conn.close()

    db = relay.server.db
    assert db is not None
    domain = await domains.get(db, "example.com")
    assert domain is not None
    await asyncio.to_thread(damage, "dsa")
    relay.server.acceptor.forget()
    d = await authed(relay, password)
    try:
        assert await transaction(d, own() + TAIL) == str(replies.TEMP_FAILURE)
        assert await queued(relay) == []
        await asyncio.to_thread(damage, domain.dkim_algorithm)
        relay.server.acceptor.forget()
        assert (await transaction(d, own() + TAIL)).startswith("250 2.0.0 queued as ")
        assert len(await queued(relay)) == 1
    finally:
        await d.close()
    assert any("could not sign" in r.getMessage() for r in caplog.records)
