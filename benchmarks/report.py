"""Ratios between rows, the issue's targets, and the Markdown and PNG reports.

Throughput ratios divide requests/s of two rows at the same concurrency; the shadow cost is the
relative increase of p50 latency (``p50(shadow) / p50(ours) - 1``). A ratio is estimated from
*pairs*: measurements of the two rows taken close in time, so that a slow spell of the machine
meets both sides. Rows measured in cycles (``benchmarks.groups.measure_interleaved_rows``: short
segments of every row in turn, several cycles per level) pair segment i of one with segment i of
the other; rows of other heads pair round i with round i (``--repeat``: rounds are interleaved).
The estimate is the median of the paired values, with a distribution-free confidence interval of
that median (``median_interval``: order statistics of the pairs, at least ``CONFIDENCE`` when
there are enough of them). A target is *met* when the whole interval clears it, *missed* when the
whole interval falls short, and *too close to call* when the interval straddles it: more pairs
would decide, and the report says so rather than let one noisy run flip a verdict. With a single
pair there is no interval and the value alone decides. *n/a*: a row is missing or failed.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass
from math import comb
from pathlib import Path
from typing import Any

from benchmarks.plan import ROWS, ROWS_BY_ID, TOGGLE_WARMUP_S, TOGGLED_ROWS, TOGGLED_SEGMENT_S


@dataclass(frozen=True)
class Ratio:
    """``numerator`` row against ``denominator`` row, with the issue's target if it sets one."""

    name: str
    title: str
    numerator: str
    denominator: str
    metric: str = "rps"  # "rps": throughput ratio, at least target; "p50_cost": p50 increase, at most target
    target: float | None = None
    target_at: tuple[int, ...] | None = None  # concurrencies the target applies to; None: all

    def sample(self, num: dict[str, Any], den: dict[str, Any]) -> float | None:
        """The ratio of one pair of measurements."""
        if self.metric == "rps":
            return num["rps"] / den["rps"] if num.get("rps") and den.get("rps") else None
        if num.get("p50_ms") is None or not den.get("p50_ms"):
            return None
        return num["p50_ms"] / den["p50_ms"] - 1.0

    def samples(self, num: dict[str, Any] | None, den: dict[str, Any] | None) -> list[float] | None:
        """One value per pair (``measurement_pairs``); None if a side is missing or a pair cannot be read."""
        if not num or not den:
            return None
        values = [self.sample(a, b) for a, b in measurement_pairs(num, den)]
        return None if not values or None in values else values  # type: ignore[return-value]

    def value(self, num: dict[str, Any] | None, den: dict[str, Any] | None) -> float | None:
        """The ratio of two points: the median of its paired values."""
        values = self.samples(num, den)
        return statistics.median(values) if values else None

    def status(self, value: float | None, concurrency: int, interval: tuple[float, float] | None = None) -> str | None:
        """``met``, ``missed``, ``close`` (the interval straddles the target) or ``n/a``; None
        where no target applies. Without an interval (a single pair), the value decides."""
        if self.target is None or (self.target_at is not None and concurrency not in self.target_at):
            return None
        if value is None:
            return "n/a"
        low, high = interval if interval is not None else (value, value)
        if self.metric == "rps":
            return "met" if low >= self.target else "missed" if high < self.target else "close"
        return "met" if high <= self.target else "missed" if low > self.target else "close"

    def describe_target(self) -> str:
        if self.target is None:
            return "reported"
        where = "" if self.target_at is None else " at c=" + ", ".join(map(str, self.target_at))
        if self.metric == "rps":
            return f">= {self.target:g}x{where}"
        return f"<= {self.target:.0%}{where}"


RATIOS = (
    Ratio(
        "ours_vs_handwritten_proxy",
        "ours / hand-written on Serve's default path",
        "ours",
        "handwritten_proxy",
        target=5.0,
        target_at=(1, 8),
    ),
    Ratio(
        "ours_vs_handwritten_haproxy", "ours / hand-written on HAProxy mode", "ours", "handwritten_haproxy", target=0.95
    ),
    Ratio("ab_vs_ours", "A/B 50/50 / ours one variant", "ours_ab", "ours_among", target=0.85),
    Ratio(
        "shadow_p50_cost", "shadow p50 cost (p50 increase)", "ours_shadow", "ours_among", metric="p50_cost", target=0.10
    ),
    Ratio("batching_gain", "batching gain (batching on / off)", "ours_batched", "ours"),
    Ratio(
        "mlflow_path_vs_json",
        "MLflow /invocations (dataframe_split) / ours JSON",
        "ours_mlflow",
        "ours_among",
        target=0.9,
    ),
    Ratio(
        "oip_path_vs_json",
        "Open Inference Protocol infer (JSON tensors) / ours JSON",
        "ours_oip",
        "ours_among",
        target=0.9,
    ),
    Ratio(
        "capture10_in_place",
        "capture 10% / the same app with capture switched off",
        "ours_capture10_on",
        "ours_capture10_off",
        target=0.95,
        target_at=(8,),
    ),
    Ratio("capture10_vs_plain", "capture 10% / ours without capture (two apps)", "ours_capture10", "ours_among"),
    Ratio("capture100_vs_plain", "capture 100% / ours without capture", "ours_capture100", "ours_among"),
    Ratio("ab_xgb_vs_ours", "A/B XGBoost vs ONNX / ours one variant", "ours_ab_xgb", "ours"),
    Ratio("ours_vs_handwritten_direct", "ours / hand-written, both on our data path", "ours", "handwritten_direct"),
    Ratio("among_vs_alone", "ours among the feature apps / ours beside the hand-written app", "ours_among", "ours"),
    Ratio("ours_vs_ours_proxy", "ours / ours on Serve's default path", "ours", "ours_proxy"),
    Ratio(
        "handwritten_haproxy_vs_proxy",
        "hand-written: HAProxy mode / default path",
        "handwritten_haproxy",
        "handwritten_proxy",
    ),
    Ratio("ours_vs_fastapi", "ours / FastAPI + uvicorn", "ours", "fastapi"),
    Ratio(
        "rows1024_vs_fastapi",
        "ours / FastAPI, 1,024 rows per request (rows/s)",
        "ours_rows1024",
        "fastapi_rows1024",
        target=1.5,
        target_at=(8,),  # where the issue measured it
    ),
    Ratio("rows64_vs_fastapi", "ours / FastAPI, 64 rows per request (rows/s)", "ours_rows64", "fastapi_rows64"),
    Ratio(
        "oip_binary1024_vs_inprocess",
        "ours, OIP binary tensors / in-process predict, 1,024 rows per request (rows/s)",
        "ours_oip_binary1024",
        "inprocess_rows1024",
        target=0.5,
        target_at=(8,),
    ),
    Ratio(
        "rows1024_vs_inprocess",
        "ours / in-process predict, 1,024 rows per request (rows/s)",
        "ours_rows1024",
        "inprocess_rows1024",
    ),
)


CONFIDENCE = 0.9
"""The confidence a verdict's interval aims at (``median_interval``)."""


def measurement_pairs(num: dict[str, Any], den: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The measurements of two points taken close in time, as pairs: round by round when both
    points hold ``rounds`` of the same count (in the order they ran), and within a round (or a
    point of one round) segment by segment when both hold ``segments`` of the same count (the
    cycles of ``measure_interleaved_rows``); else the two points themselves."""
    rounds = num.get("rounds"), den.get("rounds")
    if rounds[0] and rounds[1] and len(rounds[0]) == len(rounds[1]):
        return [pair for a, b in zip(*rounds) for pair in measurement_pairs(a, b)]
    segments = num.get("segments"), den.get("segments")
    if segments[0] and segments[1] and len(segments[0]) == len(segments[1]):
        return list(zip(*segments))
    return [(num, den)]


def median_interval(values: list[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """The interval ``[x(k), x(n+1-k)]`` of the sorted values that holds their population's median
    with probability ``1 - 2 P(B <= k - 1)``, B ~ Binomial(n, 1/2) (no assumption about the
    distribution): the narrowest such interval of at least ``confidence``, or, with too few values
    for that, the whole range. Returns (low, high, its confidence)."""
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        raise ValueError("median_interval of no values")

    def at_most(j: int) -> float:  # P(B <= j)
        return sum(comb(n, i) for i in range(j + 1)) / 2**n

    k = 1
    while k + 1 <= (n + 1) // 2 and 1 - 2 * at_most(k) >= confidence:
        k += 1
    return ordered[k - 1], ordered[n - k], max(0.0, 1 - 2 * at_most(k - 1))


def estimate(ratio: Ratio, num: dict[str, Any] | None, den: dict[str, Any] | None, concurrency: int) -> dict[str, Any]:
    """A ratio at one concurrency: its median, interval, pair count and status."""
    values = ratio.samples(num, den)
    if not values:
        return {"value": None, "status": ratio.status(None, concurrency)}
    value = statistics.median(values)
    entry: dict[str, Any] = {"value": round(value, 4), "pairs": len(values)}
    interval = None
    if len(values) > 1:
        low, high, coverage = median_interval(values)
        interval = (low, high)
        entry.update(low=round(low, 4), high=round(high, 4), confidence=round(coverage, 3))
    entry["status"] = ratio.status(value, concurrency, interval)
    return entry


def verdict_of(statuses: list[str]) -> str | None:
    """One verdict for a ratio from its statuses at each concurrency its target applies to."""
    if not statuses:
        return None
    for verdict in ("missed", "n/a", "close"):
        if verdict in statuses:
            return verdict
    return "met"


def point_at(row: dict[str, Any] | None, concurrency: int, *, any_level: bool = False) -> dict[str, Any] | None:
    """The row's point at a concurrency. An in-process row's single point (no concurrency) counts
    as c=1, or as every level with ``any_level`` (what ratios against the model's own speed use)."""
    if not row or row.get("error"):
        return None
    for point in row.get("points", []):
        if point.get("concurrency") == concurrency or (
            point.get("concurrency") is None and (concurrency == 1 or any_level)
        ):
            return point
    return None


def compute_ratios(rows: list[dict[str, Any]], concurrency: tuple[int, ...]) -> list[dict[str, Any]]:
    """Every ratio whose rows were part of the run, at each concurrency."""
    by_id = {row["id"]: row for row in rows}
    found = []
    for ratio in RATIOS:
        if ratio.numerator not in by_id or ratio.denominator not in by_id:
            continue
        at = {
            str(c): estimate(
                ratio,
                point_at(by_id[ratio.numerator], c, any_level=True),
                point_at(by_id[ratio.denominator], c, any_level=True),
                c,
            )
            for c in concurrency
        }
        found.append(
            {
                "name": ratio.name,
                "title": ratio.title,
                "numerator": ratio.numerator,
                "denominator": ratio.denominator,
                "metric": ratio.metric,
                "target": ratio.target,
                "target_at": list(ratio.target_at) if ratio.target_at else None,
                "target_text": ratio.describe_target(),
                "at": at,
                "verdict": verdict_of([entry["status"] for entry in at.values() if entry["status"]]),
            }
        )
    return found


# -- Markdown -----------------------------------------------------------------------------------


def _number(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def _ms(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:.0f}"


def _ratio_text(ratio: dict[str, Any], c: int) -> str:
    entry = ratio["at"].get(str(c), {})

    def shown(value: float) -> str:
        return f"{value:+.1%}" if ratio["metric"] == "p50_cost" else f"{value:.2f}x"

    value = entry.get("value")
    text = "–" if value is None else shown(value)
    if value is not None and entry.get("low") is not None:
        text += f" [{shown(entry['low'])}, {shown(entry['high'])}]"
    status = entry.get("status")
    status = {"close": "too close to call"}.get(status, status)
    return f"{text} ({status})" if status else text


def results_table(rows: list[dict[str, Any]], concurrency: tuple[int, ...]) -> list[str]:
    """Requests/s, p50 and p99 per concurrency; beside each rate, the share of one core its load
    generator used (a generator near a full core measures itself as much as the server)."""
    head = "| row | " + " | ".join(f"c={c} req/s (gen. CPU) | c={c} p50 ms | c={c} p99 ms" for c in concurrency)
    lines = [head + " |", "|---|" + "---:|" * (3 * len(concurrency))]
    for row in rows:
        cells = []
        for c in concurrency:
            point = point_at(row, c)
            if point is None:
                cells += ["error" if row.get("error") else "n/a", "", ""]
                continue
            failed = f" ({point['failed']} failed)" if point.get("failed") else ""
            share = point.get("generator_cpu")
            rate = _number(point.get("rps")) + (f" ({share:.0%})" if share is not None else "") + failed
            cells += [rate, _ms(point.get("p50_ms")), _ms(point.get("p99_ms"))]
        lines.append(f"| {row['title']} | " + " | ".join(cells) + " |")
    return lines


def rows_per_request_table(rows: list[dict[str, Any]], concurrency: tuple[int, ...]) -> list[str]:
    """Rows scored per second (requests/s times rows per request) of the rows that send batches,
    beside the one-row rows of the same servers; empty if no row sends more than one row."""
    if not any(ROWS_BY_ID.get(row["id"]) and ROWS_BY_ID[row["id"]].rows_per_request > 1 for row in rows):
        return []
    shown = [row for row in rows if row["id"] in BATCH_REFERENCES or ROWS_BY_ID[row["id"]].rows_per_request > 1]
    lines = [
        "| row | rows per request | " + " | ".join(f"c={c} rows/s" for c in concurrency) + " |",
        "|---|---:|" + "---:|" * len(concurrency),
    ]
    for row in shown:
        per_request = ROWS_BY_ID[row["id"]].rows_per_request
        cells = []
        for c in concurrency:
            point = point_at(row, c)
            if point is None or (point.get("concurrency") is None and c != 1):
                cells.append("error" if row.get("error") else "–")
            else:
                cells.append(_number((point.get("rps") or 0.0) * per_request))
        lines.append(f"| {row['title']} | {per_request:,} | " + " | ".join(cells) + " |")
    return lines


BATCH_REFERENCES = ("inprocess", "fastapi", "ours")
"""The one-row rows the rows-per-request table shows beside the batch rows."""


def ratios_table(ratios: list[dict[str, Any]], concurrency: tuple[int, ...]) -> list[str]:
    lines = [
        "| ratio | target | " + " | ".join(f"c={c}" for c in concurrency) + " | verdict |",
        "|---|---|" + "---:|" * len(concurrency) + "---|",
    ]
    for ratio in ratios:
        cells = [_ratio_text(ratio, c) for c in concurrency]
        verdict = {"met": "**met**", "missed": "**missed**", "n/a": "n/a", "close": "too close to call"}.get(
            ratio["verdict"], ""
        )
        lines.append(f"| {ratio['title']} | {ratio['target_text']} | " + " | ".join(cells) + f" | {verdict} |")
    return lines


def machine_lines(machine: dict[str, Any]) -> list[str]:
    versions = ", ".join(f"{name} {version}" for name, version in machine.get("versions", {}).items())
    load = machine.get("load_average", {})
    return [
        f"- CPU: {machine.get('cpu_model', '?')}, {machine.get('cpu_count')} logical CPUs "
        f"({machine.get('cpus_usable')} usable by this process)",
        f"- memory: {machine.get('memory_gib', '?')} GiB; load average at start {load.get('start')}, "
        f"at end {load.get('end')}",
        f"- {machine.get('platform', '')}; {versions}",
        f"- git: {machine.get('git', '?')}",
        f"- load generator: {machine.get('generator', 'benchmarks/loadgen.py (Python)')}",
    ]


def deploy_cost_lines(cost: dict[str, Any] | None) -> list[str]:
    if not cost:
        return ["Not measured in this mode (`--full`, or `--deploy-cost`, measures it)."]
    lines = [
        f"`{cost.get('flow')}` run end to end (`python flows/train_flow.py --no-pylint run`, its own "
        "datastore, the benchmark head already up), against the same flow with `@ray_serve` taken off "
        "(made from its source by `benchmarks/groups.py`). The first deploy also creates the embedded MLflow "
        "registry (a fresh `RAY_DEPLOY_HOME`); the second run deploys a new release of the serving app "
        "(Serve reconfigures the live replicas).",
        "",
        "| run | wall s | extra over no deploy | deploy call to serving s | exit |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, title in (("without_deploy", "flow without the deploy"), ("first_deploy", "flow, first deploy"),
                       ("redeploy", "flow, new release of a serving app")):  # fmt: skip
        run = cost.get(key)
        if not run:
            continue
        extra = "" if key == "without_deploy" else _number(run.get("extra_s"), 1)
        lines.append(
            f"| {title} | {_number(run.get('wall_s'), 1)} | {extra} | {_number(run.get('deploy_s'), 1)} "
            f"| {run.get('returncode')} |"
        )
    canary = cost.get("canary")
    if canary:
        lines += [
            "",
            f"A canary rollout on a serving app (ONNX release to XGBoost release, steps {canary['steps']}, "
            f"`interval_s` {canary['interval_s']:g}, gated; lineage off): {_number(canary.get('wall_s'), 1)} s "
            f"wall, {_number(canary.get('excluding_waits_s'), 1)} s excluding the configured waits "
            f"(ended {canary.get('state')}).",
        ]
    if cost.get("error"):
        lines += ["", f"Error: `{cost['error']}`"]
    return lines


APPS_TARGET = 1.5
"""Deploying the 30th app (of the apps study) costs at most this many times the first (issue #17)."""


def studies_lines(studies: dict[str, Any] | None) -> list[str]:
    """The apps and scale-out studies of the default head (``benchmarks/studies.py``)."""
    if not studies:
        return ["Not measured in this run (`--studies apps,scale_out`, on by default in `--quick` and `--full`)."]
    lines: list[str] = []
    apps = studies.get("apps")
    if apps:
        lines += [
            "### Many apps on one head",
            "",
            "Apps deployed one after the other with the package's `deploy` (one ONNX replica each, "
            f"`num_cpus={apps.get('num_cpus', 0):g}`, lineage off), each asked until it answers; at each checkpoint, "
            "the memory of the replicas (resident, and unique: what a replica adds), of Serve's controller and of "
            "our front (its actor and HAProxy), and the controller's CPU share with no traffic.",
            "",
            "| apps | that app: deploy s | to first answer s | replica RSS MB | replica USS MB | all replicas USS MB "
            "| Serve controller RSS MB | controller idle CPU | front RSS MB |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        by_count = {a["apps"]: a for a in apps.get("apps", [])}
        memory = {m["apps"]: m for m in apps.get("memory", [])}
        for count in sorted({1, *memory}):
            a, m = by_count.get(count, {}), memory.get(count, {})
            lines.append(
                f"| {count} | {_number(a.get('deploy_s'), 2)} | {_number(a.get('first_answer_s'), 2)} "
                f"| {_number(m.get('replica_rss_mb'), 0)} | {_number(m.get('replica_uss_mb'), 0)} "
                f"| {_number(m.get('replicas_uss_total_mb'), 0)} | {_number(m.get('serve_controller_rss_mb'), 0)} "
                f"| {_percent(m.get('serve_controller_idle_cpu'))} | {_number(m.get('front_rss_mb'), 0)} |"
            )
        cost = apps.get("cost_of_last")
        if cost and cost.get("ratio") is not None:
            verdict = "met" if cost["ratio"] <= APPS_TARGET else "missed"
            lines += [
                "",
                f"Deploying app {cost['apps']} cost {cost['ratio']:.2f}x the first (median deploy-to-first-answer of "
                f"the last {cost['window']} apps, {cost['last_s']:.2f} s, over the first {cost['window']}, "
                f"{cost['first_s']:.2f} s; one deploy per app, so no interval): target <= {APPS_TARGET:g}x "
                f"at 30 apps, **{verdict}**"
                + ("" if cost["apps"] >= 30 else f" (this run stopped at {cost['apps']} apps)")
                + f". Deleting all {len(apps.get('apps', []))} took {_number(apps.get('delete_all_s'), 1)} s.",
            ]
        if apps.get("error"):
            lines += ["", f"Error: `{apps['error']}`"]
        lines.append("")
    scale = studies.get("scale_out")
    if scale:
        auto = scale.get("autoscaling", {})
        starts = scale.get("replica_start_s") or []
        final = (scale.get("replicas") or [{}])[-1]
        lines += [
            "### Scale-out under a load step",
            "",
            f"One app with replica autoscaling (`min_replicas` {auto.get('min_replicas')}, `max_replicas` "
            f"{auto.get('max_replicas')}, `target_ongoing_requests` {auto.get('target_ongoing_requests')}, "
            f"`upscale_delay_s` {auto.get('upscale_delay_s')}, `look_back_period_s` {auto.get('look_back_period_s')}; "
            f"`num_cpus={scale.get('num_cpus', 0):g}` each): wrk at c=1, then a step to c=32, in one-second "
            "slices back to back, while Serve's replica states and the front's count of the requests it holds "
            "for the app (what the app's autoscaling policy counts beside Serve's own) are polled every 0.2 s.",
            "",
            "| p99 before the step ms | p99, first slice after ms | steady p99 after ms | back under 2x steady after s "
            "| most requests the front held | first replica added after s "
            "| replicas at the end | replica start (STARTING to RUNNING) s |",
            "|---:|---:|---:|---:|---:|---:|---:|---|",
            f"| {_ms(scale.get('p99_before_ms'))} | {_ms(scale.get('p99_first_slice_ms'))} "
            f"| {_ms(scale.get('steady_p99_ms'))} | {_number(scale.get('recovered_s'), 1)} "
            f"| {_number(scale.get('front_peak'), 0)} "
            f"| {_number(scale.get('first_added_s'), 1) if scale.get('first_added_s') is not None else 'none'} "
            f"| {final.get('running', '')} | {', '.join(f'{x:.1f}' for x in starts) or 'none started'} |",
        ]
        if scale.get("error"):
            lines += ["", f"Error: `{scale['error']}`"]
        lines.append("")
    return lines


def _percent(value: float | None) -> str:
    return "" if value is None else f"{value:.0%}"


def capture_lines(rows: list[dict[str, Any]], repeat: int = 1) -> list[str]:
    """What the capture rows' apps captured (a check that the rows measured capture at work)."""
    captured = [row for row in rows if row.get("capture")]
    if not captured:
        return []
    lines = [
        "Prediction capture"
        + (" (the first round)" if repeat > 1 else "")
        + ": requests each capture row's app answered (warm-up and readiness checks included), "
        "captured and dropped (its replicas' stats), and the rows of its Parquet files read back "
        "with `ray_deploy.read_captures`.",
        "",
        "| row | sample | requests | captured | dropped | rows on disk | root |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in captured:
        counts = row["capture"]
        cells = [_number(counts.get(key)) for key in ("requests", "captured", "capture_dropped", "rows_on_disk")]
        root = f"`{counts.get('root')}`" + (f" (error: `{counts['error'][:300]}`)" if counts.get("error") else "")
        sample = "–" if counts.get("sample") is None else f"{counts['sample']:g}"
        lines.append(f"| {row['title']} | {sample} | " + " | ".join(cells) + f" | {root} |")
    lines.append("")
    for row in captured:
        toggles = row.get("toggles")
        if toggles:
            pids = toggles.get("replica_pids") or []
            times = toggles.get("switch_s") or []
            lines += [
                f"{row['title']}: one app whose capture was switched {toggles.get('switches', 0)} times in place "
                f"(median switch {_number(statistics.median(times), 2) if times else '–'} s); "
                + (
                    "one replica process answered throughout."
                    if len(pids) == 1
                    else f"**{len(pids)} replica processes answered** (a switch restarted the replica: "
                    "the rows are not one process's)."
                ),
                "",
            ]
    return lines


def deploy_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| row | deploy call returned after s | deploy call to first answer s |", "|---|---:|---:|"]
    for row in rows:
        deploy = row.get("deploy") or row.get("startup")
        if not deploy:
            continue
        lines.append(
            f"| {row['title']} | {_number(deploy.get('deploy_s'), 2)} | {_number(deploy.get('first_answer_s'), 2)} |"
        )
    return lines


def render_markdown(results: dict[str, Any], plot_name: str | None) -> str:
    settings = results["settings"]
    concurrency = tuple(settings["concurrency"])
    rows = results["rows"]
    model = results.get("model", {})
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `{results.get('command') or 'python -m benchmarks.run --' + results['mode']}` on "
        f"{results['started_at']} "
        f"({results['wall_s']:.0f} s). Regenerate with "
        "`python -m benchmarks.run --full --repeat 3 --out docs/benchmarks.json --markdown docs/benchmarks.md` "
        "(`--quick` for a shorter run, 10-20 minutes on 2 cores; `python -m benchmarks.run --help` for the options); the raw results, "
        "every round included, are in `docs/benchmarks.json` (`--render docs/benchmarks.json` rewrites this "
        "page from them). Timing on a shared 2-core machine is noisy: compare rows of one run, not runs.",
        "",
        "The data paths across nodes (the front with secret-checked replica ports, Serve's HAProxy mode and "
        "Serve's proxy, replicas on simulated worker nodes) have a page of their own, "
        "`docs/benchmarks-multinode.md` (`python -m benchmarks.multinode`).",
        "",
        "## Machine",
        "",
        *machine_lines(results.get("machine", {})),
        "",
        "## Results",
        "",
        f"Closed-loop load from {results.get('machine', {}).get('generator', '`benchmarks/loadgen.py`')} "
        f"(HTTP/1.1 keep-alive, on the same machine; its CPU share of one core beside each rate): "
        f"{settings['seconds']:g} s per point after {settings['warmup_s']:g} s of warm-up; "
        + (
            f"every group ran {settings['repeat']} times, rounds interleaved, and each point is its median "
            "round by requests/s (every round's requests/s is in the JSON, `rounds_rps`); "
            if settings.get("repeat", 1) > 1
            else ""
        )
        + "c = connections, each with one request in flight. Every HTTP row sends the same "
        f'`{{"instances": [[...{model.get("features", 20)} floats...]]}}` and gets the ONNX model\'s label back, '
        "except the protocol rows (MLflow `/invocations`, Open Inference Protocol), which send that row in "
        "their protocol to the same app as `ours, 1 variant, among the feature apps`. `ours, 1 variant` and the "
        "hand-written deployment on our data path are deployed alone together, the protocol, capture, A/B and "
        "shadow rows and the app they compare with after them; each set is measured in cycles: at each level, "
        f"one {settings.get('segment_s', 2):g} s segment of every such row in turn, the order turned each cycle, "
        f"{settings.get('min_cycles', 1)} to {settings.get('max_cycles', 1)} cycles (more while a target is "
        "too close to call); their rate is over all their segments, their latencies the median segment's."
        + (
            " The two rows of one app whose capture is switched in place are measured the same way on their "
            f"own, in segments of at least {TOGGLED_SEGMENT_S:g} s, each after a switch and {TOGGLE_WARMUP_S:g} s of load."
            if any(row["id"] in TOGGLED_ROWS for row in rows)
            else ""
        ),
        "",
        *results_table(rows, concurrency),
        "",
    ]
    failed_rows = [row for row in rows if row.get("error")]
    if failed_rows:
        lines += ["Rows that failed:", ""]
        lines += [f"- {row['title']}: `{row['error'][:400]}`" for row in failed_rows]
        lines.append("")
    if plot_name:
        lines += [f"![requests per second by row and concurrency, log scale]({plot_name})", ""]
    batches = rows_per_request_table(rows, concurrency)
    if batches:
        lines += [
            "## Rows per request",
            "",
            "Rows scored per second when each request carries 1, 64 or 1,024 rows (the held-out rows, "
            "repeated): requests/s above times rows per request. In-process predict is the model's own "
            "speed on the same batch (no HTTP, no JSON), measured once (under c=1).",
            "",
            *batches,
            "",
        ]
    lines += capture_lines(rows, settings.get("repeat", 1))
    lines += [
        "## Ratios and the issue's targets",
        "",
        "Each ratio is the median of its paired values: segment by segment for rows measured in cycles "
        "(short segments of every such row in turn, at each level), round by round for rows of different "
        "heads; not the ratio of the numbers above. In brackets, the interval that holds the median with "
        f"{CONFIDENCE:.0%} confidence or more (order statistics of the pairs; with few pairs, their whole "
        "range, which holds less). A target is met when the whole interval clears it, missed when the whole "
        "interval falls short, and too close to call when the interval straddles it (more pairs would "
        "decide: a longer mode, `--repeat`, or `--max-cycles`).",
        "",
        *ratios_table(results.get("ratios", []), concurrency),
        "",
        "## Rows",
        "",
    ]
    data_paths = {head["group"]: head for head in results.get("heads", []) if head}
    for row in rows:
        spec = ROWS_BY_ID.get(row["id"])
        head = data_paths.get(row["group"])
        where = ""
        if head:
            state = head.get("state") or {}
            where = f" Head: `RAY_DEPLOY_DATA_PATH={head.get('env_data_path') or '(unset)'}`, recorded data path `{state.get('data_path', '?')}`."
        lines.append(f"- **{row['title']}** (`{row['id']}`): {spec.description if spec else ''}{where}")
    lines += [
        "",
        "## Model",
        "",
        f"XGBoost classifier like `flows/train_flow.py` trains, on scikit-learn's bundled breast-cancer data: "
        f"{model.get('trees')} trees of depth {model.get('max_depth')}, the {model.get('feature_choice')}, "
        f"seed {model.get('seed')}; held-out accuracy {model.get('test_accuracy')}. Exported with "
        f"`ray_deploy.xgboost_to_onnx` ({model.get('onnx_bytes')} bytes). Our apps load it by reference from a "
        "local Metaflow datastore the harness writes (`benchmarks/models.py`), as replicas load a flow's artifacts.",
        "",
        f"Replicas: 1 per app, `num_cpus={settings['replica_num_cpus']:g}`, "
        f"`max_ongoing_requests={settings['max_ongoing_requests']}`, one onnxruntime thread; batching row: "
        f"`max_batch_size={settings['max_batch_size']}`, `batch_wait_timeout_s={settings['batch_wait_timeout_s']:g}`. "
        "Lineage (MLflow) is off for the apps measured here.",
        "",
        "## Deploy time",
        "",
        *deploy_lines(rows),
        "",
        "## Deploy cost of the example flow",
        "",
        *deploy_cost_lines(results.get("deploy_cost")),
        "",
        "## Many apps, scale-out",
        "",
        *studies_lines(results.get("studies")),
        "## Heads",
        "",
        "| group | RAY_DEPLOY_DATA_PATH | recorded data path | head start s | head stop s | error |",
        "|---|---|---|---:|---:|---|",
    ]
    for head in results.get("heads", []):
        if not head:
            continue
        state = head.get("state") or {}
        lines.append(
            f"| {head['group']} | {head.get('env_data_path') or '(unset)'} | {state.get('data_path', '?')} | "
            f"{_number(head.get('start_s'), 1)} | {_number(head.get('stop_s'), 1)} | {head.get('error') or ''} |"
        )
    lines += [
        "",
        "## Caveats",
        "",
        "- The load generator is one Python process on the same 2 cores as the server under test: at c=32 "
        "it takes a core's worth of CPU itself, so the highest numbers are partly client-bound.",
        "- Each point is a few seconds (`--quick`) or tens of seconds (`--full`); other work on the machine "
        "shows up as p99 spikes. Load averages at the start and end are in the machine section.",
        "- Why the rows differ, what was fixed after profiling, and what is left (ours and Ray's): "
        '`docs/data-path.md`, section "Where the time goes".',
        "",
    ]
    return "\n".join(lines)


# -- PNG ----------------------------------------------------------------------------------------


def render_plot(results: dict[str, Any], path: Path) -> None:
    """Requests/s per row per concurrency, grouped bars on a log scale (matplotlib, Agg backend)."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    concurrency = tuple(results["settings"]["concurrency"])
    rows = [row for row in results["rows"] if not row.get("error") and row.get("points")]
    order = {spec.id: index for index, spec in enumerate(ROWS)}
    rows.sort(key=lambda row: order.get(row["id"], len(order)))
    width = 0.8 / max(1, len(concurrency))
    figure, axes = plt.subplots(figsize=(max(7.0, 1.1 * len(rows) + 2), 4.8), dpi=110)
    for index, c in enumerate(concurrency):
        xs, heights = [], []
        for position, row in enumerate(rows):
            point = point_at(row, c)
            if point and point.get("rps"):
                xs.append(position + (index - (len(concurrency) - 1) / 2) * width)
                heights.append(point["rps"])
        bars = axes.bar(xs, heights, width=width, label=f"c={c}")
        axes.bar_label(bars, labels=[f"{h:,.0f}" for h in heights], fontsize=6, rotation=90, padding=2)
    axes.set_yscale("log")
    axes.set_ylabel("requests/s (log scale)")
    axes.set_xticks(range(len(rows)))
    titles = [row["title"] + (" (1 row, no HTTP)" if not row.get("http", True) else "") for row in rows]
    axes.set_xticklabels(titles, rotation=30, ha="right", fontsize=8)
    axes.set_title(f"Throughput by row and concurrency ({results['mode']}, {results['started_at'][:10]})")
    axes.legend(title="connections", fontsize=8)
    axes.grid(axis="y", which="both", alpha=0.3)
    axes.margins(y=0.15)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
