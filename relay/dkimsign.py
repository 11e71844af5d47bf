"""The DKIM-Signature field of a message (RFC 6376 3.5, 3.7; RFC 8463), written here, byte for
byte the field dkimpy 1.1.8 writes for the same message, key, headers and second (issue 17),
except where dkimpy's folding breaks the signature (:func:`fold`).

dkimpy's ``DKIM.sign`` parses every line of the message into fields, canonicalises all of them,
rebuilds the body from its lines and folds the result twice: ~0.2 ms of a 2 KiB message, as much
as two thirds of the RSA step itself (bench/signrate.py). Here the header section is read once by
relay.grammar (which the DATA checks read it with), only the signed fields are canonicalised, and
the body hash is relay.dkimbody's. What dkimpy would write is kept exactly, down to its folding:
the tests compare the two byte for byte over many messages, domains and selectors, and verify the
result with ``dkim.verify``. dkimpy stays the reference and the verifier.

The private-key step takes a key already parsed by `cryptography`: RSASSA-PKCS1-v1_5 over the
SHA-256 of the signed data (as dkimpy's RSA step), or Ed25519 over that SHA-256 (RFC 8463 3: the
hash is what is signed, as dkimpy does through PyNaCl). Both are deterministic.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from collections.abc import Sequence

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from relay.dkimbody import CRLF, BodyHash, compress_whitespace
from relay.grammar import HeaderField

FIELD_NAME = b"DKIM-Signature"
_FIRST_LINE = 72 - len(
    FIELD_NAME
)  # dkimpy keeps lines to 72 columns, the name counted in the first
_LATER_LINES = 71  # a continuation line: its leading space and 71 more
_PLACEHOLDER = b"0" * 60  # what b= holds while the field is folded the first time (dkimpy's)
_BARE_LF = re.compile(rb"(?<!\r)\n")
_SHA256 = hashes.SHA256()
_PKCS1 = padding.PKCS1v15()

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def fold(value: bytes) -> bytes:
    """``value`` cut into lines as dkimpy 1.1.8 cuts a DKIM-Signature's (its ``fold``) where that
    is sound: while what is left is longer than a line (58 columns on the first, the field name's
    there; 71 after, each with its leading space), it is cut at the last space that fits, the
    space giving way to CRLF and a space. With no space to cut at, dkimpy cuts at the limit
    whatever is there; here that is done only in the last tag, b=, whose value may hold folding
    white space (RFC 6376 3.5); a longer tag before it (a d= or i= of a domain over 66 octets)
    keeps its line long, cut at the space after it, so that its value is unchanged (dkimpy cuts
    it, and the signature fails). A final CRLF counts toward a line's length as in dkimpy, but
    is never cut off on its own (dkimpy then leaves a line of one space, or cuts between CR and
    LF). ``value`` has no folds of its own."""
    end = CRLF if value.endswith(CRLF) else b""
    if len(value) <= _FIRST_LINE + len(end):  # the first line may take the CRLF over (dkimpy)
        return value
    text = value[: len(value) - len(end)]
    lines: list[bytes] = []
    limit = _FIRST_LINE
    while len(text) + len(end) > limit:  # a final CRLF counted, as dkimpy counts it
        space = text.rfind(b" ", 0, limit)
        if space < 0 and len(text) <= limit:
            break  # it fits but for the CRLF: dkimpy would cut it off alone
        if space < 0:
            space = text.find(b" ", limit)  # a tag longer than a line, not the last: not cut
        if space < 0:  # inside the last tag's value
            lines.append(text[:limit])
            text = text[limit:]
        else:
            lines.append(text[:space])
            text = text[space + 1 :]
        limit = _LATER_LINES
    lines.append(text)
    return b"\r\n ".join(lines) + end


def canonical_value(value: bytes) -> bytes:
    """A field value in relaxed canonical form (RFC 6376 3.4.2): unfolded, each run of white
    space one space, none at either end (dkimpy strips every ASCII space there, as here)."""
    if b"\r\n" in value:
        value = value.replace(b"\r\n", b"")
    return compress_whitespace(value).strip()


def body_of(message: bytes) -> bytes:
    """What follows the header section's blank line (nothing when there is none), with a bare
    LF read as CRLF: the body dkimpy hashes."""
    if message.startswith(CRLF):
        body = message[2:]
    else:
        end = message.find(b"\r\n\r\n")
        body = message[end + 4 :] if end >= 0 else b""
    if b"\n" in body and body.count(b"\n") != body.count(CRLF):
        body = _BARE_LF.sub(CRLF, body)
    return body


Field = tuple[bytes, bytes]  # a header field: its name lowercased, its value (relay.grammar's)


def fields_of(header: Sequence[HeaderField]) -> list[Field]:
    """relay.grammar's fields as this module takes them."""
    return [(f.key.encode("ascii"), f.value) for f in header]


def selected(fields: Sequence[Field], include: Sequence[bytes]) -> list[Field]:
    """The fields ``include`` names, in its order: each time a name comes, the last occurrence of
    it not yet taken (RFC 6376 5.4.2: bottom up), none once all are (dkimpy's select_headers)."""
    stacks: dict[bytes, list[Field]] = {}
    for f in fields:
        stacks.setdefault(f[0], []).append(f)
    out: list[Field] = []
    for name in include:
        stack = stacks.get(name)
        if stack:
            out.append(stack.pop())
    return out


def unsigned_field(
    fields: Sequence[Field],
    include: Sequence[bytes],
    body_hash: bytes,
    *,
    domain: bytes,
    selector: bytes,
    algorithm: bytes,
    now: float | None = None,
) -> tuple[list[bytes], bytes]:
    """The DKIM-Signature field's tags, relaxed/relaxed, for the header ``fields`` (a message's,
    in order), signing those ``include`` names (lowercase), with ``body_hash`` as bh=, all but
    b=; and the SHA-256 the private-key step signs for b= (:func:`private_key_step`, then
    :func:`signed_field`)."""
    tags = [
        b"v=1",
        b"a=" + algorithm,
        b"c=relaxed/relaxed",
        b"d=" + domain,
        b"i=@" + domain,
        b"q=dns/txt",
        b"s=" + selector,
        b"t=%d" % int(time.time() if now is None else now),
        b"h=" + b" : ".join(include),
        b"bh=" + body_hash,
    ]
    folded = fold(b"; ".join([*tags, b"b=" + _PLACEHOLDER]))
    unsigned = folded[: -len(_PLACEHOLDER)]  # b= last, its placeholder never cut (62 < 71 columns)
    data = [
        name + b":" + canonical_value(value) + CRLF for name, value in selected(fields, include)
    ]
    data.append(b"dkim-signature:" + canonical_value(b" " + unsigned))
    return tags, hashlib.sha256(b"".join(data)).digest()


def signed_field(tags: list[bytes], signature: bytes) -> bytes:
    """The whole field, from :func:`unsigned_field`'s tags and the private-key step's result."""
    value = b"; ".join([*tags, b"b=" + base64.b64encode(signature)])
    return FIELD_NAME + b": " + fold(value + CRLF)


def private_key_step(key: PrivateKey, digest: bytes) -> bytes:
    """The signature of the signed data's SHA-256 (its own function: profiles show it apart)."""
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(digest, _PKCS1, Prehashed(_SHA256))
    return key.sign(digest)


def body_hash_of(message: bytes) -> bytes:
    """The bh= value of a whole message's body (relaxed)."""
    h = BodyHash()
    h.update(body_of(message))
    return h.b64()
