"""A SIEM's syslog receiver for the shipper's tests, run as a process of its own: TCP (or
TLS with --cert/--key), RFC 6587 octet-counted frames, each frame appended to --out as a
line and flushed to disk before the next is read; the connection is closed when the
sender's stream ends (which is what tells the shipper everything was read)."""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import threading


def read_frames(conn: socket.socket, out: str) -> None:
    buf = b""
    with conn, open(out, "ab") as f:
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                break
            buf += chunk
            while True:
                space = buf.find(b" ")
                if space < 0:
                    break
                length = int(buf[:space])
                if len(buf) < space + 1 + length:
                    break
                f.write(buf[space + 1:space + 1 + length] + b"\n")
                f.flush()
                os.fsync(f.fileno())
                buf = buf[space + 1 + length:]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--cert")
    ap.add_argument("--key")
    args = ap.parse_args()
    server = socket.create_server(("127.0.0.1", args.port), reuse_port=False)
    context = None
    if args.cert:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.cert, args.key)
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        if context is not None:
            try:
                conn = context.wrap_socket(conn, server_side=True)
            except (ssl.SSLError, OSError):
                conn.close()
                continue
        threading.Thread(target=read_frames, args=(conn, args.out), daemon=True).start()


if __name__ == "__main__":
    main()
