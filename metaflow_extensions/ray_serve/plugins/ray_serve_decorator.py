import inspect
import os

from metaflow.decorators import StepDecorator
from metaflow.exception import MetaflowException
from metaflow.metadata_provider import MetaDatum

from ray_deploy import (
    DeploymentSpec,
    ModelRef,
    RayDeployError,
    SpecError,
    choose_predictor,
    deploy,
    load_predictor_class,
    metaflow_model_ref,
    option_defaults,
)


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
        HTTP route of the app; defaults to "/<app>".
    variants : Dict[str, Dict[str, Any]], optional, default None
        Several models behind one route, by name: {"xgb": {"model": "model", "weight": 50},
        "onnx": {"model": "model_onnx", "predictor": "onnx", "weight": 50}}; weights sum to 100.
        Replaces model, predictor and predictor_config.
    num_replicas : int, default 1
        Replicas of the serving deployment.
    num_cpus : float, default 1.0
        CPUs reserved by each replica (fractions allowed).
    num_gpus : float, default 0.0
        GPUs reserved by each replica (fractions allowed).
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
    """

    name = "ray_serve"
    defaults = option_defaults()

    def step_init(self, flow, graph, step_name, decorators, environment, flow_datastore, logger):
        self._step_name = step_name
        self._flow_datastore = flow_datastore
        self._code_dir = _flow_directory(flow)
        options = dict(self.attributes)
        if options.get("address") is None:
            options["address"] = os.environ.get("RAY_ADDRESS") or _configured_address()
        try:
            if options.get("app") is None:
                raise SpecError("app: required; name the Ray Serve application, e.g. @ray_serve(app='cancer')")
            self.spec = DeploymentSpec.from_options(options)
            for variant in self.spec.variants:
                if variant.is_user_predictor:
                    load_predictor_class(variant.predictor, code_dir=self._code_dir)
        except RayDeployError as error:
            raise RayServeException(step_name, error)

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
        try:
            models, predictors = self._resolve_models(flow)
            uses_user_code = any(v.is_user_predictor for v in self.spec.variants)
            result = deploy(
                self.spec,
                models,
                predictors,
                source={
                    "flow": flow.name,
                    "run_id": str(self._run_id),
                    "step": step_name,
                    "task": "%s/%s" % (flow.name, self._task_datastore.pathspec),
                    "user": os.environ.get("USERNAME") or os.environ.get("USER") or "unknown",
                },
                code_dir=self._code_dir if uses_user_code else None,
            )
        except RayDeployError as error:
            raise RayServeException(step_name, error)
        flow.ray_serve = result.to_dict()
        tags = ["attempt_id:%d" % retry_count]
        self._metadata.register_metadata(
            self._run_id,
            step_name,
            self._task_id,
            [
                MetaDatum(field="ray_serve_app", value=result.app, type="ray_serve", tags=tags),
                MetaDatum(field="ray_serve_url", value=result.url, type="ray_serve", tags=tags),
            ],
        )

    def _resolve_models(self, flow):
        """Variant name -> ModelRef, and variant name -> predictor with 'auto' resolved."""
        models, predictors = {}, {}
        for variant in self.spec.variants:
            if variant.is_mlflow_uri:
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
            predictors[variant.name] = choose_predictor(value) if variant.predictor == "auto" else variant.predictor
            models[variant.name] = metaflow_model_ref(self._task_datastore, self._flow_datastore, variant.model, value)
        return models, predictors


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
