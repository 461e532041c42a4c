#!/usr/bin/env python3
"""Real websocket echo server and client (the `websockets` package) for the sidecar end-to-end
tests. Runs with the project's virtualenv (`cargo xtask setup`). No compression, no pings: what
goes on the wire is the messages and their frame headers only.

serve --port P --log FILE
    echo server on [::]:P (IPv4 too): every message is sent back with its type (text or
    binary); one JSON line per connection in FILE when it closes: path, traceparent (of the
    upgrade request), peer, peer_port, messages, text, binary, bytes
client --uri ws://H:P/PATH --count N [--seed S] [--timeout T]
    sends N messages one by one, alternating text and binary, sizes cycling through 0 B .. 1 MiB
    (frame length encodings 7, 16 and 64 bits), checks every echo (type and content); prints a
    JSON summary; exit 0 iff all were echoed intact
"""

import asyncio
import json
import os
import socket
import sys
import time

from websockets.asyncio.client import connect
from websockets.asyncio.server import serve as ws_serve

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

SIZES = [0, 1, 7, 125, 126, 127, 1000, 65535, 65536, 65537, 200_000, 1 << 20]
MAX_SIZE = 16 * 1024 * 1024
# Characters of 1 to 4 UTF-8 bytes, so text frames are not all ASCII.
TEXT_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 é€😀"


def message(i, seed):
    """Message `i`: even ones text, odd ones binary, the size cycling through SIZES."""
    size = SIZES[i % len(SIZES)]
    data = b"".join(common.pattern_chunks(size, seed=f"{seed}-{i}".encode()))
    if i % 2 == 0:
        return "".join(TEXT_ALPHABET[b % len(TEXT_ALPHABET)] for b in data)
    return data


def tally(counts, msg, bytes_key):
    """Counts `msg` in counts["messages"] and counts["text"] or counts["binary"], and its
    payload (text as UTF-8) in counts[bytes_key]."""
    counts["messages"] += 1
    if isinstance(msg, str):
        counts["text"] += 1
        counts[bytes_key] += len(msg.encode("utf-8"))
    else:
        counts["binary"] += 1
        counts[bytes_key] += len(msg)


async def serve(args):
    log = common.JsonLog(args.log)

    async def echo(ws):
        counts = {"messages": 0, "text": 0, "binary": 0, "bytes": 0}
        try:
            async for msg in ws:
                tally(counts, msg, "bytes")
                await ws.send(msg)
        finally:
            host, port = ws.remote_address[:2]
            log.write({
                "path": ws.request.path,
                "traceparent": ws.request.headers.get("traceparent"),
                "peer": common.plain_address(host),
                "peer_port": port,
                **counts,
            })

    sock = common.dual_stack_socket(socket.SOCK_STREAM, args.port)
    async with ws_serve(echo, sock=sock, compression=None, max_size=MAX_SIZE,
                        ping_interval=None) as server:
        common.announce_ready(args.port)
        await server.serve_forever()


async def client(args):
    summary = {"messages": 0, "echoed": 0, "bytes_sent": 0, "text": 0, "binary": 0,
               "errors": [], "status": None}
    started = time.time_ns()
    try:
        async with asyncio.timeout(args.timeout):
            async with connect(args.uri, compression=None, max_size=MAX_SIZE,
                               ping_interval=None, proxy=None,
                               open_timeout=args.timeout) as ws:
                summary["status"] = ws.response.status_code
                for i in range(args.count):
                    msg = message(i, args.seed)
                    await ws.send(msg)
                    tally(summary, msg, "bytes_sent")
                    back = await ws.recv()
                    if type(back) is not type(msg) or back != msg:
                        summary["errors"].append(
                            f"message {i}: echo differs ({type(back).__name__}, "
                            f"{len(back)} vs {len(msg)})")
                    else:
                        summary["echoed"] += 1
    except Exception as e:  # noqa: BLE001 (reported in the summary)
        summary["errors"].append(f"{type(e).__name__}: {e}")
    summary["elapsed_s"] = (time.time_ns() - started) / 1e9
    summary["equal"] = not summary["errors"] and summary["echoed"] == args.count
    print(json.dumps(summary), flush=True)
    return 0 if summary["equal"] else 1


def main():
    ap, sub, _ = common.serve_client_parser(__doc__)
    c = sub.add_parser("client")
    c.add_argument("--uri", required=True)
    c.add_argument("--count", type=int, default=50)
    c.add_argument("--seed", default="ws")
    c.add_argument("--timeout", type=float, default=30.0)
    args = ap.parse_args()
    if args.mode == "serve":
        asyncio.run(serve(args))
        return 0
    return asyncio.run(client(args))


if __name__ == "__main__":
    sys.exit(main())
