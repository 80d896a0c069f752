"""The tree says the architecture: the PRM (``model/``) never reaches into the job or Ray, the pieces
both use (``storage``, ``schema``, ``errors``) reach into neither, and no modules import each other."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import visualprm_ray

PACKAGE = Path(visualprm_ray.__file__).parent
SHARED = ("visualprm_ray.storage", "visualprm_ray.schema", "visualprm_ray.errors")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module an import statement in ``path`` names, lazy ones inside functions included."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            # ``from visualprm_ray.job import stages``: the submodule is what is used.
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_every_internal_import_names_a_module_or_a_name_it_defines():
    """A module moved without its importers updated is caught here, lazy imports included."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    root = Path(__file__).resolve().parents[1]
    scripts = [p for folder in ("benchmarks", "jobs", "tests") for p in (root / folder).rglob("*.py")]
    for name, path in [*modules.items(), *((str(p.relative_to(root)), p) for p in scripts)]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("visualprm_ray"):
                assert node.module in modules, f"{name} imports the missing module {node.module}"
                defined = _names(modules[node.module])
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    assert full in modules or alias.name in defined, f"{name}: {full} does not exist"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("visualprm_ray"):
                        assert alias.name in modules, f"{name} imports the missing module {alias.name}"


def _names(path: Path) -> set[str]:
    """Names a module binds at its top level (and the lazy facade's exports)."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                parts = target.elts if isinstance(target, ast.Tuple) else [target]
                names.update(t.id for t in parts if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    if path == PACKAGE / "__init__.py":
        names.update(visualprm_ray.__all__)
    return names


def test_the_model_imports_neither_ray_nor_the_job():
    for path in (PACKAGE / "model").rglob("*.py"):
        bad = {m for m in _imports(path) if m.split(".")[0] == "ray" or m.startswith("visualprm_ray.job")}
        assert not bad, f"{path.relative_to(PACKAGE)} imports {sorted(bad)}"


def test_the_shared_pieces_import_neither_the_model_nor_the_job():
    graph = _graph()
    for name in SHARED:
        bad = {m for m in graph[name] if m.startswith(("visualprm_ray.model", "visualprm_ray.job"))}
        assert not bad, f"{name} imports {sorted(bad)}"


def test_no_two_modules_import_each_other_even_lazily():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            # A package importing its own submodules (a lazy facade) is not a circle.
            if nxt.startswith(node + "."):
                continue
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt) :], nxt]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_the_prm_api_works_where_ray_cannot_be_imported(tmp_path):
    """The device image has no Ray: the whole PRM, a tiny checkpoint and a score, with Ray blocked."""
    code = f"""
import sys
sys.modules["ray"] = None  # any `import ray` now raises ImportError
import pkgutil, importlib
import visualprm_ray.model as model
for info in pkgutil.walk_packages(model.__path__, "visualprm_ray.model."):
    importlib.import_module(info.name)
from visualprm_ray import VisualPRM, write_tiny_checkpoint, tile_image, split_steps, build_conversation
write_tiny_checkpoint({str(tmp_path / "m")!r})
prm = VisualPRM.from_pretrained({str(tmp_path / "m")!r}, device="cpu", dtype="float32")
scores = prm.score("What is 2 + 2?", ["It is 4.\\n\\nSo 4.", "5."])
assert [len(s.step_scores) for s in scores] == [2, 1], scores
leaked = sorted(m for m in sys.modules if m.startswith("visualprm_ray.job"))
assert not leaked, leaked
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
