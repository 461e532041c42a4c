#!/usr/bin/env python3
"""Real gRPC server and clients (grpcio, no generated code) for the sidecar end-to-end tests.

Runs with the project's virtualenv (`cargo xtask setup` installs grpcio from requirements.txt).
Messages are raw bytes: generic handlers on the server, `channel.unary_unary(path)` without
serializers on the client.

serve --port P --log FILE [--workers N]
    plaintext HTTP/2 server on [::]:P (IPv4 too) with the service `demo.Echo`:
      Say     unary: replies b"echo:" + request; metadata `x-delay-ms` delays the reply
      Fail    unary: aborts with the status named by the request (e.g. b"NOT_FOUND") before any
              message (grpcio answers with a trailers-only response)
      Stream  server-streaming: the request is JSON {count, size, interval_ms, seed, fail_after,
              fail_status}; sends `count` messages of `size` bytes, consecutive chunks of the
              deterministic stream of `seed` (common.pattern_chunks), `interval_ms` apart; with
              `fail_after` it aborts with `fail_status` after that many messages (status in the
              trailers after DATA)
    one JSON line per finished call in FILE: method, traceparent (invocation metadata), peer,
    peer_port, status, messages, bytes, start, end (Unix seconds)

unary --target H:P --count N [--method Say|Fail] [--payload S] [--delay-ms D] [--traceparent V]
    N calls on ONE channel, all started at once (futures); prints a JSON summary
stream --target H:P --count N --size S [--interval-ms I] [--seed S] [--read-delay-ms D]
       [--fail-after K --fail-status NAME]
    one server-streaming call read message by message; prints a JSON summary
load --target H:P --unary N --delay-ms D --stream-count N --stream-size S --read-delay-ms R
    on ONE channel: a server-streaming call read slowly in a thread while N unary calls run
    concurrently; prints a JSON summary of both
"""

import hashlib
import json
import os
import sys
import threading
import time
import urllib.parse
from concurrent import futures

import grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

SERVICE = "demo.Echo"
CHANNEL_OPTIONS = [
    # Never through an HTTP CONNECT proxy from the environment: the test wants the real path.
    ("grpc.enable_http_proxy", 0),
    ("grpc.enable_retries", 0),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]


def split_peer(peer):
    """`ipv4:198.18.0.1:4321`, `ipv6:[::1]:4321` or `ipv6:%5B::1%5D:4321` -> (host, port)."""
    _, _, rest = peer.partition(":")
    rest = urllib.parse.unquote(rest)
    host, _, port = rest.rpartition(":")
    host = host.strip("[]")
    return common.plain_address(host), int(port) if port.isdigit() else 0


def status_by_name(name):
    try:
        return grpc.StatusCode[name]
    except KeyError:
        return grpc.StatusCode.UNKNOWN


class Echo:
    def __init__(self, log):
        self.log = log

    def record(self, method, context, start, status, messages, nbytes):
        md = dict(context.invocation_metadata())
        host, port = split_peer(context.peer())
        self.log.write({
            "method": method,
            "traceparent": md.get("traceparent"),
            "tracestate": md.get("tracestate"),
            "peer": host,
            "peer_port": port,
            "status": status,
            "messages": messages,
            "bytes": nbytes,
            "start": start,
            "end": time.time(),
        })

    def say(self, request, context):
        start = time.time()
        md = dict(context.invocation_metadata())
        delay = int(md.get("x-delay-ms", "0") or 0)
        if delay > 0:
            time.sleep(delay / 1000.0)
        reply = b"echo:" + request
        self.record("/demo.Echo/Say", context, start, "OK", 1, len(reply))
        return reply

    def fail(self, request, context):
        start = time.time()
        name = request.decode("ascii", "replace").strip() or "UNKNOWN"
        self.record("/demo.Echo/Fail", context, start, name, 0, 0)
        context.abort(status_by_name(name), f"asked to fail with {name}")

    def stream(self, request, context):
        start = time.time()
        spec = json.loads(request.decode("utf-8"))
        count = int(spec.get("count", 1))
        size = int(spec.get("size", 1))
        interval = float(spec.get("interval_ms", 0)) / 1000.0
        seed = str(spec.get("seed", "stream")).encode()
        fail_after = spec.get("fail_after")
        fail_status = spec.get("fail_status", "UNAVAILABLE")
        sent = 0
        nbytes = 0
        status = "CANCELLED"
        try:
            for i, chunk in enumerate(common.pattern_chunks(count * size, seed=seed, chunk=size)):
                if fail_after is not None and i >= int(fail_after):
                    break
                if i > 0 and interval > 0:
                    time.sleep(interval)
                yield chunk
                sent += 1
                nbytes += len(chunk)
            if fail_after is not None:
                status = fail_status
            else:
                status = "OK"
        finally:
            self.record("/demo.Echo/Stream", context, start, status, sent, nbytes)
        if status != "OK":
            context.abort(status_by_name(status), f"stream failed after {sent} messages")


def serve(args):
    log = common.JsonLog(args.log)
    echo = Echo(log)
    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "Say": grpc.unary_unary_rpc_method_handler(echo.say),
        "Fail": grpc.unary_unary_rpc_method_handler(echo.fail),
        "Stream": grpc.unary_stream_rpc_method_handler(echo.stream),
    })
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=args.workers),
        handlers=[handler],
        options=[
            ("grpc.max_concurrent_streams", 1000),
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ],
    )
    bound = server.add_insecure_port(f"[::]:{args.port}")
    if bound != args.port:
        print(f"could not bind [::]:{args.port}", flush=True)
        return 1
    server.start()
    common.announce_ready(bound)
    server.wait_for_termination()
    return 0


def channel(target):
    return grpc.insecure_channel(target, options=CHANNEL_OPTIONS)


def unary_calls(ch, count, method, payload, delay_ms, traceparent, timeout):
    """Starts `count` calls at once on `ch`; returns the summary dict."""
    call = ch.unary_unary(f"/{SERVICE}/{method}", request_serializer=None,
                          response_deserializer=None)
    md = []
    if delay_ms:
        md.append(("x-delay-ms", str(delay_ms)))
    if traceparent:
        md.append(("traceparent", traceparent))
    started = time.time_ns()
    pending = []
    for i in range(count):
        body = payload.encode() if payload is not None else f"call-{i}".encode()
        pending.append((body, call.future(body, timeout=timeout, metadata=md or None)))
    statuses = {}
    errors = []
    replies_ok = True
    for body, fut in pending:
        try:
            reply = fut.result(timeout=timeout + 5)
            statuses["OK"] = statuses.get("OK", 0) + 1
            if reply != b"echo:" + body:
                replies_ok = False
                errors.append(f"bad reply {reply[:64]!r} to {body[:64]!r}")
        except grpc.RpcError as e:
            name = e.code().name
            statuses[name] = statuses.get(name, 0) + 1
            if len(errors) < 10:
                errors.append(f"{name}: {e.details()}")
        except futures.TimeoutError:
            statuses["CLIENT_TIMEOUT"] = statuses.get("CLIENT_TIMEOUT", 0) + 1
    return {
        "calls": count,
        "statuses": statuses,
        "replies_ok": replies_ok,
        "errors": errors,
        "start_ns": started,
        "end_ns": time.time_ns(),
    }


def stream_call(ch, spec, read_delay_ms, timeout):
    """One server-streaming call read message by message; returns the summary dict."""
    call = ch.unary_stream(f"/{SERVICE}/Stream", request_serializer=None,
                           response_deserializer=None)
    h = hashlib.sha256()
    messages = 0
    nbytes = 0
    arrivals = []
    status = "OK"
    details = ""
    started = time.time_ns()
    try:
        for msg in call(json.dumps(spec).encode(), timeout=timeout):
            arrivals.append(time.time_ns())
            h.update(msg)
            messages += 1
            nbytes += len(msg)
            if read_delay_ms:
                time.sleep(read_delay_ms / 1000.0)
    except grpc.RpcError as e:
        status = e.code().name
        details = e.details() or ""
    return {
        "messages": messages,
        "bytes": nbytes,
        "sha256": h.hexdigest(),
        "status": status,
        "details": details,
        "start_ns": started,
        "first_ns": arrivals[0] if arrivals else None,
        "last_ns": arrivals[-1] if arrivals else None,
        "end_ns": time.time_ns(),
    }


def stream_spec(args):
    spec = {"count": args.count, "size": args.size, "interval_ms": args.interval_ms,
            "seed": args.seed}
    if args.fail_after is not None:
        spec["fail_after"] = args.fail_after
        spec["fail_status"] = args.fail_status
    return spec


def main():
    ap, sub, s = common.serve_client_parser(__doc__)
    s.add_argument("--workers", type=int, default=160)
    u = sub.add_parser("unary")
    u.add_argument("--target", required=True)
    u.add_argument("--count", type=int, default=1)
    u.add_argument("--method", default="Say", choices=["Say", "Fail"])
    u.add_argument("--payload")
    u.add_argument("--delay-ms", type=int, default=0)
    u.add_argument("--traceparent")
    u.add_argument("--timeout", type=float, default=20.0)
    st = sub.add_parser("stream")
    st.add_argument("--target", required=True)
    st.add_argument("--count", type=int, required=True)
    st.add_argument("--size", type=int, required=True)
    st.add_argument("--interval-ms", type=int, default=0)
    st.add_argument("--seed", default="stream")
    st.add_argument("--read-delay-ms", type=int, default=0)
    st.add_argument("--fail-after", type=int)
    st.add_argument("--fail-status", default="UNAVAILABLE")
    st.add_argument("--timeout", type=float, default=30.0)
    ld = sub.add_parser("load")
    ld.add_argument("--target", required=True)
    ld.add_argument("--unary", type=int, required=True)
    ld.add_argument("--delay-ms", type=int, default=0)
    ld.add_argument("--stream-count", type=int, required=True)
    ld.add_argument("--stream-size", type=int, required=True)
    ld.add_argument("--seed", default="load")
    ld.add_argument("--read-delay-ms", type=int, default=0)
    ld.add_argument("--timeout", type=float, default=60.0)
    args = ap.parse_args()

    if args.mode == "serve":
        return serve(args)
    with channel(args.target) as ch:
        if args.mode == "unary":
            out = unary_calls(ch, args.count, args.method, args.payload, args.delay_ms,
                              args.traceparent, args.timeout)
            ok = out["statuses"].get("OK", 0) == args.count and out["replies_ok"]
        elif args.mode == "stream":
            out = stream_call(ch, stream_spec(args), args.read_delay_ms, args.timeout)
            ok = out["status"] == "OK"
        else:
            result = {}
            spec = {"count": args.stream_count, "size": args.stream_size, "interval_ms": 0,
                    "seed": args.seed}
            reader = threading.Thread(target=lambda: result.update(
                stream_call(ch, spec, args.read_delay_ms, args.timeout)))
            reader.start()
            unary = unary_calls(ch, args.unary, "Say", None, args.delay_ms, None, args.timeout)
            reader.join(args.timeout + 10)
            out = {"unary": unary, "stream": result or {"status": "CLIENT_TIMEOUT"}}
            ok = (unary["statuses"].get("OK", 0) == args.unary and unary["replies_ok"]
                  and out["stream"].get("status") == "OK")
    print(json.dumps(out), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
