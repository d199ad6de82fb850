# Defaults for @ray_serve, read through Metaflow's configuration (METAFLOW_RAY_SERVE_* environment
# variables or the Metaflow config file). Unset values fall back to ray_deploy's own defaults.
from metaflow.metaflow_config_funcs import from_conf

# Ray cluster to deploy to when neither the decorator's `address` nor RAY_ADDRESS is set;
# unset means a persistent local Ray head.
RAY_SERVE_ADDRESS = from_conf("RAY_SERVE_ADDRESS")
