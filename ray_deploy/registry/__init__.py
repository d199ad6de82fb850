"""registry plane of ray_deploy."""
