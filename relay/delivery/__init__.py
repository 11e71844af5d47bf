"""The far side: every outbound connection (scheduler, outbound SMTP client, bounces)."""
