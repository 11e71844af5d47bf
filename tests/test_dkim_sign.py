"""relay.dkimsign writes the DKIM-Signature field dkimpy 1.1.8 writes, byte for byte (issue 17).

Its pieces against dkimpy's own: the folding (dkim.fold) on every kind of value a signature field
can be, the choice of fields (dkim.select_headers) on random headers, and whole signatures for
domains and selectors of every length up to past a line (where the folding cuts inside a tag),
headers with repeated, folded and oddly spaced fields, RSA and Ed25519; each verified by dkimpy.
"""

from __future__ import annotations

import random

import dkim
import pytest

from relay import dkim as relay_dkim
from relay import dkimkeys, dkimsign
from relay.dkim import Signer
from relay.store.domains import SigningKey
from tests import leaks
from tests.dkimref import dkimpy_sign, same_second

WORDS = (b"a", b"bb", b";", b"=", b":", b"h=from", b"x" * 30, b"y" * 70, b"z" * 71, b"w" * 140)


def _value(rng: random.Random) -> bytes:
    parts = [rng.choice(WORDS) for _ in range(rng.randrange(0, 30))]
    return rng.choice((b" ", b"; ", b" : ", b"")).join(parts)


NAME = len(b"DKIM-Signature")


def sound(value: bytes, folded: bytes) -> bool:
    """``folded`` is ``value`` cut into lines soundly: each cut at a space (which it replaces) or
    inside the last tag (b=, after the value's last space), no line empty or only white space, no
    CR or LF but the final CRLF (when ``value`` has it), and nothing else changed."""
    end = b"\r\n" if value.endswith(b"\r\n") else b""
    if not folded.endswith(end):
        return False
    text, lines = value[: len(value) - len(end)], folded[: len(folded) - len(end)].split(b"\r\n ")
    last_space, at = text.rfind(b" "), 0
    for i, line in enumerate(lines):
        if b"\r" in line or b"\n" in line or not line.strip(b" "):
            return False
        if text[at : at + len(line)] != line:
            return False
        at += len(line)
        if i < len(lines) - 1:
            if text[at : at + 1] == b" ":
                at += 1
            elif at <= last_space:
                return False  # cut inside a tag that is not the last
    return at == len(text)


def test_fold_is_sound_and_dkimpys_wherever_dkimpys_is_sound() -> None:
    rng = random.Random(1706)
    same = 0
    for _ in range(20_000):
        value = _value(rng) + rng.choice((b"", b"\r\n"))
        ours, theirs = dkimsign.fold(value), dkim.fold(value, namelen=NAME)
        if value.strip():
            assert sound(value, ours), (value, ours)
        lines = ours.split(b"\r\n ")
        for i, line in enumerate(lines):  # no longer than a line, unless one tag is
            limit = 58 if i == 0 else 71
            assert len(line.removesuffix(b"\r\n")) <= limit or b" " not in line[:limit], line
        if sound(value, theirs):
            assert ours == theirs, value
            same += 1
    assert same > 5_000  # a third of these random values fold soundly in dkimpy too


@pytest.mark.parametrize("length", range(50, 80))
def test_fold_around_the_first_line_limit(length: int) -> None:
    for value in (b"x" * length, b"x" * (length - 2) + b"\r\n", b"a " * (length // 2)):
        ours, theirs = dkimsign.fold(value), dkim.fold(value, namelen=NAME)
        assert sound(value, ours)
        assert ours == theirs or not sound(value, theirs)


def test_a_signature_field_is_never_cut_unsoundly() -> None:
    """dkimpy 1.1.8 cuts between CR and LF, or leaves a line of one space, when the b= tag's last
    piece is 70 or 71 columns (b= starts a line; 69 columns of its value fit there, 71 after)."""
    for count in range(100, 300):
        value = b"v=1; b=" + b"A" * count + b"\r\n"
        assert sound(value, dkimsign.fold(value)), count
        if (count - 69) % 71 in (0, 70):  # 139, 140, 210, 211, 281, 282
            assert not sound(value, dkim.fold(value, namelen=NAME))
        else:
            assert dkimsign.fold(value) == dkim.fold(value, namelen=NAME)


def test_selected_fields_are_dkimpys() -> None:
    rng = random.Random(6376)
    names = (b"from", b"to", b"subject", b"cc")
    for _ in range(5_000):
        fields = [(rng.choice(names), b"%d" % i) for i in range(rng.randrange(0, 8))]
        include = [rng.choice(names) for _ in range(rng.randrange(0, 10))]
        assert dkimsign.selected(fields, include) == dkim.select_headers(fields, include)


@pytest.fixture(scope="module")
def keys() -> dict[str, dkimkeys.KeyPair]:
    pairs = {kind: dkimkeys.generate(kind) for kind in ("rsa", "ed25519")}
    for pair in pairs.values():
        leaks.add(pair.private_pem)
    return pairs


def _check(message: bytes, key: SigningKey, pair: dkimkeys.KeyPair) -> None:
    signer = Signer()
    ours, field = same_second(lambda: signer.sign(message, key), lambda: dkimpy_sign(message, key))
    assert ours == field + message
    records = {
        relay_dkim.key_name(key.domain, key.selector): dkimkeys.txt_value(
            key.algorithm, pair.public_b64
        )
    }
    assert relay_dkim.verify(ours, records).result == "pass"


MESSAGE = b"From: a@example.com\r\nTo: b@example.net\r\nSubject: s\r\n\r\nbody\r\n"


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
@pytest.mark.parametrize("length", [1, 20, 40, 50, 55, 60, 63])
def test_selectors_of_every_length(
    kind: str, length: int, keys: dict[str, dkimkeys.KeyPair]
) -> None:
    key = SigningKey("example.com", "s" * length, kind, keys[kind].private_pem)
    _check(MESSAGE, key, keys[kind])


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
@pytest.mark.parametrize("length", [6, 30, 45, 52, 58, 63, 66])
def test_domains_of_every_length(kind: str, length: int, keys: dict[str, dkimkeys.KeyPair]) -> None:
    _check(
        MESSAGE.replace(b"example.com", _domain(length).encode()),
        _key(kind, length, keys),
        keys[kind],
    )


def _domain(length: int) -> str:
    return ".".join(["d" * 62] * 4)[: length - 4].strip(".") + ".com"


def _key(kind: str, length: int, keys: dict[str, dkimkeys.KeyPair]) -> SigningKey:
    return SigningKey(_domain(length), "relaybox", kind, keys[kind].private_pem)


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
@pytest.mark.parametrize("length", [67, 68, 69, 75, 120, 253])
def test_a_domain_too_long_for_a_line_keeps_its_tags_whole(
    kind: str, length: int, keys: dict[str, dkimkeys.KeyPair]
) -> None:
    """Where dkimpy cuts d= and i= (its signature then fails: tests/test_dkim_sign's first
    case), their lines run long and the signature verifies."""
    key = _key(kind, length, keys)
    message = MESSAGE.replace(b"example.com", key.domain.encode())
    signed = Signer().sign(message, key)
    field = signed[: len(signed) - len(message)]
    unfolded = field.replace(b"\r\n ", b" ")
    assert (
        b" d=" + key.domain.encode() + b";" in unfolded
        and b"i=@" + key.domain.encode() + b";" in field
    )
    assert sound(
        unfolded.removeprefix(b"DKIM-Signature: "), field.removeprefix(b"DKIM-Signature: ")
    )
    records = {
        relay_dkim.key_name(key.domain, key.selector): dkimkeys.txt_value(
            kind, keys[kind].public_b64
        )
    }
    assert relay_dkim.verify(signed, records).result == "pass"
    theirs = dkimpy_sign(message, key)
    if length == 68:  # dkimpy leaves a line of one space (and cuts i= before its ";")
        assert b"\r\n \r\n" in theirs and b"\r\n ;" in theirs
    if length == 75:  # dkimpy cuts inside the domain: the signature fails
        assert relay_dkim.verify(theirs + message, records).result == "fail"


HEADERS = (
    # each signed name twice or more: signed bottom up, the extra From matching none
    b"From: a@example.com\r\nTo: one@example.net\r\nTo: two@example.net\r\n"
    b"Subject: first\r\nSubject: second\r\nCc: c@example.org\r\nCc: d@example.org\r\n",
    # folds, tabs and runs of white space, white space at both ends, an empty value
    b"From:\t a@example.com \t\r\nTo: b@example.net,\r\n\tc@example.net,\r\n  d@example.net\r\n"
    b"Subject:\r\nDate:   Mon, 1 Jan 2024\t\t00:00:00 +0000  \r\n",
    # every recommended field, in mixed case, among unsigned ones
    b"Received: x\r\nFROM: a@example.com\r\nsender: s@example.com\r\nResent-From: r@example.com\r\n"
    b"Resent-Sender: q@example.com\r\nTO: b@example.net\r\nCC: c@example.net\r\nSUBJECT: s\r\n"
    b"date: d\r\nMessage-Id: <m@example.com>\r\nReply-To: p@example.com\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: text/plain\r\nContent-Transfer-Encoding: 7bit\r\nX-Other: o\r\n",
    # a long subject folded many times, and octets beyond ASCII in a value
    b"From: a@example.com\r\nSubject: " + b"word  " * 60 + b"\r\n \xc3\xa9t\xc3\xa9\r\n",
    # vertical tab and form feed at a value's ends (stripped as dkimpy strips) and inside
    b"From: \x0ba@example.com\x0c\r\nSubject: a\x0bb\r\n",
)
BODIES = (b"", b"\r\n", b"body\r\n", b"lf only\nlines\n", b"  runs \t of  space \r\n\r\n\r\n")


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
@pytest.mark.parametrize("header", HEADERS)
@pytest.mark.parametrize("body", BODIES)
def test_headers_and_bodies(
    kind: str, header: bytes, body: bytes, keys: dict[str, dkimkeys.KeyPair]
) -> None:
    key = SigningKey("example.com", "relaybox", kind, keys[kind].private_pem)
    _check(header + b"\r\n" + body, key, keys[kind])


@pytest.mark.parametrize("message", [b"\r\nTo: x\r\n\r\nbody\r\n", b"From: a@example.com\r\n"])
def test_no_header_or_no_body(message: bytes, keys: dict[str, dkimkeys.KeyPair]) -> None:
    """An empty header section (the body starts at once), and a message with no blank line."""
    key = SigningKey("example.com", "relaybox", "rsa", keys["rsa"].private_pem)
    _check(message, key, keys["rsa"])
