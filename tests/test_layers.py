"""The layers of the README's Layout section, enforced: every import inside the package points to the same
layer or one below it, and no module imports itself back through others."""

import ast
from pathlib import Path

import selfextend

PACKAGE = Path(selfextend.__file__).parent
LAYERS = [  # top to bottom, as the README lists them
    ["cli", "__main__"],
    ["serving", "vllm"],
    ["evaluation"],
    ["inference"],
    ["integration", "grouped_keys", "kv_cache"],
    ["planning"],
    ["attention"],
    ["config", "rotary", "identity", "models", "weights"],
    ["positions", "errors", "transformers_compat", "samples", "testbed", "native", "linear_native", "sibling_products",
     "norm_native", "rope_native", "cache_native", "paths", "allocator"],
]
LAYER = {name: depth for depth, names in enumerate(LAYERS) for name in names}


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Each module of the package and the package modules it imports (also inside functions)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".") if package else []
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
                found |= {f"{target}.{a.name}".strip(".") for a in node.names} | {target}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("selfextend"):
                found.add(node.module.removeprefix("selfextend").strip("."))
        modules = {_module(p) for p in PACKAGE.rglob("*.py")}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def _layer(module: str) -> int:
    return LAYER[module.split(".")[0]]


def test_every_import_points_down_or_across():
    upward = [(a, b) for a, targets in _imports().items() if a for b in targets
              if b and not (a.split(".")[0] == b.split(".")[0]) and _layer(b) < _layer(a)]
    assert upward == []


def test_no_import_cycle_between_modules():
    graph, state, cycles = _imports(), {}, []

    def visit(node, path):
        state[node] = "open"
        for target in graph.get(node, ()):
            if state.get(target) == "open" and not (target == "" or node.startswith(target + ".")
                                                     or target.startswith(node + ".")):
                cycles.append([*path, target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])
    assert cycles == []
