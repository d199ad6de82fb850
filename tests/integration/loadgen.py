"""Steady request load from a separate process, bounded in time and count.

    python loadgen.py URL OUT_JSONL STOP_FILE [--rate 25] [--max-seconds 600] [--max-requests 20000]

Sends one scoring request at a time at about ``rate`` per second until STOP_FILE exists (or a
bound is hit), writing one JSON line per request: start and end times (time.time()), status,
the variant and model version that answered, the fallback header, and any connection error.
"""

import argparse
import json
import time
from pathlib import Path

import httpx


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("out")
    parser.add_argument("stop")
    parser.add_argument("--rate", type=float, default=25.0)
    parser.add_argument("--max-seconds", type=float, default=600.0)
    parser.add_argument("--max-requests", type=int, default=20000)
    parser.add_argument("--body", default='{"instances": [[0.5, 0.5, 0.5, 0.5]]}')
    args = parser.parse_args()
    body = json.loads(args.body)
    stop = Path(args.stop)
    deadline = time.monotonic() + args.max_seconds
    period = 1.0 / args.rate
    with httpx.Client(timeout=30) as client, open(args.out, "w") as out:
        for _ in range(args.max_requests):
            if stop.exists() or time.monotonic() > deadline:
                break
            started = time.time()
            row = {"start": started}
            try:
                answer = client.post(args.url, json=body)
                row["status"] = answer.status_code
                data = answer.json() if answer.headers.get("content-type", "").startswith("application/json") else {}
                row["model_version"] = data.get("model_version")
                row["variant"] = data.get("variant")
                row["error"] = data.get("error")
                row["fallback_from"] = answer.headers.get("x-ray-deploy-fallback-from")
            except httpx.HTTPError as exc:
                row["status"] = None
                row["error"] = f"{type(exc).__name__}: {exc}"
            row["end"] = time.time()
            out.write(json.dumps(row) + "\n")
            out.flush()
            time.sleep(max(0.0, period - (row["end"] - started)))


if __name__ == "__main__":
    main()
