import json

from metaflow._vendor import click
from metaflow.exception import MetaflowException

# Metaflow imports this module with every flow: the engine is imported by the commands that use it.
from ray_deploy.errors import RayDeployError
from ray_deploy.spec import DeploymentSpec


class RayServeCommandError(MetaflowException):
    headline = "ray-serve"

    def __init__(self, error):
        self.headline = getattr(error, "headline", self.headline)
        super().__init__(str(error))


def _flow_apps(flow):
    """App name -> spec for every @ray_serve step of the flow."""
    apps = {}
    for step in flow:
        for deco in getattr(step, "decorators", []):
            if deco.name != "ray_serve" or not deco.attributes.get("app"):
                continue
            options = deco.user_options()
            try:
                apps[options["app"]] = DeploymentSpec.from_options(options)
            except RayDeployError as error:
                raise RayServeCommandError(error)
    return apps


@click.group()
def cli():
    pass


@cli.group(help="Inspect and manage the Ray Serve apps this flow's @ray_serve steps deploy.")
@click.option("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or the local head).")
@click.pass_obj
def ray_serve(obj, address=None):
    obj.ray_serve_apps = _flow_apps(obj.flow)
    obj.ray_serve_address = address
    if not obj.ray_serve_apps:
        raise MetaflowException("This flow has no @ray_serve step.")


def _selected(obj, app):
    if app is None:
        return sorted(obj.ray_serve_apps)
    if app not in obj.ray_serve_apps:
        raise MetaflowException(
            "No @ray_serve step of this flow deploys app %r; its apps: %s"
            % (app, ", ".join(sorted(obj.ray_serve_apps)))
        )
    return [app]


def _address(obj, app):
    return obj.ray_serve_address or obj.ray_serve_apps[app].address


@ray_serve.command(help="Show the state, URL and variants of this flow's apps.")
@click.option("--app", default=None, help="Only this app.")
@click.option("--json", "as_json", is_flag=True, default=False, help="Print JSON.")
@click.pass_obj
def status(obj, app=None, as_json=False):
    from ray_deploy import app_lines, app_status

    rows = []
    for name in _selected(obj, app):
        try:
            rows.extend(app_status(name, address=_address(obj, name)))
        except RayDeployError as error:
            rows.append({"app": name, "status": "NOT DEPLOYED", "detail": str(error)})
    if as_json:
        obj.echo_always(json.dumps(rows, indent=2), err=False)
        return
    for row in rows:
        for line in app_lines(row):
            obj.echo_always(line, err=False)


@ray_serve.command(help="Delete this flow's apps from the cluster.")
@click.option("--app", default=None, help="Only this app.")
@click.pass_obj
def delete(obj, app=None):
    from ray_deploy import delete_app

    for name in _selected(obj, app):
        try:
            existed = delete_app(name, address=_address(obj, name))
        except RayDeployError as error:
            raise RayServeCommandError(error)
        obj.echo("Deleted app *%s*." % name if existed else "App *%s* was not deployed." % name)


@ray_serve.command(help="Trace each app: variant -> model version -> task -> artifact -> data, checking each hop.")
@click.option("--app", default=None, help="Only this app.")
@click.option("--json", "as_json", is_flag=True, default=False, help="Print JSON.")
@click.pass_context
def lineage(ctx, app=None, as_json=False):
    from ray_deploy import print_lineage, trace_app

    obj = ctx.obj
    failed = 0
    for name in _selected(obj, app):
        try:
            chains = trace_app(name, address=_address(obj, name))
        except RayDeployError as error:
            raise RayServeCommandError(error)
        failed |= print_lineage({"%s/%s" % (name, variant): hops for variant, hops in chains.items()}, as_json)
    if failed:
        ctx.exit(1)


def _single(obj, app):
    if app is not None:
        return _selected(obj, app)[0]
    if len(obj.ray_serve_apps) == 1:
        return next(iter(obj.ray_serve_apps))
    raise MetaflowException("This flow deploys several apps; choose one with --app.")


def _show(obj, config):
    for variant in config.variants:
        obj.echo_always(
            "%s: %s %s (%s)"
            % (
                config.app,
                variant.label,
                "shadow" if variant.shadow else "%g%%" % variant.weight,
                variant.model_version or variant.model.uri,
            ),
            err=False,
        )


@ray_serve.command(help="Split traffic between the app's loaded variants, e.g. --set default@v3=90,default@v4=10.")
@click.option("--app", default=None, help="The app (needed when the flow deploys several).")
@click.option("--set", "weights", required=True, help="LABEL=PERCENT,... adding up to 100.")
@click.option("--reason", default=None, help="Why; recorded on the model versions.")
@click.pass_obj
def traffic(obj, app=None, weights=None, reason=None):
    from ray_deploy import parse_weights, set_traffic

    name = _single(obj, app)
    try:
        _show(obj, set_traffic(name, parse_weights(weights), address=_address(obj, name), reason=reason or ""))
    except RayDeployError as error:
        raise RayServeCommandError(error)


@ray_serve.command(help="Finish a rollout that holds at a canary step: all traffic to the new release.")
@click.option("--app", default=None, help="The app (needed when the flow deploys several).")
@click.pass_obj
def promote(obj, app=None):
    from ray_deploy import promote as promote_app

    name = _single(obj, app)
    try:
        _show(obj, promote_app(name, address=_address(obj, name)))
    except RayDeployError as error:
        raise RayServeCommandError(error)


@ray_serve.command(help="Back to the previous release, rebuilt from the MLflow registry if its replicas are gone.")
@click.option("--app", default=None, help="The app (needed when the flow deploys several).")
@click.option("--reason", default=None, help="Why; recorded on the model versions.")
@click.pass_obj
def rollback(obj, app=None, reason=None):
    from ray_deploy import rollback as rollback_app

    name = _single(obj, app)
    try:
        _show(
            obj,
            rollback_app(
                name, address=_address(obj, name), reason="operator rollback" + (": " + reason if reason else "")
            ),
        )
    except RayDeployError as error:
        raise RayServeCommandError(error)
