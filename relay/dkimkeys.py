"""DKIM key pairs for new domains, and the DNS TXT value that publishes the public half.

RSA 2048 is the default: every verifier supports it (RFC 8301 requires >= 1024, recommends 2048).
Ed25519 (RFC 8463) is optional: small keys, but not every receiver verifies it yet.

Private keys are PEM text: RSA as PKCS#1 ("BEGIN RSA PRIVATE KEY", what dkimpy parses), Ed25519 as
PKCS#8. They are secrets: never logged, never printed by the CLI.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

ALGORITHMS = ("rsa", "ed25519")
RSA_BITS = 2048
TXT_STRING_MAX = 255  # RFC 1035 3.3.14: one character-string holds at most 255 octets


@dataclass(frozen=True)
class KeyPair:
    algorithm: str  # "rsa" | "ed25519" (the DKIM k= tag)
    public_b64: str  # the DKIM p= tag
    private_pem: str = field(repr=False)


def generate(algorithm: str = "rsa", *, bits: int = RSA_BITS) -> KeyPair:
    """A fresh key pair. CPU-bound for RSA (tens of ms): call it off the event loop."""
    if algorithm == "rsa":
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        pem = rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        # RFC 6376 3.6.1: p= is the base64 of the DER public key; SubjectPublicKeyInfo is what
        # opendkim and dkimpy publish and every verifier accepts.
        der = rsa_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    elif algorithm == "ed25519":
        ed_key = ed25519.Ed25519PrivateKey.generate()
        pem = ed_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # RFC 8463 4.2: p= is the base64 of the raw 32-byte public key, not an ASN.1 structure.
        der = ed_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
    else:
        raise ValueError(f"unknown DKIM algorithm {algorithm!r} (use rsa or ed25519)")
    return KeyPair(algorithm, base64.b64encode(der).decode("ascii"), pem.decode("ascii"))


def txt_value(algorithm: str, public_b64: str) -> str:
    """The whole TXT value to publish at ``<selector>._domainkey.<domain>`` (RFC 6376 3.6.1)."""
    return f"v=DKIM1; k={algorithm}; p={public_b64}"


def split_txt(value: str, limit: int = TXT_STRING_MAX) -> list[str]:
    """Split a TXT value into character-strings of at most ``limit`` bytes.

    A DKIM RSA-2048 record is about 410 bytes, more than one string holds; verifiers join the
    strings without separators (RFC 6376 3.6.2.2), so any split point is correct. Splits never
    cut a UTF-8 sequence (our values are ASCII anyway).
    """
    if limit < 1:
        raise ValueError("limit must be positive")
    parts: list[str] = []
    current = ""
    size = 0
    for ch in value:
        n = len(ch.encode("utf-8"))
        if size + n > limit:
            parts.append(current)
            current, size = "", 0
        current += ch
        size += n
    parts.append(current)
    return parts


def zone_strings(value: str) -> str:
    """The value as a zone file writes it: quoted <=255-byte strings separated by spaces."""
    return " ".join(
        '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"' for s in split_txt(value)
    )
