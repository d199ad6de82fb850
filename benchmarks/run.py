"""Run the benchmark harness (issue #6): one model, every way of serving it, side by side.

    python -m benchmarks.run --quick [--out results.json] [--markdown docs/benchmarks.md]
    python -m benchmarks.run --full  --out results.json --markdown docs/benchmarks.md
    python -m benchmarks.run --smoke --out /tmp/r.json --markdown /tmp/r.md   (the test's mode)
    python -m benchmarks.run --render results.json --markdown docs/benchmarks.md   (reports only)

Modes: ``--smoke`` (c=1, 1 s points, in-process + FastAPI + our app, about a minute),
``--quick`` (c=1/8/32, every row but the XGBoost A/B, three rounds; 10-15 minutes on 2 cores),
``--full`` (longer points and segments, every row, and the deploy cost of the example flow).

Verdicts that hold: the rows that ratios compare with ``ours`` run together on one head in
cycles of short segments (``--segment``, ``--min-cycles``, ``--max-cycles``), so each ratio pairs
segments taken seconds apart; rows of other heads pair round by round (``--repeat``). Each
target's verdict comes from the interval of the median of its pairs: met, missed, or too close
to call when the interval straddles the target (``benchmarks/report.py``); cycles go on while a
target is too close to call, up to ``--max-cycles``.

The harness trains the model (``benchmarks/models.py``), then runs each group of rows in a
process of its own (``benchmarks/groups.py``), each head group on a fresh Ray head with its
data path (``benchmarks/heads.py``), on the benchmark's own ports: GCS 6389, dashboard 8289,
HTTP 8089, metrics 8589, client 9089 (override with ``RAY_DEPLOY_*_PORT``). It refuses to start
if something already listens there (``--stop-existing-head`` stops a benchmark head left
behind). A row that fails is recorded with its error and the run goes on; the exit status is 1
if any row failed.

Writes the results as JSON (``--out``), a Markdown report (``--markdown``) and a PNG plot
(``--plot``, default: beside the Markdown with a ``.png`` suffix), and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks.heads import (
    BENCHMARK_PORTS,
    benchmark_environment,
    head_environment,
    ports_in_use,
    prepare_haproxy_directory,
)
from benchmarks.measure import REPO
from benchmarks.plan import GROUP_DATA_PATHS, GROUPS, MODES, ROUND_ENV, ROWS_BY_ID, Plan, Settings, settings_for
from benchmarks.report import compute_ratios, ratios_table, render_markdown, render_plot, results_table

VERSIONED_PACKAGES = ("ray", "onnxruntime", "xgboost", "scikit-learn", "fastapi", "uvicorn", "metaflow", "numpy")


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def describe_machine() -> dict[str, Any]:
    """CPU, memory, platform, package versions and the git commit the run measured."""
    cpu_model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": memory_gib,
        "platform": platform.platform(),
        "versions": versions,
        "git": git_description(),
        "load_average": {"start": [round(x, 2) for x in os.getloadavg()]},
    }


def generator_description() -> str:
    """Which load generator the points come from, said plainly (and how to get wrk when missing)."""
    from benchmarks.measure import WRK_GENERATOR_ENV, load_generator

    if load_generator() == "wrk":
        shown = subprocess.run(["wrk", "--version"], capture_output=True, text=True, timeout=10)
        version = (shown.stdout or shown.stderr).split("[")[0].strip() or "wrk"
        return f"{version} (C, one thread: one core at most)"
    if os.environ.get(WRK_GENERATOR_ENV) == "python":
        return f"benchmarks/loadgen.py (Python, one process; {WRK_GENERATOR_ENV}=python)"
    return (
        "benchmarks/loadgen.py (Python, one process): wrk is not installed "
        "(apt-get install -y wrk); a Python generator competes with the server for the cores"
    )


def git_description() -> str:
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return f"{commit}{' with uncommitted changes' if dirty else ''}" if commit else "?"


def prepare_plan(settings: Settings, workdir: Path) -> tuple[Plan, dict[str, Any]]:
    """Train and export the model, store it where replicas can load it, and write the plan."""
    from benchmarks.models import build_models, store_models

    models = build_models(workdir / "model")
    refs = store_models(models, workdir / "model" / ".metaflow")
    plan = Plan(
        settings=settings,
        workdir=str(workdir),
        onnx_path=str(models.onnx_path),
        request_row=models.row,
        request_rows=models.rows if any(ROWS_BY_ID[r].rows_per_request > 1 for r in settings.rows) else [],
        model_refs={name: ref.model_dump(mode="json") for name, ref in refs.items()},
        repo=str(REPO),
    )
    plan.write(workdir / "plan.json")
    return plan, models.describe()


def run_group(group: str, plan: Plan, env: dict[str, str], round_index: int = 0) -> dict[str, Any]:
    """Run one group in its own process, bounded in time; a crash or timeout becomes row errors."""
    workdir = Path(plan.workdir)
    out = workdir / f"group-{group}.json"
    log_path = workdir / f"group-{group}.log"
    group_env = dict(env) if group == "local" else head_environment(env, GROUP_DATA_PATHS[group])
    group_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    group_env[ROUND_ENV] = str(round_index)
    if group == "haproxy":
        prepare_haproxy_directory(env)
    started = time.monotonic()
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.groups", group, str(workdir / "plan.json"), str(out)],
            cwd=str(REPO),
            env=group_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            process.wait(timeout=plan.settings.group_timeout_s)
            problem = None if process.returncode == 0 else f"exited with status {process.returncode}"
        except subprocess.TimeoutExpired:
            problem = f"did not finish within {plan.settings.group_timeout_s:g}s and was stopped"
            _stop_session(process)
        except BaseException:  # Ctrl-C: the group runs in its own session and would not see it
            _stop_session(process)
            if group != "local":
                _stop_benchmark_head()
            raise
    if group != "local":
        _stop_benchmark_head()  # the group stops its head itself; this covers a crash or a timeout
    seconds = round(time.monotonic() - started, 1)
    if problem is None and out.is_file():
        result = json.loads(out.read_text())
        result["seconds"] = seconds
        return result
    tail = log_path.read_text(errors="replace").strip()[-3000:] if log_path.is_file() else ""
    error = f"group {group!r} {problem or 'wrote no result'}; log {log_path}: ...{tail[-600:]}"
    rows = [
        {"id": s.id, "title": s.title, "group": group, "http": s.http, "points": [], "error": error}
        for s in plan.rows_of(group)
    ]
    return {"group": group, "head": {"group": group, "error": error}, "rows": rows, "seconds": seconds}


def _stop_session(process: subprocess.Popen) -> None:
    """Stop a group process this harness started (in its own session) and everything under it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=15)
            return
        except subprocess.TimeoutExpired:
            continue


def _stop_benchmark_head() -> None:
    from benchmarks.groups import HEAD_STOP_GRACE_S
    from ray_deploy import stop_local_cluster

    try:
        stop_local_cluster(grace_s=HEAD_STOP_GRACE_S)
    except Exception as exc:  # reported; the next group's port check will say if a head is still there
        progress(f"could not stop the benchmark head: {exc}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    modes = parser.add_mutually_exclusive_group(required=True)
    for mode in MODES:
        modes.add_argument(f"--{mode}", dest="mode", action="store_const", const=mode, help=f"{mode} mode")
    modes.add_argument(
        "--render", type=Path, default=None, metavar="RESULTS.json", help="only write the reports of an earlier run"
    )
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--markdown", type=Path, default=None, help="write the Markdown report here")
    parser.add_argument("--plot", type=Path, default=None, help="PNG plot path (default: beside --markdown)")
    parser.add_argument(
        "--rows", default=None, help=f"comma-separated rows instead of the mode's: {','.join(ROWS_BY_ID)}"
    )
    parser.add_argument("--concurrency", default=None, help="comma-separated connection counts, e.g. 1,8,32")
    parser.add_argument("--seconds", type=float, default=None, help="measured seconds per point")
    parser.add_argument("--warmup", type=float, default=None, help="warm-up seconds before each point")
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="run every group N times, rounds interleaved; each point reports its median round "
        "(default: 3 in --quick and --full, 1 in --smoke)",
    )
    parser.add_argument("--segment", type=float, default=None, help="seconds per segment of the interleaved rows")
    parser.add_argument("--min-cycles", type=int, default=None, help="cycles of the interleaved rows at each level")
    parser.add_argument(
        "--max-cycles", type=int, default=None, help="at most this many cycles, while a target is too close to call"
    )
    parser.add_argument(
        "--deploy-cost",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time the example flow with and without its deploy (default: on in --full)",
    )
    parser.add_argument(
        "--studies",
        default=None,
        help="comma-separated studies of the default head, or 'none': apps (many apps on one head), "
        "scale_out (a load step with replica autoscaling); default: both in --quick and --full",
    )
    parser.add_argument(
        "--apps", default=None, help="the apps study's checkpoints, e.g. 10,30 (it deploys up to the last)"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="keep models, plan and logs here")
    parser.add_argument("--stop-existing-head", action="store_true", help="stop a head on the benchmark ports first")
    return parser.parse_args(argv)


def measurement_command(args: argparse.Namespace) -> str:
    """The command that repeats this run's measurements (where the reports go left out)."""
    words = ["python -m benchmarks.run", f"--{args.mode}"]
    listed = (("--rows", args.rows), ("--concurrency", args.concurrency), ("--studies", args.studies))
    for flag, value in (*listed, ("--apps", args.apps)):
        if value is not None:
            words.append(f"{flag} {value}")
    numeric = (("--seconds", args.seconds), ("--warmup", args.warmup), ("--repeat", args.repeat))
    numeric += (("--segment", args.segment), ("--min-cycles", args.min_cycles), ("--max-cycles", args.max_cycles))
    for flag, value in numeric:
        if value is not None:
            words.append(f"{flag} {value:g}")
    if args.deploy_cost is not None:
        words.append("--deploy-cost" if args.deploy_cost else "--no-deploy-cost")
    return " ".join(words)


def build_settings(args: argparse.Namespace) -> Settings:
    def numbers(text: str | None, flag: str) -> tuple[int, ...] | None:
        if text is None:
            return None
        try:
            return tuple(int(part) for part in text.split(",") if part.strip())
        except ValueError:
            raise ValueError(f"{flag}: expected comma-separated whole numbers, e.g. 1,8,32; got {text!r}") from None

    return settings_for(
        args.mode,
        rows=None if args.rows is None else tuple(r.strip() for r in args.rows.split(",") if r.strip()),
        concurrency=numbers(args.concurrency, "--concurrency"),
        seconds=args.seconds,
        warmup_s=args.warmup,
        deploy_cost=args.deploy_cost,
        repeat=args.repeat,
        segment_s=args.segment,
        min_cycles=args.min_cycles,
        max_cycles=args.max_cycles,
        studies=None
        if args.studies is None
        else tuple(n.strip() for n in args.studies.split(",") if n.strip() not in ("", "none")),
        many_apps=numbers(args.apps, "--apps"),
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render is not None:
        results = json.loads(args.render.read_text())
        write_reports(results, args)
        return 0
    try:
        settings = build_settings(args)
    except ValueError as exc:
        print(f"ValueError: {exc}", file=sys.stderr)
        return 2
    env = benchmark_environment(os.environ)
    os.environ.clear()
    os.environ.update(env)  # this process stops benchmark heads too (safety net): same ports as its groups
    groups = [g for g in GROUPS if any(ROWS_BY_ID[r].group == g for r in settings.rows)]
    if settings.studies and "default" not in groups:  # the studies run on the default head
        groups.append("default")
    if any(g != "local" for g in groups):
        busy = ports_in_use(env)
        if busy and args.stop_existing_head:
            progress(f"stopping the head on the benchmark ports ({', '.join(busy)}) ...")
            _stop_benchmark_head()
            busy = ports_in_use(env)
        if busy:
            print(
                f"PortsInUse: something already listens on the benchmark ports {', '.join(busy)}. The harness starts "
                f"and stops its own heads there. If it is a benchmark head left behind, rerun with "
                f"--stop-existing-head (or: RAY_DEPLOY_GCS_PORT={env['RAY_DEPLOY_GCS_PORT']} ray-deploy cluster down); "
                f"otherwise choose free ports with {', '.join(BENCHMARK_PORTS)}.",
                file=sys.stderr,
            )
            return 2
    # Absolute: the group processes run in the checkout, and replicas write captures under it.
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="ray-deploy-bench-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    started = time.monotonic()
    machine = describe_machine()
    machine["generator"] = generator_description()
    progress(f"load generator: {machine['generator']}")
    progress(f"{settings.mode}: rows {', '.join(settings.rows)} at c={settings.concurrency}; work dir {workdir}")
    plan, model = prepare_plan(settings, workdir)
    rounds: list[list[dict[str, Any]]] = []
    heads: list[dict[str, Any]] = []
    deploy_cost = None
    studies = None
    for round_index in range(settings.repeat):
        if round_index == 1 and (settings.deploy_cost or settings.studies):  # flow runs and studies run once
            plan = replace(plan, settings=replace(plan.settings, deploy_cost=False, studies=()))
            plan.write(workdir / "plan.json")
        rows_of_round: list[dict[str, Any]] = []
        for group in groups:
            if not plan.rows_of(group) and not (group == "default" and plan.settings.studies):
                continue  # a head started only for the studies, which ran in the first round
            where = f" (round {round_index + 1}/{settings.repeat})" if settings.repeat > 1 else ""
            progress(f"group {group}{where}: {', '.join(s.id for s in plan.rows_of(group))} ...")
            result = run_group(group, plan, env, round_index)
            rows_of_round += result["rows"]
            if result.get("head"):
                heads.append({**result["head"], "round": round_index + 1})
            deploy_cost = result.get("deploy_cost") or deploy_cost
            studies = result.get("studies") or studies
            failed = [row["id"] for row in result["rows"] if row.get("error")]
            progress(
                f"group {group} done in {result['seconds']}s" + (f"; failed: {', '.join(failed)}" if failed else "")
            )
        rounds.append(rows_of_round)
    rows = median_rows(rounds)
    order = {row_id: index for index, row_id in enumerate(settings.rows)}
    rows.sort(key=lambda row: order.get(row["id"], len(order)))
    machine["load_average"]["end"] = [round(x, 2) for x in os.getloadavg()]
    results = {
        "schema": 1,
        "mode": settings.mode,
        "command": measurement_command(args),
        "started_at": started_at,
        "wall_s": round(time.monotonic() - started, 1),
        "machine": machine,
        "settings": settings.to_dict(),
        "ports": {name: env[name] for name in BENCHMARK_PORTS},
        "model": model,
        "heads": heads,
        "rows": rows,
        "ratios": compute_ratios(rows, settings.concurrency),
        "deploy_cost": deploy_cost,
        "studies": studies,
        "workdir": str(workdir),
    }
    write_reports(results, args)
    print("\n".join(results_table(rows, settings.concurrency)))
    print()
    print("\n".join(ratios_table(results["ratios"], settings.concurrency)))
    failed = [row["id"] for row in rows if row.get("error")]
    if failed:
        progress(f"rows that failed: {', '.join(failed)}; logs in {workdir}")
    elif args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    progress(f"done in {results['wall_s']:.0f}s")
    return 1 if failed else 0


def median_rows(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per id from several rounds: each point is the round with the median requests/s
    (the lower middle of an even count), so its latencies come from the same measurement; every
    round's requests/s is kept as ``rounds_rps`` (sorted) and every round's numbers as ``rounds``
    (in the order they ran). A row that failed in any round is reported with that round's error."""
    if len(rounds) == 1:
        return rounds[0]
    by_id: dict[str, list[dict[str, Any]]] = {}
    for rows in rounds:
        for row in rows:
            by_id.setdefault(row["id"], []).append(row)
    merged = []
    for candidates in by_id.values():
        failed = [row for row in candidates if row.get("error")]
        if failed:
            merged.append(failed[0])
            continue
        row = dict(candidates[0])
        points = []
        for index in range(len(row["points"])):
            in_order = [r["points"][index] for r in candidates]
            measured = sorted(in_order, key=lambda p: p.get("rps") or 0.0)
            points.append(
                {
                    **measured[(len(measured) - 1) // 2],
                    "rounds_rps": [p.get("rps") for p in measured],
                    # Round by round, in the order they ran: ratios pair round i of one row with
                    # round i of another (benchmarks/report.py).
                    "rounds": [
                        {key: p[key] for key in ("rps", "p50_ms", "p99_ms", "segments") if key in p} for p in in_order
                    ],
                }
            )
        row["points"] = points
        merged.append(row)
    return merged


def write_reports(results: dict[str, Any], args: argparse.Namespace) -> None:
    """JSON, PNG and Markdown; a plot that cannot be drawn is recorded, not fatal."""
    plot_path = args.plot or (args.markdown.with_suffix(".png") if args.markdown else None)
    results["plot"] = None
    if plot_path is not None:
        try:
            render_plot(results, plot_path)
            results["plot"] = {"path": str(plot_path)}
        except Exception as exc:
            hint = " (pip install matplotlib)" if isinstance(exc, ImportError) else ""
            results["plot"] = {"path": None, "error": f"{type(exc).__name__}: {exc}{hint}"}
            progress(f"no plot: {results['plot']['error']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, default=str) + "\n")
        progress(f"results: {args.out}")
    if args.markdown:
        plot_name = None
        if results["plot"] and results["plot"].get("path"):
            plot_name = os.path.relpath(plot_path.resolve(), args.markdown.resolve().parent)
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(render_markdown(results, plot_name))
        progress(f"report: {args.markdown}")


if __name__ == "__main__":
    sys.exit(main())
