"""Errors the operator or client can act on. Their text is safe to show (never a secret)."""

from __future__ import annotations


class RelayboxError(Exception):
    """Base of the errors that carry a message meant for a person."""


class NotFound(RelayboxError):
    """The named user, domain or message does not exist."""


class Invalid(RelayboxError):
    """The input is not acceptable (bad name, bad duration, weak password...)."""


class Conflict(RelayboxError):
    """The request clashes with the current state (already exists, domain not verified...)."""
