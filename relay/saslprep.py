"""SASLprep (RFC 4013): the stringprep profile (RFC 3454) for SASL user names and passwords.

RFC 4616 2 (PLAIN) recommends preparing both the presented password and the stored one with it,
so that one password typed on two systems is one password: a composed "ö" and an "o" followed by
a combining diaeresis, a no-break space and a space, a soft hyphen and nothing at all.

The steps, in the order RFC 3454 section 3 fixes, over Unicode 3.2 (the version stringprep is
defined on; Python's :mod:`stringprep` and ``unicodedata.ucd_3_2_0`` carry its tables):

1. map (RFC 4013 2.1): non-ASCII spaces (C.1.2) to SPACE, "commonly mapped to nothing" (B.1)
   to nothing;
2. normalize (2.2): NFKC;
3. prohibit (2.3): C.1.2, C.2.1, C.2.2, C.3 to C.9 (controls, private use, non-characters,
   surrogates, characters inappropriate for plain text or canonical representation, display
   changers, tags);
4. bidi (2.4, RFC 3454 6): right-to-left text may not mix with left-to-right text, and begins and
   ends with a right-to-left character;
5. unassigned (2.5, RFC 3454 7): a *stored* string must not contain code points unassigned in
   Unicode 3.2 (a later version may map them, and the stored form would then no longer match);
   a *query* may.

Errors name the rule broken, never the string or the character: the string is a password.
"""

from __future__ import annotations

import stringprep
import unicodedata
from collections.abc import Callable

_UCD = unicodedata.ucd_3_2_0


class SASLprepError(ValueError):
    """The string cannot be prepared. The message names the rule, never the string."""


# RFC 4013 2.3, each with the words an error uses for it.
_PROHIBITED: tuple[tuple[Callable[[str], bool], str], ...] = (
    (stringprep.in_table_c12, "a non-ASCII space (C.1.2)"),
    (stringprep.in_table_c21, "a control character (C.2.1)"),
    (stringprep.in_table_c22, "a control character (C.2.2)"),
    (stringprep.in_table_c3, "a private use character (C.3)"),
    (stringprep.in_table_c4, "a non-character code point (C.4)"),
    (stringprep.in_table_c5, "a surrogate code point (C.5)"),
    (stringprep.in_table_c6, "a character that is not plain text (C.6)"),
    (stringprep.in_table_c7, "an ideographic description character (C.7)"),
    (stringprep.in_table_c8, "a character that changes display properties (C.8)"),
    (stringprep.in_table_c9, "a tagging character (C.9)"),
)


def map_and_normalize(text: str) -> str:
    """RFC 4013 2.1 and 2.2: the mapping, then NFKC. What logins use (their grammar is checked
    afterwards, and an IDN domain may well be right-to-left while its local part is not)."""
    mapped = "".join(
        " " if stringprep.in_table_c12(c) else c for c in text if not stringprep.in_table_b1(c)
    )
    return _UCD.normalize("NFKC", mapped)


def saslprep(text: str, *, stored: bool) -> str:
    """``text`` prepared (RFC 4013): ``stored=True`` for a string being stored (a password being
    set: unassigned code points refused), ``False`` for one being checked against it."""
    prepared = map_and_normalize(text)
    for c in prepared:
        for prohibited, what in _PROHIBITED:
            if prohibited(c):
                raise SASLprepError(f"contains {what}, which SASLprep (RFC 4013) prohibits")
        if stored and stringprep.in_table_a1(c):
            raise SASLprepError(
                "contains a code point unassigned in Unicode 3.2 (such as a recent emoji), "
                "which SASLprep (RFC 4013) refuses in a stored string"
            )
    _check_bidi(prepared)
    return prepared


def _check_bidi(text: str) -> None:
    """RFC 3454 6: with any RandALCat character, no LCat one, and RandALCat at both ends."""
    if not any(stringprep.in_table_d1(c) for c in text):
        return
    if any(stringprep.in_table_d2(c) for c in text):
        raise SASLprepError("mixes right-to-left and left-to-right text (RFC 3454 6)")
    if not (stringprep.in_table_d1(text[0]) and stringprep.in_table_d1(text[-1])):
        raise SASLprepError(
            "has right-to-left text that does not begin and end right-to-left (RFC 3454 6)"
        )
