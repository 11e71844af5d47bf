"""The DKIM body hash of a message body read in pieces (RFC 6376 3.4.4 relaxed, 3.7 bh=).

A message too large to hold in memory is written to disk as it arrives (relay/smtp/spill.py) and
its body hash computed on the way, so signing it needs only its header section in memory
(relay.dkim.Signer.sign with ``body_hash``). The result is what dkimpy's relaxed body
canonicalisation hashes for the whole body at once, whatever the pieces; tests/test_dkim_stream.py
compares the two on awkward bodies cut everywhere.

Each piece is cut after its last CRLF; the whole lines are canonicalised (white space at a line's
end removed, runs of it made one space: neither crosses a CRLF, so lines may be done in any
grouping) and the partial line waits for the next piece. Empty lines are held back and hashed
only once a non-empty line follows them: those at the end of the body are not part of it.
"""

from __future__ import annotations

import base64
import hashlib
import re

_TRAILING_WSP = re.compile(b"[\t ]+\r\n")
_WSP_RUN = re.compile(b"[\t ]+")
CRLF = b"\r\n"


def strip_trailing_whitespace(content: bytes) -> bytes:
    """White space before each CRLF removed (dkimpy's helper of that name, compiled once and
    skipped where it cannot match; relay.dkim installs it in dkimpy)."""
    if b" \r\n" not in content and b"\t\r\n" not in content:
        return content
    return _TRAILING_WSP.sub(CRLF, content)


def compress_whitespace(content: bytes) -> bytes:
    """Each run of white space made one space (likewise dkimpy's helper)."""
    if b"\t" not in content and b"  " not in content:
        return content
    return _WSP_RUN.sub(b" ", content)


def _canonical_lines(lines: bytes) -> bytes:
    """Whole lines (ending in CRLF), relaxed: dkimpy's two substitutions, in its order."""
    return compress_whitespace(strip_trailing_whitespace(lines))


def _trailing_empty_lines(canon: bytes) -> int:
    """How many CRLFs end ``canon`` one after another (the last line's own included)."""
    kept = len(canon.rstrip(b"\r\n"))
    tail = canon[kept:]
    if tail == CRLF * (len(tail) // 2):
        return len(tail) // 2
    count, end = 0, len(canon)  # a CR or LF of its own among them: count the pairs one by one
    while canon.endswith(CRLF, 0, end):
        count, end = count + 1, end - 2
    return count


class BodyHash:
    """SHA-256 of a body's relaxed canonical form, fed in pieces of any size."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self._partial = b""  # the line begun and not yet ended
        self._empty = 0  # empty lines held back: hashed only if a non-empty line follows
        self._done: bytes | None = None

    def update(self, data: bytes) -> None:
        if self._done is not None:
            raise RuntimeError("the body hash is already final")
        text = self._partial + data if self._partial else data
        cut = text.rfind(CRLF)
        if cut < 0:
            self._partial = text
            return
        self._partial = text[cut + 2 :]
        self._lines(_canonical_lines(text[: cut + 2]))

    def _lines(self, canon: bytes) -> None:
        empty = _trailing_empty_lines(canon)
        if 2 * empty == len(canon):  # nothing but empty lines
            self._empty += empty
            return
        end = len(canon) - 2 * empty + 2  # just past the last non-empty line's CRLF
        if self._empty:
            self._sha.update(CRLF * self._empty)
        self._sha.update(canon[:end] if end < len(canon) else canon)
        self._empty = empty - 1

    def digest(self) -> bytes:
        """The hash, once the whole body was fed (a body not ending in CRLF gets one, as
        dkimpy gives it; an empty body, or one of empty lines only, hashes as empty)."""
        if self._done is None:
            if self._partial:
                line = self._partial
                self._partial = b""
                if self._empty:
                    self._sha.update(CRLF * self._empty)
                self._sha.update(compress_whitespace(line) + CRLF)
                self._empty = 0
            self._done = self._sha.digest()
        return self._done

    def b64(self) -> bytes:
        """The ``bh=`` value."""
        return base64.b64encode(self.digest())
