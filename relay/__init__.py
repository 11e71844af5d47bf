"""relaybox: an embedded SMTP submission relay with a built-in credential store."""

__version__ = "0.1.0"
