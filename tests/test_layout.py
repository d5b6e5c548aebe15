"""The import graph runs one way: bench on top; training and export below it; serving (the
request path) below export; medoe at the bottom. The request path never reaches torch.

Read from the source with `ast` (imports inside functions count too), so a lazy import that
breaks the layering fails here, not on a server without torch.
"""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("medoe", "training", "export", "serving", "bench")
# What each package may import of the others. export writes the artefacts serving runs, so it
# reads serving's limits and onnxruntime settings; nothing below imports what is above it.
ALLOWED = {
    "medoe": set(),
    "serving": {"medoe"},
    "training": {"medoe"},
    "export": {"medoe", "serving"},
    "bench": {"medoe", "serving", "export", "training"},
}
# The request path and the modules it shares with the rest: never torch, directly or through another module.
TORCH_FREE = ("serving", "medoe.contract", "medoe.cli", "medoe.io", "medoe.config")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Every module `path` imports, absolute names (relative imports resolved)."""
    name, found = module_name(path), set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return found


def project_modules() -> dict[str, set[str]]:
    graph = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            graph[module_name(path)] = imported(path)
    for path in sorted((ROOT / "model_repository").glob("*/1/model.py")):  # the python models: request path
        graph[f"serving.<{path.parent.parent.name} model>"] = imported(path)
    return graph


GRAPH = project_modules()


def top(name: str) -> str:
    return name.split(".")[0]


def test_every_package_imports_only_what_is_below_it():
    wrong = sorted(
        f"{module} imports {name}"
        for module, names in GRAPH.items()
        for name in names
        if top(name) in PACKAGES and top(name) != top(module) and top(name) not in ALLOWED[top(module)]
    )
    assert wrong == []


def closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        for name in GRAPH.get(current, ()):
            target = name if name in GRAPH else name.rpartition(".")[0]  # `from pkg.mod import function`
            if name not in seen:
                seen.add(name)
                if target in GRAPH:
                    todo.append(target)
    return seen


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m.startswith(TORCH_FREE)))
def test_the_request_path_never_reaches_torch(module):
    assert sorted(n for n in closure(module) if top(n) == "torch") == []


def test_the_graph_is_read_from_real_files():
    # The checks above are only as good as the graph: it holds the known edges.
    assert "medoe.contract" in GRAPH["serving.processing"] | closure("serving.<segment model>")
    assert "torch" in closure("export.to_onnx") and "medoe.config" in GRAPH["training.train"]
    assert any(top(n) == "export" for n in GRAPH["bench.inference"])


def test_importing_the_client_and_processing_loads_no_torch():
    import subprocess

    code = (
        "import sys, serving.client, serving.processing, serving.decode, serving.model_limits; "
        "print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
