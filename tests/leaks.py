"""Secrets seen by a test (passwords, AUTH payloads, DKIM keys), to check logs and output for."""

from __future__ import annotations

import base64

_secrets: set[str] = set()


def reset() -> None:
    _secrets.clear()


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


def find_in(text: str) -> list[str]:
    return [s for s in _secrets if s in text]
