"""aiosmtpd hooks: AUTH PLAIN/LOGIN, MAIL, RCPT, DATA. Thin: decisions live in auth and policy.

AUTH is implemented as coroutine mechanisms on the handler, never as aiosmtpd's ``authenticator=``
callback: that callback is synchronous, and an async one is an AUTH bypass (its coroutine object
is truthy, so any password succeeds). A failure pushes its own reply and returns
``AuthResult(success=False, handled=True)``; a bare ``AuthResult(success=False)`` sends nothing.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import logging
import time

from aiosmtpd.smtp import AuthResult, Envelope, Session

from relay import grammar, maillog, replies
from relay.config import Config
from relay.dkim import INLINE_LIMIT, HeaderError, SigningError
from relay.metrics import Metrics
from relay.replies import Reply
from relay.smtp import policy
from relay.smtp.accept import Acceptor
from relay.smtp.auth import Authenticator, Outcome
from relay.smtp.controls import Grant, Quota
from relay.smtp.session import RelaySMTP, hook_names
from relay.store import suppressions
from relay.store.db import StoreError

log = logging.getLogger("relaybox.handler")

# "The reply was sent already": aiosmtpd then sends nothing more (a bare success=False would
# also send nothing, leaving the client waiting; see the module docstring).
_HANDLED = AuthResult(success=False, handled=True)

MAX_AUTH_FAILURES_PER_SESSION = 3


class _NotAdmitted(Exception):
    """The admission refused the message (a limit): its 451, nothing queued."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.code)
        self.reply = reply


class Handler:
    def __init__(
        self,
        cfg: Config,
        auth: Authenticator,
        acceptor: Acceptor,
        metrics: Metrics,
        quota: Quota,
    ) -> None:
        self.cfg = cfg
        self.auth = auth
        self.acceptor = acceptor
        self.metrics = metrics
        self.quota = quota
        self.suppressions = suppressions.Lookup(acceptor.db)

    def configure(self, cfg: Config) -> None:
        """Reload: limits and the hostname apply from the next command on."""
        self.cfg = cfg

    def __dir__(self) -> list[str]:
        return hook_names(self, ("handle_", "auth_"))  # what aiosmtpd reads for every session

    # --- AUTH (RFC 4954; PLAIN is RFC 4616) ------------------------------------------------------

    async def auth_PLAIN(self, smtp: RelaySMTP, args: list[str]) -> AuthResult:
        blob = await self._first_response(smtp, args, b"")
        if blob is None:
            return _HANDLED
        parts = blob.split(b"\0")
        if len(parts) != 3:
            await smtp.push(str(replies.AUTH_MALFORMED))
            return _HANDLED
        authzid, authcid, password = parts
        return await self._authenticate(smtp, "PLAIN", authcid, password, authzid)

    async def auth_LOGIN(self, smtp: RelaySMTP, args: list[str]) -> AuthResult:
        login = await self._first_response(smtp, args, b"Username:")
        if login is None:
            return _HANDLED
        password = await smtp.sasl_response(b"Password:")
        if password is None:
            return _HANDLED
        return await self._authenticate(smtp, "LOGIN", login, password, b"")

    async def _first_response(
        self, smtp: RelaySMTP, args: list[str], challenge: bytes
    ) -> bytes | None:
        """The initial response (inline, or after a 334 challenge), decoded; None once a reply
        was sent (throttled: 454 without argon2 work; cancelled or undecodable: 501)."""
        assert smtp.state is not None
        if self.auth.is_throttled(smtp.state.ip):
            maillog.auth_throttled(smtp.state.ip)
            self.metrics.auth_throttled()
            await smtp.push(str(replies.AUTH_THROTTLED))
            return None
        if len(args) == 1:
            return await smtp.sasl_response(challenge)
        return await smtp.decode_b64(args[1].encode("ascii", "replace"))

    async def _authenticate(
        self, smtp: RelaySMTP, mech: str, login_b: bytes, password_b: bytes, authzid: bytes
    ) -> AuthResult:
        st = smtp.state
        assert st is not None and smtp.session is not None
        try:
            login = login_b.decode("utf-8")
            password = password_b.decode("utf-8")
        except UnicodeDecodeError:
            await smtp.push(str(replies.AUTH_MALFORMED))
            return _HANDLED
        shown = login if len(login) <= 320 else login[:64] + "..."
        if authzid and authzid != login_b:
            # No proxy authorization: authzid, if given, must be the login itself (RFC 4616 2).
            # Checked like any wrong password (same cost, same counting, same reply).
            login, password = "", ""
        answer = await self.auth.authenticate(login, password, st.ip)
        answer_outcome, reason, identity = answer.outcome, answer.reason, answer.identity
        if answer_outcome is Outcome.OK:
            assert identity is not None
            st.identity = identity
            smtp.session.authenticated = True
            maillog.auth_ok(identity.login, st.ip, mech, identity.which)
            self.metrics.auth_ok()
            await smtp.push(str(replies.AUTH_OK))
            # We sent the reply ourselves; "handled" keeps aiosmtpd from sending another one
            # (and from touching its deprecated Session.login_data).
            return _HANDLED
        if answer_outcome is Outcome.TEMPFAIL:
            maillog.auth_failed(shown, st.ip, mech, "tempfail")
            await smtp.push(str(replies.AUTH_TEMPFAIL))
            return _HANDLED
        if answer_outcome is Outcome.THROTTLED:
            maillog.auth_throttled(st.ip, shown)
            self.metrics.auth_throttled()
            await smtp.push(str(replies.AUTH_THROTTLED))
            return _HANDLED
        st.auth_failures += 1
        maillog.auth_failed(shown, st.ip, mech, reason or "bad_credentials")
        self.metrics.auth_failed()
        if st.auth_failures >= MAX_AUTH_FAILURES_PER_SESSION:
            await smtp.push(str(replies.AUTH_TOO_MANY))
            smtp.close()
            return _HANDLED
        await smtp.push(str(replies.AUTH_FAILED))
        return _HANDLED

    # --- envelope ----------------------------------------------------------------------------

    async def handle_MAIL(
        self,
        smtp: RelaySMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        st = smtp.state
        assert st is not None
        identity = st.identity
        if identity is None:
            return str(replies.AUTH_REQUIRED)
        st.grant = None
        try:
            controls, why = await self.auth.recheck(identity, st.ip)
            state = await self.acceptor.domain_state(identity.domain)
        except StoreError:
            return str(replies.TEMP_FAILURE)
        if controls is None:
            # Deleted, disabled, its password revoked, expired, or its allow-list changed since
            # AUTH: immediate, per session.
            st.identity = None
            session.authenticated = False
            maillog.rejected("mail", why, st.ip, identity.login)
            return str(replies.USER_REVOKED)
        senders = policy.Senders(identity.domain, controls.allow_from, identity.login)
        refusal = policy.check_sender(senders, address, state)
        if refusal is not None:
            maillog.rejected(
                "mail", replies.token(refusal), st.ip, identity.login, **{"from": address}
            )
            self.metrics.rejected(replies.token(refusal))
            return str(refusal)
        limits = self.quota.limits(controls)
        try:
            over, counts = await self.quota.at_mail(identity.login, limits)
        except StoreError:
            return str(replies.TEMP_FAILURE)
        if over is not None:
            return str(over)  # counted and logged (once per window) by the quota
        st.grant = Grant(senders, limits, counts)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return str(replies.SENDER_OK)

    async def handle_RCPT(
        self,
        smtp: RelaySMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        st = smtp.state
        assert st is not None
        if st.identity is None:
            return str(replies.AUTH_REQUIRED)
        refusal = policy.check_recipient(
            address, len(envelope.rcpt_tos), self.cfg.limits.max_recipients
        )
        if refusal is not None:
            self.metrics.rejected(replies.token(refusal))
            return str(refusal)
        grant = st.grant
        if grant is not None:
            hit = self.quota.rcpt_hit(grant.limits, grant.counts, len(envelope.rcpt_tos))
            if hit is not None:
                return str(await self.quota.refused(st.identity.login, hit))
        try:  # a primary-key read, or its answer kept (relay/store/suppressions.py, Lookup)
            entry = await self.suppressions.check(st.identity.domain, address, self.quota.clock())
        except StoreError:
            return str(replies.TEMP_FAILURE)
        if entry is not None:
            maillog.rejected("rcpt", "suppressed", st.ip, st.identity.login, to=address)
            self.metrics.rejected("suppressed")
            refused = str(suppressions.refusal(entry, address))
            await self.acceptor.suppressed(
                st.identity.login, st.identity.domain, envelope.mail_from or "", address, refused
            )
            return refused
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return str(replies.RCPT_OK)

    async def handle_DATA(self, smtp: RelaySMTP, session: Session, envelope: Envelope) -> str:
        st = smtp.state
        assert st is not None and st.identity is not None and st.grant is not None
        identity, grant = st.identity, st.grant
        content = envelope.original_content
        assert isinstance(content, bytes) and envelope.mail_from is not None
        # Every return below is the reply to DATA: the session then ends the transaction
        # (aiosmtpd's _set_post_data_state), a refusal included. An exception would not.
        if len(content) > INLINE_LIMIT:  # the header scan costs as much as its size: off the loop
            refusal, checked = await asyncio.to_thread(_checked, grant.senders, content)
        else:
            refusal, checked = _checked(grant.senders, content)
        if refusal is not None:
            return self._refuse(refusal, st.ip, identity.login)
        message = self._complete(checked, smtp, identity.login)
        rcpts = list(envelope.rcpt_tos)
        # Counted now, exactly (relay/store/usage.py), while the message is signed: the two waits
        # overlap. Queued only once counted; taken back below if it was counted and not queued.
        admission = asyncio.ensure_future(
            self.quota.admit(identity.login, len(rcpts), grant.limits)
        )

        async def admitted() -> None:
            over, _at = await admission
            if over is not None:
                raise _NotAdmitted(over)

        queued = False
        try:
            msg_id = await self.acceptor.accept(
                identity.domain, envelope.mail_from, rcpts, message, identity.login, st.spill,
                before_queue=admitted,
            )  # fmt: skip
            queued = True
        except _NotAdmitted as refused:
            return str(refused.reply)  # counted and logged (once per window) by the quota
        except StoreError:
            counting_failed = (
                admission.done() and not admission.cancelled() and admission.exception() is not None
            )
            if not counting_failed:  # the spool failed (a failed count: 451 alone, as before)
                log.exception("could not queue a message from %s", maillog.safe(identity.login))
            self.metrics.rejected("store_error")
            return str(replies.TEMP_FAILURE)
        except HeaderError:  # the checks above let nothing through that the signer refuses
            return self._refuse(replies.HEADER_SYNTAX, st.ip, identity.login)
        except SigningError:
            log.exception("could not sign a message from %s", maillog.safe(identity.login))
            self.metrics.rejected("signing_error")
            return str(replies.TEMP_FAILURE)
        finally:
            if not queued:
                await self._take_back(admission, identity.login, len(rcpts))
        st.messages += 1
        size = len(message) + (st.spill.size if st.spill is not None else 0)
        maillog.queued(
            msg_id, envelope.mail_from, len(envelope.rcpt_tos), size, identity.login, st.ip
        )
        return str(replies.QUEUED.fill(id=msg_id))

    async def _take_back(
        self, admission: asyncio.Future[tuple[Reply | None, float]], login: str, rcpts: int
    ) -> None:
        """The message was not queued: if its admission counted it, uncount it."""
        try:
            over, admitted_at = await asyncio.shield(admission)
        except StoreError:
            return  # nothing was counted
        if over is None:
            await self.quota.release(login, rcpts, admitted_at)

    def _refuse(self, refusal: Reply, ip: str, login: str) -> str:
        maillog.rejected("data", replies.token(refusal), ip, login)
        self.metrics.rejected(replies.token(refusal))
        return str(refusal)

    def _complete(self, content: bytes, smtp: RelaySMTP, login: str) -> bytes:
        """Add Received (always), and Message-ID and Date if missing (RFC 6409 8.2, 8.3)."""
        lower = grammar.header_block(content).lower()
        added: list[bytes] = []
        st = smtp.state
        assert st is not None and smtp.session is not None
        helo = maillog.safe(smtp.session.host_name or "unknown", 100)
        proto = "ESMTPSA" if smtp.session.ssl is not None or st.listener_mode == "tls" else "ESMTPA"
        now = _date(int(time.time()))
        hostname = self.cfg.public_hostname
        received = (
            f"Received: from {helo} ([{st.ip}])\r\n\tby {hostname} (relaybox) with {proto};\r\n"
            f"\t{now}\r\n"
        )
        added.append(received.encode("ascii", "replace"))
        if not lower.startswith(b"message-id:") and b"\nmessage-id:" not in lower:
            added.append(f"Message-ID: {email.utils.make_msgid(domain=hostname)}\r\n".encode())
        if not lower.startswith(b"date:") and b"\ndate:" not in lower:
            added.append(f"Date: {now}\r\n".encode())
        return b"".join(added) + content

    async def handle_exception(self, error: Exception) -> str:
        """Never send exception text to a client: log it, answer a temporary failure."""
        log.error("session error: %s", type(error).__name__, exc_info=error)
        return str(replies.TEMP_FAILURE)


@functools.lru_cache(maxsize=2)
def _date(second: int) -> str:
    """RFC 5322's date of a second (UTC): made once a second, not once a message."""
    return email.utils.formatdate(second, localtime=False)


def _checked(senders: policy.Senders, content: bytes) -> tuple[Reply | None, bytes]:
    """The refusal for a message (line endings, then its header section), or None and the
    message with every field name written the modern way ("From:" for "From :", RFC 5322 4.5):
    what is queued and signed is then read alike by every receiver, dkimpy's verifier included."""
    refusal = policy.check_line_endings(content) or policy.check_header(senders, content)
    if refusal is not None:
        return refusal, content
    return None, grammar.modern_field_names(content)
