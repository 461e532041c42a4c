#!/usr/bin/env python3
"""HTTP/1.1 keep-alive peer for the sidecar end-to-end tests (standard library only).

Listens on [::]:PORT with IPv4 accepted too. Endpoints:
  GET  /bytes/N        N deterministic bytes (sha256 counter stream), with Content-Length
  POST /sha256         hex sha256 of the request body (Content-Length or chunked)
  GET  /status/NNN     responds with status NNN
  GET  /slow?ms=N      waits N ms, then responds 200
  GET  /headers        the request headers as JSON
Every request (method, path, peer, connection id, headers) is appended as a JSON line to the
log file given with --log, before the response is written.
"""

import argparse
import hashlib
import http.server
import itertools
import json
import os
import socket
import socketserver
import sys
import threading
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

MAX_BYTES = 1 << 30
MAX_SLOW_MS = 60_000


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "sidecar-tests-peer/1"
    conn_ids = itertools.count(1)
    conn_lock = threading.Lock()

    def setup(self):
        super().setup()
        # Head and body are two writes: without TCP_NODELAY, Nagle holds the body until the
        # head is acknowledged, and a delayed ACK adds ~40 ms to every response.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with Handler.conn_lock:
            self.conn_id = next(Handler.conn_ids)

    def log_message(self, fmt, *args):
        pass

    def _record(self):
        headers = {}
        for name, value in self.headers.items():
            key = name.lower()
            headers[key] = headers[key] + ", " + value if key in headers else value
        self.server.log.write({
            "conn": self.conn_id,
            "method": self.command,
            "path": self.path,
            "peer": common.plain_address(self.client_address[0]),
            "peer_port": self.client_address[1],
            "version": self.request_version,
            "headers": headers,
        })

    def _read_body(self, sink):
        te = self.headers.get("Transfer-Encoding", "").lower()
        total = 0
        if "chunked" in te:
            while True:
                line = self.rfile.readline(1024)
                if not line:
                    raise ConnectionError("eof in chunk size")
                size = int(line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    # trailers until the empty line
                    while self.rfile.readline(8192) not in (b"\r\n", b"\n", b""):
                        pass
                    return total
                remaining = size
                while remaining:
                    data = self.rfile.read(min(remaining, 65536))
                    if not data:
                        raise ConnectionError("eof in chunk")
                    sink(data)
                    remaining -= len(data)
                    total += len(data)
                self.rfile.readline(8)
        length = int(self.headers.get("Content-Length", "0") or "0")
        remaining = length
        while remaining:
            data = self.rfile.read(min(remaining, 65536))
            if not data:
                raise ConnectionError("eof in body")
            sink(data)
            remaining -= len(data)
            total += len(data)
        return total

    def _send(self, status, body, content_type="text/plain", extra=None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        no_body = status in (204, 304) or 100 <= status < 200
        if not no_body:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not no_body and self.command != "HEAD":
            self.wfile.write(body)

    def _dispatch(self):
        self._record()
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        parts = [p for p in url.path.split("/") if p]
        digest = hashlib.sha256()
        length = self._read_body(digest.update)

        if self.command in ("GET", "HEAD") and len(parts) == 2 and parts[0] == "bytes":
            n = int(parts[1])
            if n < 0 or n > MAX_BYTES:
                return self._send(400, b"bad size\n")
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(n))
            self.end_headers()
            if self.command == "GET":
                for chunk in common.pattern_chunks(n):
                    self.wfile.write(chunk)
            return None
        if self.command in ("POST", "PUT") and parts == ["sha256"]:
            return self._send(200, digest.hexdigest().encode(),
                              extra={"X-Body-Length": str(length)})
        if len(parts) == 2 and parts[0] == "status" and parts[1].isdigit():
            code = int(parts[1])
            return self._send(code, f"status {code}\n".encode())
        if parts == ["slow"]:
            ms = min(int(query.get("ms", ["1000"])[0]), MAX_SLOW_MS)
            time.sleep(ms / 1000.0)
            return self._send(200, f"slept {ms}\n".encode())
        if parts == ["headers"]:
            body = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
            return self._send(200, body, content_type="application/json")
        return self._send(404, b"not found\n")

    def _handle(self):
        try:
            self._dispatch()
        except (ValueError, ConnectionError) as e:
            self.close_connection = True
            try:
                self._send(400, f"bad request: {e}\n".encode())
            except OSError:
                pass

    do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _handle


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, port, log):
        self.log = log
        super().__init__(("::", port), Handler)

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        # HTTPServer.server_bind would resolve the host name (DNS); skip that.
        socketserver.TCPServer.server_bind(self)
        self.server_name = "peer"
        self.server_port = self.server_address[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--log", required=True)
    args = ap.parse_args()
    server = Server(args.port, common.JsonLog(args.log))
    common.announce_ready(server.server_port)
    server.serve_forever()


if __name__ == "__main__":
    main()
