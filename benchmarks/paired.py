"""Paired comparisons: small differences (a protocol, prediction capture) against the plain JSON
path, measured so that the machine's drift cancels out.

The harness's rounds vary by 20-40% on a shared 2-core machine, so three rounds cannot tell 0.9x
from 1.0x. Here every variant is deployed once on one head, then short ``wrk`` runs alternate
between the plain path and each variant (the order reversed every pair), and each ratio is the
median of its paired ratios::

    python -m benchmarks.paired                       # c=8, 12 pairs of 3 s, every variant
    python -m benchmarks.paired --concurrency 1 --pairs 16 --variants mlflow,oip

Variants: ``mlflow`` (the same app asked through ``/invocations`` with ``dataframe_split``),
``oip`` (``/v2/models/<app>/infer`` at the server's root, JSON tensors), ``capture10`` and
``capture100`` (apps of their own: the plain app's settings plus ``capture`` of 10% / 100% of
requests). Same model and replica settings as the harness (``benchmarks/models.py``). Uses the
benchmark's own ports (``benchmarks/heads.py``) and needs ``wrk``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.heads import benchmark_environment
from benchmarks.models import build_models, store_models

VARIANTS = ("mlflow", "oip", "capture10", "capture100")
_SCRIPT = 'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nwrk.body = [==[{body}]==]\n'


def bodies(row: list[float]) -> dict[str, str]:
    """The same row in each protocol."""
    columns = [f"f{index}" for index in range(len(row))]
    tensor = {"name": "input", "shape": [1, len(row)], "datatype": "FP32", "data": row}
    return {
        "json": json.dumps({"instances": [row]}),
        "mlflow": json.dumps({"dataframe_split": {"columns": columns, "data": [row]}}),
        "oip": json.dumps({"inputs": [tensor]}),
    }


def paired_ratios(plain: list[float], other: list[float]) -> tuple[float, list[float]]:
    """The median of ``other[i] / plain[i]``, and the ratios."""
    ratios = [b / a for a, b in zip(plain, other, strict=True)]
    return statistics.median(ratios), ratios


def wrk_rate(url: str, script: Path, concurrency: int, seconds: float) -> float:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds:g}s", "-s", str(script), url],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    ).stdout
    for line in out.splitlines():
        if line.startswith("Requests/sec:"):
            return float(line.split()[1])
    raise RuntimeError(f"wrk printed no rate for {url}: {out[-500:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=12)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--out", help="write the rates and ratios as JSON here")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if not shutil.which("wrk"):
        parser.error("needs wrk (apt-get install -y wrk)")
    os.environ.update(benchmark_environment(os.environ))

    import ray_deploy
    from ray_deploy import DeploymentSpec

    work = Path(tempfile.mkdtemp(prefix="ray-deploy-paired-"))
    models = build_models(work / "model")
    refs = store_models(models, work / "datastore")
    ray_deploy.start_local_cluster()
    try:
        base = {"num_cpus": 0.5, "max_ongoing_requests": 32, "lineage": False, "predictor": "onnx", "model": "m"}
        apps = {"plain": None}
        for variant, sample in (("capture10", 0.1), ("capture100", 1.0)):
            if variant in variants:
                apps[variant] = {"sample": sample, "path": str(work / "captures")}
        urls = {}
        for app, capture in apps.items():
            options = {**base, "app": f"paired-{app}", **({"capture": capture} if capture else {})}
            urls[app] = ray_deploy.deploy(DeploymentSpec.from_options(options), {"default": refs["onnx"]}).url
        scripts = {}
        for kind, body in bodies(models.row).items():
            scripts[kind] = work / f"{kind}.lua"
            scripts[kind].write_text(_SCRIPT.format(body=body))
        root = urls["plain"].rsplit("/", 1)[0]
        targets = {"plain": (urls["plain"], scripts["json"])}
        for variant in variants:
            if variant == "mlflow":
                targets[variant] = (urls["plain"] + "/invocations", scripts["mlflow"])
            elif variant == "oip":
                targets[variant] = (f"{root}/v2/models/paired-plain/infer", scripts["oip"])
            else:
                targets[variant] = (urls[variant], scripts["json"])
        for url, script in targets.values():  # warm every path up
            wrk_rate(url, script, args.concurrency, 2)
        rates: dict[str, list[float]] = {name: [] for name in targets}
        order = list(targets)
        for index in range(args.pairs):
            for name in order if index % 2 == 0 else order[::-1]:
                rates[name].append(wrk_rate(*targets[name], args.concurrency, args.seconds))
            print(f"[paired] pair {index + 1}/{args.pairs}", file=sys.stderr, flush=True)
        results = {"concurrency": args.concurrency, "pairs": args.pairs, "seconds": args.seconds, "variants": {}}
        print(f"plain JSON path: median {statistics.median(rates['plain']):,.0f} req/s at c={args.concurrency}")
        for variant in variants:
            median, ratios = paired_ratios(rates["plain"], rates[variant])
            results["variants"][variant] = {"median_ratio": round(median, 3), "ratios": [round(r, 3) for r in ratios]}
            print(f"{variant}: {median:.3f}x the plain path (paired ratios {', '.join(f'{r:.2f}' for r in ratios)})")
        results["rates"] = rates
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2))
    finally:
        ray_deploy.stop_local_cluster()
    return 0


if __name__ == "__main__":
    sys.exit(main())
