"""A body hashed in pieces as it arrives, and signed apart from it (issue 17: big messages).

relay.dkimbody.BodyHash must give the hash dkimpy computes for the whole body at once (its own
relaxed canonicalisation, its helpers put back), however the body is cut: every cut of short
awkward bodies, and random cuts of long random ones. And relay.dkim.Signer.sign with
``body_hash`` (the header section only) must give byte for byte the signature dkimpy makes of
the whole message, which dkimpy's verifier accepts.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import random

import dkim
import dkim.canonicalization
import pytest

from relay import dkim as relay_dkim
from relay import dkimkeys
from relay.dkim import CANON_ORIGINALS, Signer
from relay.dkimbody import BodyHash
from relay.store.domains import SigningKey
from tests import leaks
from tests.dkimref import dkimpy_sign, same_second

BODIES = (
    b"",
    b"\r\n",
    b"\r\n\r\n\r\n",
    b"x\r\n",
    b"x",
    b" \r\n",
    b" ",
    b"a  b\t\tc \t\r\n\r\n \r\n\t\r\n",
    b"\r\n\r\na\r\n\r\n\r\nb \r\n\r\n",
    b"line  with   runs \t\r\n\tindented\r\n\r\nlast  ",
    b"  \t \r\n  lead\r\n\r\n\r\n\r\nend\r\n \t\r\n",
)
ALPHABET = (b" ", b"\t", b"\r\n", b"a", b"\r\n\r\n")


def dkimpy_body_hash(body: bytes, monkeypatch: pytest.MonkeyPatch) -> bytes:
    """What dkimpy hashes for a whole relaxed body, with its own helpers."""
    with monkeypatch.context() as m:
        for name, original in CANON_ORIGINALS.items():
            m.setattr(dkim.canonicalization, name, original)
        canon = dkim.canonicalization.Relaxed.canonicalize_body(body)
    return hashlib.sha256(canon).digest()


def streamed(body: bytes, cuts: list[int]) -> bytes:
    h = BodyHash()
    last = 0
    for cut in sorted(cuts):
        h.update(body[last:cut])
        last = cut
    h.update(body[last:])
    return h.digest()


@pytest.mark.parametrize("body", BODIES)
def test_every_cut_of_awkward_bodies_hashes_as_dkimpy(
    body: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    want = dkimpy_body_hash(body, monkeypatch)
    positions = range(len(body) + 1)
    for n in range(min(3, len(body) + 1) + 1):
        for cuts in itertools.combinations(positions, n):
            assert streamed(body, list(cuts)) == want, (body, cuts)


def test_every_short_mix_hashes_as_dkimpy(monkeypatch: pytest.MonkeyPatch) -> None:
    for length in range(6):
        for parts in itertools.product(ALPHABET, repeat=length):
            body = b"".join(parts)
            want = dkimpy_body_hash(body, monkeypatch)
            assert streamed(body, []) == want, body
            assert streamed(body, list(range(len(body)))) == want, body  # octet by octet


def test_long_random_bodies_cut_at_random_hash_as_dkimpy(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(17)
    pieces = (b" ", b"\t", b"\r\n", b"word", b"x" * 300, b"\r\n\r\n\r\n", b"  \t ")
    for _ in range(200):
        body = b"".join(rng.choice(pieces) for _ in range(rng.randrange(1, 400)))
        cuts = [rng.randrange(len(body) + 1) for _ in range(rng.randrange(0, 20))]
        assert streamed(body, cuts) == dkimpy_body_hash(body, monkeypatch)


def test_a_final_hash_takes_no_more() -> None:
    h = BodyHash()
    h.update(b"a\r\n")
    assert h.b64() == base64.b64encode(h.digest())
    with pytest.raises(RuntimeError):
        h.update(b"b\r\n")


@pytest.fixture(scope="module", params=["rsa", "ed25519"])
def pair(request: pytest.FixtureRequest) -> tuple[str, dkimkeys.KeyPair]:
    return request.param, dkimkeys.generate(request.param)


HEADS = (
    b"From: a@example.com\r\nTo: b@example.net\r\nSubject: plain\r\n\r\n",
    b"From:  Alice \t <a@example.com>  \r\nTo: b@example.net,\r\n\tc@example.net\r\n"
    b"Subject: a\r\n  folded\t\tsubject \r\n\r\n",
)


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("body", BODIES[:8] + (b"big  line \t\r\n" * 50_000,))
def test_a_head_signed_with_its_body_hash_is_dkimpys_whole_signature(
    head: bytes, body: bytes, pair: tuple[str, dkimkeys.KeyPair]
) -> None:
    kind, keys = pair
    leaks.add(keys.private_pem)
    key = SigningKey("example.com", "relaybox", kind, keys.private_pem)
    signer = Signer()

    def apart() -> bytes:
        h = BodyHash()
        for i in range(0, len(body), 4099):
            h.update(body[i : i + 4099])
        return signer.sign(head, key, body_hash=h)

    ours, field = same_second(apart, lambda: dkimpy_sign(head + body, key))
    assert ours == field + head
    whole, field = same_second(
        lambda: signer.sign(head + body, key), lambda: dkimpy_sign(head + body, key)
    )
    assert whole == field + head + body  # and the whole message, signed at once
    records = {
        relay_dkim.key_name("example.com", "relaybox"): dkimkeys.txt_value(kind, keys.public_b64)
    }
    assert relay_dkim.verify(ours + body, records).result == "pass"
    assert relay_dkim.verify(ours + body + b"x\r\n", records).result == "fail"
