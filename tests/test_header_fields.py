"""relay.grammar's header-field parser: the one reading of a header section that the policy, the
signer and the bounce builder share (issue 12, items 5 and 6).

A field name followed by white space and a colon is that field (RFC 5322 4.5.2 obs-syntax); a
line that is not part of a field makes the whole section unreadable (None), because receivers
read such a line in different ways. Property tests check that, once the names are written the
modern way, dkimpy's parser and Python's read exactly the fields this one reads.
"""

from __future__ import annotations

import email
import email.policy

import dkim
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay import grammar
from relay.grammar import HeaderField


def _f(name: str, value: bytes, obsolete: bool = False) -> HeaderField:
    return HeaderField(name, value, obsolete)


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (b"From: a\r\nTo: b\r\n\r\nX: body\r\n", [_f("From", b" a"), _f("To", b" b")]),
        (b"From : a\r\n\r\n", [_f("From", b" a", True)]),
        (b"From\t: a\r\n\r\n", [_f("From", b" a", True)]),
        (b"fROM \t \t: a\r\n\r\n", [_f("fROM", b" a", True)]),
        (b"X-Note:hi\r\n\r\n", [_f("X-Note", b"hi")]),
        (b"Subject:\r\n\r\n", [_f("Subject", b"")]),
        (
            b"A: one\r\n two\r\n\tthree\r\nB: b\r\n\r\n",
            [_f("A", b" one\r\n two\r\n\tthree"), _f("B", b" b")],
        ),
        (b"A: b\r\n \r\n\r\n", [_f("A", b" b\r\n ")]),  # a continuation of white space only
        (b"A: b", [_f("A", b" b")]),  # no final CRLF, no body
        (b"A: b\r\n", [_f("A", b" b")]),
        (b"A:: b\r\n", [_f("A", b": b")]),
        ("S: J\u00fcrgen\r\n".encode(), [_f("S", " J\u00fcrgen".encode())]),  # RFC 6532 values
        (b"", []),
        (b"\r\nTo: b\r\n\r\nbody\r\n", []),  # an empty header section: the rest is body
    ],
)
def test_fields_are_read_in_order(message: bytes, expected: list[HeaderField]) -> None:
    assert grammar.header_fields(message) == expected


@pytest.mark.parametrize(
    "message",
    [
        b"no colon\r\n\r\n",
        b"From: a\r\nno colon\r\n\r\n",
        b"X Note: hi\r\n\r\n",
        b"X Note : hi\r\n\r\n",
        b"From a@b.test Mon Jan  1 00:00:00 2024\r\nFrom: a\r\n\r\n",  # an mbox "From " line
        b": no name\r\n\r\n",
        b" folded: first\r\nFrom: a\r\n\r\n",  # a continuation with nothing to continue
        b"\tfolded\r\n\r\n",
        "X-N\u00f6te: a\r\n\r\n".encode(),
        b"X\x7f: a\r\n\r\n",
        b"A: b\rc\r\n\r\n",  # bare CR (the DATA reader refuses these first)
        b"A: b\nc: d\r\n\r\n",  # bare LF
        b"A: b\r\nC: d\r\n\x00: e\r\n\r\n",
        b"From: a\r\nTo b",  # a last line with no colon and no CRLF
    ],
)
def test_a_line_that_is_not_part_of_a_field_makes_the_section_unreadable(message: bytes) -> None:
    assert grammar.header_fields(message) is None
    assert grammar.header_fields(message, ("from",)) is None  # whatever the names asked


def test_only_the_fields_asked_for_are_returned_in_order_any_case() -> None:
    message = b"From: a\r\nTo: b\r\nSENDER : c\r\nSubject: s\r\nsender: d\r\n\r\nSender: body\r\n"
    assert grammar.header_fields(message, ("Sender", "from")) == [
        _f("From", b" a"),
        _f("SENDER", b" c", True),
        _f("sender", b" d"),
    ]
    assert grammar.header_fields(message, ("resent-from",)) == []
    # A name that only begins like one asked for is another field.
    assert grammar.header_fields(b"From-X: a\r\nFromage : b\r\n\r\n", ("from",)) == []


def test_a_field_knows_its_key_and_its_unfolded_text() -> None:
    (field,) = grammar.header_fields(b"FROM : App\r\n <a@b.test>\r\n\r\n") or []
    assert field.key == "from" and field.obsolete
    assert field.text() == " App <a@b.test>"
    (odd,) = grammar.header_fields(b"X: \xff\xfe\r\n\r\n") or []
    assert odd.text() == " \ufffd\ufffd"


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            b"From : a\r\nX-Note\t: hi\r\n there : x\r\n\r\nX : body\r\n",
            b"From: a\r\nX-Note: hi\r\n there : x\r\n\r\nX : body\r\n",
        ),
        (b"A \t : b\r\nB: c\r\n", b"A: b\r\nB: c\r\n"),
        (b"A: b : c\r\n\r\n", b"A: b : c\r\n\r\n"),  # white space in the value is the value's
        (b"\r\nX : body\r\n", b"\r\nX : body\r\n"),  # no header: nothing to rewrite
    ],
)
def test_modern_field_names_rewrite_only_names(message: bytes, expected: bytes) -> None:
    assert grammar.modern_field_names(message) == expected


@pytest.mark.parametrize(
    "message",
    [
        b"From : a\r\nTo: b\r\n\r\nbody\r\n",
        b"From: a\r\nX-Note\t: hi\r\n\r\nbody\r\n",
        b"From: a\r\nX: b\r\n there : x\r\n\r\nY : body\r\n",  # a fold, then the body
        b"A: b : c\r\n\r\n",
        b"\r\nX : body\r\n",
        b"From: a\r\nTo: b",  # no blank line: all of it is the header section
        b"From: a\r\nSubject \t:\r\n",
    ],
)
def test_obsolete_names_are_found_where_modern_field_names_would_rewrite(message: bytes) -> None:
    rewrites = grammar.modern_field_names(message) != message
    assert grammar.has_obsolete_field_names(message) is rewrites


def test_modern_field_names_returns_the_message_itself_when_nothing_changes() -> None:
    message = b"From: a\r\nTo: b\r\n\r\nX : body\r\n"
    assert grammar.modern_field_names(message) is message


# --- every reader reads the same fields ----------------------------------------------------------

_NAMES = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=":"),
    min_size=1,
    max_size=12,
)
_WSP = st.text(st.sampled_from(" \t"), max_size=3)
_VALUE = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E) | st.sampled_from("\t"), max_size=20
)


@st.composite
def _fields(draw: st.DrawFn) -> tuple[str, str, list[str]]:
    """name, white space before the colon, value lines (the first, then continuations)."""
    name = draw(_NAMES)
    first = draw(_VALUE)
    folds = draw(st.lists(st.tuples(st.sampled_from(" \t"), _VALUE), max_size=2))
    return name, draw(_WSP), [first] + [w + v for w, v in folds]


@settings(max_examples=300, deadline=None)
@given(st.lists(_fields(), max_size=8), st.binary(max_size=30))
def test_after_modern_names_dkimpy_and_python_read_these_fields(
    fields: list[tuple[str, str, list[str]]], body: bytes
) -> None:
    head = "".join(f"{n}{w}:" + "\r\n".join(lines) + "\r\n" for n, w, lines in fields)
    message = head.encode() + b"\r\n" + body.replace(b"\r", b"").replace(b"\n", b"")
    parsed = grammar.header_fields(message)
    assert parsed is not None
    assert [(f.name, f.obsolete) for f in parsed] == [(n, bool(w)) for n, w, _ in fields]
    modern = grammar.modern_field_names(message)
    assert grammar.header_fields(modern) == [HeaderField(f.name, f.value, False) for f in parsed]
    # dkimpy (the signer and the verifier) reads the same names and values.
    dkim_headers, _body = dkim.rfc822_parse(modern)
    assert [(bytes(n).decode(), bytes(v)) for n, v in dkim_headers] == [
        (f.name, f.value + b"\r\n") for f in parsed
    ]
    # Python's parser (what many receivers' tools are built on) reads the same names.
    msg = email.message_from_bytes(modern, policy=email.policy.compat32)
    assert [k for k in msg.keys()] == [f.name for f in parsed]
    assert not msg.defects


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.binary(max_size=16).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")), max_size=6
    )
)
def test_any_lines_are_fields_dkimpy_reads_alike_or_unreadable(lines: list[bytes]) -> None:
    """Arbitrary lines: either the section is unreadable (refused), or, names made modern,
    dkimpy reads exactly our fields, never skipping one or raising."""
    message = b"".join(line + b"\r\n" for line in lines) + b"\r\nbody\r\n"
    parsed = grammar.header_fields(message)
    if parsed is None:
        return
    dkim_headers, _body = dkim.rfc822_parse(grammar.modern_field_names(message))
    assert [(bytes(n), bytes(v)) for n, v in dkim_headers] == [
        (f.name.encode(), f.value + b"\r\n") for f in parsed
    ]
