"""The client's side: from a connection to "250 queued as <id>" (session, AUTH, policy, gate)."""
