"""The fast path across nodes: our app on a cluster of simulated nodes, per data path, same run.

    python -m benchmarks.multinode [--rounds 2] [--seconds 5] [--concurrency 1,8,32] \\
        [--out docs/benchmarks-multinode.json] [--markdown docs/benchmarks-multinode.md]

Each data path gets a head of its own (one at a time, on the benchmark's ports) that Ray's fake
multi-node provider gives two worker nodes of one CPU; the head holds no CPU, so the app's two
replicas (0.5 CPU each, at most one per node) run on the two worker nodes, and every request
crosses from the head's entry point to a replica on another node (checked: the replicas' nodes
are recorded). The data paths:

- ``front``: the package's default, the ray-deploy front (HAProxy on the head) sending each
  request to a replica's own port with the app's secret (``ray_deploy.serving.access``);
- ``serve_haproxy``: Serve's HAProxy mode (replica ports open to anyone who reaches the node);
- ``serve_proxy``: Serve's defaults (its proxy on the head, then an actor call to a replica).

Simulated nodes share this machine's address, so Serve's proxies run on the head only
(``RAY_DEPLOY_PROXY_LOCATION=HeadOnly``) for every path. Heads take turns, and their order turns
each round; the ratios are taken within a round (the front over each Serve path, per concurrency)
and their median reported. Load comes from ``wrk`` when it is installed (``benchmarks.measure``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PATHS = {"front": "default", "serve_haproxy": "haproxy", "serve_proxy": "proxy"}
"""Data path -> the benchmark head's group (``benchmarks.heads.DATA_PATHS``)."""
TITLES = {
    "front": "ray-deploy front (secret-checked replica ports)",
    "serve_haproxy": "Serve's HAProxy mode (open replica ports)",
    "serve_proxy": "Serve's proxy (defaults)",
}
APP = "bench-multinode"
WORKER_NODES = 2
REPLICAS = 2
REPLICA_NUM_CPUS = 0.5
NODES_TIMEOUT_S = 180.0
HEAD_TIMEOUT_S = 900.0


def cluster_config(gcs_port: int) -> dict[str, Any]:
    """Ray's fake multi-node provider: a head with no CPU and ``WORKER_NODES`` nodes of one CPU, kept up."""
    return {
        "cluster_name": "bench-multinode",
        "max_workers": WORKER_NODES,
        "upscaling_speed": 100.0,
        "idle_timeout_minutes": 60,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": f"127.0.0.1:{gcs_port}",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "launch_multiple": True,
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "min_workers": 0, "max_workers": 0},
            "node": {
                "resources": {"CPU": 1, "object_store_memory": 100_000_000},
                "node_config": {},
                "min_workers": WORKER_NODES,
                "max_workers": WORKER_NODES,
            },
        },
        "head_node_type": "ray.head.default",
        **{key: {} for key in ("auth", "docker", "file_mounts")},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        **{
            key: []
            for key in (
                "initialization_commands",
                "setup_commands",
                "head_setup_commands",
                "worker_setup_commands",
                "head_start_ray_commands",
                "worker_start_ray_commands",
            )
        },
    }


def ratios(rounds: list[dict[str, Any]], concurrency: tuple[int, ...]) -> dict[str, Any]:
    """The front's requests/s over each Serve path's, per round and concurrency, and their medians.

    ``rounds``: ``{path: {"points": [{"concurrency": c, "rps": ...}, ...]}}`` per round; a round
    missing a path (it failed) gives no ratio for it.
    """
    out: dict[str, Any] = {}
    for other in ("serve_haproxy", "serve_proxy"):
        for level in concurrency:
            values = []
            for measured in rounds:
                ours, theirs = (_rps(measured.get(path), level) for path in ("front", other))
                if ours and theirs:
                    values.append(ours / theirs)
            key = f"front_vs_{other}_c{level}"
            out[key] = {
                "rounds": [round(v, 3) for v in values],
                "median": round(statistics.median(values), 3) if values else None,
            }
    return out


def _rps(result: dict[str, Any] | None, level: int) -> float | None:
    for point in (result or {}).get("points", []):
        if point.get("concurrency") == level and point.get("rps"):
            return float(point["rps"])
    return None


def render_markdown(results: dict[str, Any]) -> str:
    levels = results["settings"]["concurrency"]
    lines = [
        "# The fast path across nodes",
        "",
        f"Generated by `{results['command']}` on {results['started']} ({results['seconds']:.0f} s); "
        f"machine: {results['machine']}; load generator: {results['generator']}.",
        "",
        f"One head with no CPU and {WORKER_NODES} simulated worker nodes of one CPU (Ray's fake multi-node "
        f"provider), per data path; the app's {REPLICAS} replicas ({REPLICA_NUM_CPUS} CPU, ONNX, one row per "
        "request) run one per worker node, so every request crosses from the head to another node. Heads take "
        "turns, their order turning each round; ratios are taken within a round, the median shown.",
        "",
        "| data path | "
        + " | ".join(f"req/s c={c}" for c in levels)
        + " | c=8 ms: p50 / p90 / p99 / max | replicas' nodes |",
        "|---|" + "---:|" * len(levels) + "---:|---|",
    ]
    for path in PATHS:
        runs = [r[path] for r in results["rounds"] if path in r and not r[path].get("error")]
        if not runs:
            errors = [r[path]["error"] for r in results["rounds"] if path in r and r[path].get("error")]
            lines.append(f"| {TITLES[path]} | failed: {(errors or ['not measured'])[0][:200]} |")
            continue
        cells = []
        for level in levels:
            values = [v for v in (_rps(run, level) for run in runs) if v]
            cells.append(f"{statistics.median(values):,.0f}" if values else "-")
        at8 = [p for run in runs for p in run.get("points", []) if p.get("concurrency") == 8]
        nodes = {len(set(run.get("replica_nodes", []))) for run in runs}
        spread = "/".join(str(n) for n in sorted(nodes))
        latency = " / ".join(_median_ms(at8, key) for key in ("p50_ms", "p90_ms", "p99_ms", "max_ms"))
        lines.append(f"| {TITLES[path]} | {' | '.join(cells)} | {latency} | {spread} distinct worker nodes |")
    lines += ["", "| ratio | " + " | ".join(f"c={c}" for c in levels) + " |", "|---|" + "---:|" * len(levels)]
    for other in ("serve_haproxy", "serve_proxy"):
        cells = []
        for level in levels:
            entry = results["ratios"].get(f"front_vs_{other}_c{level}") or {}
            shown = ", ".join(f"{v:.2f}" for v in entry.get("rounds", []))
            cells.append(f"**{entry['median']:.2f}x** ({shown})" if entry.get("median") else "-")
        lines.append(f"| front / {TITLES[other]} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Per round in brackets; latencies are each round's, their median shown. Replica ports on the front's "
        "path refuse requests without the app's secret; Serve's HAProxy mode leaves them open (see "
        "docs/data-path.md).",
        "",
    ]
    return "\n".join(lines)


def _median_ms(points: list[dict[str, Any]], key: str) -> str:
    """The median over rounds of one latency of the points (older results have no p90 or max)."""
    values = [p[key] for p in points if p.get(key) is not None]
    return f"{statistics.median(values):.1f}" if values else "-"


# -- one head (a process of its own) ------------------------------------------------------------


def measure_head(path: str, plan: dict[str, Any]) -> dict[str, Any]:
    """Start this path's head with simulated nodes, deploy the app, measure it, stop the head."""
    from benchmarks.measure import measure_http, wait_until_answers
    from ray_deploy import DeploymentSpec, ModelRef, connect, deploy, start_local_cluster, stop_local_cluster

    result: dict[str, Any] = {"path": path}
    config = Path(plan["workdir"]) / f"cluster-{path}.yaml"
    import yaml

    config.write_text(yaml.safe_dump(cluster_config(int(os.environ["RAY_DEPLOY_GCS_PORT"])), sort_keys=False))
    started = time.monotonic()
    try:
        start_local_cluster(autoscaling_config=str(config))
        result["start_s"] = round(time.monotonic() - started, 1)
        with connect() as info:
            result["nodes_s"] = round(_wait_for_nodes(WORKER_NODES), 1)
            spec = DeploymentSpec.from_options(
                {
                    "app": APP,
                    "predictor": "onnx",
                    "num_replicas": REPLICAS,
                    "num_cpus": REPLICA_NUM_CPUS,
                    "max_replicas_per_node": 1,
                    "max_ongoing_requests": 32,
                    "lineage": False,
                }
            )
            deployed = deploy(spec, {"default": ModelRef.model_validate(plan["model_ref"])})
            url = deployed.url
            result["url"] = url
            result["http_url"] = info.http_url
            result["first_answer_s"] = round(wait_until_answers(url, plan["body"]), 2)
            result["replica_nodes"] = _replica_nodes()
            result["points"] = measure_http(
                url,
                plan["body"],
                concurrency=tuple(plan["concurrency"]),
                seconds=plan["seconds"],
                warmup_s=plan["warmup_s"],
            )
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    finally:
        stop_local_cluster(grace_s=2.0)
    return result


def _wait_for_nodes(count: int) -> float:
    import ray

    started = time.monotonic()
    while time.monotonic() - started < NODES_TIMEOUT_S:
        workers = [n for n in ray.nodes() if n["Alive"] and n.get("Resources", {}).get("CPU", 0) >= 1]
        if len(workers) >= count:
            return time.monotonic() - started
        print(f"[multinode] {len(workers)} of {count} worker nodes up ...", flush=True)
        time.sleep(2)
    raise TimeoutError(f"{count} simulated worker nodes did not join within {NODES_TIMEOUT_S:g}s")


def _replica_nodes() -> list[str]:
    from ray.util.state import list_actors

    from ray_deploy.cluster import LocalClusterSettings

    actors = list_actors(
        address=LocalClusterSettings.from_env().dashboard_url,
        filters=[("state", "=", "ALIVE")],
        limit=1000,
        raise_on_missing_output=False,
    )
    return sorted(a.node_id for a in actors if a.class_name.startswith("ServeReplica") and APP in (a.name or ""))


# -- the run ------------------------------------------------------------------------------------


def run_head(path: str, plan_path: Path, workdir: Path) -> dict[str, Any]:
    from benchmarks.heads import benchmark_environment, head_environment, prepare_haproxy_directory

    base = benchmark_environment(os.environ)
    env = head_environment(base, PATHS[path])
    env["RAY_DEPLOY_PROXY_LOCATION"] = "HeadOnly"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    if path == "serve_haproxy":
        prepare_haproxy_directory(base)
    out = workdir / f"head-{path}.json"
    log = workdir / f"head-{path}.log"
    with open(log, "a") as handle:
        process = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.multinode",
                "--head",
                path,
                "--plan",
                str(plan_path),
                "--result",
                str(out),
            ],
            cwd=str(REPO),
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            timeout=HEAD_TIMEOUT_S,
            check=False,
        )
    if out.is_file():
        return json.loads(out.read_text())
    tail = log.read_text(errors="replace")[-600:]
    return {"path": path, "error": f"the head process exited with {process.returncode}; log {log}: ...{tail}"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.multinode", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--out", default=None, help="JSON results")
    parser.add_argument("--markdown", default=None, help="Markdown page")
    parser.add_argument("--head", choices=sorted(PATHS), help=argparse.SUPPRESS)
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.head:  # one head, in a process of its own
        plan = json.loads(Path(args.plan).read_text())
        Path(args.result).write_text(json.dumps(measure_head(args.head, plan), indent=1))
        return 0

    from benchmarks.heads import benchmark_environment, ports_in_use
    from benchmarks.models import build_models, store_models
    from benchmarks.run import describe_machine, generator_description

    busy = ports_in_use(benchmark_environment(os.environ))
    if busy:
        print(f"benchmark ports in use ({', '.join(busy)}): stop that head first", file=sys.stderr)
        return 2
    levels = tuple(int(c) for c in args.concurrency.split(","))
    workdir = Path(tempfile.mkdtemp(prefix="ray-deploy-multinode-"))
    print(f"[multinode] load generator: {generator_description()}; work dir {workdir}", flush=True)
    models = build_models(workdir / "model")
    refs = store_models(models, workdir / "model" / ".metaflow")
    plan = {
        "workdir": str(workdir),
        "model_ref": refs["onnx"].model_dump(mode="json"),
        "body": json.dumps({"instances": [models.row]}),
        "concurrency": list(levels),
        "seconds": args.seconds,
        "warmup_s": args.warmup,
    }
    plan_path = workdir / "plan.json"
    plan_path.write_text(json.dumps(plan))
    started_at, started = time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.monotonic()
    rounds = []
    order = list(PATHS)
    for index in range(args.rounds):
        turn = order[index % len(order) :] + order[: index % len(order)]
        measured = {}
        for path in turn:
            print(f"[multinode] round {index + 1}/{args.rounds}: {path} ...", flush=True)
            measured[path] = run_head(path, plan_path, workdir)
            shown = measured[path].get("error") or ", ".join(
                f"c={p['concurrency']} {p.get('rps', 0):,.0f} req/s" for p in measured[path].get("points", [])
            )
            print(f"[multinode]   {path}: {shown}", flush=True)
        rounds.append(measured)
    results = {
        "command": "python -m benchmarks.multinode " + " ".join(argv if argv is not None else sys.argv[1:]),
        "started": started_at,
        "seconds": round(time.monotonic() - started, 1),
        "machine": _machine_line(describe_machine()),
        "generator": generator_description(),
        "settings": {"rounds": args.rounds, "seconds": args.seconds, "concurrency": list(levels)},
        "rounds": rounds,
        "ratios": ratios(rounds, levels),
    }
    text = render_markdown(results)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(text)
    print(text)
    return 0


def _machine_line(machine: dict[str, Any]) -> str:
    versions = machine.get("versions") or {}
    return (
        f"{machine['cpu_model']}, {machine['cpus_usable'] or machine['cpu_count']} usable CPUs, "
        f"{machine['memory_gib']} GiB; Ray {versions.get('ray')}; git {machine['git']}"
    )


if __name__ == "__main__":
    sys.exit(main())
