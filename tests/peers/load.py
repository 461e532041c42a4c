#!/usr/bin/env python3
"""Paced HTTP/1.1 keep-alive load for the sidecar end-to-end tests (standard library only).

Sends GET requests to --url at --rate requests per second on one keep-alive connection for
--seconds (at most --max requests), reconnecting after a failure, and prints one JSON object:
{"sent": n, "ok": n, "errors": n, "latencies_ms": [...]} with the latency of every successful
request (send to last body byte). Pacing is open-loop on a fixed schedule: a slow request
delays the next one but the schedule does not drift.
"""

import argparse
import http.client
import json
import sys
import time
import urllib.parse


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--rate", type=float, default=50.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--max", type=int, default=100_000)
    ap.add_argument("--timeout", type=float, default=10.0)
    args = ap.parse_args()
    if args.rate <= 0 or args.seconds <= 0:
        sys.exit("--rate and --seconds must be positive")

    url = urllib.parse.urlsplit(args.url)
    target = url.path or "/"
    if url.query:
        target += "?" + url.query
    period = 1.0 / args.rate
    start = time.monotonic()
    end = start + args.seconds
    conn = None
    sent = ok = errors = 0
    latencies = []
    while sent < args.max:
        due = start + sent * period
        now = time.monotonic()
        if due >= end:
            break
        if due > now:
            time.sleep(due - now)
        sent += 1
        try:
            if conn is None:
                conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=args.timeout)
            t0 = time.monotonic()
            conn.request("GET", target)
            resp = conn.getresponse()
            resp.read()
            dt = time.monotonic() - t0
            if resp.status == 200:
                ok += 1
                latencies.append(round(dt * 1000.0, 3))
            else:
                errors += 1
        except (OSError, http.client.HTTPException):
            errors += 1
            if conn is not None:
                conn.close()
            conn = None
    if conn is not None:
        conn.close()
    json.dump({"sent": sent, "ok": ok, "errors": errors, "latencies_ms": latencies}, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
