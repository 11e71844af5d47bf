"""Our fast MAIL/RCPT address parser gives exactly what aiosmtpd's own parser gives."""

from __future__ import annotations

from typing import Any

from aiosmtpd.smtp import SMTP
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.smtp.session import RelaySMTP
from tests.dialogue import Dialogue
from tests.relayserver import RelayHandle

ATEXT = "abcXYZ019!#$%&'*+/=?^_`{|}~-"
atom = st.text(alphabet=ATEXT, min_size=1, max_size=8)
local = st.lists(atom, min_size=1, max_size=3).map(".".join)
label = st.text(alphabet="abcxyz019", min_size=1, max_size=6)
hyphenated = st.tuples(label, label).map("-".join)
domain = st.lists(st.one_of(label, hyphenated), min_size=1, max_size=3).map(".".join)
params = st.sampled_from(["", " SIZE=2048", " BODY=8BITMIME SIZE=1", "  SMTPUTF8"])
noise = st.text(alphabet='<>@." \\:[]()a,;\t', max_size=12)


def both(arg: str) -> tuple[Any, Any]:
    """Ours and aiosmtpd's; where aiosmtpd's parser crashes, ours says "malformed"."""
    fast = RelaySMTP._getaddr(object.__new__(RelaySMTP), arg)
    try:
        ref = SMTP._getaddr(object.__new__(SMTP), arg)
    except Exception:
        ref = (None, None)
    return fast, ref


@settings(max_examples=300, deadline=None)
@given(local, domain, params)
def test_same_as_aiosmtpd_on_plain_addresses(lp: str, dom: str, rest: str) -> None:
    fast, ref = both(f"<{lp}@{dom}>{rest}")
    assert fast == ref


@settings(max_examples=300, deadline=None)
@given(noise, params)
def test_same_as_aiosmtpd_on_odd_input(text: str, rest: str) -> None:
    fast, ref = both(text + rest)
    assert fast == ref


def test_null_path_and_fallbacks() -> None:
    for arg in ["<>", "<> SIZE=1", '<"quoted local"@example.com>', "<a@[127.0.0.1]>", "a@b.c"]:
        fast, ref = both(arg)
        assert fast == ref, arg


async def test_junk_address_is_malformed_not_a_fault(relay: RelayHandle) -> None:
    """aiosmtpd's parser raises IndexError on "<": that must be a 553, not a logged 451."""
    password = await relay.add_user("app@example.com")
    d = await Dialogue.open(relay.tls_port, tls=relay.client_context())
    await d.login("app@example.com", password)
    await d.expect_after("MAIL FROM:<", "553")
    await d.expect_after("MAIL FROM:<app@example.com> SIZE=100", "250 2.1.0")
    await d.expect_after('RCPT TO:<"quoted local"@dest.test>', "250 2.1.5")
    await d.expect_after("RCPT TO:<@", "553")
    await d.close()
