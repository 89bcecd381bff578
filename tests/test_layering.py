"""The direction of imports (DESIGN §2): every tether module sits in a layer and imports only from
its own layer or the ones below; no import cycle among tether's modules; no tether import inside a
function (those are for optional heavy dependencies only); importing tether.algo pulls in no
transformers."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tether"

# Lowest first. A module matches the longest prefix listed; a new module must be placed here.
LAYERS = [
    ["tether.algo", "tether.distributed", "tether.precision", "tether.text_health", "tether.metrics", "tether.tiny",
     "tether.report", "tether.data", "tether.layouts", "tether.tracking"],
    ["tether.doctor", "tether.sharding", "tether.checkpoint", "tether.rundir", "tether.config"],
    ["tether.models"],  # HF loading, heads, architecture helpers
    ["tether.lora"],
    ["tether.sampling", "tether.rewards", "tether.http_reward"],
    ["tether.generation", "tether.roles"],
    ["tether.placement"],  # role assembly
    ["tether.rollout"],  # the contract and the driver
    ["tether.trainers"],
    ["tether.pipelines"],  # stage start-up, the stages, the demos
    ["tether.api"],
    ["tether.cli", "tether.__main__", "tether"],
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer_of(module: str) -> int:
    best, found = -1, None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), index
    assert found is not None, f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}"
    return found


def imported_modules(module: str, node: ast.AST) -> list[str]:
    """The tether modules an import statement names (a `from pkg import submodule` names the submodule)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
            package = package[: len(package) - (node.level - 1)]
            base = ".".join(package + ([node.module] if node.module else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    found = []
    for name in names:
        while name not in MODULES and "." in name:
            name = name.rsplit(".", 1)[0]
        if name in MODULES and name != module:
            found.append(name)
    return found


def imports() -> dict[str, list[tuple[str, bool]]]:
    """module -> [(imported tether module, at module level?)]."""
    graph = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        graph[module] = [(target, id(node) in top or _in_type_checking(tree, node))
                         for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                         for target in imported_modules(module, node)]
    return graph


def _in_type_checking(tree: ast.Module, node: ast.AST) -> bool:
    return any(isinstance(n, ast.If) and "TYPE_CHECKING" in ast.dump(n.test) and node in ast.walk(n)
               for n in tree.body)


def test_every_import_points_down_the_layers():
    upward = [f"{source} (layer {layer_of(source)}) imports {target} (layer {layer_of(target)})"
              for source, targets in imports().items() for target, _ in targets
              if layer_of(target) > layer_of(source)]
    assert not upward, "\n".join(upward)


def test_no_import_cycle_among_tethers_modules():
    graph = {m: {t for t, _ in targets} for m, targets in imports().items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


# The package's API names load on first use (PEP 562), so `import tether.algo` stays torch-only.
LAZY = {("tether", "tether.api"), ("tether", "tether.config")}


def test_no_tether_import_inside_a_function():
    inner = [f"{source} imports {target} inside a function"
             for source, targets in imports().items() for target, at_top in targets
             if not at_top and (source, target) not in LAZY]
    assert not inner, "\n".join(inner)


def test_the_layering_check_sees_a_planted_upward_import(tmp_path, monkeypatch):
    """The checks above can fail: a planted upward import and a planted cycle are both found."""
    planted = {"tether.models": [("tether.trainers.ppo", True)], "tether.trainers.ppo": [("tether.models", True)]}
    monkeypatch.setattr(sys.modules[__name__], "imports", lambda: planted | {"tether.trainers": []})
    for check in (test_every_import_points_down_the_layers, test_no_import_cycle_among_tethers_modules):
        try:
            check()
        except AssertionError as err:
            assert "tether.models" in str(err)
        else:
            raise AssertionError(f"{check.__name__} passed a planted violation")


def test_import_pulls_in_no_transformers():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    code = (
        "import tether.algo, sys; assert 'transformers' not in sys.modules, 'transformers imported'; "
        "ours = [m for m in sys.modules if m.startswith('tether')]; "
        "assert all(m == 'tether' or m.startswith('tether.algo') for m in ours), ours; "
        "assert tether.algo.gae is not None"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
