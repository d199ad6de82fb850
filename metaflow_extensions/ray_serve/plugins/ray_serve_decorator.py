import inspect
import os

from metaflow.decorators import StepDecorator
from metaflow.exception import MetaflowException
from metaflow.metadata_provider import MetaDatum

# Only what step_init needs is imported here: Metaflow imports this module in every flow and task
# process (any flow's), so the engine is imported by the methods that use it.
from ray_deploy.errors import ParityError, RayDeployError, SpecError
from ray_deploy.spec import QUALITY_METRICS, DeploymentSpec, option_defaults, routes_overlap


class RayServeException(MetaflowException):
    headline = "@ray_serve failed"

    def __init__(self, step_name, error):
        # Carry the engine's headline ("Invalid @ray_serve option", "Ray cluster unreachable", ...).
        self.headline = getattr(error, "headline", self.headline)
        super().__init__("@ray_serve on step '%s': %s" % (step_name, error))


class RayServeDecorator(StepDecorator):
    """
    Deploys this step's model artifact as a Ray Serve application when the step body ends.

    The step's code sets the model artifact (e.g. `self.model = best_model`); after the body,
    the artifact is stored, referenced by its pathspec and sha256, and served at
    `http://127.0.0.1:8000/<app>` (or the cluster's Serve address). Replicas load the model
    themselves by that reference and check its hash. Requests and answers follow
    `mlflow models serve`: POST `{"instances": [[...]]}`, get `{"predictions": [...]}`.

    The step gains the artifact `self.ray_serve`: a dict with `app`, `url`, `route_prefix`,
    `address`, `dashboard_url` and `variants` (name, weight, predictor, model_uri, sha256).
    Every option is checked before the flow starts; a bad value stops the run naming it.

    Parameters
    ----------
    app : str
        Ray Serve application name (lowercase letters, digits, '-' or '_'). Required.
    model : str, default "model"
        Name of the step artifact holding the model, or an MLflow model URI
        ("models:/name/1", "runs:/<run_id>/model").
    predictor : str, default "auto"
        "xgboost", "onnx", "python" (any object with predict), "mlflow", "auto" (chosen from
        the artifact's type), or a class of yours as "module:Class" (imported from the flow's
        directory; it takes `__init__(self, model, config)` and `predict(self, payload)`).
    predictor_config : Dict[str, Any], optional, default None
        JSON-serializable config passed to the predictor, e.g. {"output": "probability"}.
    route_prefix : str, optional, default None
        HTTP route of the app; defaults to "/<app>". Not under "/-/" (Serve's own) or "/v2" (the
        Open Inference Protocol), no "." or ".." segments, and not inside another app's route
        (or holding it): "/seed/feedback" beside "/seed" is refused, naming the other app.
    variants : Dict[str, Dict[str, Any]], optional, default None
        Several models behind one route, by name: {"xgb": {"model": "model", "weight": 50},
        "onnx": {"model": "model_onnx", "predictor": "onnx", "weight": 50, "derived_from": "xgb"}};
        weights sum to 100. Replaces model, predictor and predictor_config. A variant with
        `derived_from` must answer like that variant (the parity gate) before it takes traffic; one
        with `"shadow": True` gets a copy of live requests, compared and counted, never returned.
        A variant with `"isolate": True` (implied by its own `num_replicas`, `num_cpus` or
        `num_gpus`) runs in a Serve app of its own, `<app>--<variant>-<release>`: own replicas and
        resources (e.g. a GPU), its own line in the Ray dashboard, one extra hop per request.
    num_replicas : int, default 1
        Replicas of the serving deployment.
    num_cpus : float, default 1.0
        CPUs reserved by each replica (fractions allowed).
    num_gpus : float, default 0.0
        GPUs reserved by each replica (fractions allowed). Built-in predictors use the GPU
        when the replica holds one and the library can (XGBoost, onnxruntime-gpu).
    memory : int, optional, default None
        Memory reserved by each replica, in bytes.
    accelerator_type : str, optional, default None
        Accelerator each replica's node must have, e.g. "A10G" or "T4".
    resources : Dict[str, float], default {}
        Custom Ray resources each replica reserves, e.g. {"inference_node": 1}.
    max_replicas_per_node : int, optional, default None
        Most replicas of the app on one node (cannot be combined with placement).
    placement : Dict[str, Any], optional, default None
        A placement group per replica: {"bundles": [{"CPU": 1, "GPU": 1}, {"CPU": 2}],
        "strategy": "PACK"} (PACK, SPREAD, STRICT_PACK, STRICT_SPREAD). The replica runs in
        bundle 0, so num_cpus/num_gpus/memory/resources must fit in it; the other bundles are
        reserved beside it (e.g. for workers the predictor starts).
    autoscaling : Dict[str, Any], optional, default None
        Replica autoscaling instead of num_replicas: {"min_replicas": 1, "max_replicas": 4,
        "initial_replicas": None, "target_ongoing_requests": 2, "upscale_delay_s": 10,
        "downscale_delay_s": 60, "look_back_period_s": 10}. On a cluster with an autoscaler,
        replicas that do not fit make Ray add nodes.
    max_ongoing_requests : int, default 32
        Requests one replica handles at once.
    max_batch_size : int, default 1
        Requests merged into one predict call (server-side batching); 1 turns batching off.
    batch_wait_timeout_s : float, default 0.005
        Longest a request waits for a batch to fill, in seconds.
    max_request_bytes : int, default 8388608
        Largest request body accepted; larger ones are answered with 413.
    address : str, optional, default None
        Ray cluster address (host:port, ray://host:10001 or auto). Default: RAY_ADDRESS, then
        METAFLOW_RAY_SERVE_ADDRESS, else a persistent local Ray head started on first use.
    deploy_timeout_s : float, default 300.0
        Longest wait for the replicas to become healthy; on timeout the step fails and the
        previous version of the app keeps serving.
    lineage : bool, default True
        Record every deployed variant as an MLflow registered model version whose tags lead back
        to this run, step, task, artifact (with its sha256) and input data, and forward to the Ray
        app. The registry is MLFLOW_REGISTRY_URI / MLFLOW_TRACKING_URI, else a SQLite file at
        ~/.ray_deploy/mlflow/mlflow.db. An unreachable registry fails the step before Serve is touched.
    registered_model : str, optional, default None
        MLflow registered model name; defaults to the app name.
    data : List[str], default []
        The model's input data: artifact names of this run (e.g. ["dataset"]) or pathspecs of
        another flow's artifacts ("DataFlow/12/end/34/table"); recorded with their hashes.
    metrics : List[str], default []
        Artifacts holding the model's metrics (a number or a dict of numbers), logged on the
        MLflow run that mirrors this Metaflow run, e.g. ["best_metrics"].
    parity_rows : str, optional, default None
        Held-out rows for the parity gate: an artifact, or a key inside one ("dataset.X_test");
        default: generated rows. Inputs are cast to float32 for both models.
    parity_rtol : float, default 1e-05
        Relative tolerance of the parity gate on probabilities (labels must be equal).
    parity_atol : float, default 1e-06
        Absolute tolerance of the parity gate on probabilities.
    production_alias : str, default "production"
        MLflow alias held by the version serving all traffic.
    canary_alias : str, default "canary"
        MLflow alias held by a version serving part of the traffic.
    capture : Dict[str, Any], optional, default None
        Capture a sample of requests with their predictions, and take delayed labels:
        {"sample": 0.1, "path": None, "flush_s": 5, "max_pending": 10000, "quality": "accuracy",
        "quality_goal": None, "feedback_token_env": None}. Captures are written off the request
        path as Parquet under this flow's datastore root (<root>/ray_deploy_captures; local or S3),
        partitioned by app, release and hour; `POST <route>/feedback` with {"request_id": ...,
        "label": ...} labels a captured answer (the answer's X-Request-Id); each variant gets a
        quality figure ("accuracy", "mae" or "module:function"), read by `ray-deploy status`,
        `ray_deploy.Endpoint` and the rollout gates. `feedback_token_env` names an environment
        variable on the Ray nodes holding a bearer token that feedback must send.
    rollout : Dict[str, Any], optional, default None
        How a new release replaces the one serving the app, with no request dropped:
        {"strategy": "canary", "steps": [10, 50, 100], "interval_s": 30, "max_error_rate": 0.01,
        "max_p99_ms": None, "max_p99_ratio": None, "min_requests": 0, "max_disagreement": None,
        "max_prediction_shift": None, "min_quality_delta": None, "min_labels": 20, "wait": True}.
        Model gates: max_disagreement (share of the new release's requests the old release answers
        otherwise, asked off the request path), max_prediction_shift (mean prediction moved by
        more than this many of the old release's standard deviations), min_quality_delta (with
        capture and labels: quality difference, in the metric's better direction). Strategies:
        "immediate" (the default: all traffic at once), "canary" (traffic in steps, gates after
        each) and "blue_green" (all at once, old release kept loaded for interval_s, then gated).
        The new release is loaded beside the old before it gets traffic; a failing gate rolls back
        automatically and fails the step; steps short of 100 hold for `ray-deploy promote`. The
        steps run in a rollout controller on the cluster (actor `rollout:<app>`), which outlives
        the flow; "wait": False ends the step once the controller has taken over.
    """

    name = "ray_serve"
    defaults = option_defaults()

    def step_init(self, flow, graph, step_name, decorators, environment, flow_datastore, logger):
        if not self.statically_defined:
            # `--with` puts the decorator on every step: the run would train, then fail on a step
            # with no model. Refused here, before any step runs.
            raise RayServeException(
                step_name,
                SpecError(
                    "--with ray_serve: refused; --with attaches @ray_serve to every step, and a step "
                    "without a model would fail the run after training. Write @ray_serve on the step "
                    "that sets the model, and take per-run values from a Metaflow Config:\n"
                    "    from metaflow import Config, config_expr\n"
                    '    deploy_config = Config("deploy")  # in the flow class\n'
                    '    @ray_serve(app=config_expr("deploy.app"), num_replicas=config_expr("deploy.num_replicas"))\n'
                    "then run: python flow.py --config deploy deploy.json run  "
                    '(deploy.json: {"app": "cancer", "num_replicas": 2})'
                ),
            )
        _attach_card(decorators)
        self._step_name = step_name
        self._flow_datastore = flow_datastore
        self._code_dir = _flow_directory(flow)
        options = self.user_options()
        if options.get("address") is None:
            options["address"] = os.environ.get("RAY_ADDRESS") or _configured_address()
        try:
            if options.get("app") is None:
                raise SpecError("app: required; name the Ray Serve application, e.g. @ray_serve(app='cancer')")
            self.spec = DeploymentSpec.from_options(options)
            _check_routes_apart(flow, step_name, self.spec)
            for variant in self.spec.variants:
                if variant.is_user_predictor:
                    from ray_deploy.models.predictors import load_predictor_class

                    load_predictor_class(variant.predictor, code_dir=self._code_dir)
            capture = self.spec.capture
            if capture is not None and capture.quality not in QUALITY_METRICS:
                from ray_deploy.serving.capture import load_quality_function

                load_quality_function(capture.quality, code_dir=self._code_dir)
        except RayDeployError as error:
            raise RayServeException(step_name, error)

    def user_options(self):
        """The options the user set; the spec supplies every default itself.

        Passing the defaults along would make `model`/`predictor` look set beside `variants`.
        """
        user_defined = getattr(self, "_user_defined_attributes", None)
        if user_defined is None:
            return {k: v for k, v in self.attributes.items() if v is not None}
        return {k: v for k, v in self.attributes.items() if k in user_defined and v is not None}

    def task_pre_step(
        self,
        step_name,
        task_datastore,
        metadata,
        run_id,
        task_id,
        flow,
        graph,
        retry_count,
        max_user_code_retries,
        ubf_context,
        inputs,
    ):
        self._task_datastore = task_datastore
        self._metadata = metadata
        self._run_id = run_id
        self._task_id = task_id

    def task_post_step(self, step_name, flow, graph, retry_count, max_user_code_retries):
        from ray_deploy.control.deploy import deploy

        try:
            models, predictors, objects = self._resolve_models(flow)
            parity = self._check_parity(flow, predictors, objects)
            source = self._lineage_source(flow, step_name, models)
            result = deploy(
                self.spec,
                models,
                predictors,
                source={
                    "flow": source.flow,
                    "run_id": source.run_id,
                    "step": step_name,
                    "task": source.task,
                    "user": source.user,
                },
                # The flow's directory travels with the deployment: user predictors, and the
                # classes of pickled models defined next to the flow, import from it.
                code_dir=self._code_dir,
                lineage=source,
            )
        except RayDeployError as error:
            raise RayServeException(step_name, error)
        record = result.to_dict()
        record["parity"] = [
            {"source": p.source, "derived": p.derived, "ok": p.ok, "summary": p.summary()} for p in parity
        ]
        record["lineage"] = {
            "task": source.task,
            "code_version": source.code_version,
            "parameters": source.parameters,
            "metrics": source.metrics,
            "data": [{"name": d.name, "pathspec": d.pathspec, "sha256": d.sha256} for d in source.data],
            # Variant -> the artifact where its model's content first appeared: the task that trained it.
            "model_origins": {
                name: source.model_origins[ref.blob_key]
                for name, ref in models.items()
                if ref.blob_key in source.model_origins
            },
        }
        flow.ray_serve = record
        tags = ["attempt_id:%d" % retry_count]
        entries = [
            MetaDatum(field="ray_serve_app", value=result.app, type="ray_serve", tags=tags),
            MetaDatum(field="ray_serve_url", value=result.url, type="ray_serve", tags=tags),
        ]
        for variant, version in sorted(result.versions.items()):
            entries.append(
                MetaDatum(field="ray_serve_model_version.%s" % variant, value=str(version), type="ray_serve", tags=tags)
            )
        self._metadata.register_metadata(self._run_id, step_name, self._task_id, entries)

    def _lineage_source(self, flow, step_name, models):
        """Where the deployed models came from: the tasks that trained them, this task (which deploys
        them), the flow's parameters, metrics and data."""
        from metaflow import current

        from ray_deploy.registry.lineage import LineageSource, code_version

        parameters = {name: getattr(flow, name) for name in getattr(current, "parameter_names", [])}
        return LineageSource(
            flow=flow.name,
            run_id=str(self._run_id),
            step=step_name,
            task="%s/%s" % (flow.name, self._task_datastore.pathspec),
            user=current.username or os.environ.get("USERNAME") or "unknown",
            code_version=code_version(self._code_dir),
            parameters={k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in parameters.items()},
            metrics=self._metrics(flow),
            data=tuple(self._data_ref(flow, entry) for entry in self.spec.data),
            model_origins=self._model_origins(flow, models),
        )

    def _model_origins(self, flow, models):
        """Content address of each Metaflow model -> the artifact where that content first appeared in
        this run: the task that trained it (a foreach's winning branch, under any artifact name), not
        the steps that copied it here; this task's own artifact when no earlier task holds it."""
        from ray_deploy.registry.lineage import origin_of

        origins = {}
        for ref in models.values():
            if ref.kind == "metaflow" and ref.blob_key and ref.blob_key not in origins:
                found = origin_of(flow.name, str(self._run_id), None, ref.blob_key)
                origins[ref.blob_key] = found or ref.pathspec
        return origins

    def _metrics(self, flow):
        from ray_deploy.registry.lineage import flatten_metrics

        metrics = {}
        for name in self.spec.metrics:
            if not hasattr(flow, name):
                raise SpecError("metrics: the step has no artifact named %r; set it or drop it from metrics" % name)
            try:
                metrics.update(flatten_metrics(name, getattr(flow, name)))
            except ValueError as exc:
                raise SpecError("metrics: %s" % exc)
        return metrics

    def _data_ref(self, flow, entry):
        from ray_deploy.models.artifacts import metaflow_model_ref
        from ray_deploy.registry.lineage import DataRef, data_ref_from_pathspec, origin_of

        if "/" in entry:
            return data_ref_from_pathspec(entry, self._flow_datastore)
        if not hasattr(flow, entry):
            raise SpecError(
                "data: the step has no artifact named %r (nor did an earlier step); name the artifact that "
                "holds the training data, or give another flow's artifact as Flow/run/step/task/name" % entry
            )
        ref = metaflow_model_ref(self._task_datastore, self._flow_datastore, entry, getattr(flow, entry))
        # Point at the task that produced the data, not at this step's copy of it (same content).
        origin = origin_of(flow.name, str(self._run_id), entry, ref.blob_key) or ref.pathspec
        return DataRef(name=entry, pathspec=origin, sha256=ref.sha256, blob_key=ref.blob_key)

    def _resolve_models(self, flow):
        """Variant name -> ModelRef, -> predictor with 'auto' resolved, and -> the model object."""
        from ray_deploy.models.artifacts import ModelRef, metaflow_model_ref
        from ray_deploy.models.predictors import choose_predictor

        models, predictors, objects = {}, {}, {}
        for variant in self.spec.variants:
            if variant.is_mlflow_uri:
                # ray_deploy.deploy resolves it against the registry this step uses.
                models[variant.name] = ModelRef(kind="mlflow", uri=variant.model)
                predictors[variant.name] = "mlflow" if variant.predictor == "auto" else variant.predictor
                continue
            if not hasattr(flow, variant.model):
                raise SpecError(
                    "model: the step did not set an artifact named %r (nor did an earlier step); "
                    "assign it, e.g. self.%s = trained_model, or point model= at the artifact that "
                    "holds the model" % (variant.model, variant.model)
                )
            value = getattr(flow, variant.model)
            objects[variant.name] = value
            predictors[variant.name] = choose_predictor(value) if variant.predictor == "auto" else variant.predictor
            models[variant.name] = metaflow_model_ref(self._task_datastore, self._flow_datastore, variant.model, value)
        return models, predictors, objects

    def _check_parity(self, flow, predictors, objects):
        """Every derived variant must answer like its source before anything is deployed."""
        from ray_deploy.models.parity import check_parity
        from ray_deploy.progress import report

        derived = [v for v in self.spec.variants if v.derived_from]
        if not derived:
            return []
        rows = self._parity_rows(flow) if self.spec.parity_rows else None
        by_name = {v.name: v for v in self.spec.variants}
        reports = []
        for variant in derived:
            source = by_name[variant.derived_from]
            if source.name not in objects or variant.name not in objects:
                raise SpecError(
                    "variants.%s.derived_from: the parity gate compares step artifacts; %r or %r is an MLflow URI"
                    % (variant.name, source.name, variant.name)
                )
            outcome = check_parity(
                (source.name, predictors[source.name], objects[source.name], source.predictor_config),
                (variant.name, predictors[variant.name], objects[variant.name], variant.predictor_config),
                rows,
                rtol=self.spec.parity_rtol,
                atol=self.spec.parity_atol,
            )
            report(outcome.summary())
            if not outcome.ok:
                raise ParityError(outcome.summary() + "; variant %r is blocked and nothing was deployed" % variant.name)
            reports.append(outcome)
        return reports

    def _parity_rows(self, flow):
        name, *keys = self.spec.parity_rows.split(".")
        if not hasattr(flow, name):
            raise SpecError("parity_rows: the step has no artifact named %r" % name)
        value = getattr(flow, name)
        for key in keys:
            try:
                value = value[key] if isinstance(value, dict) else getattr(value, key)
            except (KeyError, AttributeError):
                raise SpecError("parity_rows: %r has no key %r" % (name, key))
        return value


def _attach_card(decorators):
    """Give the step a `ray_serve` card (endpoint, variants, model versions, lineage) unless it has one.

    Metaflow runs step_init over the step's decorator list as it iterates it, so a card decorator
    appended here is initialised like one written in the flow.
    """
    if any(d.name == "card" and d.attributes.get("type") == "ray_serve" for d in decorators):
        return
    from metaflow.plugins.cards.card_decorator import CardDecorator

    card = CardDecorator(attributes={"type": "ray_serve", "id": "ray_serve"}, statically_defined=False)
    card.external_init()
    decorators.append(card)


def _check_routes_apart(flow, step_name, spec):
    """Two @ray_serve steps of one flow that deploy different apps on overlapping routes (one inside
    the other) are refused before any step runs; the cluster's other apps are checked at deploy."""
    for step in flow:
        if step.__name__ == step_name:
            continue
        for deco in getattr(step, "decorators", []):
            if deco.name != "ray_serve" or not deco.attributes.get("app") or deco.attributes["app"] == spec.app:
                continue
            route = deco.attributes.get("route_prefix") or "/%s" % deco.attributes["app"]
            if routes_overlap(spec.route, route):
                raise SpecError(
                    "route_prefix: %r overlaps %r, the route of app %r deployed by step %r of this flow "
                    "(one route inside the other would take the other app's requests); give the apps routes "
                    "side by side" % (spec.route, route, deco.attributes["app"], step.__name__)
                )


def _flow_directory(flow):
    try:
        return os.path.dirname(os.path.abspath(inspect.getfile(flow.__class__)))
    except (TypeError, OSError):
        return os.getcwd()


def _configured_address():
    try:
        from metaflow.metaflow_config import RAY_SERVE_ADDRESS
    except ImportError:
        return None
    return RAY_SERVE_ADDRESS
