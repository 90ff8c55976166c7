"""Imports point one way (docs/design.md#modalities): entry points -> the loop -> modalities ->
recipes / models / data -> ops -> kernels. A static walk of every module of d2v_fast, imports
inside functions included, fails on a cycle and on a module that imports an entry point."""
import ast

from .helpers import ROOT

PACKAGE = ROOT / "d2v_fast"
ENTRY_POINTS = {"d2v_fast.pretrain", "d2v_fast.probe", "d2v_fast.export", "d2v_fast.bench", "d2v_fast.finetune"}


def _module_name(path):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_package(path):
    return path.name == "__init__.py"


def import_graph() -> dict[str, set[str]]:
    """module -> the d2v_fast modules it imports (``from .x import y`` counts as importing
    ``x.y`` when that is a module, else ``x``; a package's ``__init__`` is not counted as
    imported by its own submodules' relative imports of siblings)."""
    files = {_module_name(f): f for f in PACKAGE.rglob("*.py")}
    graph = {}
    for name, f in files.items():
        base = name.split(".") if _is_package(f) else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    mod = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in files else mod for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in files:  # `import d2v_fast.data.x` names the module itself
                    t = t.rpartition(".")[0]
                if t.startswith("d2v_fast") and t != name:
                    deps.add(t)
        graph[name] = deps
    return graph


def _cycles(graph):
    """Every strongly connected component of more than one module (Tarjan's algorithm)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
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


def _parents(name):
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def test_the_walk_sees_the_imports():
    graph = import_graph()
    assert "d2v_fast.trainer" in graph["d2v_fast.pretrain"]
    assert "d2v_fast.kernels.eager" in graph["d2v_fast.ops"]
    assert len(graph) > 60


def test_no_import_cycle():
    graph = import_graph()
    # a package importing its own submodules is not a cycle of the layering (``__init__`` re-exports)
    pruned = {m: {d for d in deps if m not in _parents(d)} for m, deps in graph.items()}
    assert _cycles(pruned) == []


def test_the_cycle_finder_finds_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_an_entry_point():
    """Except the modules of an entry point that is a package (``d2v_fast.finetune``'s
    per-modality task builders and its ``__main__``), which import their own package."""
    graph = import_graph()
    bad = sorted((m, d) for m, deps in graph.items() for d in deps & ENTRY_POINTS if not m.startswith(d + "."))
    assert bad == []


def test_the_probe_core_stands_below_the_modalities():
    graph = import_graph()
    assert graph["d2v_fast.linear_probe"] == set()  # features in, result out: nothing to import back up
    for m in ("d2v_fast.modalities.text", "d2v_fast.modalities.audio", "d2v_fast.modalities.images"):
        assert "d2v_fast.linear_probe" in graph[m]
        assert not graph[m] & {"d2v_fast.probing", "d2v_fast.probe", "d2v_fast.trainer"}, (m, graph[m])
