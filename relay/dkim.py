"""DKIM signing at acceptance (RFC 6376), with the sender domain's key; verification through dkimpy.

The signature field is written by relay.dkimsign, byte for byte what dkimpy 1.1.8 writes for the
same message (issue 17: dkimpy's parsing and folding cost ~0.2 ms a message, as much as two thirds
of the RSA step). Keys are parsed once by `cryptography` (OpenSSL: an RSA-2048 signature in
~0.3 ms here, bench/signrate.py; dkimpy's own RSA is pure Python, ~7 ms). dkimpy is pinned and
stays the reference: the tests compare our signatures with dkimpy's own, byte for byte, and verify
them with ``dkim.verify``. Its three relaxed-canonicalisation helpers are replaced by the same
substitutions, compiled once and skipped where they cannot match (:data:`CANON_ORIGINALS` keeps
dkimpy's for the tests); the verifier runs them.

Ed25519 (RFC 8463, ``dns.dkim_key_type = "ed25519"``) is signed with `cryptography` too. dkimpy
verifies it through PyNaCl, which is not a dependency: without it, dkimpy has no ``nacl`` name at
all; we give it a stand-in whose ``VerifyKey`` verifies with `cryptography` only while
:func:`verify` runs, and raises the NameError dkimpy expects without PyNaCl anywhere else (its
``SigningKey`` always does), so plain dkimpy still reports "pynacl required" where it did.

:func:`verify` checks a signature against keys the caller hands it (the sandbox inbox: the domain's
key from the store, no DNS).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import importlib.metadata
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Protocol

import dkim
import dkim.canonicalization
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from relay import dkimsign, grammar
from relay.dkimbody import BodyHash, compress_whitespace, strip_trailing_whitespace
from relay.signproc import KeyProcess

DKIMPY_VERSION = "1.1.8"  # the version whose internals the wrappers below were written against
INLINE_LIMIT = 256 * 1024  # larger messages are hashed in a thread so the loop keeps serving

# RFC 6376 5.4.1 recommends these; From is signed once more than it occurs (5.4.2) so a second
# From cannot be added without breaking the signature. Sender and the Resent- originators are
# held to the From rule by the policy, and signed when present.
SIGNED_HEADERS = (
    "from",
    "sender",
    "resent-from",
    "resent-sender",
    "to",
    "cc",
    "subject",
    "date",
    "message-id",
    "reply-to",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
)
_ALGORITHMS = {
    "rsa": b"rsa-sha256",
    "rsa-sha256": b"rsa-sha256",
    "ed25519": b"ed25519-sha256",
    "ed25519-sha256": b"ed25519-sha256",
}


class SigningKey(Protocol):
    """What relay.domains.signing_key() returns (only these attributes are used)."""

    @property
    def domain(self) -> str: ...
    @property
    def selector(self) -> str: ...
    @property
    def algorithm(self) -> str: ...
    @property
    def private_pem(self) -> str | bytes: ...


class SigningError(Exception):
    """The message could not be signed (a key or algorithm it cannot use). Answer 451, log it."""


class HeaderError(SigningError):
    """The header section is not one dkimpy reads as relay.grammar does: a line that is not part
    of a field (dkimpy refuses it, or skips a "From " line), or a field with white space before
    its colon (dkimpy skips "From :" and refuses the others). Permanent: the message cannot be
    signed as written (answer 554 5.6.0; relay.grammar.modern_field_names fixes the second)."""


def _no_nacl(*_args: Any, **_kwargs: Any) -> Any:
    raise NameError("name 'nacl' is not defined")  # what dkimpy sees without PyNaCl


_VERIFYING = threading.local()  # .on: inside verify(), in this thread


def _nacl_verify_key(key: Any, encoder: Any = None) -> Any:
    if not getattr(_VERIFYING, "on", False):
        return _no_nacl()
    try:  # dkimpy hands over the p= tag, base64 (its Base64Encoder, None in the stand-in)
        public = ed25519.Ed25519PublicKey.from_public_bytes(base64.b64decode(key, validate=True))
    except (ValueError, binascii.Error) as exc:
        raise ValueError(f"not an Ed25519 public key: {exc}") from None
    return SimpleNamespace(verify=lambda digest, signature: public.verify(signature, digest))


_NACL_STANDIN = SimpleNamespace(
    signing=SimpleNamespace(SigningKey=_no_nacl, VerifyKey=_nacl_verify_key),
    encoding=SimpleNamespace(Base64Encoder=None),
    exceptions=SimpleNamespace(ValueError=ValueError, BadSignatureError=InvalidSignature),
)


# dkimpy's relaxed canonicalisation runs three module-level helpers, each one re.sub with its
# pattern looked up again, on every header field and the body of a message it verifies (the
# sandbox inbox; and the tests' reference signatures). These are the same substitutions, with
# compiled patterns and a fast path where the pattern cannot match (then re.sub would return its
# input unchanged). The tests compare them with dkimpy's own on every short mix of the characters
# that matter, and whole signatures with dkimpy's helpers put back. The two body ones are
# relay.dkimbody's, which hashes a body read in pieces with them.
_LINE_BREAK = re.compile(b"\r?\n")
_strip_trailing_whitespace = strip_trailing_whitespace
_compress_whitespace = compress_whitespace


def _unfold_header_value(content: bytes) -> bytes:
    if b"\n" not in content:
        return content
    return _LINE_BREAK.sub(b"", content)


_FAST_CANON = {
    "strip_trailing_whitespace": _strip_trailing_whitespace,
    "compress_whitespace": _compress_whitespace,
    "unfold_header_value": _unfold_header_value,
}
CANON_ORIGINALS: dict[str, Any] = {}  # dkimpy's own helpers, as they were (for the tests)


def _wrap_dkimpy() -> None:
    """Install the wrappers once (idempotent). Refuses an unexpected dkimpy version."""
    if getattr(dkim, "_relaybox_wrapped", False):
        return
    version = importlib.metadata.version("dkimpy")
    if version != DKIMPY_VERSION:
        raise RuntimeError(f"relay.dkim was written for dkimpy {DKIMPY_VERSION}, found {version}")
    for name, fast in _FAST_CANON.items():
        CANON_ORIGINALS[name] = getattr(dkim.canonicalization, name)
        setattr(dkim.canonicalization, name, fast)
    if not hasattr(dkim, "nacl"):
        dkim.nacl = _NACL_STANDIN
    dkim._relaybox_wrapped = True


_wrap_dkimpy()


def _signed_fields(message: bytes) -> list[grammar.HeaderField]:
    fields = grammar.header_fields(message, SIGNED_HEADERS)
    if fields is None:
        raise HeaderError("a line of the header section is not part of a header field")
    return fields


def _include(fields: list[dkimsign.Field]) -> list[bytes]:
    return [name for name, _ in fields] + [b"from"]


def headers_to_sign(message: bytes) -> list[bytes]:
    """The SIGNED_HEADERS present in the header block, once per occurrence, plus From once more.
    A field written with white space before its colon counts as that field (relay.grammar).
    Raises HeaderError when a line of the header section is not part of a field."""
    return _include(dkimsign.fields_of(_signed_fields(message)))


_WholeKey = tuple[str, str, str, str | bytes]  # domain, selector, algorithm, PEM
_KnownKey = tuple[bytes, bytes, dkimsign.PrivateKey]  # the PEM, its SHA-256, the parsed key


class Signer:
    """Signs messages with a domain's key; parsed keys are cached (keyed by all a key is)."""

    def __init__(self, cache_size: int = 1024, key_process: KeyProcess | None = None) -> None:
        """``key_process``: where :meth:`sign_async` makes the private-key steps it takes."""
        self._keys: dict[_WholeKey, _KnownKey] = {}
        self._cache_size = cache_size
        self._lock = threading.Lock()  # sign_async may run in threads
        self.key_process = key_process

    def _key(self, key: SigningKey) -> _KnownKey:
        """The PEM, its SHA-256 and the parsed key."""
        # The domain cache hands every message the same key, its PEM the same string, whose
        # hash the string keeps: finding it here costs no pass over the PEM (nor its SHA-256).
        whole = (key.domain, key.selector, key.algorithm, key.private_pem)
        with self._lock:
            known = self._keys.get(whole)
        if known is not None:
            return known
        pem = (
            key.private_pem.encode("ascii") if isinstance(key.private_pem, str) else key.private_pem
        )
        try:
            loaded = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as exc:
            raise SigningError(f"DKIM key of {key.domain} is not a usable private key") from exc
        if not isinstance(loaded, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
            raise SigningError(f"DKIM key of {key.domain} is neither RSA nor Ed25519")
        known = (pem, hashlib.sha256(pem).digest(), loaded)
        with self._lock:
            if len(self._keys) >= self._cache_size:
                self._keys.clear()
            self._keys[whole] = known
        return known

    def sign(self, message: bytes, key: SigningKey, body_hash: BodyHash | None = None) -> bytes:
        """The message with a DKIM-Signature (relaxed/relaxed) prepended.

        With ``body_hash`` (a body too large to hold, hashed as it arrived: relay.dkimbody),
        ``message`` is the header section with its blank line, and the body's hash is signed
        for the body that is not here."""
        _pem, _ident, private, tags, digest = self._unsigned(message, key, body_hash)
        return dkimsign.signed_field(tags, self._step(key, private, digest)) + message

    def _unsigned(
        self, message: bytes, key: SigningKey, body_hash: BodyHash | None
    ) -> tuple[bytes, bytes, dkimsign.PrivateKey, list[bytes], bytes]:
        algorithm = _ALGORITHMS.get(key.algorithm.lower())
        if algorithm is None:
            raise SigningError(f"DKIM algorithm {key.algorithm!r} is not supported for signing")
        pem, ident, private = self._key(key)
        wanted = ed25519.Ed25519PrivateKey if algorithm == b"ed25519-sha256" else rsa.RSAPrivateKey
        if not isinstance(private, wanted):
            raise SigningError(f"DKIM key of {key.domain} does not match {key.algorithm}")
        fields = dkimsign.fields_of(_signed_fields(message))
        if grammar.has_obsolete_field_names(message):
            raise HeaderError("a header field has white space before its colon")
        include = _include(fields)
        bh = body_hash.b64() if body_hash is not None else dkimsign.body_hash_of(message)
        try:
            tags, digest = dkimsign.unsigned_field(
                fields, include, bh,
                domain=key.domain.encode("ascii"), selector=key.selector.encode("ascii"),
                algorithm=algorithm,
            )  # fmt: skip
        except UnicodeError as exc:
            raise SigningError(f"cannot DKIM-sign for {key.domain}: {exc}") from exc
        return pem, ident, private, tags, digest

    @staticmethod
    def _step(key: SigningKey, private: dkimsign.PrivateKey, digest: bytes) -> bytes:
        try:
            return dkimsign.private_key_step(private, digest)
        except ValueError as exc:  # an RSA modulus too short for the SHA-256's DigestInfo
            raise SigningError(f"cannot DKIM-sign for {key.domain}: {exc}") from exc

    async def sign_async(
        self, message: bytes, key: SigningKey, body_hash: BodyHash | None = None
    ) -> bytes:
        """Small messages are read inline (a thread costs more than it saves), large ones in a
        thread. With a key process running (relay.signproc), its private-key step is made
        there, off the loop's GIL; without one, or when it gives no answer, here."""
        if len(message) > INLINE_LIMIT:
            return await asyncio.to_thread(self.sign, message, key, body_hash)
        keys = self.key_process
        if keys is None or not keys.running:
            return self.sign(message, key, body_hash)
        pem, ident, private, tags, digest = self._unsigned(message, key, body_hash)
        signature = await keys.sign(ident, pem, digest) if keys.takes(private) else None
        if signature is None:
            signature = self._step(key, private, digest)
        return dkimsign.signed_field(tags, signature) + message


@dataclass(frozen=True)
class Verification:
    """The first (topmost) DKIM-Signature of a message, checked."""

    result: str  # "pass" | "fail" | "none" (no signature)
    domain: str  # its d= ("" when there is none)
    selector: str  # its s=
    reason: str  # why not "pass"; "" for a pass


def signature_of(message: bytes) -> tuple[str, str] | None:
    """(d=, s=) of the first DKIM-Signature, or None when there is none (or it has neither)."""
    fields = grammar.header_fields(message, ("dkim-signature",))
    if not fields:
        return None
    try:
        tags = dkim.util.parse_tag_value(b" ".join(fields[0].value.split()))
        return tags[b"d"].decode("ascii").lower(), tags[b"s"].decode("ascii").lower()
    except (dkim.util.InvalidTagValueList, KeyError, UnicodeError):
        return None


def key_name(domain: str, selector: str) -> str:
    """Where the key of ``selector`` is published (RFC 6376 3.6.2.1), no final dot."""
    return f"{selector}._domainkey.{domain}"


def verify(message: bytes, keys: Mapping[str, str]) -> Verification:
    """Verify the first signature with the key records in ``keys`` (:func:`key_name` -> TXT
    value); nothing else is looked up. CPU-bound (RSA in pure Python): not on the event loop."""
    signed = signature_of(message)
    if signed is None:
        return Verification("none", "", "", "no DKIM-Signature")
    domain, selector = signed
    if key_name(domain, selector) not in keys:
        return Verification("fail", domain, selector, f"no key at {key_name(domain, selector)}")

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes:
        found = keys.get(name.decode("ascii", "replace").rstrip(".").lower())
        return found.encode("ascii") if found is not None else b""

    _VERIFYING.on = True
    try:
        ok = dkim.DKIM(message).verify(dnsfunc=dnsfunc)
    except dkim.DKIMException as exc:
        return Verification("fail", domain, selector, str(exc) or type(exc).__name__)
    finally:
        _VERIFYING.on = False
    if not ok:
        why = "the signature does not match the message (changed after signing) or the key"
        return Verification("fail", domain, selector, why)
    return Verification("pass", domain, selector, "")
