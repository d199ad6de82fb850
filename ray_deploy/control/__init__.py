"""control plane of ray_deploy."""
