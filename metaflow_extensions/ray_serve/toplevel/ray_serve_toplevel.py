# Metaflow reports extensions as "<metaflow version>+ray_serve(<version>)".
__mf_extensions__ = "ray_serve"

from ray_deploy import __version__  # noqa: E402,F401
