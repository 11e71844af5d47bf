"""What a DKIM signature costs relaybox on this box, alone on one core: relay.dkim.Signer.sign of
the bench's 2 KiB message with an RSA-2048 and an Ed25519 key, and the RSA-2048 private-key step
by itself (`cryptography`, as relay.dkim hands it over). CPU time per call, in ms.

    python -m bench.signrate --seconds 1     # prints one JSON line
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from relay import dkimkeys
from relay.dkim import Signer
from relay.store.domains import SigningKey

MESSAGE = (
    b"From: App <app@bench.test>\r\nTo: rcpt@dest.test\r\nSubject: bench message\r\n"
    b"Date: Wed, 02 Dec 2026 00:00:00 +0000\r\nMessage-ID: <bench.1@bench.test>\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
) + (b"x" * 76 + b"\r\n") * 25


def per_call_ms(fn: Callable[[], Any], seconds: float) -> float:
    fn()
    calls, t0 = 0, time.process_time()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        fn()
        calls += 1
    return round((time.process_time() - t0) / calls * 1000, 3)


def measure(seconds: float) -> dict[str, float]:
    signer = Signer()
    out: dict[str, float] = {}
    for kind in ("rsa", "ed25519"):
        pair = dkimkeys.generate(kind)
        key = SigningKey("bench.test", "bench", kind, pair.private_pem)
        out[f"sign_{kind}_ms"] = per_call_ms(lambda k=key: signer.sign(MESSAGE, k), seconds)
        if kind == "rsa":
            private: Any = serialization.load_pem_private_key(
                pair.private_pem.encode(), password=None
            )
            digest = hashlib.sha256(MESSAGE).digest()
            pad, pre = padding.PKCS1v15(), Prehashed(hashes.SHA256())
            out["rsa2048_private_key_step_ms"] = per_call_ms(
                lambda p=private, d=digest, a=pad, h=pre: p.sign(d, a, h), seconds
            )
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=1.0)
    print(json.dumps(measure(p.parse_args().seconds)))
