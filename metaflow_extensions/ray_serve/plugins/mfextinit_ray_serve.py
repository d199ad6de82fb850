# Registers the @ray_serve step decorator and the `ray-serve` flow command group with Metaflow.
STEP_DECORATORS_DESC = [("ray_serve", ".ray_serve_decorator.RayServeDecorator")]
CLIS_DESC = [("ray-serve", ".ray_serve_cli.cli")]
