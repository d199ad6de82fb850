"""models plane of ray_deploy."""
