"""The process: lifecycle and wiring, workers, systemd notify, TLS files, doctor checks."""
