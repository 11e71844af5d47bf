"""Every SMTP reply relaybox sends, in one catalogue (used by the server and by the tests).

Enhanced status codes per RFC 3463 / RFC 5248; AUTH replies per RFC 4954 section 6; submission
policy per RFC 6409. Faults are temporary (4xx) and never carry exception text.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    code: int
    enhanced: str
    text: str

    def __str__(self) -> str:
        if not self.enhanced:  # an intermediate reply (354) carries no enhanced code
            return f"{self.code} {self.text}"
        return f"{self.code} {self.enhanced} {self.text}"

    def with_text(self, text: str) -> Reply:
        return Reply(self.code, self.enhanced, text)

    def fill(self, **fields: str) -> Reply:
        """The reply with its ``{name}`` fields filled in (QUEUED, the delivery reasons)."""
        return self.with_text(self.text.format(**fields))


# --- AUTH (RFC 4954) ---
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
AUTH_NEEDS_TLS = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
AUTH_MALFORMED = Reply(501, "5.5.2", "Cannot decode response")
AUTH_CANCELLED = Reply(501, "5.7.0", "Authentication cancelled")
AUTH_TEMPFAIL = Reply(454, "4.7.0", "Temporary authentication failure")
AUTH_THROTTLED = Reply(454, "4.7.0", "Too many failed authentications, try again later")
AUTH_TOO_MANY = Reply(421, "4.7.0", "Too many failed authentications, closing connection")
AUTH_ALREADY = Reply(503, "5.5.1", "Already authenticated")
AUTH_UNKNOWN_MECH = Reply(504, "5.5.4", "Unrecognized authentication type")

# --- TLS (RFC 3207) ---
TLS_READY = Reply(220, "2.0.0", "Ready to start TLS")
TLS_ALREADY = Reply(503, "5.5.1", "TLS already active")  # RFC 3207 4.2: no second TLS layer

# --- envelope and policy ---
OK = Reply(250, "2.0.0", "OK")
SENDER_OK = Reply(250, "2.1.0", "Sender OK")
RCPT_OK = Reply(250, "2.1.5", "Recipient OK")
QUEUED = Reply(250, "2.0.0", "queued as {id}")
SENDER_NOT_OWNED = Reply(550, "5.7.1", "Sender address not owned by authenticated user")
SENDER_DOMAIN_UNVERIFIED = Reply(550, "5.7.1", "Sender domain is not verified for relaying")
NULL_SENDER_REFUSED = Reply(550, "5.7.1", "Null sender not allowed for submission")
HEADER_FROM_MISMATCH = Reply(550, "5.7.1", "Header From must be in the sender's domain")
HEADER_FROM_MISSING = Reply(550, "5.6.0", "Message has no valid From header")
HEADER_SENDER_MISMATCH = Reply(
    550, "5.7.1", "Header Sender, Resent-From and Resent-Sender must be in the sender's domain"
)
HEADER_SENDER_INVALID = Reply(
    550, "5.6.0", "Message has an invalid Sender, Resent-From or Resent-Sender header"
)
HEADER_SYNTAX = Reply(554, "5.6.0", "Message header invalid: a line is not part of a header field")
BAD_SENDER_SYNTAX = Reply(553, "5.1.7", "Sender address syntax invalid")
BAD_RCPT_SYNTAX = Reply(553, "5.1.3", "Recipient address syntax invalid")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed limit")
BARE_LINE_ENDING = Reply(554, "5.6.0", "Bare CR or LF in message not allowed")
NUL_IN_MESSAGE = Reply(554, "5.6.0", "NUL byte in message not allowed")
LINE_TOO_LONG = Reply(554, "5.6.0", "Message line too long (RFC 5321 4.5.3.1.6: 998 octets)")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
NEED_RCPT = Reply(503, "5.5.1", "Error: need RCPT command")
DATA_SYNTAX = Reply(501, "5.5.4", "Syntax: DATA")
NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "No valid recipients")
USER_REVOKED = Reply(535, "5.7.8", "Authentication credentials no longer valid")
# A user's own controls (relay/smtp/controls.py): a sending limit, the sender allow-list.
LIMIT_REACHED = Reply(451, "4.7.1", "{login}: limit of {limit} {what} reached; retry after {at}")
SENDER_NOT_ALLOWED = Reply(550, "5.7.1", "{login} may send only as {allowed}")
HEADER_NOT_ALLOWED = Reply(
    550, "5.7.1", "{field} address not allowed: {login} may send only as {allowed}"
)
# The suppression list (relay/store/suppressions.py): an address that bounced hard for the domain.
SUPPRESSED = Reply(
    550,
    "5.1.1",
    "<{address}>: suppressed after a hard bounce on {date}"
    " (relaybox suppression remove {key} --domain {domain})",
)

# --- connection and faults ---
TEMP_FAILURE = Reply(451, "4.3.0", "Temporary failure, please try again later")
PROXY_REFUSED = Reply(554, "5.7.0", "PROXY header not accepted from this address")
INSUFFICIENT_STORAGE = Reply(452, "4.3.1", "Insufficient system storage")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
TOO_MANY_FROM_IP = Reply(421, "4.7.0", "Too many connections from your address")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")
IDLE_TIMEOUT = Reply(421, "4.4.2", "Idle timeout, closing connection")
TOO_MANY_COMMANDS = Reply(421, "4.7.0", "Too many commands without a message, closing connection")
MEMORY_BUSY = Reply(451, "4.3.1", "Server busy, try again later")

# --- delivery: our own reasons for a recipient's outcome (logged, and shown in a DSN) ---
# RFC 3463 codes; {fields} are filled by relay.delivery (remote texts pass maillog.safe first).
NO_RECIPIENT_DOMAIN = Reply(550, "5.1.3", "recipient address has no domain")
NULL_MX = Reply(556, "5.1.10", "{domain} accepts no mail (null MX)")  # RFC 7505
DNS_TEMPFAIL = Reply(451, "4.4.3", "DNS lookup for {domain}: {reason}")
NO_ROUTE = Reply(550, "5.1.2", "cannot route to {domain}: {reason}")
NO_MX_ADDRESS = Reply(451, "4.4.3", "no address for the MX hosts of {domain}")
STARTTLS_FAILED = Reply(451, "4.7.5", "STARTTLS with {host} failed: {reason}")
STARTTLS_MISSING = Reply(451, "4.7.4", "{host} does not offer STARTTLS, which is required")
CONNECT_FAILED = Reply(451, "4.4.1", "{reason}")
CONNECTION_LOST = Reply(451, "4.4.2", "connection lost")
CONNECTION_LOST_DETAIL = Reply(451, "4.4.2", "connection lost ({reason})")
NETWORK_ERROR = Reply(451, "4.4.2", "{reason}")
DELIVERY_INTERNAL_ERROR = Reply(451, "4.3.0", "internal error in delivery")
# A sandbox domain's recipient (relay/store/sandbox.py): kept in the local inbox, never sent out.
CAPTURED = Reply(250, "2.0.0", "captured in the sandbox inbox as {id}")
INBOX_UNAVAILABLE = Reply(451, "4.3.0", "sandbox inbox unavailable")


def token(reply: Reply) -> str:
    """A short stable name for a reply (its catalogue name, lower case): metrics and log labels."""
    return _TOKENS.get(reply, f"code_{reply.code}")


_TOKENS: dict[Reply, str] = {
    value: name.lower() for name, value in list(globals().items()) if isinstance(value, Reply)
}
