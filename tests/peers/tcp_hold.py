#!/usr/bin/env python3
"""TCP client that exchanges data with an echo server, then holds the connection open until
told to close (standard library only). Lets a test inspect a live connection (`ss -ti`) and then
observe its close.

  tcp_hold.py --host H --port P --rounds N --size B --release FILE --timeout T

Connects, does N rounds of "send B deterministic bytes, read the B echoed bytes back", prints
`ROUNDS_DONE {json}` (local and peer address), then waits until FILE exists (bounded by T
seconds), half-closes, reads to EOF and prints a JSON summary line. Exits 0 iff every echo was
byte-identical and the release came in time.
"""

import argparse
import json
import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        data = sock.recv(min(65536, n - len(buf)))
        if not data:
            raise ConnectionError(f"eof after {len(buf)} of {n} bytes")
        buf += data
    return bytes(buf)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--release", required=True)
    ap.add_argument("--timeout", type=float, default=60.0)
    args = ap.parse_args()

    deadline = time.monotonic() + args.timeout
    sock = socket.create_connection((args.host, args.port), timeout=args.timeout)
    payload = b"".join(common.pattern_chunks(args.size))
    equal = True
    for _ in range(args.rounds):
        sock.sendall(payload)
        equal = equal and recv_exact(sock, len(payload)) == payload
    local = sock.getsockname()
    peer = sock.getpeername()
    print("ROUNDS_DONE " + json.dumps({
        "local": common.plain_address(local[0]), "local_port": local[1],
        "peer": common.plain_address(peer[0]), "peer_port": peer[1],
    }), flush=True)

    released = False
    while time.monotonic() < deadline:
        if os.path.exists(args.release):
            released = True
            break
        time.sleep(0.02)
    sock.shutdown(socket.SHUT_WR)
    rest = 0
    while True:
        data = sock.recv(65536)
        if not data:
            break
        rest += len(data)
    sock.close()
    print(json.dumps({"equal": equal, "released": released, "trailing": rest}), flush=True)
    sys.exit(0 if equal and released and rest == 0 else 1)


if __name__ == "__main__":
    main()
