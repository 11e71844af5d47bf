"""Secrets seen by a test (passwords, AUTH payloads, DKIM keys), to check logs and output for.

The autouse fixture in conftest.py calls :func:`check` at the end of every test: every captured
log record (message and traceback) and everything a test :func:`observe`-d (SMTP replies read by
tests/dialogue.py, CLI and ``--json`` output) is searched for every registered secret.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterable

_secrets: set[str] = set()
_observed: list[str] = []


def reset() -> None:
    _secrets.clear()
    _observed.clear()


def add(secret: str) -> str:
    """Register a secret (and the base64 forms a client would send); returns it unchanged."""
    if len(secret) >= 6:
        _secrets.add(secret)
        _secrets.add(base64.b64encode(secret.encode()).decode().rstrip("="))
    return secret


def add_auth_payload(login: str, password: str) -> None:
    add(password)
    blob = base64.b64encode(f"\0{login}\0{password}".encode()).decode()
    _secrets.add(blob.rstrip("="))


def add_pem(pem: str | bytes) -> None:
    """Register a PEM private key by its base64 lines: a log would show it whole, cut or with its
    newlines escaped (a repr), and each line alone is as secret as the key."""
    text = pem.decode("ascii") if isinstance(pem, bytes) else pem
    for line in text.splitlines():
        if line.strip() and not line.startswith("-----"):
            add(line.strip())


def observe(text: str) -> str:
    """Remember something a client or an operator was shown, for the end-of-test check."""
    _observed.append(text)
    return text


def find_in(text: str) -> list[str]:
    return [s for s in _secrets if s in text]


def check(records: Iterable[logging.LogRecord]) -> list[str]:
    """The registered secrets found in these log records or in anything observed."""
    text = "\n".join(r.getMessage() + (("\n" + r.exc_text) if r.exc_text else "") for r in records)
    return find_in(text + "\n" + "\n".join(_observed))
