"""A small closed-loop HTTP load generator (the role `wrk` plays), run as its own process.

    python -m benchmarks.loadgen URL --concurrency 8 --seconds 5 [--body JSON] [--header K:V]
    python -m benchmarks.loadgen URL --concurrency 1,8,32 ...     (one level after the other)

``concurrency`` connections each keep one request in flight over HTTP/1.1 keep-alive, for a
bounded time (and a bounded count). It speaks just enough HTTP/1.1 for a JSON POST and a
Content-Length answer, with no client library in the timed loop, so one client core drives
several thousand requests a second. Prints one JSON object: requests sent, answered (2xx),
failed (non-2xx or connection errors), throughput over the measured window, and latency
percentiles in milliseconds. A warm-up period is run first and not counted. With several
concurrency levels, each runs in turn (with its own warm-up) and prints its own line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
from pathlib import Path
from urllib.parse import urlsplit

MAX_REQUESTS = 2_000_000


class Tally:
    def __init__(self) -> None:
        self.sent = 0
        self.ok = 0
        self.failed = 0
        self.latencies: list[float] = []
        self.errors: dict[str, int] = {}

    def error(self, what: str) -> None:
        self.failed += 1
        self.errors[what] = self.errors.get(what, 0) + 1


def build_request(url: str, body: bytes, headers: dict[str, str]) -> tuple[str, int, bytes]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = parts.path or "/"
    given = {key.lower() for key in headers}
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}"]
    if "content-type" not in given:
        lines.append("Content-Type: application/json")
    lines += [f"Content-Length: {len(body)}", "Connection: keep-alive"]
    lines += [f"{key}: {value}" for key, value in headers.items()]
    return host, port, ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Reads one answer; returns its status and whether the server closes the connection after it."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = None
    chunked = False
    closing = False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value.strip())
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
        elif name == b"connection" and b"close" in value.lower():
            closing = True
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length:
        await reader.readexactly(length)
    return status, closing


STOP = {"now": False}  # set by SIGTERM/SIGINT: finish the requests in flight, then report


async def worker(host: str, port: int, request: bytes, until: float, record_from: float, tally: Tally) -> None:
    reader = writer = None
    while time.monotonic() < until and tally.sent < MAX_REQUESTS and not STOP["now"]:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            started = time.perf_counter()
            counted = time.monotonic() >= record_from
            writer.write(request)
            status, closing = await read_response(reader)
            elapsed = time.perf_counter() - started
            if closing:  # the server ends this connection (e.g. a reloading load balancer)
                writer.close()
                reader = writer = None
            if counted:
                tally.sent += 1
                if 200 <= status < 300:
                    tally.ok += 1
                    tally.latencies.append(elapsed)
                else:
                    tally.error(f"HTTP {status}")
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            if time.monotonic() >= record_from:
                tally.sent += 1
                tally.error(type(exc).__name__)
            if writer is not None:
                writer.close()
            reader = writer = None
            await asyncio.sleep(0.01)
    if writer is not None:
        writer.close()


def percentile(sorted_values: list[float], fraction: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, int(round(fraction * (len(sorted_values) - 1))))
    return sorted_values[index]


async def run(
    url: str, body: bytes, headers: dict[str, str], concurrency: int, seconds: float, warmup_s: float
) -> dict:
    host, port, request = build_request(url, body, headers)
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, STOP.__setitem__, "now", True)
    tally = Tally()
    start = time.monotonic()
    record_from = start + warmup_s
    until = record_from + seconds
    await asyncio.gather(*(worker(host, port, request, until, record_from, tally) for _ in range(concurrency)))
    window = max(1e-9, time.monotonic() - record_from)
    latencies = sorted(tally.latencies)
    ms = 1000.0
    return {
        "concurrency": concurrency,
        "seconds": round(window, 3),
        "sent": tally.sent,
        "ok": tally.ok,
        "failed": tally.failed,
        "errors": tally.errors,
        "rps": round(tally.ok / window, 1),
        "p50_ms": None if not latencies else round(percentile(latencies, 0.50) * ms, 3),
        "p99_ms": None if not latencies else round(percentile(latencies, 0.99) * ms, 3),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url")
    parser.add_argument("--concurrency", default="1", help="connections; several as 1,8,32 run one after the other")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--body", default='{"instances": [[0.0]]}')
    parser.add_argument("--body-file", default=None, help="POST this file's bytes instead of --body")
    parser.add_argument("--header", action="append", default=[], help="extra header, 'Name: value'")
    args = parser.parse_args(argv)
    headers = dict(item.split(":", 1) for item in args.header)
    headers = {key.strip(): value.strip() for key, value in headers.items()}
    try:
        levels = [int(part) for part in args.concurrency.split(",") if part.strip()]
    except ValueError:
        parser.error(f"--concurrency: expected a number or numbers like 1,8,32, got {args.concurrency!r}")
    if not levels or min(levels) < 1:
        parser.error(f"--concurrency: expected positive numbers, got {args.concurrency!r}")
    for concurrency in levels:
        body = Path(args.body_file).read_bytes() if args.body_file else args.body.encode()
        result = asyncio.run(run(args.url, body, headers, concurrency, args.seconds, args.warmup))
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
