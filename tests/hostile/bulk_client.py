"""A stand-alone bulk sender, run as a subprocess so its memory is not counted as the server's.

    python -m tests.hostile.bulk_client PORT CAFILE LOGIN CLIENTS SIZE  (password on stdin)

Each of CLIENTS threads sends one SIZE-byte message over implicit TLS with smtplib, retrying on
451 (the server's memory budget is full) after a short back-off. Prints JSON: the queue ids, how
many 451s were seen, and any error.
"""

from __future__ import annotations

import json
import smtplib
import ssl
import sys
import threading
import time


def build(login: str, n: int, size: int) -> bytes:
    head = f"From: {login}\r\nTo: r{n}@dest.test\r\nSubject: big {n}\r\n\r\n".encode()
    line = b"m" * 998 + b"\r\n"
    return head + line * (size // len(line))


def main() -> None:
    port, cafile, login, clients, size = sys.argv[1:6]
    password = sys.stdin.readline().rstrip("\n")
    ctx = ssl.create_default_context(cafile=cafile)
    ids: list[str] = []
    busy = [0]
    errors: list[str] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        msg = build(login, n, int(size))
        try:
            with smtplib.SMTP_SSL("127.0.0.1", int(port), context=ctx, timeout=60) as s:
                s.login(login, password)
                for _attempt in range(400):
                    s.mail(login, [f"SIZE={len(msg)}"])
                    s.rcpt(f"r{n}@dest.test")
                    try:
                        code, reply = s.data(msg)
                    except smtplib.SMTPDataError as exc:  # refused at DATA, before 354
                        code, reply = exc.smtp_code, exc.smtp_error
                    if code == 250:
                        with lock:
                            ids.append(reply.decode().rsplit(" ", 1)[1])
                        return
                    if code != 451:
                        raise RuntimeError(f"unexpected reply {code} {reply!r}")
                    with lock:
                        busy[0] += 1
                    s.rset()
                    time.sleep(0.05)  # sleep-ok: a client backing off after 451, as real ones do
                raise RuntimeError("never got in")
        except Exception as exc:  # reported to the test, which fails on it
            with lock:
                errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=client, args=(n,)) for n in range(int(clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"ids": ids, "busy": busy[0], "errors": errors}))


if __name__ == "__main__":
    main()
