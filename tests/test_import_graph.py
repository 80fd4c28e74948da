"""The house's imports run one way: no cycles, math below modules, no import hidden in a function."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tensorlm"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> tuple[set[str], list[tuple[int, str]]]:
    """``(modules imported at top level, [(line, module) imported inside a function]``, tensorlm and others."""
    tree = ast.parse(path.read_text())
    top, nested = set(), []
    functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    inside = {id(n) for f in functions for n in ast.walk(f) if isinstance(n, ast.Import | ast.ImportFrom)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        if id(node) in inside:
            nested += [(node.lineno, n) for n in names]
        else:
            top.update(names)
    return top, nested


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports(path)[0] if m in modules and m != name} for name, path in modules.items()}


def test_no_import_cycle():
    edges, state, cycles = graph(), {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, f"import cycles: {cycles}"


def test_decompose_imports_only_errors_from_tensorlm_and_no_modules():
    for path in (PACKAGE / "decompose").glob("*.py"):
        top, nested = imports(path)
        found = top | {m for _, m in nested}
        own = {m for m in found if m.startswith("tensorlm.") and not m.startswith("tensorlm.decompose")}
        assert own <= {"tensorlm.errors", "tensorlm.errors.TensorLMError"}, f"{path.name} imports {own}"
        assert not {m for m in found if m.split(".")[0] == "transformers"}, f"{path.name} imports transformers"
        assert "torch.nn" not in found and "torch.nn.Module" not in found, f"{path.name} imports nn.Module code"


def test_my_modules_import_tensorlm_only_at_top_level():
    owned = ["methods", "decompose", "layers", "distill"]
    files = [p for d in owned for p in (PACKAGE / d).glob("*.py")]
    files += [PACKAGE / f for f in ("plan.py", "surgery.py", "recipe.py", "params.py", "io.py", "files.py")]
    hidden = {p.name: [(line, m) for line, m in imports(p)[1] if m.startswith("tensorlm")] for p in files}
    assert not {k: v for k, v in hidden.items() if v}, f"imports of tensorlm inside functions: {hidden}"


LAZY_OPTIONAL = {"datasets", "matplotlib", "accelerate"}
"""Optional heavy dependencies that may be imported inside the function that needs them (and nothing else)."""


def test_no_import_inside_a_function_anywhere():
    """No function in tensorlm/ imports a module, so none can dodge a cycle that way; only the optional heavy
    dependencies of LAZY_OPTIONAL may be imported late."""
    hidden = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        found = [(line, m) for line, m in imports(path)[1] if m.split(".")[0] not in LAZY_OPTIONAL]
        if found:
            hidden[str(path.relative_to(PACKAGE))] = found
    assert not hidden, f"imports inside functions: {hidden}"


def test_the_graph_sees_nested_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import os\n\n\ndef f():\n    from tensorlm import io\n    import datasets\n")
    top, nested = imports(probe)
    assert top == {"os"}
    assert {m for _, m in nested} == {"tensorlm", "tensorlm.io", "datasets"}
