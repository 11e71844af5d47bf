"""relay.grammar: the one copy of the mail grammar every stage reads addresses and headers with."""

from __future__ import annotations

import pytest

from relay import grammar


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("App@Example.COM", "example.com"),
        ("a@b@Example.com", "example.com"),  # the last "@": a queued recipient is not reparsed
        ("nobody", ""),
        ("", ""),
    ],
)
def test_domain_part_is_what_follows_the_last_at(address: str, expected: str) -> None:
    assert grammar.domain_part(address) == expected


def test_mailbox_domain_refuses_what_domain_part_takes() -> None:
    assert grammar.domain_part("a@b@example.com") == "example.com"
    assert grammar.mailbox_domain("a@b@example.com") is None
    assert grammar.mailbox_domain('"a b"@Example.com') == "example.com"


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (b"From: a\r\nTo: b\r\n\r\nbody\r\n\r\nmore", b"From: a\r\nTo: b\r\n"),
        (b"From: a\r\n", b"From: a\r\n"),  # no blank line: all of it
        (b"\r\n\r\nTo: b\r\n", b"\r\n"),  # an empty header section
        (b"", b""),
    ],
)
def test_header_block_ends_with_the_last_field(message: bytes, expected: bytes) -> None:
    assert grammar.header_block(message) == expected


@pytest.mark.parametrize(
    ("text", "ok"),
    [("a.b", True), ("a", True), ("a..b", False), (".a", False), ("a.", False), ("a b", False)],
)
def test_dot_atom(text: str, ok: bool) -> None:
    assert grammar.is_dot_atom(text) is ok


def test_simple_path_takes_only_the_bracketed_dot_atom_form() -> None:
    m = grammar.SIMPLE_PATH.match("<a.b@example.com> SIZE=10")
    assert m is not None and m.groups() == ("a.b@example.com", "SIZE=10")
    assert grammar.SIMPLE_PATH.match("<a.b@example.com>") is not None
    assert grammar.SIMPLE_PATH.match('<"a b"@example.com>') is None
    assert grammar.SIMPLE_PATH.match("<a@-example.com>") is None
