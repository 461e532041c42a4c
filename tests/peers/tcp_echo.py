#!/usr/bin/env python3
"""Binary TCP echo peer and client for the sidecar end-to-end tests (standard library only).

serve --port P --log FILE   echo every connection's bytes back until EOF, then half-close;
                            one JSON line per connection (peer, bytes) in FILE
client --host H --port P --bytes N [--seed S]
                            send N deterministic binary bytes while reading the echo,
                            half-close, read to EOF; print a JSON summary; exit 0 iff the
                            echo is byte-identical
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


def serve(args):
    log = common.JsonLog(args.log)
    srv = common.dual_stack_socket(socket.SOCK_STREAM, args.port)
    srv.listen(128)
    ids = itertools.count(1)

    def echo(conn, peer, conn_id):
        total = 0
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                conn.sendall(data)
                total += len(data)
            try:
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        log.write({"conn": conn_id, "peer": common.plain_address(peer[0]),
                   "peer_port": peer[1], "bytes": total})

    common.announce_ready(srv.getsockname()[1])
    while True:
        conn, peer = srv.accept()
        threading.Thread(target=echo, args=(conn, peer, next(ids)), daemon=True).start()


def client(args):
    sock = socket.create_connection((args.host, args.port), timeout=args.timeout)
    sent_hash = hashlib.sha256()
    sent = [0]
    errors = []

    def sender():
        try:
            for chunk in common.pattern_chunks(args.bytes, seed=args.seed.encode()):
                sock.sendall(chunk)
                sent_hash.update(chunk)
                sent[0] += len(chunk)
            sock.shutdown(socket.SHUT_WR)
        except OSError as e:
            errors.append(str(e))

    t = threading.Thread(target=sender)
    t.start()
    recv_hash = hashlib.sha256()
    received = 0
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                break
            recv_hash.update(data)
            received += len(data)
    except OSError as e:
        errors.append(str(e))
    t.join(args.timeout)
    sock.close()
    summary = {
        "sent": sent[0],
        "received": received,
        "sent_sha256": sent_hash.hexdigest(),
        "received_sha256": recv_hash.hexdigest(),
        "errors": errors,
    }
    summary["equal"] = (not errors and sent[0] == args.bytes and received == sent[0]
                        and summary["sent_sha256"] == summary["received_sha256"])
    print(json.dumps(summary), flush=True)
    return 0 if summary["equal"] else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    sub = ap.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--log", required=True)
    c = sub.add_parser("client")
    c.add_argument("--host", required=True)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--bytes", type=int, required=True)
    c.add_argument("--seed", default="echo")
    c.add_argument("--timeout", type=float, default=20.0)
    args = ap.parse_args()
    if args.mode == "serve":
        serve(args)
        return 0
    return client(args)


if __name__ == "__main__":
    sys.exit(main())
