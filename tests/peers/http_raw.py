#!/usr/bin/env python3
"""Raw-socket HTTP/1.x peer and client for the fidelity tests (standard library only).

serve --port P --log FILE   an HTTP/1.x server that works on the raw bytes: one JSON line per
                            request in FILE with the raw head (the traceparent line removed),
                            the traceparent value and the sha256 of the raw body bytes (chunk
                            framing and trailers included). Responses are fixed functions of the
                            request (see `respond`), so the client side can predict every byte.
client --host H --port P --steps FILE
                            runs the steps in the JSON file FILE on one connection:
                            ["send", HEX], ["recv", N] (exactly N bytes or EOF), ["shut"]
                            (half-close), ["eof"] (read to EOF); prints {"received_hex",
                            "error"} as JSON
"""

import argparse
import hashlib
import itertools
import json
import os
import socket
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

REASONS = {100: "Continue", 101: "Switching Protocols", 200: "OK", 204: "No Content",
           304: "Not Modified", 404: "Not Found", 503: "Service Unavailable"}


def read_head(f):
    """Raw head lines (each with its CRLF) up to and including the blank line; None on EOF."""
    lines = []
    while True:
        line = f.readline(65536)
        if not line:
            return None
        lines.append(line)
        if line in (b"\r\n", b"\n"):
            return lines


def read_chunked(f):
    raw = b""
    while True:
        size_line = f.readline(65536)
        raw += size_line
        size = int(size_line.split(b";")[0].strip(), 16)
        if size == 0:
            break
        data = f.read(size + 2)
        raw += data
    while True:
        line = f.readline(65536)
        raw += line
        if line in (b"\r\n", b"\n", b""):
            return raw


def response(status, headers, body=b""):
    head = f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}\r\n".encode()
    for name, value in headers:
        head += f"{name}: {value}\r\n".encode()
    return head + b"\r\n" + body


def respond(method, target, version, headers, body_sha):
    """The response bytes and whether to close afterwards."""
    close = version == "HTTP/1.0" and headers.get("connection", "").lower() != "keep-alive"
    extra = [("Connection", "close")] if close else []
    if target.startswith("/upgrade"):
        return response(101, [("Upgrade", "websocket"), ("Connection", "Upgrade")]), False
    if method == "CONNECT":
        # A tunnel: 200 without a body, then the bytes are echoed (see handle).
        return response(200, []), False
    if target.startswith("/chunked"):
        head = response(200, [("Transfer-Encoding", "chunked"), ("Trailer", "X-Digest")])
        body = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-Digest: " + body_sha.encode()
        return head + body + b"\r\n\r\n", close
    if target.startswith("/status/"):
        status = int(target[len("/status/"):].split("?")[0])
        if status in (204, 304):
            return response(status, extra), close
        return response(status, [("Content-Length", "1")] + extra, b"x"), close
    body = f"ok {method} {target}".encode()
    if method == "HEAD":
        return response(200, [("Content-Length", str(len(body)))] + extra), close
    return response(200, [("Content-Length", str(len(body)))] + extra, body), close


def handle(conn, log, conn_id):
    f = conn.makefile("rb")
    with conn:
        while True:
            lines = read_head(f)
            if lines is None:
                break
            request_line = lines[0].decode("latin-1").rstrip("\r\n")
            method, target, version = request_line.split(" ", 2)
            headers = {}
            kept = []
            traceparent = None
            for line in lines[1:-1]:
                name, _, value = line.decode("latin-1").partition(":")
                if name.lower() == "traceparent":
                    traceparent = value.strip()
                    continue
                kept.append(line)
                headers[name.strip().lower()] = value.strip()
            body = b""
            if headers.get("transfer-encoding", "").lower() == "chunked":
                body = read_chunked(f)
            elif "content-length" in headers:
                if headers.get("expect", "").lower() == "100-continue":
                    conn.sendall(response(100, []))
                body = f.read(int(headers["content-length"]))
            body_sha = hashlib.sha256(body).hexdigest()
            head = b"".join([lines[0]] + kept + [lines[-1]])
            log.write({"conn": conn_id, "method": method, "target": target, "version": version,
                       "head": head.decode("latin-1"), "traceparent": traceparent,
                       "body_len": len(body), "body_sha256": body_sha})
            out, close = respond(method, target, version, headers, body_sha)
            conn.sendall(out)
            if target.startswith("/upgrade") or method == "CONNECT":
                while True:
                    data = f.read1(65536)
                    if not data:
                        break
                    conn.sendall(data)
                break
            if close:
                break
        try:
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def serve(args):
    log = common.JsonLog(args.log)
    srv = common.dual_stack_socket(socket.SOCK_STREAM, args.port)
    srv.listen(128)
    ids = itertools.count(1)
    common.announce_ready(srv.getsockname()[1])
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=handle, args=(conn, log, next(ids)), daemon=True).start()


def client(args):
    received = b""
    error = None
    try:
        sock = socket.create_connection((args.host, args.port), timeout=args.timeout)
        with sock:
            with open(args.steps, encoding="utf-8") as f:
                steps = json.load(f)
            for step in steps:
                if step[0] == "send":
                    sock.sendall(bytes.fromhex(step[1]))
                elif step[0] == "shut":
                    sock.shutdown(socket.SHUT_WR)
                elif step[0] == "recv":
                    want = len(received) + step[1]
                    while len(received) < want:
                        data = sock.recv(want - len(received))
                        if not data:
                            break
                        received += data
                elif step[0] == "eof":
                    while True:
                        data = sock.recv(65536)
                        if not data:
                            break
                        received += data
    except OSError as e:
        error = f"{type(e).__name__}: {e}"
    print(json.dumps({"received_hex": received.hex(), "error": error}), flush=True)
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    sub = ap.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--log", required=True)
    c = sub.add_parser("client")
    c.add_argument("--host", required=True)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--steps", required=True)
    c.add_argument("--timeout", type=float, default=20.0)
    args = ap.parse_args()
    if args.mode == "serve":
        serve(args)
        return 0
    return client(args)


if __name__ == "__main__":
    sys.exit(main())
