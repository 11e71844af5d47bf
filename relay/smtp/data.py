"""Reading DATA (RFC 5321 4.1.1.4) in bulk, with exactly the results of reading it line by line.

What a message is, whatever the reads look like:

- Only ``CRLF . CRLF`` ends it: a line holding one dot, where the first line counts as following a
  CRLF. Nothing else (``LF . LF``, ``CR . CR``...) ends it, so nothing after a lax end can become
  a second transaction (SMTP smuggling).
- A bare CR or LF, or a NUL, refuses the message (554 5.6.0) once its end is read; so does a line of
  more than 998 octets of text (CRLF and a stuffed dot not counted, RFC 5321 4.5.3.1.6). The tail
  of a line is never a line start: a dot after a cut cannot end DATA.
- With ``normalize`` (``limits.bare_newline = "normalize"``, Postfix 3.9's default) a bare LF is a
  line end instead, stored as CRLF: its line's length counts to it, and a dot after it is unstuffed
  like any line start; but it is never the CRLF before an end (``LF . CRLF`` ends nothing). A bare
  CR and a NUL are still refused.
- Dot-stuffing is undone (RFC 5321 4.5.2); ``limits.max_message_size`` holds for the message as
  stored, whatever SIZE= said (552 5.3.4); the first fault wins and the rest is read, not kept.
- Memory is reserved from the budget before it is held: the declared SIZE= at once (or one
  STEP without it), then in STEPs as the message grows; no room is 451 4.3.1. A refused message
  gives its room back at once (the rest of it is read, not kept).
- Past SPILL_AT octets, once its header section is complete, a message's body goes to disk as it
  arrives (relay/smtp/spill.py: hashed for DKIM on the way) and only the header section and the
  last CHUNK stay in memory: what a large message holds of the budget stops growing there.

How it reads: ``readuntil(CRLF.CRLF)`` takes everything up to the end of the message at once, or,
without an end in sight, all the reader holds but its last four octets (which may begin the end);
each piece is checked with a few scans for the rare faults, so an 8 MiB message costs a few dozen
reads rather than a few million. Two states need more than readuntil's lookahead: the start
(the end may be the first line) and, inside a line too long to keep, after taking all but one
octet (only a CRLF matters there): then what the reader holds is taken whole and everything after
the end of the message, or the last four octets, is given back to the reader
(``StreamReader.feed_data`` on an empty buffer), where the session's command loop reads it.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from relay import replies
from relay.replies import Reply
from relay.smtp.gate import MemoryHold
from relay.smtp.spill import CHUNK, SPILL_AT, Spill

log = logging.getLogger("relaybox.data")

END = b"\r\n.\r\n"
_AHEAD = len(END) - 1  # octets left unread after a cut: an end may begin in them
# Held in memory per message: the content (1x) plus the copies made when the message is completed,
# signed and stored; measured at 5-6x its size (tests/hostile/test_resources.py).
MEMORY_FACTOR = 6
STEP = 64 * 1024  # message octets reserved at a time when no SIZE= was declared, or beyond it
_MAX_TEXT = 998  # octets of text on a line (RFC 5321 4.5.3.1.6)
# aiosmtpd's stream limit (SMTP.line_length_limit): the per-line reader this one replaces took a
# line of more text than this as too long before looking at its octets (a NUL or a bare CR in it
# then changes nothing), a shorter one whole. The same order of checks, on any cut.
_CUT = 1001
_ALL = 1 << 30  # more than a StreamReader buffers (its transport pauses past twice its limit)


def declared_size(mail_options: list[str]) -> int | None:
    """The ``SIZE=`` of MAIL FROM (RFC 1870; aiosmtpd checked it is digits within the limit)."""
    for option in mail_options:
        name, _, value = option.partition("=")
        if name.upper() == "SIZE" and value.isdigit():
            return int(value)
    return None


class DataReader:
    """One message after 354: ``begin()`` reserves its first memory, ``read()`` reads it."""

    def __init__(
        self,
        limit: int,
        hold: MemoryHold,
        declared: int | None,
        *,
        normalize: bool,
        spill_dir: Path | None = None,
        disk: MemoryHold | None = None,
    ) -> None:
        """``spill_dir``: where a body past SPILL_AT goes (relay/smtp/spill.py), within the
        ``disk`` hold (released by the caller once the file is closed); None: held."""
        self.limit = limit
        self.spill_dir = spill_dir if disk is not None else None
        self.disk = disk
        self.spill: Spill | None = None  # the body, once on disk (then ``head`` is the rest)
        self.head = b""
        self.stored = 0  # message octets so far, held or on disk
        self._no_head = False  # past SPILL_AT without a complete header section: held whole
        self.normalize = normalize  # a bare LF is a line end, stored as CRLF
        self._eol = b"\n" if normalize else b"\r\n"  # what ends a line
        self.hold = hold
        self.first = min(STEP if declared is None else declared, limit)
        if self.spill_dir is not None:  # what is held at most, once the body goes to disk
            self.first = min(self.first, SPILL_AT + CHUNK)
        self.covered = 0  # message octets the hold has room for
        self.kept = bytearray()
        self.problem: Reply | None = None
        self.done = False
        self._tail = b"\r\n"  # the last four octets read, after a CRLF before the first one
        self._line = b""  # the line being read, up to its CRLF; once too long, only a CR it ends in
        self._long = False
        self._at_crlf = True  # whether the line being read follows a CRLF: only then may it end

    def begin(self) -> bool:
        """Reserve room for the declared size (or one STEP); False if there is none."""
        if not self.hold.grow_to(MEMORY_FACTOR * self.first):
            return False
        self.covered = self.first
        return True

    async def read(self, reader: asyncio.StreamReader) -> tuple[Reply | None, bytes | None]:
        """Read to the end of the message: (the refusal, None), or (None, the content).

        On EOF, IncompleteReadError, as the stream's own reads raise it.
        """
        safe = False  # whether no end of the message can have begun in what was taken
        pending = b""
        while not self.done:
            await self._spill_some()
            if safe:
                try:
                    self._feed(await reader.readuntil(END))  # the first end: the message's own
                    continue
                except asyncio.LimitOverrunError as exc:
                    # No end in what the reader holds: take all of it but _AHEAD octets.
                    self._feed(await reader.readexactly(exc.consumed))
                    safe = await self._in_long_line_take(reader, _AHEAD - 1)
                continue
            pending += await _everything(reader)
            end = self._end_in(pending)
            if end >= 0:
                self._feed(pending[:end])
                _give_back(reader, pending[end:])
            elif len(pending) >= _AHEAD:
                # An end beginning in what is taken would lie wholly in what was read: none.
                self._feed(pending[:-_AHEAD])
                _give_back(reader, pending[-_AHEAD:])
                pending = b""
                safe = await self._in_long_line_take(reader, _AHEAD - 1)
        await self._spill_some()
        if self.problem is not None:
            return self.problem, None
        if self.spill is not None:
            return None, self.head
        return None, bytes(self.kept)

    async def _spill_some(self) -> None:
        """Past SPILL_AT, with its header section complete: the body to disk, CHUNK at a time
        (and the rest at the end), the header section kept as ``head``."""
        if self.problem is not None or self.spill_dir is None or self._no_head:
            return
        if self.spill is None:
            if len(self.kept) < SPILL_AT:
                return
            end = self.kept.find(b"\r\n\r\n")
            if end < 0 or self.kept.startswith(b"\r\n"):  # no header section to keep apart
                self._no_head = True
                return
            self.head = bytes(self.kept[: end + 4])
            del self.kept[: end + 4]
            self.spill = Spill(self.spill_dir)
        if len(self.kept) >= CHUNK or (self.done and self.kept):
            data, self.kept = self.kept, bytearray()
            assert self.disk is not None
            if not self.disk.grow_to(self.spill.size + len(data)):  # over the disk budget
                self._refuse(replies.INSUFFICIENT_STORAGE)
                return
            try:
                await self.spill.write(bytes(data))
            except OSError as exc:  # a full disk, a file too large: as when the spool cannot grow
                log.error("could not write a message body to disk: %s", exc.strerror or exc)
                self._refuse(replies.TEMP_FAILURE)

    async def _in_long_line_take(self, reader: asyncio.StreamReader, n: int) -> bool:
        """After taking all the reader holds but _AHEAD octets: inside a line too long to keep
        only its CRLF matters, so take ``n`` more of them too (the reader keeps one, as the
        per-line reader did: it may be the CR). Whether still no end can have begun in what was
        taken (else the next read takes what the reader holds whole)."""
        if not self._long:
            return True
        self._feed(await reader.readexactly(n))
        return not self._tail.endswith((b"\r", b"\r\n", b"\r\n."))

    def _end_in(self, data: bytes) -> int:
        """Where in ``data`` (read next) the message ends, just past its last octet; -1 if not."""
        at = (self._tail + data).find(END)
        return -1 if at < 0 else at + len(END) - len(self._tail)

    def _feed(self, data: bytes) -> None:
        """Take the next octets of the stream, up to the end of the message at most."""
        self._tail = (self._tail + data[-4:])[-4:]
        text = self._line + data  # begins at a line start, unless in a long line
        pos = 0
        if self._long:
            eol = text.find(self._eol)
            if eol < 0:
                self._line = b"\r" if text.endswith(b"\r") else b""
                return
            self._long = False
            pos = eol + len(self._eol)
            self._at_crlf = text.endswith(b"\r\n", 0, pos)
        if self._at_crlf and text.startswith(b".\r\n", pos):
            last = pos  # the line of the end
        else:
            last = text.find(END, pos)
            last = last + 2 if last >= 0 else -1
        if last >= 0:
            self._lines(text[pos:last])
            self.done = True
            return
        eol = text.rfind(self._eol, pos)
        if eol >= 0:
            self._lines(text[pos : eol + len(self._eol)])
            pos = eol + len(self._eol)
            self._at_crlf = text.endswith(b"\r\n", 0, pos)
        rest = text[pos:]
        if len(rest) - rest.endswith(b"\r") > _CUT:  # more text than _CUT, wherever its CRLF
            self._refuse(replies.LINE_TOO_LONG)
            self._long = True
            rest = b"\r" if rest.endswith(b"\r") else b""
        self._line = rest

    def _lines(self, region: bytes) -> None:
        """Whole lines, each with its CRLF: kept, or the first fault among them refuses."""
        if self.problem is not None or not region:
            return
        body = _normalized(region) if self.normalize else _unstuffed(region)
        if body is None or self.stored + len(body) > self.limit:
            self._refuse(_first_fault(region, self.stored, self.limit, self.normalize))
        elif not self._cover(len(self.head) + len(self.kept) + len(body)):  # what is held
            self._refuse(replies.MEMORY_BUSY)
        else:
            self.kept += body
            self.stored += len(body)

    def _cover(self, size: int) -> bool:
        """Room in the hold for ``size`` octets of message (at most the limit), in STEPs."""
        if size <= self.covered:
            return True
        want = min(-(-size // STEP) * STEP, self.limit)
        if not self.hold.grow_to(MEMORY_FACTOR * want):
            return False
        self.covered = want
        return True

    def _refuse(self, reply: Reply) -> None:
        if self.problem is None:
            self.problem = reply
            self.kept = bytearray()
            # Nothing more of it is kept: its room goes back to the budget now, not when its
            # end is read, so the messages still being kept can grow into it (32 DATAs growing
            # together otherwise all run out together, and none is accepted).
            self.hold.release()
            self.covered = 0


def _unstuffed(region: bytes) -> bytes | None:
    """The lines with their stuffed dots removed, or None if one has a bare CR or LF, a NUL, or
    more than 998 octets of text: a few scans of the whole region, not a loop over its lines."""
    crlf = region.count(b"\r\n")
    if region.count(b"\r") != crlf or region.count(b"\n") != crlf or b"\0" in region:
        return None
    return _crlf_unstuffed(region, crlf)


def _crlf_unstuffed(region: bytes, crlf: int) -> bytes | None:
    """_unstuffed's work past its checks, for a region whose ``crlf`` line ends are all."""
    body = region[1:] if region.startswith(b".") else region
    body = body.replace(b"\r\n.", b"\r\n")  # each CRLF ends a line: a dot after it starts one
    if len(body) - 2 * crlf > _MAX_TEXT and max(map(len, body.split(b"\r\n"))) > _MAX_TEXT:
        return None
    return body


def _normalized(region: bytes) -> bytes | None:
    """As _unstuffed, with a bare LF as a line end too: the lines with CRLF line ends."""
    crlf = region.count(b"\r\n")
    if region.count(b"\r") != crlf or b"\0" in region:
        return None
    if region.count(b"\n") == crlf:  # no bare LF (every client but a broken one): three passes
        return _crlf_unstuffed(region, crlf)
    body = region.replace(b"\r\n", b"\n")
    lines = body.count(b"\n")
    body = body[1:] if body.startswith(b".") else body
    body = body.replace(b"\n.", b"\n")
    if len(body) - lines > _MAX_TEXT and max(map(len, body.split(b"\n"))) > _MAX_TEXT:
        return None
    return body.replace(b"\n", b"\r\n")


def _first_fault(region: bytes, kept: int, limit: int, normalize: bool) -> Reply:
    """The refusal of the first line at fault, checked in the per-line reader's order."""
    size = kept
    if normalize:  # the lines end at each LF; a CR before it is its CRLF's
        region = region.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    for line in region.split(b"\r\n")[:-1]:
        stuffed = line.startswith(b".")
        if len(line) > _CUT:
            return replies.LINE_TOO_LONG
        if b"\r" in line or b"\n" in line:
            return replies.BARE_LINE_ENDING
        if b"\0" in line:
            return replies.NUL_IN_MESSAGE
        if len(line) - stuffed > _MAX_TEXT:
            return replies.LINE_TOO_LONG
        size += len(line) + 2 - stuffed
        if size > limit:
            return replies.MESSAGE_TOO_BIG
    return replies.MESSAGE_TOO_BIG  # not reached: the caller saw a fault or the size


async def _everything(reader: asyncio.StreamReader) -> bytes:
    """All the reader holds (waiting for some if it holds none), leaving it empty."""
    data = await reader.read(_ALL)
    if not data:
        raise asyncio.IncompleteReadError(b"", None)
    return data


def _give_back(reader: asyncio.StreamReader, data: bytes) -> None:
    """Put octets taken but not the message's back into the (empty) reader, for the session."""
    if data and not reader.at_eof():  # after EOF the session is over: nothing reads them
        reader.feed_data(data)
