"""Shared helpers for the test peers (Python 3 standard library only)."""

import argparse
import hashlib
import json
import socket
import threading
import time

_BLOCK = 32


def pattern_block(seed, index):
    """Block `index` of the deterministic stream for `seed` (sha256 in counter mode)."""
    return hashlib.sha256(seed + index.to_bytes(8, "big")).digest()


def pattern_chunks(n, seed=b"sidecar-tests", chunk=65536):
    """Yields the first `n` bytes of the deterministic stream in chunks of up to `chunk`."""
    index = 0
    sent = 0
    buf = bytearray()
    while sent < n:
        while len(buf) < min(chunk, n - sent):
            buf += pattern_block(seed, index)
            index += 1
        take = min(chunk, n - sent)
        yield bytes(buf[:take])
        del buf[:take]
        sent += take


def dual_stack_socket(kind, port):
    """A socket bound to [::]:port that also accepts IPv4 (v6only off)."""
    s = socket.socket(socket.AF_INET6, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port))
    return s


def plain_address(host):
    """Strips the IPv4-mapped prefix so IPv4 peers read as 198.18.0.1."""
    if host.startswith("::ffff:") and "." in host:
        return host[len("::ffff:"):]
    return host


class JsonLog:
    """Appends one JSON object per line to a file, flushed, safe across threads."""

    def __init__(self, path):
        self._lock = threading.Lock()
        self._file = open(path, "a", encoding="utf-8")

    def write(self, record):
        record.setdefault("time", time.time())
        line = json.dumps(record, sort_keys=True)
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()


def announce_ready(port):
    print(f"READY {port}", flush=True)


def serve_client_parser(doc):
    """An argument parser with the modes of a peer script (`dest="mode"`, one required) and
    its `serve --port P --log FILE` mode; returns (parser, subparsers, serve parser)."""
    ap = argparse.ArgumentParser(description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--log", required=True)
    return ap, sub, s
