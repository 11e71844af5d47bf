"""DKIM signing: byte-identical to plain dkimpy, verified by dkim.verify against published keys."""

from __future__ import annotations

import asyncio
import base64
import re
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import dkim
import dns.resolver
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from relay import dkimkeys, grammar
from relay.clock import ManualClock
from relay.config import Config
from relay.dkim import INLINE_LIMIT, HeaderError, Signer, SigningError, headers_to_sign
from relay.store import domains
from relay.store.db import Database
from relay.store.domains import SigningKey
from tests import leaks
from tests.dialogue import Dialogue
from tests.dkimref import dkimpy_sign, same_second
from tests.dnsserver import TestDNSServer
from tests.procs import spawn
from tests.relayserver import RelayHandle

MESSAGE = (
    b"Received: from client by relay; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@example.net\r\n"
    b"Cc: carol@example.org\r\n"
    b"Subject: Quarterly report\r\n"
    b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"Message-ID: <1234@example.com>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"X-Mailer: test\r\n"
    b"\r\n"
    b"Hello  Bob,\r\n\r\nthe numbers are in.   \r\n"
)


@pytest.fixture(scope="module")
def keypair() -> dkimkeys.KeyPair:
    return dkimkeys.generate("rsa")


@pytest.fixture
def key(keypair: dkimkeys.KeyPair) -> SigningKey:
    leaks.add(keypair.private_pem)
    return SigningKey("example.com", "relaybox", "rsa", keypair.private_pem)


def _txt(keypair: dkimkeys.KeyPair) -> bytes:
    return dkimkeys.txt_value("rsa", keypair.public_b64).encode()


def _t(signed: bytes) -> bytes:
    m = re.search(rb"\bt=(\d+)", signed)
    assert m is not None
    return m.group(1)


def test_signature_is_byte_identical_to_plain_dkimpy(key: SigningKey) -> None:
    signer = Signer()
    ours, field = same_second(lambda: signer.sign(MESSAGE, key), lambda: dkimpy_sign(MESSAGE, key))
    assert ours == field + MESSAGE
    assert ours.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;")


def test_an_ed25519_signature_is_byte_identical_to_dkimpys() -> None:
    kp = dkimkeys.generate("ed25519")
    leaks.add(kp.private_pem)
    key = SigningKey("example.com", "ed", "ed25519", kp.private_pem)
    signer = Signer()
    ours, field = same_second(lambda: signer.sign(MESSAGE, key), lambda: dkimpy_sign(MESSAGE, key))
    assert ours == field + MESSAGE
    assert ours.startswith(b"DKIM-Signature: v=1; a=ed25519-sha256;")


def test_signature_verifies_and_breaks_on_tampering(
    key: SigningKey, keypair: dkimkeys.KeyPair
) -> None:
    signed = Signer().sign(MESSAGE, key)
    lookups: list[bytes] = []

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        lookups.append(name)
        return _txt(keypair)

    assert dkim.verify(signed, dnsfunc=dnsfunc)
    assert lookups == [b"relaybox._domainkey.example.com."]
    assert not dkim.verify(signed.replace(b"Quarterly", b"Annual"), dnsfunc=dnsfunc)
    assert not dkim.verify(signed.replace(b"the numbers", b"no numbers"), dnsfunc=dnsfunc)
    # relaxed/relaxed: whitespace changes in transit do not break it (RFC 6376 3.4.2, 3.4.4)
    assert dkim.verify(signed.replace(b"Hello  Bob", b"Hello Bob"), dnsfunc=dnsfunc)


def test_verifies_against_the_key_published_in_dns(
    key: SigningKey, keypair: dkimkeys.KeyPair, dns_server: TestDNSServer
) -> None:
    dns_server.add_txt_value(
        "relaybox._domainkey.example.com", dkimkeys.txt_value("rsa", keypair.public_b64)
    )
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = dns_server.port

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        answer = resolver.resolve(name.decode(), "TXT")
        return b"".join(b"".join(rd.strings) for rd in answer)

    assert dkim.verify(Signer().sign(MESSAGE, key), dnsfunc=dnsfunc)


def test_signs_the_recommended_headers_present(key: SigningKey) -> None:
    signed = Signer().sign(MESSAGE, key)
    m = re.search(rb"h=([^;]+);", signed)
    assert m is not None
    names = [h.strip() for h in m.group(1).replace(b"\r\n", b"").split(b":")]
    assert names == [
        b"from",
        b"to",
        b"cc",
        b"subject",
        b"date",
        b"message-id",
        b"mime-version",
        b"content-type",
        b"from",  # signed once more than present: a second From breaks the signature
    ]
    assert b"c=relaxed/relaxed" in signed and b"d=example.com" in signed


async def test_large_messages_sign_off_the_loop_with_the_same_result(
    key: SigningKey, keypair: dkimkeys.KeyPair
) -> None:
    big = MESSAGE + (b"x" * 998 + b"\r\n") * (INLINE_LIMIT // 1000 + 10)
    signer = Signer()
    for _ in range(5):
        threaded = await signer.sign_async(big, key)
        inline = signer.sign(big, key)
        if _t(threaded) == _t(inline):
            break
    assert threaded == inline
    assert dkim.verify(threaded, dnsfunc=lambda name, timeout=5: _txt(keypair))


def test_ed25519_signs_and_verifies(monkeypatch: pytest.MonkeyPatch) -> None:
    """RFC 8463 without PyNaCl: the signature verifies against the published raw public key."""
    kp = dkimkeys.generate("ed25519")
    leaks.add(kp.private_pem)
    signed = Signer().sign(MESSAGE, SigningKey("example.com", "ed", "ed25519", kp.private_pem))
    assert b"a=ed25519-sha256" in signed and b"c=relaxed/relaxed" in signed

    class VerifyKey:  # PyNaCl's interface, as dkimpy uses it, over `cryptography`
        def __init__(self, p: bytes, encoder: object = None) -> None:
            self.key = Ed25519PublicKey.from_public_bytes(base64.b64decode(p))

        def verify(self, digest: bytes, signature: bytes) -> None:
            self.key.verify(signature, digest)

    monkeypatch.setattr(dkim.nacl.signing, "VerifyKey", VerifyKey)
    txt = dkimkeys.txt_value("ed25519", kp.public_b64).encode()
    assert dkim.verify(signed, dnsfunc=lambda name, timeout=5: txt)
    assert not dkim.verify(
        signed.replace(b"Quarterly", b"Annual"), dnsfunc=lambda n, timeout=5: txt
    )


def test_plain_dkimpy_ed25519_behaves_as_without_pynacl() -> None:
    """The stand-in acts on our preloaded keys only: dkimpy's own error path is unchanged."""
    with pytest.raises(dkim.NaClNotFoundError):
        dkim.sign(MESSAGE, b"s", b"example.com", b"c2VlZA==", signature_algorithm=b"ed25519-sha256")


def test_unusable_keys_raise_signing_error(key: SigningKey) -> None:
    ed = dkimkeys.generate("ed25519")
    leaks.add(ed.private_pem)
    with pytest.raises(SigningError):  # key and algorithm disagree
        Signer().sign(MESSAGE, SigningKey("example.com", "s", "rsa", ed.private_pem))
    with pytest.raises(SigningError):
        Signer().sign(MESSAGE, SigningKey("example.com", "s", "rsa", "not a key"))
    with pytest.raises(SigningError):
        Signer().sign(MESSAGE, SigningKey("example.com", "s", "dsa", key.private_pem))


# --- the key cache across a domain's removal and re-creation ------------------------------------


def _dnsfunc(public_b64: str) -> Callable[..., bytes]:
    txt = dkimkeys.txt_value("rsa", public_b64).encode()
    return lambda name, timeout=5: txt


async def test_a_readded_domain_signs_with_its_new_key(
    db: Database, cfg: Config, clock: ManualClock
) -> None:
    """Same domain, same selector, new key: one Signer (as the server holds) must sign with the
    new key, not a cached parse of the old one."""
    signer = Signer()
    old = await domains.add(db, "example.com", cfg=cfg, now=clock(), actor="t")
    old_key = await domains.signing_key(db, "example.com")
    assert old_key is not None
    leaks.add(old_key.private_pem)
    first = signer.sign(MESSAGE, old_key)
    assert dkim.verify(first, dnsfunc=_dnsfunc(old.dkim_public_key))

    await domains.remove(db, "example.com", with_users=False, now=clock(), actor="t")
    new = await domains.add(db, "example.com", cfg=cfg, now=clock(), actor="t")
    new_key = await domains.signing_key(db, "example.com")
    assert new_key is not None
    leaks.add(new_key.private_pem)
    assert (new_key.domain, new_key.selector) == (old_key.domain, old_key.selector)
    assert new.dkim_public_key != old.dkim_public_key

    second = signer.sign(MESSAGE, new_key)
    assert dkim.verify(second, dnsfunc=_dnsfunc(new.dkim_public_key))
    assert not dkim.verify(second, dnsfunc=_dnsfunc(old.dkim_public_key))


async def test_the_relay_signs_with_the_key_of_the_readded_domain(
    relay: RelayHandle, clock: ManualClock
) -> None:
    """Through the server: submit, remove the domain (and its user), add both again, submit
    again; the queued message verifies against the new public key only."""
    db = relay.server.db
    spool = relay.server.spool
    assert db is not None and spool is not None

    async def submit_and_load() -> tuple[bytes, str]:
        password = await relay.add_user("app@example.com")
        d = await Dialogue.open(relay.tls_port, tls=relay.client_context())
        await d.login("app@example.com", password)
        await d.expect_after("MAIL FROM:<app@example.com>", "250")
        await d.expect_after("RCPT TO:<bob@example.net>", "250")
        await d.expect_after("DATA", "354")
        reply = await d.expect_after(MESSAGE.replace(b"alice@", b"app@") + b".\r\n", "250")
        await d.close()
        msg = await spool.load(reply.rsplit(" ", 1)[-1])
        assert msg is not None and msg.body is not None
        domain = await domains.get(db, "example.com")
        key = await domains.signing_key(db, "example.com")
        assert domain is not None and key is not None
        leaks.add(key.private_pem)
        return msg.body, domain.dkim_public_key

    first, old_public = await submit_and_load()
    assert dkim.verify(first, dnsfunc=_dnsfunc(old_public))
    await domains.remove(db, "example.com", with_users=True, now=clock(), actor="t")
    second, new_public = await submit_and_load()
    assert new_public != old_public
    assert dkim.verify(second, dnsfunc=_dnsfunc(new_public))
    assert not dkim.verify(second, dnsfunc=_dnsfunc(old_public))


# --- which header fields are signed: the header block only ---------------------------------------


def _h_tag(signed: bytes) -> list[bytes]:
    m = re.search(rb"\bh=([^;]+);", signed)
    assert m is not None
    return [h.strip() for h in re.sub(rb"\s+", b"", m.group(1)).split(b":")]


def _verifies(signed: bytes, keypair: dkimkeys.KeyPair) -> bool:
    return bool(dkim.verify(signed, dnsfunc=lambda name, timeout=5: _txt(keypair)))


def test_header_like_lines_in_the_body_are_not_signed(
    key: SigningKey, keypair: dkimkeys.KeyPair
) -> None:
    message = (
        b"From: Alice <alice@example.com>\r\n"
        b"Subject: s\r\n"
        b"\r\n"
        b"To: not-a-header@example.net\r\n"
        b"Cc: nor-this@example.net\r\n"
        b"Subject: quoted\r\n"
    )
    assert headers_to_sign(message) == [b"from", b"subject", b"from"]
    signed = Signer().sign(message, key)
    assert _h_tag(signed) == [b"from", b"subject", b"from"]
    assert _verifies(signed, keypair)


def test_header_like_lines_after_an_empty_header_block_are_not_signed() -> None:
    assert headers_to_sign(b"\r\n\r\nTo: bob@example.net\r\nSubject: s\r\n") == [b"from"]


def test_a_message_without_a_body_has_all_its_headers_signed(
    key: SigningKey, keypair: dkimkeys.KeyPair
) -> None:
    message = b"From: Alice <alice@example.com>\r\nTo: bob@example.net\r\nSubject: only\r\n"
    assert headers_to_sign(message) == [b"from", b"to", b"subject", b"from"]
    signed = Signer().sign(message, key)
    assert _h_tag(signed) == [b"from", b"to", b"subject", b"from"]
    assert _verifies(signed, keypair)
    assert not _verifies(signed.replace(b"Subject: only", b"Subject: else"), keypair)
    assert not _verifies(signed.replace(b"bob@", b"eve@"), keypair)


def test_an_empty_last_header_field_is_signed(key: SigningKey, keypair: dkimkeys.KeyPair) -> None:
    message = b"From: Alice <alice@example.com>\r\nTo: bob@example.net\r\nSubject:\r\n\r\nbody\r\n"
    assert headers_to_sign(message) == [b"from", b"to", b"subject", b"from"]
    signed = Signer().sign(message, key)
    assert _verifies(signed, keypair)
    assert not _verifies(signed.replace(b"Subject:\r\n", b"Subject: added\r\n"), keypair)


def test_sender_and_resent_originators_are_signed_when_present(
    key: SigningKey, keypair: dkimkeys.KeyPair
) -> None:
    message = (
        b"Resent-From: app@example.com\r\nResent-Sender: app@example.com\r\n"
        b"From: Alice <alice@example.com>\r\nSender: app@example.com\r\nSubject: s\r\n\r\nhi\r\n"
    )
    expected = [b"resent-from", b"resent-sender", b"from", b"sender", b"subject", b"from"]
    assert headers_to_sign(message) == expected
    signed = Signer().sign(message, key)
    assert _h_tag(signed) == expected
    assert _verifies(signed, keypair)
    assert not _verifies(signed.replace(b"Sender: app@", b"Sender: eve@"), keypair)


# --- fields with white space before the colon, and lines that are not fields (issue 12) --------


def test_a_field_with_white_space_before_its_colon_is_that_field() -> None:
    message = b"From: a@example.com\r\nFrom : b@other.test\r\nSubject\t: s\r\n\r\nbody\r\n"
    assert headers_to_sign(message) == [b"from", b"from", b"subject", b"from"]


@pytest.mark.parametrize(
    "line",
    [b"not a header", b"X Note: hi", b"From ceo@other.test Mon Jan  1", b": hi", b" leading: fold"],
    ids=["no-colon", "space-in-name", "mbox-from", "empty-name", "leading-continuation"],
)
def test_a_line_that_is_not_a_field_cannot_be_signed(key: SigningKey, line: bytes) -> None:
    """dkimpy refuses such a line (MessageFormatError), crashes on a leading continuation, or
    skips a "From " line and signs the rest: a HeaderError (permanent) for all of them."""
    message = (
        (line + b"\r\nFrom: a@example.com\r\n")
        if line.startswith(b" ")
        else (b"From: a@example.com\r\n" + line + b"\r\nSubject: s\r\n\r\nbody\r\n")
    )
    with pytest.raises(HeaderError):
        headers_to_sign(message)
    with pytest.raises(HeaderError):
        Signer().sign(message, key)


@pytest.mark.parametrize(
    "field",
    [b"From : ceo@other.test", b"From\t: ceo@other.test", b"X-Note\t: hi", b"Subject  : s"],
    ids=["from-space", "from-tab", "x-note-tab", "subject-spaces"],
)
def test_a_field_with_white_space_before_its_colon_is_not_signed_as_written(
    key: SigningKey, field: bytes
) -> None:
    """dkimpy skips "From :" (an mbox "From " line to it) and so would sign a message whose
    second From no signature covers; it refuses the others. The signer refuses them all: the
    DATA handler writes the names the modern way first (relay.grammar.modern_field_names)."""
    message = b"From: a@example.com\r\n" + field + b"\r\nTo: b@example.net\r\n\r\nbody\r\n"
    with pytest.raises(HeaderError):
        Signer().sign(message, key)


def test_written_the_modern_way_such_a_field_is_signed_and_verifies(
    key: SigningKey, keypair: dkimkeys.KeyPair
) -> None:
    message = b"From \t: a@example.com\r\nX-Note\t: hi\r\n there\r\nSubject : s\r\n\r\nbody\r\n"
    modern = grammar.modern_field_names(message)
    assert modern == b"From: a@example.com\r\nX-Note: hi\r\n there\r\nSubject: s\r\n\r\nbody\r\n"
    signed = Signer().sign(modern, key)
    assert _h_tag(signed) == [b"from", b"subject", b"from"]
    assert _verifies(signed, keypair)
    assert not _verifies(signed.replace(b"Subject: s", b"Subject: t"), keypair)
    # A second From added in transit breaks it (From is signed once more than it occurs).
    assert not _verifies(signed.replace(b"X-Note:", b"From: ceo@other.test\r\nX-Note:"), keypair)


# --- keys that cannot sign ------------------------------------------------------------------------


def test_a_key_of_the_other_algorithm_is_reported_as_a_mismatch(key: SigningKey) -> None:
    ed = dkimkeys.generate("ed25519")
    leaks.add(ed.private_pem)
    with pytest.raises(SigningError, match="does not match ed25519"):
        Signer().sign(MESSAGE, SigningKey("example.com", "s", "ed25519", key.private_pem))
    with pytest.raises(SigningError, match="does not match rsa"):
        Signer().sign(MESSAGE, SigningKey("example.com", "s", "rsa", ed.private_pem))


def test_an_rsa_key_too_short_for_a_sha256_signature_raises_signing_error() -> None:
    """A 480-bit modulus cannot hold an EMSA-PKCS1-v1_5 SHA-256 block (62 bytes): dkimpy refuses
    it (ParameterError); the `cryptography` step raises ValueError, which must become SigningError
    too, not escape as an unexpected error."""
    p, q, e = 2**239 + 29, 2**240 + 115, 65537
    d = pow(e, -1, (p - 1) * (q - 1))
    numbers = rsa.RSAPrivateNumbers(
        p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p), rsa.RSAPublicNumbers(e, p * q)
    )
    pem = (
        numbers.private_key()
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )
    leaks.add(pem)
    with pytest.raises(dkim.DKIMException):  # plain dkimpy refuses it as well
        dkim.sign(MESSAGE, b"s", b"example.com", pem.encode(), include_headers=[b"from"])
    with pytest.raises(SigningError, match="cannot DKIM-sign for example.com"):
        Signer().sign(MESSAGE, SigningKey("example.com", "s", "rsa", pem))


# --- where sign_async signs: on the loop up to 256 KiB, in a thread above -------------------------


@dataclass
class _ThreadRecordingKey:
    """A SigningKey that records the thread its private key is read in (where signing runs)."""

    inner: SigningKey
    threads: set[int] = field(default_factory=set)

    @property
    def domain(self) -> str:
        return self.inner.domain

    @property
    def selector(self) -> str:
        return self.inner.selector

    @property
    def algorithm(self) -> str:
        return self.inner.algorithm

    @property
    def private_pem(self) -> str:
        self.threads.add(threading.get_ident())
        return self.inner.private_pem


def _message_of(size: int) -> bytes:
    """MESSAGE with a body of 1000-byte lines padded to exactly `size` bytes."""
    rest = size - len(MESSAGE) - 2
    assert rest >= 0
    lines, tail = divmod(rest, 1000)
    message = MESSAGE + (b"x" * 998 + b"\r\n") * lines + b"y" * tail + b"\r\n"
    assert len(message) == size
    return message


@pytest.mark.parametrize(
    ("size", "on_the_loop"),
    [(10_000, True), (256 * 1024, True), (256 * 1024 + 1, False)],
    ids=["10kB", "256KiB", "256KiB+1"],
)
async def test_sign_async_signs_on_the_loop_up_to_256_kib_and_in_a_thread_above(
    key: SigningKey, keypair: dkimkeys.KeyPair, size: int, on_the_loop: bool
) -> None:
    loop_thread = threading.get_ident()
    recording = _ThreadRecordingKey(key)
    signed = await Signer().sign_async(_message_of(size), recording)
    assert recording.threads
    if on_the_loop:
        assert recording.threads == {loop_thread}
    else:
        assert loop_thread not in recording.threads
    assert _verifies(signed, keypair)


# --- the key cache: each key parsed once while there is room, 1024 keys by default ---------------


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every PEM `cryptography` is asked to parse (calls through to the real parser)."""
    seen: list[bytes] = []
    real = serialization.load_pem_private_key

    def counting(data: bytes, *args: object, **kwargs: object) -> object:
        seen.append(bytes(data))
        return real(data, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(serialization, "load_pem_private_key", counting)
    return seen


def test_a_signer_parses_each_key_once(key: SigningKey, parses: list[bytes]) -> None:
    ed = dkimkeys.generate("ed25519")
    leaks.add(ed.private_pem)
    other = SigningKey("example.org", "relaybox", "ed25519", ed.private_pem)
    signer = Signer()
    for _ in range(3):
        signer.sign(MESSAGE, key)
        signer.sign(MESSAGE, other)
    assert parses == [key.private_pem.encode(), ed.private_pem.encode()]


def test_the_default_key_cache_holds_1024_keys_then_starts_over(parses: list[bytes]) -> None:
    ed = dkimkeys.generate("ed25519")
    leaks.add(ed.private_pem)
    keys = [SigningKey("example.com", f"s{i}", "ed25519", ed.private_pem) for i in range(1025)]
    signer = Signer()
    for k in keys[:1024]:
        signer.sign(MESSAGE, k)
    assert len(parses) == 1024
    for k in keys[:1024]:  # all 1024 still held
        signer.sign(MESSAGE, k)
    assert len(parses) == 1024
    signer.sign(MESSAGE, keys[1024])  # the 1025th: the cache is full, it starts over
    assert len(parses) == 1025
    signer.sign(MESSAGE, keys[0])
    assert len(parses) == 1026


def test_a_cache_size_below_one_still_bounds_the_cache(
    key: SigningKey, parses: list[bytes]
) -> None:
    """cache_size=0 keeps at most the last key (it starts over at every new key), never more."""
    ed = dkimkeys.generate("ed25519")
    leaks.add(ed.private_pem)
    other = SigningKey("example.org", "relaybox", "ed25519", ed.private_pem)
    signer = Signer(cache_size=0)
    for _ in range(2):
        signer.sign(MESSAGE, key)
        signer.sign(MESSAGE, key)  # the last key is held
        signer.sign(MESSAGE, other)
    assert parses == [key.private_pem.encode(), ed.private_pem.encode()] * 2


# --- the dkimpy version the wrappers were written against ----------------------------------------

_ROOT = Path(__file__).resolve().parents[1]
_IMPORT_WITH_DKIMPY_VERSION = """
import importlib.metadata, sys
real = importlib.metadata.version
importlib.metadata.version = lambda name: sys.argv[1] if name == "dkimpy" else real(name)
try:
    import relay.dkim
except RuntimeError as exc:
    print("refused:", exc)
else:
    print("loaded")
"""


@pytest.mark.parametrize("version", ["1.1.7", "1.1.9"])
async def test_relay_dkim_refuses_to_load_with_another_dkimpy_version(version: str) -> None:
    """The wrappers patch dkimpy 1.1.8's internals: any other version, older or newer, is refused
    at import (the reported version is faked in a fresh interpreter; the installed one is 1.1.8)."""
    proc = await spawn(
        sys.executable,
        "-c",
        _IMPORT_WITH_DKIMPY_VERSION,
        version,
        cwd=_ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    assert out.decode().strip() == (
        f"refused: relay.dkim was written for dkimpy 1.1.8, found {version}"
    )
