"""The session's stream reader: aiosmtpd's, plus AUTH lines of up to one AUTH response limit.

One limit for an AUTH response, however it is sent (RFC 4954 4 asks a server to take responses as
long as its mechanisms produce, whatever its line limits elsewhere, and names 12288 octets):

- after a 334, the response line is read by :meth:`CommandReader.read_response`;
- inline, ``AUTH PLAIN <response>``: aiosmtpd reads each command line with ``readuntil()`` under
  the reader's limit (1001 octets) and refuses one over 512 octets (RFC 5321 4.5.3.1.4). An
  AUTH command line is read here whole up to :data:`AUTH_COMMAND_LIMIT` (the session raises
  aiosmtpd's size limit for AUTH alone to match); every other command line keeps 512 octets.

An AUTH command's verb and mechanism are upper-cased before aiosmtpd sees the line: a mechanism
is matched whatever its case (RFC 5321 2.4: argument values are not case sensitive; SASL names
are registered in upper case, RFC 4422 3.1), and aiosmtpd both looks the mechanism up and hides
the response from its own log only for an upper-case ``AUTH``.
Python's smtplib, for one, sends the initial response inline whatever its length.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

AUTH_RESPONSE_LIMIT = 12288  # octets of one AUTH response, inline or after a 334 (RFC 4954 4)
# "AUTH PLAIN <response>": LOGIN is as long a name as PLAIN, the only other mechanism offered.
AUTH_COMMAND_LIMIT = len("AUTH PLAIN ") + AUTH_RESPONSE_LIMIT

_AUTH_VERB = re.compile(rb"auth +\S+", re.IGNORECASE)  # the verb and the mechanism


class CommandReader(asyncio.StreamReader):
    def __init__(
        self, between_commands: Callable[[], bool], *, limit: int, loop: asyncio.AbstractEventLoop
    ) -> None:
        """``between_commands``: true while aiosmtpd is waiting for the next command, false
        while a command runs (DATA and AUTH exchanges read their own lines)."""
        super().__init__(limit=limit, loop=loop)
        self._between_commands = between_commands

    async def readuntil(self, separator: bytes = b"\n") -> bytes:  # type: ignore[override]
        if separator != b"\n" or not self._between_commands():
            return await super().readuntil(separator)
        try:
            line = await super().readuntil(separator)
        except asyncio.LimitOverrunError as exc:
            # Over the reader's limit: an AUTH line is read on; any other line is left to
            # aiosmtpd, which reads the rest of it and says 500. What was taken here is passed
            # over (consumed = 0), so aiosmtpd's skip starts where this one stopped.
            head = await self.readexactly(exc.consumed)
            rest = await self._rest_of_auth_line(head) if _is_auth(head) else None
            if rest is None:
                raise asyncio.LimitOverrunError("command line too long", 0) from None
            line = head + rest
        return _upper_verb(line) if _is_auth(line) else line

    async def _rest_of_auth_line(self, head: bytes) -> bytes | None:
        """The rest of an AUTH command line, LF included; None once it has run past the limit
        without an LF (what is left of it stays in the buffer, for aiosmtpd to pass over). A
        whole line a little over the limit is returned: aiosmtpd's size check refuses it."""
        rest = bytearray()
        while True:
            try:
                rest += await super().readuntil(b"\n")
                return bytes(rest)
            except asyncio.LimitOverrunError as exc:
                rest += await self.readexactly(exc.consumed)
                if len(head) + len(rest) > AUTH_COMMAND_LIMIT + 2:  # + CRLF
                    return None

    async def read_response(self) -> bytes | None:
        """One AUTH response line of up to AUTH_RESPONSE_LIMIT octets (its CRLF not counted),
        or None (the line read whole and discarded) if it is longer."""
        buf = bytearray()
        while True:
            try:
                buf += await super().readuntil(b"\n")
            except asyncio.LimitOverrunError as exc:
                buf += await self.readexactly(exc.consumed)
                # With the LF already in the buffer, what was consumed ends in the line's CR:
                # that octet is the terminator's, not the line's.
                if len(buf) - buf.endswith(b"\r") > AUTH_RESPONSE_LIMIT:
                    await self._discard_line()
                    return None
                continue
            return bytes(buf) if len(buf) <= AUTH_RESPONSE_LIMIT + 2 else None  # + CRLF

    async def _discard_line(self) -> None:
        while True:
            try:
                await super().readuntil(b"\n")
                return
            except asyncio.LimitOverrunError as exc:
                await self.readexactly(exc.consumed)


def _is_auth(line: bytes) -> bool:
    return line[:5].upper() == b"AUTH "  # aiosmtpd's verb is what comes before the first space


def _upper_verb(line: bytes) -> bytes:
    m = _AUTH_VERB.match(line)
    return m.group(0).upper() + line[m.end() :] if m else line
