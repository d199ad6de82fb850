"""The distribution Metaflow will load: namespace layout, plugin registration, console script."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_wheel_ships_a_namespace_extension(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("metaflow_ray_serve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "metaflow_extensions/ray_serve/plugins/mfextinit_ray_serve.py" in names
    assert "metaflow_extensions/ray_serve/config/mfextinit_ray_serve.py" in names
    assert "ray_deploy/serving/server.py" in names
    # Metaflow refuses extensions that are not implicit namespace packages.
    assert "metaflow_extensions/__init__.py" not in names
    assert "metaflow_extensions/ray_serve/__init__.py" not in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "ray-deploy = ray_deploy.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_metaflow_lists_the_extension():
    from metaflow.extension_support import dump_module_info
    from metaflow.metaflow_version import get_version

    assert "+ray_serve(" in get_version()
    _, (packages, extension_points) = dump_module_info()
    assert any("metaflow-ray-serve" in package for package in packages)
    assert {"plugins", "config", "toplevel"} <= set(extension_points)


def test_decorator_importable_from_metaflow():
    import metaflow

    assert callable(metaflow.ray_serve)


def test_ray_deploy_help():
    ray_deploy = Path(sys.executable).with_name("ray-deploy")
    shown = subprocess.run([str(ray_deploy), "--help"], capture_output=True, text=True, check=True)
    for command in ("cluster", "status", "predict", "delete"):
        assert command in shown.stdout


def test_importing_metaflow_does_not_import_the_engine(tmp_path):
    """Metaflow loads the extension in every flow and task process, of any flow: `import metaflow`
    (and the decorator's option checks) must not pay for Ray, MLflow, numpy or the deploy engine."""
    probe = (
        "import sys, metaflow\n"
        "from metaflow import ray_serve\n"
        "heavy = ('ray', 'mlflow', 'numpy', 'pandas', 'ray_deploy.control.deploy', 'ray_deploy.cluster')\n"
        "print(','.join(name for name in heavy if name in sys.modules))\n"
    )
    env = {**os.environ, "USERNAME": os.environ.get("USERNAME") or "someone"}
    # Run outside the checkout: with a regular install, the checkout's own metaflow_extensions on
    # sys.path would be a second copy of the extension.
    shown = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert shown.stdout.strip() == "", f"import metaflow imported {shown.stdout.strip()}"


def test_every_public_name_resolves():
    import ray_deploy

    missing = [name for name in ray_deploy.__all__ if getattr(ray_deploy, name, None) is None]
    assert not missing, missing
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        ray_deploy.not_a_name  # noqa: B018
