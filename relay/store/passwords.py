"""Password hashing (Argon2id), generation and the password policy.

Argon2 is deliberately slow (tens of milliseconds and ~19 MiB per call at the OWASP profile), so it
never runs on the event loop: every hash and verify goes through a bounded thread pool, one thread
per core by default. argon2-cffi releases the GIL while hashing, so the pool really runs in parallel
and its size is what bounds the memory argon2 can take at once.

Unknown (and disabled) users are verified against a dummy hash made with the same parameters, so a
login that does not exist costs the same argon2 work as a wrong password (no user enumeration by
timing; DESIGN.md "Unknown users cost the same time as wrong passwords").

Passwords are prepared with SASLprep (RFC 4013, as RFC 4616 2 recommends for PLAIN): a password is
hashed in its prepared form, and a presented one is prepared before it is checked, so the composed
and decomposed forms of one password are one password. Hashes stored before relaybox prepared
passwords are of the password as it was sent; nothing tells them apart from new ones, so a
presented password is tried in its prepared form first and, only when SASLprep changed it, as sent
too (see :func:`forms`; users.verify then stores the prepared form's hash). The number of argon2
verifies thus depends on the presented password alone, never on the stored hash: the dummy verify
of an unknown user tries the same forms, and timing still says nothing about who exists.
"""

from __future__ import annotations

import asyncio
import math
import os
import secrets
import threading
import unicodedata
from concurrent.futures import Future, ThreadPoolExecutor

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from relay.config import Config
from relay.config_sections import AuthConfig
from relay.errors import Invalid
from relay.saslprep import SASLprepError, saslprep

# Letters and digits without the ones people misread when copying by eye (0/O, 1/l/I). No
# punctuation: a generated password pasted into a shell, a URL or a YAML file needs no quoting.
ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789"
GENERATED_LENGTH = 26  # 26 * log2(57) = 151.6 bits, above the 128 bits the issue asks for
MAX_PASSWORD_BYTES = 1024  # far above any real password; bounds what a client makes us hash


def entropy_bits(length: int = GENERATED_LENGTH) -> float:
    """Entropy of a generated password of ``length`` characters (uniform over ALPHABET)."""
    return length * math.log2(len(ALPHABET))


def generate_password(length: int = GENERATED_LENGTH) -> str:
    """A random password from the OS CSPRNG (``secrets``), at least 128 bits."""
    if entropy_bits(length) < 128:
        raise ValueError("a generated password must carry at least 128 bits")
    return "".join(secrets.choice(ALPHABET) for _ in range(length))


def prepare(password: str) -> str:
    """The form of a new password that is hashed: SASLprep for a stored string (RFC 4013).

    Raises Invalid (naming the rule, never the password) for what SASLprep refuses: prohibited
    characters, mixed right-to-left text, code points Unicode 3.2 does not assign."""
    try:
        return saslprep(password, stored=True)
    except SASLprepError as exc:
        raise Invalid(f"password {exc}") from None


def forms(password: str) -> tuple[tuple[str, str], ...]:
    """The forms of a presented password to check, in order, each named: "prepared" (SASLprep
    for a query), then "raw", as sent, when that differs (a hash made before relaybox prepared
    passwords). A password SASLprep cannot prepare can only match such an old hash: it is tried
    as sent alone."""
    try:
        prepared = saslprep(password, stored=False)
    except SASLprepError:
        return (("raw", password),)
    if prepared == password:
        return (("prepared", prepared),)
    return (("prepared", prepared), ("raw", password))


def check_password(password: str, *, min_length: int) -> None:
    """Raise Invalid if ``password`` breaks the policy. The message never contains the password.

    Lengths and repetition are judged on the prepared form (what is hashed): seven soft hyphens
    add nothing to a password, and twelve ROMAN NUMERAL NINEs are "IX" twelve times."""
    if len(password.encode("utf-8", "surrogatepass")) > MAX_PASSWORD_BYTES:
        raise Invalid(f"password too long: at most {MAX_PASSWORD_BYTES} bytes")
    # NUL separates the fields of AUTH PLAIN (RFC 4616), so such a password could never log in;
    # other control characters are mangled by terminals, config files and mail clients.
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in password):
        raise Invalid("password contains a control character (NUL, tab, newline...)")
    prepared = prepare(password)
    if len(prepared) < min_length:
        raise Invalid(f"password too short: at least {min_length} characters are required")
    if len(prepared.encode("utf-8")) > MAX_PASSWORD_BYTES:  # NFKC can lengthen a string
        raise Invalid(f"password too long: at most {MAX_PASSWORD_BYTES} bytes")
    if len(set(prepared)) == 1:
        raise Invalid("password is one character repeated")


def check_policy(password: str, cfg: Config) -> None:
    """The policy of ``cfg``: see :func:`check_password`."""
    check_password(password, min_length=cfg.auth.min_password_length)


class Hasher:
    """Argon2id with the configured parameters, run in a bounded thread pool.

    ``verifications`` counts argon2 verify calls (real and dummy); the metrics endpoint and the
    tests read it to see that unknown users pay the same work as known ones.
    """

    def __init__(self, auth: AuthConfig) -> None:
        p = auth.argon2
        self._ph = PasswordHasher(
            time_cost=p.time_cost,
            memory_cost=p.memory_kib,
            parallelism=p.parallelism,
            type=Type.ID,
        )
        self.min_password_length = auth.min_password_length
        self.workers = auth.verify_threads or os.cpu_count() or 1
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="argon2")
        self._count_lock = threading.Lock()
        self.verifications = 0
        self._dummy_lock = threading.Lock()
        self._dummy: Future[str] | None = None

    def check_policy(self, password: str) -> None:
        check_password(password, min_length=self.min_password_length)

    async def hash(self, password: str) -> str:
        """The hash of ``password``'s prepared form (:func:`prepare`: Invalid if it has none)."""
        prepared = prepare(password)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._ph.hash, prepared)

    def _match_sync(
        self, password_hash: str, candidates: tuple[tuple[str, str], ...]
    ) -> str | None:
        """The name of the first form that matches, each form costing one counted verify."""
        for name, candidate in candidates:
            with self._count_lock:
                self.verifications += 1
            try:
                if self._ph.verify(password_hash, candidate):
                    return name
            except (VerifyMismatchError, VerificationError, InvalidHashError):
                pass
        return None

    async def match(self, password_hash: str, password: str) -> str | None:
        """Which form of ``password`` matches ``password_hash``: "prepared", "raw" (as sent, the
        hash is older than SASLprep here) or None. A corrupt hash is a mismatch.

        Each form SASLprep yields (:func:`forms`) is tried until one matches, one thread hop
        for all of them: a mismatch always costs ``len(forms(password))`` verifies."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._pool, self._match_sync, password_hash, forms(password)
        )

    async def verify(self, password_hash: str, password: str) -> bool:
        """True if ``password`` (in any of its forms) matches ``password_hash``."""
        return await self.match(password_hash, password) is not None

    async def verify_dummy(self, password: str) -> None:
        """Spend a mismatch's worth of argon2 work on nothing (unknown or disabled users): one
        verify per form of ``password``, as a wrong password for a real user costs."""
        await self.match(await self.dummy_hash(), password)

    async def dummy_hash(self) -> str:
        """A hash of a random secret with the configured parameters, made once, in the pool.

        Made on first use rather than in ``__init__``: building a Hasher (on the event loop, or in
        a CLI command that never verifies) then costs no argon2 work.
        """
        with self._dummy_lock:
            if self._dummy is None:
                self._dummy = self._pool.submit(self._ph.hash, secrets.token_urlsafe(32))
            future = self._dummy
        return await asyncio.wrap_future(future)

    def needs_rehash(self, password_hash: str) -> bool:
        """True if the hash was made with other parameters than the configured ones."""
        try:
            return self._ph.check_needs_rehash(password_hash)
        except (InvalidHashError, ValueError):
            return False

    def close(self) -> None:
        """Stop the pool; running hashes finish, queued ones are cancelled."""
        self._pool.shutdown(wait=True, cancel_futures=True)
