"""The package's planes, as imports: arrows point down, no plane imports a higher one, no cycles,
and the replicas' code version covers exactly the code a replica imports."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "ray_deploy"

# Higher number = higher plane. A module may import modules of its own plane or lower ones.
PLANES = {
    "cli": 5,
    "deployments": 5,
    "control": 4,
    "cluster": 4,
    "registry": 3,
    "serving": 2,
    "models": 1,
    "spec": 0,
    "errors": 0,
    "progress": 0,
}


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every ray_deploy module ``path`` imports, at module level or inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ray_deploy"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("ray_deploy"))
    return found


MODULES = {_module(path): path for path in PACKAGE.rglob("*.py")}
GRAPH = {name: {m for m in _imports(path) if m in MODULES and m != name} for name, path in MODULES.items()}


def _plane(module: str) -> int | None:
    parts = module.split(".")
    return PLANES.get(parts[1]) if len(parts) > 1 else None


def test_no_plane_imports_a_higher_one():
    upward = [
        f"{name} (plane {_plane(name)}) imports {target} (plane {_plane(target)})"
        for name, targets in GRAPH.items()
        for target in targets
        if _plane(name) is not None and _plane(target) is not None and _plane(target) > _plane(name)
    ]
    assert not upward, "\n".join(upward)


def test_every_module_belongs_to_a_plane():
    assert not [m for m in MODULES if m != "ray_deploy" and _plane(m) is None]


def test_no_import_cycles():
    # The package's __init__ re-exports everything; cycles through it are Python's, not ours.
    graph = {n: {t for t in ts if t != "ray_deploy"} for n, ts in GRAPH.items() if n != "ray_deploy"}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                cycles.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_code_version_covers_what_a_replica_imports_and_nothing_of_the_control_plane():
    from ray_deploy.serving.server import REPLICA_CODE

    covered = set()
    for entry in REPLICA_CODE:
        target = PACKAGE / entry
        covered |= {_module(p) for p in (target.rglob("*.py") if target.is_dir() else [target])}
    reached, todo = set(), ["ray_deploy.serving.server"]
    while todo:
        module = todo.pop()
        if module in reached or module == "ray_deploy":
            continue
        reached.add(module)
        todo.extend(GRAPH[module])
    # Package __init__ files of the planes the replica reaches come along with their modules.
    reached |= {m.rsplit(".", 1)[0] for m in reached if m.rsplit(".", 1)[0] in MODULES} - {"ray_deploy"}
    assert reached <= covered, f"replica code outside the code version: {sorted(reached - covered)}"
    assert not {m for m in covered if m.startswith(("ray_deploy.control", "ray_deploy.cli", "ray_deploy.registry"))}
    assert "ray_deploy.serving.front" not in covered
