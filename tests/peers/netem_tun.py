#!/usr/bin/env python3
"""Userspace stand-in for `tc qdisc ... netem delay D loss P%` (standard library only).

Kernels built without sch_netem cannot delay or drop packets with tc. This script owns a TUN
device (IFF_TUN | IFF_NO_PI, removed when the script exits); the test bed redirects a link's
ingress TCP packets into it with `tc ... action mirred egress redirect`, and the script writes
each packet back into the TUN device after `--delay-ms`, dropping `--loss-pct` percent of them
at random. Packets written back are received by the namespace's stack on the TUN device, so
they are delivered (or forwarded) normally, only later. Only IPv4/IPv6 TCP packets are
re-injected; anything else the device emits (router solicitations, ...) is discarded.

  netem_tun.py --dev NAME --delay-ms D --loss-pct P [--seed S]

Prints `READY <dev>` once the device exists, and a JSON line with counters on SIGTERM/SIGINT.
"""

import argparse
import fcntl
import heapq
import json
import os
import random
import select
import signal
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
TCP = 6
MAX_QUEUE = 100_000


def is_tcp(pkt):
    if not pkt:
        return False
    version = pkt[0] >> 4
    if version == 4 and len(pkt) >= 20:
        return pkt[9] == TCP
    if version == 6 and len(pkt) >= 40:
        return pkt[6] == TCP
    return False


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dev", required=True)
    ap.add_argument("--delay-ms", type=float, default=0.0)
    ap.add_argument("--loss-pct", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()
    if not 0.0 <= args.loss_pct < 100.0 or args.delay_ms < 0.0:
        sys.exit("loss must be in [0, 100) and delay >= 0")
    rng = random.Random(args.seed)
    delay = args.delay_ms / 1000.0

    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", args.dev.encode(), IFF_TUN | IFF_NO_PI))
    os.set_blocking(fd, False)

    stats = {"received": 0, "dropped": 0, "forwarded": 0, "ignored": 0}
    running = [True]

    def stop(_sig, _frame):
        running[0] = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"READY {args.dev}", flush=True)

    queue = []
    seq = 0
    while running[0]:
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, _, pkt = heapq.heappop(queue)
            try:
                os.write(fd, pkt)
                stats["forwarded"] += 1
            except OSError:
                stats["dropped"] += 1
        timeout = max(0.0, queue[0][0] - now) if queue else 0.5
        try:
            ready, _, _ = select.select([fd], [], [], timeout)
        except InterruptedError:
            continue
        if not ready:
            continue
        for _ in range(256):
            try:
                pkt = os.read(fd, 65536)
            except BlockingIOError:
                break
            stats["received"] += 1
            if not is_tcp(pkt):
                stats["ignored"] += 1
                continue
            if rng.random() * 100.0 < args.loss_pct or len(queue) >= MAX_QUEUE:
                stats["dropped"] += 1
                continue
            seq += 1
            heapq.heappush(queue, (time.monotonic() + delay, seq, pkt))
    print(json.dumps(stats, sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
