"""The store: every SQL statement (users, passwords, domains, audit events, the spool)."""
