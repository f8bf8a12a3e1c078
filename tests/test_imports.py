"""The import graph of src/steerlab: no cycles, and no module imports a module of a higher layer
(the layers of docs/architecture.md). Every import counts, also one inside a function; only imports
under ``if TYPE_CHECKING:`` (annotations) do not."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "steerlab"

# lowest first; a module belongs to the layer of its longest matching prefix
LAYERS = [
    ("base", ["steerlab", "steerlab.errors", "steerlab.registry", "steerlab.options", "steerlab.validate",
              "steerlab.progress", "steerlab.profile", "steerlab.runs", "steerlab.parallel", "steerlab.positions",
              "steerlab.report"]),
    ("models", ["steerlab.models"]),
    ("data", ["steerlab.data", "steerlab.scoring", "steerlab.metrics"]),
    ("core", ["steerlab.hooks", "steerlab.edits", "steerlab.generation", "steerlab.grid", "steerlab.evaluation",
              "steerlab.interventions"]),
    ("methods", ["steerlab.explain", "steerlab.steer", "steerlab.protocols"]),
    ("method list", ["steerlab.methods"]),
    ("experiments", ["steerlab.experiments"]),
    ("cli", ["steerlab.cli", "steerlab.__main__"]),
]


# the arrows that break the rule knowingly, each with its reason; no other may join them
EXCEPTIONS: dict[tuple[str, str], str] = {}


def module_name(f: Path) -> str:
    parts = list(f.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(f): f for f in SRC.rglob("*.py")}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for b in node.body for n in ast.walk(b)}
    return skip


def imports(name: str, f: Path, known: dict) -> set[str]:
    """The steerlab modules ``name`` imports (a ``from X import y`` names X.y when that is a module)."""
    tree = ast.parse(f.read_text(encoding="utf-8"))
    skip = _type_checking_nodes(tree)
    pkg = name if f.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = pkg
            for _ in range(node.level - 1):
                base = base.rsplit(".", 1)[0]
            mod = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rsplit(".", 1)[0] if "." in t else ""
            if t and t != name:
                out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: {t for t in imports(m, f, known) if (m, t) not in EXCEPTIONS} for m, f in known.items()}


def layer(name: str) -> int:
    best, where = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:  # the package root is a layer of its own name only
            if (name == p or p != "steerlab" and name.startswith(p + ".")) and len(p) > best:
                best, where = len(p), i
    assert where is not None, f"{name} is in no layer: add it to LAYERS and docs/architecture.md"
    return where


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(u):
        state[u] = 1
        stack.append(u)
        for v in sorted(g.get(u, ())):
            if state.get(v) == 1:
                found.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = 2

    for u in sorted(g):
        if u not in state:
            visit(u)
    return found


def test_import_graph_has_no_cycle():
    assert cycles(graph()) == []


def test_no_module_imports_a_higher_layer():
    g = graph()
    up = [f"{a} ({LAYERS[layer(a)][0]}) -> {b} ({LAYERS[layer(b)][0]})"
          for a, targets in g.items() for b in targets if layer(b) > layer(a)]
    assert up == []


def test_the_checks_see_a_cycle_and_an_upward_arrow():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert layer("steerlab.interventions") < layer("steerlab.steer.vector") < layer("steerlab.experiments.bench")
    g = graph()
    # the protocol module names none of its implementations; the method list sits above them
    assert not any(t.startswith(("steerlab.steer", "steerlab.protocols", "steerlab.explain"))
                   for t in g["steerlab.interventions"])
    assert {"steerlab.steer.vector", "steerlab.steer.iti"} <= g["steerlab.methods"]


def test_every_module_has_a_layer():
    for name in modules():
        layer(name)


def test_every_exception_is_still_needed():
    known = modules()
    for (a, b), why in EXCEPTIONS.items():
        assert b in imports(a, known[a], known), f"{a} -> {b} is gone; remove its exception ({why})"


def test_architecture_doc_names_every_layer():
    text = (SRC.parent.parent / "docs" / "architecture.md").read_text()
    for name, _ in LAYERS:
        assert f"**{name}**" in text, name
