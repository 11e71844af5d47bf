"""Passwords: generation, policy, Argon2id hashing in a bounded pool, rehash detection."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
import unicodedata

import pytest
from argon2 import PasswordHasher, Type

from relay.config import Config
from relay.config_sections import Argon2Params
from relay.errors import Invalid
from relay.store import passwords
from relay.store.passwords import Hasher
from tests import leaks


def _auth(cfg: Config, **argon2: int) -> Config:
    params = dataclasses.replace(cfg.auth.argon2, **argon2)
    return dataclasses.replace(cfg, auth=dataclasses.replace(cfg.auth, argon2=params))


def test_generated_passwords_are_strong_and_distinct() -> None:
    seen = {passwords.generate_password() for _ in range(200)}
    assert len(seen) == 200
    for pw in seen:
        assert len(pw) == passwords.GENERATED_LENGTH
        assert set(pw) <= set(passwords.ALPHABET)
    assert passwords.entropy_bits() >= 128
    assert not set("0O1lI") & set(passwords.ALPHABET)  # nothing to misread when copying by eye
    assert len(passwords.generate_password(40)) == 40
    with pytest.raises(ValueError):
        passwords.generate_password(10)  # 10 characters cannot carry 128 bits


@pytest.mark.parametrize(
    ("password", "message"),
    [
        ("short-pw", "too short"),
        ("x" * 12 + "\0abc", "control character"),
        ("correct horse\nbattery", "control character"),
        ("tab\tseparated-pass", "control character"),
        ("a" * 20, "one character repeated"),
        ("ü" * 300 + "abc" + "é" * 300, "too long"),  # 1203 bytes in UTF-8, 603 characters
    ],
)
def test_policy_rejects(cfg: Config, password: str, message: str) -> None:
    leaks.add(password)
    with pytest.raises(Invalid, match=message) as exc:
        passwords.check_policy(password, cfg)
    assert password not in str(exc.value)


def test_policy_accepts_long_unicode_and_spaces(cfg: Config) -> None:
    for pw in ("correct horse battery staple", "pässwörd-mit-ümlaut", "x" * 1000 + "y"):
        passwords.check_policy(pw, cfg)
    strict = dataclasses.replace(cfg, auth=dataclasses.replace(cfg.auth, min_password_length=30))
    with pytest.raises(Invalid, match="at least 30"):
        passwords.check_policy("correct horse battery", strict)


async def test_hash_and_verify(hasher: Hasher) -> None:
    pw = leaks.add(passwords.generate_password())
    h = await hasher.hash(pw)
    assert h.startswith("$argon2id$v=19$m=1024,t=1,p=1$")
    assert pw not in h
    assert await hasher.verify(h, pw)
    assert not await hasher.verify(h, pw + "x")
    assert not await hasher.verify("not a hash", pw)  # corrupt hash: a mismatch, not a crash
    assert not await hasher.verify(h.replace("$argon2id$", "$argon2xx$"), pw)
    assert await hasher.hash(pw) != h  # salted


async def test_needs_rehash_when_parameters_change(cfg: Config) -> None:
    cheap = Hasher(cfg.auth)
    dearer = Hasher(_auth(cfg, time_cost=2, memory_kib=2048).auth)
    try:
        pw = leaks.add("rehash-me-please-123")
        old = await cheap.hash(pw)
        assert not cheap.needs_rehash(old)
        assert dearer.needs_rehash(old)
        assert await dearer.verify(old, pw)  # the parameters are read from the hash itself
        new = await dearer.hash(pw)
        assert not dearer.needs_rehash(new)
        assert "m=2048,t=2" in new
        assert not dearer.needs_rehash("garbage")
    finally:
        cheap.close()
        dearer.close()


async def test_dummy_verify_counts_as_one_verification(hasher: Hasher) -> None:
    before = hasher.verifications
    await hasher.verify_dummy("whatever-the-client-sent")
    assert hasher.verifications == before + 1
    dummy = await hasher.dummy_hash()
    assert dummy == await hasher.dummy_hash()  # made once
    assert not hasher.needs_rehash(dummy)  # same parameters as real hashes: same cost


def test_pool_size_follows_config(cfg: Config) -> None:
    default = Hasher(cfg.auth)
    one = Hasher(dataclasses.replace(cfg.auth, verify_threads=1))
    try:
        assert default.workers == (os.cpu_count() or 1)
        assert one.workers == 1
    finally:
        default.close()
        one.close()


async def test_hashing_runs_in_a_bounded_pool_off_the_loop(cfg: Config) -> None:
    """Many verifies at once use at most verify_threads threads and leave the loop running."""
    auth = dataclasses.replace(
        cfg.auth, verify_threads=2, argon2=Argon2Params(time_cost=2, memory_kib=8192)
    )
    h = Hasher(auth)
    try:
        pw = leaks.add("bounded-pool-password")
        stored = await h.hash(pw)
        ticks = 0
        peak_threads = 0
        done = False

        async def ticker() -> None:
            nonlocal ticks, peak_threads
            while not done:
                ticks += 1
                names = [t.name for t in threading.enumerate() if t.name.startswith("argon2")]
                peak_threads = max(peak_threads, len(names))
                await asyncio.sleep(0)  # sleep-ok: a yield, to count loop turns during hashing

        task = asyncio.create_task(ticker())
        results = await asyncio.gather(*(h.verify(stored, pw) for _ in range(12)))
        done = True
        await task
        assert all(results)
        assert 1 <= peak_threads <= 2  # seen at all, and never more than the bound
        # 12 verifies of ~10 ms each on 2 threads: a loop blocked by argon2 would barely turn.
        assert ticks > 12
    finally:
        h.close()


def test_generated_passwords_are_26_characters_of_151_bits() -> None:
    password = passwords.generate_password()
    assert len(password) == 26 and set(password) <= set(passwords.ALPHABET)
    assert passwords.entropy_bits() == pytest.approx(151.6, abs=0.1)


def test_a_generated_password_of_128_bits_is_the_shortest_allowed() -> None:
    """22 characters carry 128.3 bits: allowed; 21 carry 122.5: refused."""
    assert len(passwords.generate_password(22)) == 22
    with pytest.raises(ValueError, match="128 bits"):
        passwords.generate_password(21)


def test_password_length_limits_are_inclusive() -> None:
    passwords.check_password("k" + "x" * 11, min_length=12)  # exactly the minimum
    with pytest.raises(Invalid, match="too short"):
        passwords.check_password("k" + "x" * 10, min_length=12)
    at_limit = "k" + "x" * (passwords.MAX_PASSWORD_BYTES - 1)
    assert passwords.MAX_PASSWORD_BYTES == 1024
    passwords.check_password(at_limit, min_length=12)  # exactly 1024 bytes
    with pytest.raises(Invalid, match="at most 1024 bytes"):
        passwords.check_password(at_limit + "x", min_length=12)
    # Counted in UTF-8 bytes, not characters: 512 two-byte characters are 1024 bytes.
    passwords.check_password("é" * 511 + "k", min_length=12)
    with pytest.raises(Invalid, match="too long"):
        passwords.check_password("é" * 512 + "k", min_length=12)


def test_a_new_hasher_has_counted_no_verification(cfg: Config) -> None:
    h = Hasher(cfg.auth)
    try:
        assert h.verifications == 0
    finally:
        h.close()


async def test_close_waits_for_the_running_hash_and_cancels_the_queued(cfg: Config) -> None:
    auth = dataclasses.replace(
        cfg.auth, verify_threads=1, argon2=Argon2Params(time_cost=2, memory_kib=8192)
    )
    h = Hasher(auth)
    tasks = [asyncio.create_task(h.hash(f"queued-password-{i}")) for i in range(4)]
    await asyncio.sleep(0)  # sleep-ok: one turn: each task hands its hash to the pool
    h.close()
    # wait=True: the pool's one thread has finished by the time close() returns.
    assert [t.name for t in threading.enumerate() if t.name.startswith("argon2")] == []
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[0], str)  # the running one finished
    assert all(isinstance(r, asyncio.CancelledError) for r in results[1:]), results


# --- SASLprep (RFC 4013): issue 12, item 10 ------------------------------------------------------

COMPOSED = "Pa\u00dfw\u00f6rd-tr\u00e8s-s\u00fbr"  # NFC: ö, è and û as one code point each
DECOMPOSED = unicodedata.normalize("NFD", COMPOSED)


def _unprepared_hash(cfg: Config, password: str) -> str:
    """A hash as relaybox made it before SASLprep: argon2 over the password as the client sent it,
    with the same parameters as the hasher of ``cfg``."""
    p = cfg.auth.argon2
    ph = PasswordHasher(
        time_cost=p.time_cost, memory_cost=p.memory_kib, parallelism=p.parallelism, type=Type.ID
    )
    return ph.hash(password)


async def test_a_decomposed_password_matches_the_composed_one(hasher: Hasher) -> None:
    """RFC 4013 2.2 (NFKC): the two forms are one password, whichever was set."""
    leaks.add(COMPOSED)
    leaks.add(DECOMPOSED)
    assert COMPOSED != DECOMPOSED
    for set_as in (COMPOSED, DECOMPOSED):
        stored = await hasher.hash(set_as)
        for sent in (COMPOSED, DECOMPOSED):
            assert await hasher.verify(stored, sent), (set_as, sent)
        assert not await hasher.verify(stored, COMPOSED + "x")


async def test_a_hash_made_before_saslprep_still_verifies(cfg: Config, hasher: Hasher) -> None:
    """Hashes stored before this change are of the password as the client sent it: that form
    still matches (as "raw": users.verify upgrades such a hash), the prepared form first."""
    leaks.add(DECOMPOSED)
    old = _unprepared_hash(cfg, DECOMPOSED)
    before = hasher.verifications
    assert await hasher.match(old, DECOMPOSED) == "raw"
    assert hasher.verifications == before + 2  # the prepared form, then the raw one
    new = await hasher.hash(DECOMPOSED)
    assert await hasher.match(new, DECOMPOSED) == "prepared"
    assert await hasher.match(new, COMPOSED) == "prepared"
    assert await hasher.match(new, "wrong-password-123") is None


@pytest.mark.parametrize(
    ("password", "forms"),
    [
        ("plain-ascii-password", 1),  # SASLprep changes nothing: one argon2 verify
        (COMPOSED, 1),
        (DECOMPOSED, 2),  # changed by NFKC: the prepared form and the raw one
        ("with\u00a0no-break space", 2),
        ("line\u2028separator-inside", 1),  # not preparable: the raw form only (an old password)
    ],
)
async def test_a_wrong_password_and_the_dummy_cost_the_same_verifies(
    hasher: Hasher, password: str, forms: int
) -> None:
    """The number of argon2 verifies depends only on the password sent: a wrong password for a
    real hash and the dummy verify of an unknown user pay the same."""
    leaks.add(password)
    stored = await hasher.hash("another-password-456")
    before = hasher.verifications
    assert await hasher.match(stored, password) is None
    assert hasher.verifications == before + forms
    await hasher.verify_dummy(password)
    assert hasher.verifications == before + 2 * forms


@pytest.mark.parametrize(
    ("password", "message"),
    [
        ("emoji-\U0001f600-password", "unassigned"),
        ("private-\ue000-password", "private use"),
        ("line\u2028separator-inside", "control character"),
        ("\u0627\u0644\u0633\u0631-and-latin", "right-to-left"),
        ("short\u00ad\u00ad\u00ad\u00ad\u00ad\u00ad\u00ad", "too short"),  # 5 once prepared
        ("\u2168" * 12, "one character repeated"),  # "IX" twelve times: not one character
    ],
)
def test_the_policy_judges_the_prepared_password(cfg: Config, password: str, message: str) -> None:
    leaks.add(password)
    if message == "one character repeated":
        passwords.check_policy(password, cfg)  # "IXIX...": prepared, it is not one character
        with pytest.raises(Invalid, match=message):
            passwords.check_policy("\u00aa" * 12, cfg)  # "a" twelve times once prepared
        return
    with pytest.raises(Invalid, match=message) as exc:
        passwords.check_policy(password, cfg)
    assert password not in str(exc.value)


async def test_a_password_saslprep_refuses_is_never_hashed(hasher: Hasher) -> None:
    """Hasher.hash prepares what it hashes: a caller that skipped the policy still cannot store
    an unprepared or unpreparable password."""
    with pytest.raises(Invalid, match="unassigned"):
        await hasher.hash("emoji-\U0001f600-password")
