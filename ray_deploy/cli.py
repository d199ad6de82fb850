"""``ray-deploy``: manage the local Ray head and the apps deployed on a cluster.

    ray-deploy cluster up|down|status      the persistent local Ray head (status works for any cluster)
    ray-deploy status [APP]                apps, their state, URL and variants
    ray-deploy predict APP --data JSON     send one scoring request and print the answer
    ray-deploy delete APP                  remove an app
    ray-deploy traffic APP --set a=90,b=10 split traffic between loaded variants (labels or names)
    ray-deploy promote APP                 finish a rollout that holds at a canary step
    ray-deploy rollback APP                back to the previous release (rebuilt from the registry)
    ray-deploy export APP --serve-config   the app as Ray's Serve config file (serve deploy, serveConfigV2)
    ray-deploy restore [APP]               re-create recorded apps the cluster lost (e.g. after a head restart)
    ray-deploy export APP --kuberay        the app as a KubeRay RayService (autoscaling, GPU worker group)
    ray-deploy lineage APP                 app -> variant -> model version -> task -> artifact -> data, checked
    ray-deploy lineage --model NAME@ALIAS  the same from the registry side (or NAME/VERSION)

Errors print as ``ErrorName: message`` and exit with status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from typing import Any

from ray_deploy.cluster import cluster_status, start_local_cluster, stop_local_cluster
from ray_deploy.control.status import app_status, delete_apps
from ray_deploy.errors import RayDeployError


def app_lines(row: dict[str, Any]) -> list[str]:
    """One app's status as text: state and URL, rollout, each release with its share, device
    paths and live metrics."""
    lines = [f"{row['app']}: {row['status']} {row.get('url', row.get('detail', ''))}"]
    if row.get("rollout"):
        state = row["rollout"]
        driver = f", driven by {row['controller']}" if row.get("controller") else ""
        lines.append(
            f"  rollout ({state['strategy']}): {state['phase']}, step {state['step']}, "
            f"{state['percent']:g}% on {', '.join(state['new'])}{driver}"
        )
    elif row.get("last_rollout") and row["last_rollout"].get("phase"):
        last = row["last_rollout"]
        why = f": {last['reason']}" if last.get("reason") else ""
        lines.append(f"  last rollout: {last['phase']} (recorded {last.get('recorded_at', '?')}){why}")
    for variant in row.get("variants", []):
        label = variant.get("label", variant["name"])
        version = f" = MLflow {variant['model_version']}" if variant.get("model_version") else ""
        share = "shadow" if variant.get("shadow") else f"{variant['weight']:g}%"
        lines.append(f"  {label} ({share}): {variant['model_uri']}{version} via {variant['predictor']}")
        devices = row.get("devices", {}).get(label)
        if devices:
            lines.append("    runs on: " + "; ".join(f"{path} x{count} replica(s)" for path, count in devices.items()))
        seen = row.get("metrics", {}).get(label)
        if seen:
            lines.append(
                f"    {seen['requests']} requests, {seen['errors']} errors, "
                f"{seen['client_errors']} client errors, p50 <= {seen['p50_ms']} ms, p99 <= {seen['p99_ms']} ms"
            )
            signals = []
            if seen.get("disagreement") is not None:
                signals.append(f"disagreement {seen['disagreement']:.3f} over {seen['compared']} compared")
            if row.get("capture"):
                signals.append(f"{seen.get('captured', 0)} captured, {seen.get('capture_dropped', 0)} capture dropped")
                quality = seen.get("quality")
                figure = f"{quality:.4g}" if quality is not None else "-"
                signals.append(f"{row['capture']['quality']} {figure} over {seen.get('labels', 0)} label(s)")
            if signals:
                lines.append("    " + "; ".join(signals))
    if row.get("capture"):
        lines.append(f"  capture: {row['capture']['sample']:.0%} of requests to {row['capture']['root']}")
    return lines


def _print(value: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(value, indent=2, sort_keys=True, default=str))
        return
    rows = value if isinstance(value, list) else [value]
    for row in rows:
        if "app" in row:
            print("\n".join(app_lines(row)))
        else:
            print(json.dumps(row, indent=2, sort_keys=True, default=str))


def _cluster(args: argparse.Namespace) -> None:
    if args.action == "up":
        # The head, Serve and the front: the HTTP endpoint answers when this returns (a front that is down is restarted).
        info = start_local_cluster(autoscaling_config=args.config, serve=True)
        _print(info.to_dict(), args.json)
    elif args.action == "down":
        stopped = stop_local_cluster()
        print("stopped the local Ray head" if stopped else "no local Ray head was running")
    elif args.action == "front":
        from ray_deploy.cluster import serve_front

        status = serve_front(args.address, args.host, args.port, args.proxy_port, watch_s=args.watch)
        _print(status, args.json)
    else:
        status = cluster_status(args.address)
        _print(status, args.json)
        if status.get("front_problem"):
            print(status["front_problem"], file=sys.stderr)


def _status(args: argparse.Namespace) -> None:
    _print(app_status(args.app, address=args.address), args.json)


def _delete(args: argparse.Namespace) -> None:
    existed = delete_apps(args.apps, address=args.address)
    for app in args.apps:
        print(f"deleted app {app!r}" if app in existed else f"app {app!r} was not deployed")


def _predict(args: argparse.Namespace) -> None:
    (row,) = app_status(args.app, address=args.address)
    body = args.data.encode("utf-8") if args.data != "-" else sys.stdin.buffer.read()
    request = urllib.request.Request(row["url"], data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            print(answer.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        raise RayDeployError(f"{row['url']} answered {exc.code}: {exc.read().decode('utf-8', 'replace')}") from None


def parse_weights(text: str) -> dict[str, float]:
    """``xgb@v3=90,xgb@v4=10`` -> {"xgb@v3": 90.0, "xgb@v4": 10.0}; SpecError naming the bad part."""
    from ray_deploy.errors import SpecError

    weights: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        name, sep, value = part.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            weights[name.strip()] = float(value)
        except ValueError:
            raise SpecError(f"--set: {part!r} is not LABEL=PERCENT (e.g. --set xgb@v3=90,xgb@v4=10)") from None
    return weights


def _show_config(config: Any, as_json: bool) -> None:
    from ray_deploy.control.operate import describe_variants

    variants = describe_variants(config)
    if as_json:
        print(json.dumps({"app": config.app, "variants": variants}, indent=2))
        return
    for variant in variants:
        share = "shadow" if variant["shadow"] else f"{variant['weight']:g}%"
        print(f"{config.app}: {variant['label']} {share} ({variant['model_version'] or variant['model_uri']})")


def _traffic(args: argparse.Namespace) -> None:
    from ray_deploy import set_traffic

    _show_config(
        set_traffic(args.app, parse_weights(args.set), address=args.address, reason=args.reason or ""), args.json
    )


def _promote(args: argparse.Namespace) -> None:
    from ray_deploy import promote

    _show_config(promote(args.app, address=args.address), args.json)


def _rollback(args: argparse.Namespace) -> None:
    from ray_deploy import rollback

    reason = f"operator rollback: {args.reason}" if args.reason else "operator rollback"
    _show_config(rollback(args.app, address=args.address, reason=reason), args.json)


def _restore(args: argparse.Namespace) -> None:
    from ray_deploy import restore

    restored = restore(args.app, address=args.address)
    print("restored: " + (", ".join(restored) if restored else "nothing (every recorded app is running)"))


def _export(args: argparse.Namespace) -> None:
    import yaml

    from ray_deploy import kuberay_manifest, serve_config

    if args.kuberay:
        document = kuberay_manifest(args.app, address=args.address, image=args.image, gpu_image=args.gpu_image)
    else:
        document = serve_config(args.app, address=args.address)
    text = json.dumps(document, indent=2) if args.json else yaml.safe_dump(document, sort_keys=False)
    if args.out:
        with open(args.out, "w") as out:
            out.write(text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(text)


def print_lineage(chains: dict[str, list[Any]], as_json: bool) -> int:
    """Print lineage chains; 1 if any hop does not check out."""
    from ray_deploy.registry.trace import broken

    if as_json:
        print(json.dumps({name: [hop.to_dict() for hop in hops] for name, hops in chains.items()}, indent=2))
    else:
        for name, hops in chains.items():
            print(name)
            chain = [hop for hop in hops if hop.kind != "traffic"]
            for depth, hop in enumerate(chain):
                mark = "ok " if hop.ok else "BAD"
                print(f"  {mark} {'  ' * depth}{hop.kind}: {hop.name}  ({hop.detail})")
            history = [hop for hop in hops if hop.kind == "traffic"]
            if history:
                print("  traffic history:")
                for hop in history:
                    print(f"      {hop.name}: {hop.detail}")
    failed = [hop for hops in chains.values() for hop in broken(hops)]
    if failed:
        print(f"LineageError: {len(failed)} hop(s) do not check out", file=sys.stderr)
        return 1
    return 0


def _lineage(args: argparse.Namespace) -> int:
    from ray_deploy.control.status import trace_app, trace_model

    if args.model:
        chains = {args.model: trace_model(args.model, address=args.address)}
    elif args.app:
        chains = trace_app(args.app, address=args.address)
    else:
        raise RayDeployError("lineage needs an APP or --model NAME/VERSION (or NAME@ALIAS)")
    return print_lineage(chains, args.json)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ray-deploy", description=__doc__.split("\n\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or the local head)")
    common.add_argument("--json", action="store_true", help="print JSON")
    commands = parser.add_subparsers(dest="command", required=True)

    cluster = commands.add_parser("cluster", parents=[common], help="start, stop or inspect the Ray cluster")
    cluster.add_argument("action", choices=["up", "down", "status", "front"])
    cluster.add_argument("--config", default=None, help="autoscaler YAML for 'up' (e.g. the fake multi-node provider)")
    cluster.add_argument(
        "--host", default="0.0.0.0", help="'front': the address the front listens on (default: every interface)"
    )
    cluster.add_argument("--port", type=int, default=8000, help="'front': the port the front listens on")
    cluster.add_argument(
        "--proxy-port", type=int, default=8001, help="'front': where Serve's proxy listens behind the front"
    )
    cluster.add_argument(
        "--watch", type=float, default=None, metavar="SECONDS", help="'front': keep repairing it, checking this often"
    )
    cluster.set_defaults(run=_cluster)

    status = commands.add_parser("status", parents=[common], help="state, URL and variants of deployed apps")
    status.add_argument("app", nargs="?", default=None)
    status.set_defaults(run=_status)

    predict = commands.add_parser("predict", parents=[common], help="send one scoring request to an app")
    predict.add_argument("app")
    predict.add_argument("--data", required=True, help="request JSON, e.g. '{\"instances\": [[...]]}', or - for stdin")
    predict.set_defaults(run=_predict)

    delete = commands.add_parser(
        "delete", parents=[common], help="remove apps from the cluster (several: their replicas drain side by side)"
    )
    delete.add_argument("apps", nargs="+", metavar="APP")
    delete.set_defaults(run=_delete)

    traffic = commands.add_parser("traffic", parents=[common], help="split traffic between an app's variants")
    traffic.add_argument("app")
    traffic.add_argument("--set", required=True, help="LABEL=PERCENT,... adding up to 100, e.g. xgb@v3=90,xgb@v4=10")
    traffic.add_argument("--reason", default=None, help="why (recorded on the model versions)")
    traffic.set_defaults(run=_traffic)

    promote = commands.add_parser("promote", parents=[common], help="finish a rollout holding at a canary step")
    promote.add_argument("app")
    promote.set_defaults(run=_promote)

    rollback = commands.add_parser("rollback", parents=[common], help="back to the previous release")
    rollback.add_argument("app")
    rollback.add_argument("--reason", default=None, help="why (recorded on the model versions)")
    rollback.set_defaults(run=_rollback)

    restore = commands.add_parser("restore", parents=[common], help="re-create recorded apps the cluster lost")
    restore.add_argument("app", nargs="?", default=None, help="only this app (default: every recorded app)")
    restore.set_defaults(run=_restore)

    export = commands.add_parser("export", parents=[common], help="write the app for another cluster")
    export.add_argument("app")
    target = export.add_mutually_exclusive_group(required=True)
    target.add_argument("--serve-config", action="store_true", help="Ray's Serve config file (serve deploy)")
    target.add_argument("--kuberay", action="store_true", help="a KubeRay RayService manifest")
    export.add_argument("-o", "--out", default=None, help="file to write (default: stdout)")
    export.add_argument("--image", default=None, help="image with ray-deploy installed (KubeRay)")
    export.add_argument("--gpu-image", default=None, help="GPU image with ray-deploy installed (KubeRay)")
    export.set_defaults(run=_export)

    lineage = commands.add_parser(
        "lineage", parents=[common], help="trace an app or a model version, checking each hop"
    )
    lineage.add_argument("app", nargs="?", default=None)
    lineage.add_argument("--model", default=None, help="NAME/VERSION or NAME@ALIAS in the MLflow registry")
    lineage.set_defaults(run=_lineage)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except RayDeployError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
