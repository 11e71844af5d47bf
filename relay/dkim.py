"""DKIM signing at acceptance (RFC 6376), with the sender domain's key, through dkimpy.

dkimpy computes RSA in pure Python (~7-9 ms per 2048-bit signature, a cap near 110 msgs/s). The RSA
private-key step is the only slow part and RSASSA-PKCS1-v1_5 is deterministic, so it is handed to
`cryptography` (OpenSSL, ~0.28 ms here: bench/signrate.py) with byte-identical output. dkimpy
1.1.8 has no signer hook: we wrap its two module-level functions ``parse_pem_private_key`` and
``RSASSA_PKCS1_v1_5_sign``; the wrappers act only on a :class:`_PreloadedKey` (a key parsed once,
by us) and pass anything else to dkimpy's own code, so plain dkimpy calls elsewhere behave exactly
as before. dkimpy is pinned; the tests compare our output with dkimpy's own, byte for byte, and
verify it with ``dkim.verify``. Its three relaxed-canonicalisation helpers are replaced by the
same substitutions, compiled once and skipped where they cannot match (:data:`CANON_ORIGINALS`
keeps dkimpy's for the tests).

Ed25519 (RFC 8463, ``dns.dkim_key_type = "ed25519"``): dkimpy signs it through PyNaCl, which is not
a dependency. Without PyNaCl, dkimpy has no ``nacl`` name at all; we give it a stand-in whose
``SigningKey`` accepts only a :class:`_PreloadedKey` (signing with `cryptography`; Ed25519 is
deterministic, so the result is what PyNaCl would give) and raises the same NameError as before for
anything else, so dkimpy still reports "pynacl required" where it did. With PyNaCl installed, the
raw seed is passed to dkimpy unchanged.

:func:`verify` checks a signature against keys the caller hands it (the sandbox inbox: the domain's
key from the store, no DNS). The stand-in's ``VerifyKey`` verifies Ed25519 with `cryptography`
only while :func:`verify` runs; anywhere else it raises the NameError dkimpy expects without PyNaCl.
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
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from relay import grammar
from relay.dkimbody import BodyHash, compress_whitespace, strip_trailing_whitespace

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
_CANON = (b"relaxed", b"relaxed")
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


class _PreloadedKey:
    """A key already parsed by `cryptography`; the only thing the wrappers act on."""

    __slots__ = ("key",)

    def __init__(self, key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> None:
        self.key = key


def _no_nacl(*_args: Any, **_kwargs: Any) -> Any:
    raise NameError("name 'nacl' is not defined")  # what dkimpy sees without PyNaCl


def _nacl_signing_key(seed: Any, encoder: Any = None) -> Any:
    if isinstance(seed, _PreloadedKey) and isinstance(seed.key, ed25519.Ed25519PrivateKey):
        key = seed.key
        return SimpleNamespace(sign=lambda digest: SimpleNamespace(signature=key.sign(digest)))
    return _no_nacl()


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
    signing=SimpleNamespace(SigningKey=_nacl_signing_key, VerifyKey=_nacl_verify_key),
    encoding=SimpleNamespace(Base64Encoder=None),
    exceptions=SimpleNamespace(ValueError=ValueError, BadSignatureError=InvalidSignature),
)


_HASHES: dict[str, hashes.HashAlgorithm] = {"sha256": hashes.SHA256(), "sha1": hashes.SHA1()}  # noqa: S303 (rsa-sha1 verify compat only)


# dkimpy's relaxed canonicalisation runs three module-level helpers, each one re.sub with its
# pattern looked up again, on every header field (all of them, twice per signature) and the body:
# about 0.1 ms of a 2 KiB message's ~0.27 ms outside RSA. These are the same substitutions, with
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
    orig_parse = dkim.parse_pem_private_key
    orig_sign = dkim.RSASSA_PKCS1_v1_5_sign

    def parse_pem_private_key(data: Any) -> Any:
        if isinstance(data, _PreloadedKey):
            return data
        return orig_parse(data)

    def rsassa_pkcs1_v1_5_sign(hash: Any, private_key: Any) -> Any:
        if isinstance(private_key, _PreloadedKey) and isinstance(
            private_key.key, rsa.RSAPrivateKey
        ):
            algorithm = _HASHES[hash.name.lower()]
            return private_key.key.sign(hash.digest(), padding.PKCS1v15(), Prehashed(algorithm))
        return orig_sign(hash, private_key)

    dkim.parse_pem_private_key = parse_pem_private_key
    dkim.RSASSA_PKCS1_v1_5_sign = rsassa_pkcs1_v1_5_sign
    for name, fast in _FAST_CANON.items():
        CANON_ORIGINALS[name] = getattr(dkim.canonicalization, name)
        setattr(dkim.canonicalization, name, fast)
    if not hasattr(dkim, "nacl"):
        dkim.nacl = _NACL_STANDIN
    dkim._relaybox_wrapped = True


_wrap_dkimpy()


def headers_to_sign(message: bytes) -> list[bytes]:
    """The SIGNED_HEADERS present in the header block, once per occurrence, plus From once more.
    A field written with white space before its colon counts as that field (relay.grammar).
    Raises HeaderError when a line of the header section is not part of a field."""
    fields = grammar.header_fields(message, SIGNED_HEADERS)
    if fields is None:
        raise HeaderError("a line of the header section is not part of a header field")
    return [f.key.encode("ascii") for f in fields] + [b"from"]


class _HashedBody(dkim.DKIM):  # type: ignore[misc]
    """dkimpy's signer for a header section whose body was hashed apart: the one change is the
    ``bh=`` tag, put in before the header hash that covers it is computed (gen_header is where
    dkimpy 1.1.8 turns the tags into the header; every byte else is dkimpy's)."""

    body_hash = b""

    def gen_header(self, fields: list[tuple[bytes, bytes]], *args: Any, **kwargs: Any) -> Any:
        fields = [(k, self.body_hash if k == b"bh" else v) for k, v in fields]
        return super().gen_header(fields, *args, **kwargs)


class Signer:
    """Signs messages with a domain's key; parsed keys are cached (keyed by a digest of the PEM)."""

    def __init__(self, cache_size: int = 1024) -> None:
        self._keys: dict[tuple[str, str, bytes], _PreloadedKey] = {}
        self._cache_size = cache_size
        self._lock = threading.Lock()  # sign_async may run in threads

    def _key(self, key: SigningKey) -> _PreloadedKey:
        pem = (
            key.private_pem.encode("ascii") if isinstance(key.private_pem, str) else key.private_pem
        )
        ident = (key.domain, key.selector, hashlib.sha256(pem).digest())
        with self._lock:
            cached = self._keys.get(ident)
        if cached is not None:
            return cached
        try:
            loaded = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as exc:
            raise SigningError(f"DKIM key of {key.domain} is not a usable private key") from exc
        if not isinstance(loaded, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
            raise SigningError(f"DKIM key of {key.domain} is neither RSA nor Ed25519")
        pre = _PreloadedKey(loaded)
        with self._lock:
            if len(self._keys) >= self._cache_size:
                self._keys.clear()
            self._keys[ident] = pre
        return pre

    def sign(self, message: bytes, key: SigningKey, body_hash: BodyHash | None = None) -> bytes:
        """The message with a DKIM-Signature (rsa-sha256, relaxed/relaxed) prepended.

        With ``body_hash`` (a body too large to hold, hashed as it arrived: relay.dkimbody),
        ``message`` is the header section with its blank line, and the body's hash is signed
        for the body dkimpy is given none of."""
        algorithm = _ALGORITHMS.get(key.algorithm.lower())
        if algorithm is None:
            raise SigningError(f"DKIM algorithm {key.algorithm!r} is not supported for signing")
        pre = self._key(key)
        privkey: Any = pre
        if isinstance(pre.key, ed25519.Ed25519PrivateKey):
            if algorithm != b"ed25519-sha256":
                raise SigningError(f"DKIM key of {key.domain} does not match {key.algorithm}")
            if dkim.nacl is not _NACL_STANDIN:  # real PyNaCl: it takes the base64 seed
                privkey = base64.b64encode(pre.key.private_bytes_raw())
        elif algorithm != b"rsa-sha256":
            raise SigningError(f"DKIM key of {key.domain} does not match {key.algorithm}")
        include = headers_to_sign(message)
        if grammar.modern_field_names(message) != message:
            raise HeaderError("a header field has white space before its colon")
        try:
            signer = (dkim.DKIM if body_hash is None else _HashedBody)(
                message, signature_algorithm=algorithm
            )
            if body_hash is not None:
                signer.body_hash = body_hash.b64()
            sig = signer.sign(
                key.selector.encode("ascii"),
                key.domain.encode("ascii"),
                privkey,
                canonicalize=_CANON,
                include_headers=include,
            )
        except (dkim.DKIMException, ValueError, UnicodeError) as exc:
            raise SigningError(f"cannot DKIM-sign for {key.domain}: {exc}") from exc
        return bytes(sig) + message

    async def sign_async(
        self, message: bytes, key: SigningKey, body_hash: BodyHash | None = None
    ) -> bytes:
        """Inline for small messages (a thread costs more than it saves); a thread for large."""
        if len(message) <= INLINE_LIMIT:
            return self.sign(message, key, body_hash)
        return await asyncio.to_thread(self.sign, message, key, body_hash)


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
