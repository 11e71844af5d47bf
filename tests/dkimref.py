"""Plain dkimpy as the reference signer: what relay.dkim.Signer must produce byte for byte.

dkimpy signs with its own canonicalisation helpers put back (relay.dkim replaces them for the
verifier) and its own RSA (pure Python, a few ms a signature). For Ed25519 dkimpy needs PyNaCl,
which is not installed: it gets PyNaCl's interface as dkimpy uses it (``SigningKey(seed,
encoder=Base64Encoder).sign(digest).signature``) over `cryptography`, for the call only. The t=
tag is a second's count: both signatures are made until they fall in the same second.
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import dkim
import dkim.canonicalization
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from relay.dkim import CANON_ORIGINALS, headers_to_sign
from relay.store.domains import SigningKey


def t_tag(signed: bytes) -> bytes:
    m = re.search(rb"\bt=(\d+)", signed)
    assert m is not None
    return m.group(1)


def _seed_signer(seed_b64: bytes, encoder: Any = None) -> Any:
    private = ed25519.Ed25519PrivateKey.from_private_bytes(base64.b64decode(seed_b64))
    return SimpleNamespace(sign=lambda digest: SimpleNamespace(signature=private.sign(digest)))


@contextmanager
def plain_dkimpy() -> Iterator[None]:
    """dkimpy as shipped, for the duration: its helpers back, and a PyNaCl signer."""
    saved = {name: getattr(dkim.canonicalization, name) for name in CANON_ORIGINALS}
    nacl = dkim.nacl
    dkim.nacl = SimpleNamespace(
        signing=SimpleNamespace(SigningKey=_seed_signer, VerifyKey=nacl.signing.VerifyKey),
        encoding=SimpleNamespace(Base64Encoder=None),
        exceptions=SimpleNamespace(ValueError=ValueError),
    )
    try:
        for name, original in CANON_ORIGINALS.items():
            setattr(dkim.canonicalization, name, original)
        yield
    finally:
        for name, ours in saved.items():
            setattr(dkim.canonicalization, name, ours)
        dkim.nacl = nacl


def dkimpy_sign(message: bytes, key: SigningKey) -> bytes:
    """The signature field plain dkimpy writes for ``message`` with ``key`` (relaxed/relaxed,
    the headers relay.dkim signs)."""
    pem = key.private_pem.encode() if isinstance(key.private_pem, str) else key.private_pem
    if key.algorithm == "ed25519":
        loaded = serialization.load_pem_private_key(pem, password=None)
        assert isinstance(loaded, ed25519.Ed25519PrivateKey)
        privkey, algorithm = base64.b64encode(loaded.private_bytes_raw()), b"ed25519-sha256"
    else:
        privkey, algorithm = pem, b"rsa-sha256"
    with plain_dkimpy():
        return bytes(
            dkim.sign(
                message,
                key.selector.encode("ascii"),
                key.domain.encode("ascii"),
                privkey,
                signature_algorithm=algorithm,
                canonicalize=(b"relaxed", b"relaxed"),
                include_headers=headers_to_sign(message),
            )
        )


def same_second(ours: Callable[[], bytes], theirs: Callable[[], bytes]) -> tuple[bytes, bytes]:
    """Both made in one second (their t= tags equal), trying again a few times if not."""
    for _ in range(5):
        a, b = ours(), theirs()
        if t_tag(a) == t_tag(b):
            return a, b
        time.sleep(0.01)  # sleep-ok: into the next second, rarely
    raise AssertionError("could not sign twice within one second")
