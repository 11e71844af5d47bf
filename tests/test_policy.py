"""relay/policy.py on its own: the header-From rule (RFC 5322 3.6, DMARC alignment).

A user of example.com may send only messages with exactly one From field, whose every address is
in example.com. Each case goes through both public functions, as the DATA handler does:
``check_header_from(domain, header_from_addresses(message))``.
"""

from __future__ import annotations

import pytest

from relay import grammar, replies
from relay.replies import Reply
from relay.smtp import policy

DOMAIN = "example.com"
OWN = "app@example.com"
FOREIGN = "boss@other.test"
MISSING = replies.HEADER_FROM_MISSING
MISMATCH = replies.HEADER_FROM_MISMATCH


def message(*fields: str, body: str = "Hello.\r\n") -> bytes:
    """A message with these header fields (plus To and Subject) and a body, CRLF throughout."""
    head = [*fields, "To: someone@dest.test", "Subject: hi"]
    return ("".join(f"{f}\r\n" for f in head) + "\r\n" + body).encode()


def decide(msg: bytes) -> Reply | None:
    return policy.check_header_from(DOMAIN, policy.header_from_addresses(msg))


# --- one From field with owned addresses: accepted ---------------------------------------------


@pytest.mark.parametrize(
    "field",
    [
        f"From: {OWN}",
        f"From: App <{OWN}>",
        f"From: <{OWN}>",
        f'From: "Doe, John" <{OWN}>',  # a comma inside a quoted display name is not a list
        "From: app@EXAMPLE.COM",
        f"FROM: {OWN}",  # field names are case-insensitive
        f"From: App\r\n <{OWN}>",  # folded
        'From: "boss@other.test"@example.com',  # a quoted local part: still example.com
        f"From: {OWN}, b@example.com",
        f"From: team: {OWN}, b@example.com;",
    ],
    ids=[
        "addr-spec",
        "name-addr",
        "angle-addr",
        "quoted-comma",
        "domain-case",
        "field-name-case",
        "folded",
        "quoted-local-part",
        "list",
        "group",
    ],
)
def test_owned_from_is_accepted(field: str) -> None:
    assert decide(message(field)) is None


# --- no From: refused --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "msg",
    [
        message(),
        message("From:"),
        message("From:   "),
        message(body=f"From: {OWN}\r\n"),  # in the body, not the header block
        message(f"Sender: {OWN}"),  # a Sender is not a From
        message(f"Resent-From: {OWN}"),
        message(f"Reply-To: {OWN}"),
    ],
    ids=["none", "empty", "blank", "in-body", "sender-only", "resent-from-only", "reply-to-only"],
)
def test_missing_from_is_refused(msg: bytes) -> None:
    assert policy.header_from_addresses(msg) is None
    assert decide(msg) == MISSING


def test_no_addresses_at_all_is_missing() -> None:
    assert policy.check_header_from(DOMAIN, None) == MISSING
    assert policy.check_header_from(DOMAIN, []) == MISSING
    assert policy.check_header_from(DOMAIN, iter(())) == MISSING


# --- several From fields: refused, whichever comes first ---------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        (f"From: {OWN}", f"From: {OWN}"),
        (f"From: {OWN}", "From: b@example.com"),
        (f"From: {OWN}", f"From: {FOREIGN}"),
        (f"From: {FOREIGN}", f"From: {OWN}"),
        (f"From: {OWN}", "Cc: c@dest.test", f"from: {FOREIGN}"),
        (f"From: {OWN}", f"From: {OWN}", f"From: {OWN}"),
    ],
    ids=["same-twice", "both-owned", "own-then-foreign", "foreign-then-own", "apart", "three"],
)
def test_several_from_fields_are_refused(fields: tuple[str, ...]) -> None:
    msg = message(*fields)
    assert policy.header_from_addresses(msg) is None
    assert decide(msg) == MISSING


# --- a From list: every address is checked -----------------------------------------------------


@pytest.mark.parametrize(
    "field",
    [
        f"From: {OWN}, {FOREIGN}",
        f"From: {FOREIGN}, {OWN}",
        f"From: {OWN}, b@example.com, {FOREIGN}",
        f"From: App <{OWN}>, Boss <{FOREIGN}>",
        f"From: {OWN},\r\n {FOREIGN}",  # folded
        f"From: {OWN}; {FOREIGN}",
    ],
    ids=["own-first", "foreign-first", "foreign-third", "name-addr", "folded", "semicolon"],
)
def test_every_address_of_a_from_list_is_checked(field: str) -> None:
    msg = message(field)
    addresses = policy.header_from_addresses(msg)
    assert addresses is not None and FOREIGN in addresses and OWN in addresses
    assert decide(msg) == MISMATCH


@pytest.mark.parametrize("position", [0, 1, 2])
def test_check_header_from_looks_at_every_address(position: int) -> None:
    addresses = [OWN, "b@example.com", "c@example.com"]
    assert policy.check_header_from(DOMAIN, addresses) is None
    addresses[position] = FOREIGN
    assert policy.check_header_from(DOMAIN, addresses) == MISMATCH
    addresses[position] = "not an address"
    assert policy.check_header_from(DOMAIN, addresses) == MISSING


# --- groups (RFC 5322 3.4; RFC 6854 allows them in From) ---------------------------------------


def test_empty_group_is_no_from() -> None:
    assert decide(message("From: undisclosed: ;")) == MISSING
    assert decide(message("From: undisclosed-recipients:;")) == MISSING


def test_group_members_are_all_checked() -> None:
    assert decide(message(f"From: team: {OWN}, {FOREIGN};")) == MISMATCH
    assert decide(message(f"From: team: {FOREIGN};")) == MISMATCH
    assert decide(message(f"From: team: {OWN}, b@example.com;")) is None


# --- RFC 2047 encoded words: the display name is not the address -------------------------------


def test_encoded_display_name_with_owned_address_is_accepted() -> None:
    assert decide(message(f"From: =?utf-8?q?J=C3=BCrgen?= <{OWN}>")) is None
    # A display name that decodes to someone else's address does not change whose address it is.
    assert decide(message(f"From: =?utf-8?q?Boss_=3Cboss=40other=2Etest=3E?= <{OWN}>")) is None


def test_encoded_display_name_does_not_make_a_foreign_address_owned() -> None:
    msg = message(f"From: =?utf-8?b?YXBwQGV4YW1wbGUuY29t?= <{FOREIGN}>")  # "app@example.com"
    assert decide(msg) == MISMATCH


def test_encoded_word_in_place_of_the_address_is_no_address() -> None:
    assert decide(message("From: =?utf-8?q?app=40example=2Ecom?=")) == MISSING


# --- tricks with comments and broken syntax -----------------------------------------------------


def test_a_comment_is_not_the_address() -> None:
    assert decide(message(f"From: {FOREIGN} ({OWN})")) == MISMATCH


def test_broken_angle_syntax_never_passes_a_foreign_address() -> None:
    """CVE-2023-27043 shapes: whatever email.utils makes of them, they are not accepted."""
    for field in (
        f"From: {FOREIGN})<{OWN}>",
        f"From: {OWN} <{FOREIGN}>",
        f"From: <{OWN}>{FOREIGN}",
        f"From: <{OWN}> <{FOREIGN}>",
        f"From: <@example.com:{FOREIGN}>",
    ):
        assert decide(message(field)) is not None, field


# --- obs-syntax: "From :" (RFC 5322 4.5.2, WSP before the colon) --------------------------------


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ((f"From : {OWN}",), None),
        ((f"From\t: {OWN}",), None),
        ((f"From \t \t: App <{OWN}>",), None),
        ((f"From : {FOREIGN}",), MISMATCH),
        ((f"From: {OWN}", f"From : {FOREIGN}"), MISSING),
        ((f"From: {OWN}", f"From\t: {FOREIGN}"), MISSING),
        ((f"From: {OWN}", f"from \t  \t: {FOREIGN}"), MISSING),
        ((f"From: {OWN}", f"fRoM  : {OWN}"), MISSING),
        ((f"From : {FOREIGN}", f"From: {OWN}"), MISSING),
        ((f"From : {OWN}", f"From\t: {OWN}"), MISSING),
    ],
    ids=[
        "alone-space",
        "alone-tab",
        "alone-several",
        "alone-foreign",
        "second-foreign",
        "second-tab",
        "second-several",
        "second-owned",
        "first-foreign",
        "both-obsolete",
    ],
)
def test_obs_syntax_from_is_a_from_field(fields: tuple[str, ...], expected: Reply | None) -> None:
    """A "From :" line is a From field (white space of any kind and length before the colon), as
    a receiver may read it: beside a regular From it makes two (refused); alone, its addresses are
    checked like those of any From (the DATA handler then queues it written "From:")."""
    msg = message(*fields)
    assert decide(msg) == expected
    assert policy.check_header(DOMAIN, msg) == expected


def test_a_from_hidden_after_a_non_header_line_still_counts() -> None:
    """The line that is not a field makes the whole header refused (a receiver might read what
    follows it as fields, or as the body)."""
    msg = message(f"From: {OWN}", "not a header line", f"From: {FOREIGN}")
    assert decide(msg) == MISSING
    assert policy.check_header(DOMAIN, msg) == replies.HEADER_SYNTAX


# --- lines that are not header fields: refused whole (554 5.6.0) ---------------------------------


@pytest.mark.parametrize(
    "line",
    [
        "not a header line",
        "X Note: hi",
        "X Note : hi",
        f"From {FOREIGN} Mon Jan  1 00:00:00 2024",
        ": no name",
        "X-N\u00f6te: eight-bit name",
    ],
    ids=["no-colon", "space-in-name", "space-in-obs-name", "mbox-from", "empty-name", "8bit-name"],
)
@pytest.mark.parametrize("where", ["first", "after-from", "last"])
def test_a_line_that_is_not_a_field_is_refused(line: str, where: str) -> None:
    fields = {
        "first": (line, f"From: {OWN}"),
        "after-from": (f"From: {OWN}", line),
        "last": (f"From: {OWN}",),
    }[where]
    head = [*fields, "To: someone@dest.test", "Subject: hi"] + ([line] if where == "last" else [])
    msg = ("".join(f"{f}\r\n" for f in head) + "\r\nHello.\r\n").encode()
    assert policy.check_header(DOMAIN, msg) == replies.HEADER_SYNTAX


def test_a_continuation_with_no_field_before_it_is_refused() -> None:
    msg = f" folded: x\r\nFrom: {OWN}\r\n\r\nHello.\r\n".encode()
    assert policy.check_header(DOMAIN, msg) == replies.HEADER_SYNTAX
    # The same line after a field continues it: fine.
    assert policy.check_header(DOMAIN, message(f"From: {OWN}", "X-A: a", " folded: x")) is None


def test_the_header_check_refuses_what_the_from_rule_refuses() -> None:
    assert policy.check_header(DOMAIN, message()) == MISSING
    assert policy.check_header(DOMAIN, message(f"From: {FOREIGN}")) == MISMATCH
    assert policy.check_header(DOMAIN, message(f"From: {OWN}", f"From: {OWN}")) == MISSING
    assert policy.check_header(DOMAIN, message(f"From: {OWN}")) is None


# --- Sender, Resent-From and Resent-Sender: held to the From rule --------------------------------

SENDER_MISMATCH = replies.HEADER_SENDER_MISMATCH
SENDER_INVALID = replies.HEADER_SENDER_INVALID


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ((f"Sender: {OWN}",), None),
        (("Sender: b@example.com",), None),
        ((f"Sender: App <{OWN}>",), None),
        ((f"Resent-From: {OWN}",), None),
        ((f"Resent-From: {OWN}", f"Resent-From: {OWN}"), None),  # two resent blocks
        ((f"Resent-From: {OWN}, b@example.com",), None),
        ((f"Resent-Sender: {OWN}",), None),
        ((f"Sender: {FOREIGN}",), SENDER_MISMATCH),
        ((f"Sender : {FOREIGN}",), SENDER_MISMATCH),
        ((f"Sender\t: {FOREIGN}",), SENDER_MISMATCH),
        ((f"SENDER: {FOREIGN}",), SENDER_MISMATCH),
        ((f"Sender: {OWN}, {FOREIGN}",), SENDER_MISMATCH),
        ((f"Sender: {FOREIGN} ({OWN})",), SENDER_MISMATCH),
        ((f"Resent-From: {FOREIGN}",), SENDER_MISMATCH),
        ((f"Resent-From : {FOREIGN}",), SENDER_MISMATCH),
        ((f"Resent-From: {OWN}", f"Resent-From: {FOREIGN}"), SENDER_MISMATCH),
        ((f"Resent-From: {OWN},\r\n {FOREIGN}",), SENDER_MISMATCH),
        ((f"Resent-Sender: {FOREIGN}",), SENDER_MISMATCH),
        ((f"Sender: {OWN}", f"Sender: {OWN}"), SENDER_INVALID),
        ((f"Sender: {OWN}", f"Sender : {OWN}"), SENDER_INVALID),
        (("Sender:",), SENDER_INVALID),
        (("Sender: nobody",), SENDER_INVALID),
        (("Resent-From: undisclosed: ;",), SENDER_INVALID),
        (("Resent-Sender: =?utf-8?q?app=40example=2Ecom?=",), SENDER_INVALID),
    ],
    ids=[
        "sender-owned",
        "sender-other-owned",
        "sender-name-addr",
        "resent-from-owned",
        "resent-from-two-blocks",
        "resent-from-list",
        "resent-sender-owned",
        "sender-foreign",
        "sender-obs-space",
        "sender-obs-tab",
        "sender-name-case",
        "sender-list-one-foreign",
        "sender-comment",
        "resent-from-foreign",
        "resent-from-obs",
        "resent-from-second-block-foreign",
        "resent-from-folded-foreign",
        "resent-sender-foreign",
        "sender-twice",
        "sender-twice-obs",
        "sender-empty",
        "sender-no-address",
        "resent-from-empty-group",
        "resent-sender-encoded-word",
    ],
)
def test_sender_and_resent_fields_are_held_to_the_from_rule(
    fields: tuple[str, ...], expected: Reply | None
) -> None:
    """Was ``test_sender_and_resent_fields_are_not_checked`` (issue 18 pinned that only From was
    checked). Issue 12: a signature d= the user's domain must not vouch for a Sender or a
    Resent- originator in another domain either (a receiver shows "Sender on behalf of From").
    Every address in them must be the user's; at most one Sender (RFC 5322 3.6); Resent-From
    and Resent-Sender may repeat (one per resent block), each checked."""
    assert policy.check_header(DOMAIN, message(f"From: {OWN}", *fields)) == expected
    assert policy.check_senders(DOMAIN, grammar.header_fields(message(*fields)) or []) == expected


@pytest.mark.parametrize("field", [f"Sender: {OWN}", f"Resent-From: {OWN}"])
def test_an_owned_sender_does_not_excuse_a_foreign_from(field: str) -> None:
    assert decide(message(f"From: {FOREIGN}", field)) == MISMATCH
    assert policy.check_header(DOMAIN, message(f"From: {FOREIGN}", field)) == MISMATCH


def test_an_owned_from_does_not_excuse_a_foreign_sender() -> None:
    msg = message(f"From: {OWN}", f"Sender: {FOREIGN}")
    assert decide(msg) is None  # the From rule alone passes it
    assert policy.check_header(DOMAIN, msg) == SENDER_MISMATCH


def test_reply_to_and_other_resent_fields_are_not_originators() -> None:
    msg = message(f"From: {OWN}", f"Reply-To: {FOREIGN}", f"Resent-To: {FOREIGN}")
    assert policy.check_header(DOMAIN, msg) is None


# --- the header block: where the From rule looks -------------------------------------------------


def test_a_from_line_in_the_body_is_not_a_from_field() -> None:
    """Only the header block counts: "From:" at the start of a body line is content."""
    body = "From: boss@other.test wrote:\r\n> hi\r\nFrom: someone else\r\n"
    assert decide(message(f"From: {OWN}", body=body)) is None


def test_a_message_of_headers_only_is_read_whole() -> None:
    """No blank line (no body): the whole message is the header block."""
    assert decide(f"From: {OWN}\r\nSubject: no body\r\n".encode()) is None
    assert decide(f"Subject: no body\r\nFrom: {FOREIGN}\r\n".encode()) == MISMATCH


# --- MAIL FROM and RCPT TO -----------------------------------------------------------------------


@pytest.mark.parametrize("sender", ["app@example.com", "App@EXAMPLE.COM", "x.y+tag@Example.Com"])
def test_a_sender_in_the_users_domain_may_send(sender: str) -> None:
    assert policy.check_sender("Example.com", sender, "verified") is None
    assert policy.check_sender(DOMAIN, sender, "failing") is None  # within its grace period


@pytest.mark.parametrize(
    "sender",
    [
        "app@aaa.test",  # sorts before example.com
        "app@zzz.test",  # sorts after it
        "app@mail.example.com",  # a subdomain is another domain
        "app@example.com.evil.test",
        "app@xample.com",
    ],
)
def test_a_sender_outside_the_users_domain_is_refused(sender: str) -> None:
    assert policy.check_sender(DOMAIN, sender, "verified") == replies.SENDER_NOT_OWNED


@pytest.mark.parametrize("state", [None, "pending", "suspended"])
def test_a_domain_that_may_not_send_is_refused(state: str | None) -> None:
    assert policy.check_sender(DOMAIN, OWN, state) == replies.SENDER_DOMAIN_UNVERIFIED


@pytest.mark.parametrize("sender", ["", "<>"])
def test_the_null_sender_is_refused(sender: str) -> None:
    assert policy.check_sender(DOMAIN, sender, "verified") == replies.NULL_SENDER_REFUSED


def test_a_sender_that_is_no_mailbox_is_refused() -> None:
    assert policy.check_sender(DOMAIN, "not an address", "verified") == replies.BAD_SENDER_SYNTAX


def test_recipients_up_to_the_limit_and_not_one_more() -> None:
    rcpt = "someone@dest.test"
    assert policy.check_recipient(rcpt, 0, 3) is None
    assert policy.check_recipient(rcpt, 2, 3) is None
    assert policy.check_recipient(rcpt, 3, 3) == replies.TOO_MANY_RECIPIENTS
    # Past the limit too (the limit can be lowered by a reload while a session runs).
    assert policy.check_recipient(rcpt, 7, 3) == replies.TOO_MANY_RECIPIENTS
    assert policy.check_recipient(rcpt, 300, 3) == replies.TOO_MANY_RECIPIENTS
    assert policy.check_recipient("no-at-sign", 0, 3) == replies.BAD_RCPT_SYNTAX


def test_mailbox_length_limits() -> None:
    """RFC 5321 4.5.3.1: local part at most 64 octets, a path at most 254 (256 with <>)."""
    assert grammar.split_address("a" * 64 + "@example.com") == ("a" * 64, "example.com")
    assert grammar.split_address("a" * 65 + "@example.com") is None
    domain = ".".join(["d" * 60] * 3) + ".example.com"  # 195 octets
    at_limit = "l" * (254 - 1 - len(domain)) + "@" + domain
    assert len(at_limit) == 254 and grammar.split_address(at_limit) is not None
    assert grammar.split_address("l" + at_limit) is None  # 255
    assert grammar.mailbox_domain("App@Example.COM") == "example.com"
    assert grammar.mailbox_domain("nobody") is None


def test_a_foreign_from_is_refused_whichever_way_it_sorts() -> None:
    for foreign in ("boss@aaa.test", "boss@zzz.test", "boss@sub.example.com"):
        assert decide(message(f"From: {foreign}")) == MISMATCH, foreign


def test_a_from_field_last_in_the_header_block_is_read_whole() -> None:
    msg = f"To: someone@dest.test\r\nSubject: hi\r\nFrom: {OWN}\r\n\r\nHello.\r\n".encode()
    assert decide(msg) is None


# --- line endings (the DATA reader refuses these first; this is the second line of defence) -----


@pytest.mark.parametrize(
    ("msg", "refusal"),
    [
        (b"Subject: x\r\n\r\nbare LF\nhere\r\n", replies.BARE_LINE_ENDING),
        (b"Subject: x\r\n\r\nbare CR\rhere\r\n", replies.BARE_LINE_ENDING),
        (b"Subject: x\r\n\r\nCR CR LF\r\r\n", replies.BARE_LINE_ENDING),
        (b"Subject: x\r\n\r\nLF CR\n\r", replies.BARE_LINE_ENDING),
        (b"Subject: x\r\n\r\nNUL\0\r\n", replies.NUL_IN_MESSAGE),
    ],
)
def test_bare_line_endings_and_nul_are_refused(msg: bytes, refusal: Reply) -> None:
    assert policy.check_line_endings(msg) == refusal


def test_crlf_only_messages_pass_however_long() -> None:
    assert policy.check_line_endings(b"Subject: x\r\n\r\nshort\r\n") is None
    # Several hundred lines: counts beyond the small integers Python caches.
    assert policy.check_line_endings(b"Subject: x\r\n\r\n" + b"line\r\n" * 600) is None
