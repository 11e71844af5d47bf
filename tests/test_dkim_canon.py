"""relay/dkim.py's relaxed-canonicalisation helpers against dkimpy's own (issue 17).

relay.dkim replaces dkimpy's three module-level helpers (trailing white space, white-space runs,
unfolding) with the same substitutions, compiled once and skipped where they cannot match. Shown
here: they give dkimpy's result on every mix of up to 7 of the characters that matter and on long
random ones, and relaybox's signatures of awkward messages (relay.dkimsign, which runs the same
helpers) are byte for byte what plain dkimpy makes with its own helpers put back.
"""

from __future__ import annotations

import itertools
import random

import dkim
import dkim.canonicalization
import pytest

from relay import dkim as relay_dkim
from relay import dkimkeys
from relay.dkim import CANON_ORIGINALS, Signer
from relay.store.domains import SigningKey
from tests import leaks
from tests.dkimref import dkimpy_sign, same_second

ALPHABET = (b" ", b"\t", b"\r", b"\n", b"a", b":")
NAMES = ("strip_trailing_whitespace", "compress_whitespace", "unfold_header_value")

MESSAGES = (
    b"From: a@example.com\r\nTo: b@example.net\r\nSubject: plain\r\n\r\nbody\r\n",
    # folded fields, tabs and runs of spaces in values, trailing white space on lines
    b"From:  Alice \t <a@example.com>  \r\nTo: b@example.net,\r\n\tc@example.net\r\n"
    b"Subject: a\r\n  folded\t\tsubject \r\n\r\nline  with   runs \t\r\n\tindented\r\n",
    # trailing empty lines, white-space-only lines, no final CRLF
    b"From: a@example.com\r\nSubject: t\r\n\r\nx\r\n \r\n\t\r\n\r\n\r\n",
    b"From: a@example.com\r\nSubject: t\r\n\r\nno final line break",
    # an empty body, and a body of one empty line
    b"From: a@example.com\r\nSubject: empty\r\n\r\n",
    b"From: a@example.com\r\nSubject: empty\r\n\r\n\r\n",
    # (a bare CR or LF never reaches the signer: DATA refuses or normalises it)
    # white space at the ends of values, a field folded over several lines, a body of spaces
    b"From:\ta@example.com\t\r\nSubject:   \r\n to\r\n\tand  fro  \r\n\r\n   \r\n \t \r\n",
    b"From: a@example.com\r\nSubject: " + b"word " * 40 + b"\r\n\r\n" + b"x " * 600 + b"\r\n",
)


@pytest.fixture(scope="module")
def pair() -> dkimkeys.KeyPair:
    return dkimkeys.generate("rsa")


@pytest.fixture
def key(pair: dkimkeys.KeyPair) -> SigningKey:
    leaks.add(pair.private_pem)
    return SigningKey("example.com", "relaybox", "rsa", pair.private_pem)


def test_dkimpy_runs_relaybox_helpers() -> None:
    for name in NAMES:
        assert getattr(dkim.canonicalization, name) is not CANON_ORIGINALS[name]
    assert dkim.canonicalization.compress_whitespace is relay_dkim._compress_whitespace


@pytest.mark.parametrize("name", NAMES)
def test_each_helper_gives_dkimpys_result_on_every_short_mix(name: str) -> None:
    fast, original = getattr(dkim.canonicalization, name), CANON_ORIGINALS[name]
    cases = 0
    for length in range(8):
        for parts in itertools.product(ALPHABET, repeat=length):
            text = b"".join(parts)
            assert fast(text) == original(text), text
            cases += 1
    assert cases == sum(len(ALPHABET) ** n for n in range(8))


@pytest.mark.parametrize("name", NAMES)
def test_each_helper_gives_dkimpys_result_on_long_random_text(name: str) -> None:
    fast, original = getattr(dkim.canonicalization, name), CANON_ORIGINALS[name]
    rng = random.Random(17)
    for _ in range(3000):
        text = b"".join(rng.choice(ALPHABET + (b"xyz", b"\r\n")) for _ in range(rng.randrange(200)))
        assert fast(text) == original(text), text


@pytest.mark.parametrize("message", MESSAGES)
def test_signatures_are_byte_identical_to_dkimpy_with_its_own_helpers(
    message: bytes, key: SigningKey, pair: dkimkeys.KeyPair
) -> None:
    signer = Signer()
    ours, field = same_second(lambda: signer.sign(message, key), lambda: dkimpy_sign(message, key))
    assert ours == field + message
    txt = dkimkeys.txt_value("rsa", pair.public_b64).encode()
    assert dkim.verify(ours, dnsfunc=lambda *_a, **_k: txt) is True
