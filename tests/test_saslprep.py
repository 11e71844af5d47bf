"""SASLprep (RFC 4013), the stringprep profile (RFC 3454) for passwords: relay/saslprep.py."""

from __future__ import annotations

import stringprep
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay import replies, saslprep
from relay.saslprep import SASLprepError
from relay.store import users
from tests import leaks
from tests.dialogue import Dialogue, b64, plain
from tests.hostile.kit import LOGIN
from tests.relayserver import RelayHandle


@pytest.mark.parametrize(
    ("raw", "prepared"),
    [
        # RFC 4013 section 3, the examples that prepare.
        ("I\u00adX", "IX"),  # SOFT HYPHEN is mapped to nothing
        ("user", "user"),
        ("USER", "USER"),  # case is kept (a password is not a name)
        ("\u00aa", "a"),  # NFKC: FEMININE ORDINAL INDICATOR
        ("\u2168", "IX"),  # NFKC: ROMAN NUMERAL NINE, so it matches the first example
        # 2.1: non-ASCII spaces (C.1.2) become SPACE; "commonly mapped to nothing" (B.1) goes.
        ("pass\u00a0word", "pass word"),
        ("pass\u3000word", "pass word"),  # IDEOGRAPHIC SPACE
        ("pass\u200bword", "password"),  # ZERO WIDTH SPACE
        ("pass\ufe0fword", "password"),  # VARIATION SELECTOR-16
        ("zero\u200dwidth", "zerowidth"),  # ZERO WIDTH JOINER (B.1, not prohibited)
        # 2.2: a composed and a decomposed password are one password.
        ("caf\u00e9", "caf\u00e9"),
        ("cafe\u0301", "caf\u00e9"),
        ("\uff30\uff41\uff53\uff53", "Pass"),  # full-width letters
        # 2.4: right-to-left text is fine when it begins and ends right-to-left.
        ("\u0627\u0031\u0628", "\u0627\u0031\u0628"),
        ("", ""),
    ],
)
def test_saslprep_prepares(raw: str, prepared: str) -> None:
    assert saslprep.saslprep(raw, stored=True) == prepared
    assert saslprep.saslprep(raw, stored=False) == prepared


@pytest.mark.parametrize(
    ("raw", "rule"),
    [
        ("bell\u0007", "control character"),  # RFC 4013 section 3, example 6 (C.2.1)
        ("tab\there", "control character"),
        ("nul\u0000", "control character"),
        ("line\u2028separator", "control character"),  # C.2.2
        ("\u0085next line", "control character"),  # C.2.2
        ("private\ue000", "private use"),  # C.3
        ("plane15\U000f0000", "private use"),
        ("non\ufdd0char", "non-character"),  # C.4
        ("non\uffffchar", "non-character"),
        ("surrogate\ud800", "surrogate"),  # C.5
        ("replace\ufffd", "not plain text"),  # C.6
        ("ideo\u2ff0graphic", "ideographic description"),  # C.7
        ("mark\u200e", "display"),  # C.8: LEFT-TO-RIGHT MARK
        ("tag\U000e0001", "tagging"),  # C.9
        # RFC 4013 section 3, example 7: RandALCat with a character that is not.
        ("\u0627\u0031", "right-to-left"),
        ("\u0627a\u0628", "right-to-left"),  # left-to-right text inside right-to-left
        ("a\u0627", "right-to-left"),
    ],
)
def test_saslprep_refuses_prohibited_output(raw: str, rule: str) -> None:
    for stored in (True, False):
        with pytest.raises(SASLprepError, match=rule) as exc:
            saslprep.saslprep(raw, stored=stored)
        assert raw not in str(exc.value)  # a password never reaches a message


@pytest.mark.parametrize("raw", ["emoji-\U0001f600-pass", "d-curl-\u0221-pass"])
def test_unassigned_code_points_only_in_queries(raw: str) -> None:
    """RFC 4013 2.5 / RFC 3454 7: a stored string must not contain code points unassigned in
    Unicode 3.2 (a later Unicode may give them a mapping, and the stored form would no longer
    match); a query may (so an old password with them can still be checked)."""
    assert any(stringprep.in_table_a1(c) for c in raw)
    with pytest.raises(SASLprepError, match="unassigned") as exc:
        saslprep.saslprep(raw, stored=True)
    assert raw not in str(exc.value)
    assert saslprep.saslprep(raw, stored=False) == raw


def test_the_mapping_step_alone_is_what_logins_use() -> None:
    """map_and_normalize is RFC 4013's steps 2.1-2.2 (no prohibition, no bidi check): logins are
    checked by their own grammar afterwards, and an IDN domain may be right-to-left."""
    assert saslprep.map_and_normalize(" \uff41pp\u00ad@example.com\u3000") == " app@example.com "
    assert saslprep.map_and_normalize("a@\u05d0\u05d1.example") == "a@\u05d0\u05d1.example"


SASL_TEXT = st.text(
    alphabet=st.characters(codec="utf-8")
    | st.sampled_from(["\u00ad", "\u00a0", "\u200b", "\u0301", "\u2168", "\u0627", "\ufb01"]),
    max_size=30,
)


@settings(max_examples=500, deadline=None, database=None)
@given(SASL_TEXT)
def test_a_prepared_string_is_its_own_preparation(raw: str) -> None:
    """A stored password is hashed in its prepared form; preparing that form again changes
    nothing, so a client that sends the prepared form itself matches on the first verify."""
    try:
        prepared = saslprep.saslprep(raw, stored=False)
    except SASLprepError as exc:
        assert len(str(exc)) < 200
        return
    assert saslprep.saslprep(prepared, stored=False) == prepared
    assert unicodedata.ucd_3_2_0.normalize("NFKC", prepared) == prepared


async def test_a_password_set_composed_logs_in_decomposed(relay: RelayHandle) -> None:
    """Live, through AUTH PLAIN and AUTH LOGIN: the form a client's keyboard or OS produces does
    not matter (macOS, for one, hands applications decomposed text)."""
    composed = leaks.add("Pa\u00dfw\u00f6rd-tr\u00e8s-s\u00fbr")
    decomposed = leaks.add(unicodedata.normalize("NFD", composed))
    leaks.add_auth_payload(LOGIN, composed)
    leaks.add_auth_payload(LOGIN, decomposed)
    await relay.add_user("other@example.com")  # makes the verified domain
    db = relay.server.db
    assert db is not None
    await users.create(
        db, LOGIN, composed, hasher=relay.hasher, cfg=relay.server.cfg, now=relay.clock(), actor="t"
    )
    for sent in (decomposed, composed):
        d = await Dialogue.open(relay.tls_port, tls=relay.client_context())
        await d.expect_after("EHLO c", "250")
        assert await d.reply_after(f"AUTH PLAIN {plain(LOGIN, sent)}") == str(replies.AUTH_OK)
        await d.close()
        d = await Dialogue.open(relay.tls_port, tls=relay.client_context())
        await d.expect_after("EHLO c", "250")
        await d.expect_after(f"AUTH LOGIN {b64(LOGIN)}", "334")
        assert await d.reply_after(b64(sent)) == str(replies.AUTH_OK)
        await d.close()
