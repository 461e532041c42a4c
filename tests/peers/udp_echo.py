#!/usr/bin/env python3
"""UDP echo peer and client for the sidecar end-to-end tests (standard library only).

serve --port P --log FILE      reply to every datagram with the same payload; one JSON line
                               per datagram (peer, payload hex) in FILE
send --host H --port P --payload-hex X [--timeout S]
                               connect() a UDP socket (so cgroup connect hooks run), send X,
                               wait for the reply; print JSON; exit 0 iff the reply equals X
"""

import argparse
import json
import os
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def serve(args):
    log = common.JsonLog(args.log)
    sock = common.dual_stack_socket(socket.SOCK_DGRAM, args.port)
    common.announce_ready(sock.getsockname()[1])
    while True:
        data, peer = sock.recvfrom(65535)
        log.write({"peer": common.plain_address(peer[0]), "peer_port": peer[1],
                   "payload_hex": data.hex()})
        sock.sendto(data, peer)


def send(args):
    payload = bytes.fromhex(args.payload_hex)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.settimeout(args.timeout)
    sock.connect((args.host, args.port))
    sock.send(payload)
    try:
        reply = sock.recv(65535)
        error = None
    except OSError as e:
        reply = b""
        error = str(e)
    result = {"reply_hex": reply.hex(), "error": error, "equal": reply == payload}
    print(json.dumps(result), flush=True)
    return 0 if result["equal"] else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    sub = ap.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--log", required=True)
    c = sub.add_parser("send")
    c.add_argument("--host", required=True)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--payload-hex", required=True)
    c.add_argument("--timeout", type=float, default=5.0)
    args = ap.parse_args()
    if args.mode == "serve":
        serve(args)
        return 0
    return send(args)


if __name__ == "__main__":
    sys.exit(main())
