"""The shape of the code, checked: the import graph of model/ and viewer/ has no cycles,
project imports sit at the top of each file, model/ never imports Streamlit, the viewer uses
no private names of model/, and the layers import only downwards."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "viewer")
# model/'s layers, lowest first: a module may import its own layer and the ones below.
# The command-line entry modules (model/<tool>.py) sit above every layer.
LAYERS = ["core", "data", "nets", "review", "evaluation.metrics", "training.config", "runs",
          "evaluation", "training", "oof", "slides", "benchmarks"]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            if "__pycache__" not in path.parts:
                out[_module_name(path)] = path
    return out


def _project_imports(tree: ast.AST, known: set[str]):
    """(node, imported module, imported names, top level?) for imports of model/ or viewer/."""
    top = {id(n) for n in getattr(tree, "body", [])}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            base = node.module
            if base.split(".")[0] not in PACKAGES:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                target = sub if sub in known else base
                yield node, target, alias.name, id(node) in top
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    yield node, alias.name, None, id(node) in top


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {m: set() for m in mods}
    for name, path in mods.items():
        for _, target, _, _ in _project_imports(ast.parse(path.read_text()), set(mods)):
            if target in mods and target != name:
                graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = _graph()
    assert len(graph) > 40 and graph["model.training.loop"]  # the graph is really built
    assert _cycles(graph) == []


def test_project_imports_are_at_the_top_of_each_file():
    mods = _modules()
    late = [f"{path.relative_to(REPO)}:{node.lineno} {ast.unparse(node)}"
            for path in mods.values()
            for node, _, _, top in _project_imports(ast.parse(path.read_text()), set(mods))
            if not top]
    assert late == []


def test_model_never_imports_streamlit_and_the_viewer_never_fastai():
    bad = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for m in mods:
                root = m.split(".")[0]
                if (name.startswith("model") and root == "streamlit") or (
                        name.startswith("viewer") and root in ("fastai", "captum", "timm")):
                    bad.append(f"{name}: {m}")
    assert bad == []


def test_viewer_uses_no_private_names_of_model():
    mods = _modules()
    bad = [f"{name}: {target}.{imported}"
           for name, path in mods.items() if name.startswith("viewer")
           for _, target, imported, _ in _project_imports(ast.parse(path.read_text()), set(mods))
           if target.startswith("model") and imported and imported.startswith("_")]
    assert bad == []


def _layer(module: str) -> int | None:
    if not module.startswith("model.") or module.count(".") == 1 and not any(
            module == f"model.{layer}" for layer in LAYERS):
        return None  # model/<tool>.py entry modules and model/__init__
    rest = module[len("model."):]
    best = None
    for k, layer in enumerate(LAYERS):
        if rest == layer or rest.startswith(layer + "."):
            if best is None or len(layer) > len(LAYERS[best]):
                best = k
    return best


def test_layers_import_only_downwards():
    graph = _graph()
    up = [f"{a} -> {b}" for a, targets in graph.items() for b in targets
          if _layer(a) is not None and _layer(b) is not None and _layer(b) > _layer(a)]
    assert up == []
    entries = [m for m in graph if m.startswith("model.") and _layer(m) is None]
    assert {"model.train", "model.evaluate", "model.predict", "model.inspect", "model.pack",
            "model.bench", "model.crossval", "model.queue"} <= set(entries)
    assert not any(e in graph[m] for m in graph for e in entries), "a library imports a CLI"
