"""DATA's bulk scans of whole lines (relay/smtp/data.py ``_unstuffed``, ``_normalized``) against a
reader that takes one line at a time, as RFC 5321 4.5.2 and 4.5.3.1.6 put it: a stuffed dot
removed, no NUL, no CR that does not end a line, at most 998 octets of text; a bare LF ends a line
only when ``bare_newline = "normalize"``. The scans are a few passes over the whole region (and
a shorter path when there is no bare LF); whatever the path, they must say what the line reader
says, for lines of every kind."""

from __future__ import annotations

import random

import pytest

from relay.smtp import data

PIECES = [
    b"",
    b".",
    b"..",
    b".x",
    b"x.",
    b"Subject: hi",
    b"a" * 998,
    b"a" * 999,  # one octet too many
    b"." + b"a" * 998,  # stuffed: 998 octets of text once its dot is removed
    b"a\rb",  # a CR inside a line
    b"a\0b",
    b"trailing cr\r",  # with a bare LF after it: CR LF, a line end after all
]


def line_reader(region: bytes, normalize: bool) -> bytes | None:
    """One line at a time: what DATA keeps of ``region`` (whole lines), or None at a fault."""
    out = []
    rest = region
    while rest:
        end = rest.find(b"\n")
        assert end >= 0, "a region is whole lines"
        line, rest = rest[:end], rest[end + 1 :]
        if line.endswith(b"\r"):
            line = line[:-1]
        elif not normalize:
            return None  # a bare LF
        if b"\r" in line or b"\0" in line:
            return None
        if line.startswith(b"."):
            line = line[1:]
        if len(line) > 998:
            return None
        out.append(line + b"\r\n")
    return b"".join(out)


def regions(seed: int, count: int) -> list[bytes]:
    rng = random.Random(seed)
    made = []
    for _ in range(count):
        lines = [rng.choice(PIECES[:6]) for _ in range(rng.randint(1, 12))]
        if rng.random() < 0.5:  # now and then a line of another kind, anywhere
            lines[rng.randrange(len(lines))] = rng.choice(PIECES)
        ends = [b"\n" if rng.random() < 0.15 else b"\r\n" for _ in lines]
        made.append(b"".join(line + end for line, end in zip(lines, ends, strict=True)))
    return made


@pytest.mark.parametrize("normalize", [False, True], ids=["reject", "normalize"])
def test_the_bulk_scans_keep_what_a_line_reader_keeps(normalize: bool) -> None:
    scan = data._normalized if normalize else data._unstuffed
    seen = {True: 0, False: 0}
    for region in regions(seed=17, count=3000):
        expected = line_reader(region, normalize)
        assert scan(region) == expected, region
        seen[expected is None] += 1
    assert min(seen.values()) > 300  # both outcomes, often: the cases are not all one kind
