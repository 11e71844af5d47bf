"""The `relaybox` admin CLI (presentation only; the rules live in relay/)."""
