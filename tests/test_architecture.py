"""The package's imports run one way: no module imports one that imports it back, and no kernel module
imports a backend, the manager or the prefix store.

Read from the source (module-level and function-level imports alike), so it needs no GPU and imports
nothing.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "mamba_cache"

#: The floors, bottom first: a module may import modules of its own floor and the floors below, never one
#: above (a module named in no floor is on top: the models, the CLI, the demo, the package itself).
FLOORS = [
    # foundation: target choice, prepared launches, device plumbing, argument checks, the NumPy references
    {"mamba_cache._target", "mamba_cache._config", "mamba_cache.core", "mamba_cache.core.launch",
     "mamba_cache.core.device", "mamba_cache.core.checks", "mamba_cache.interop", "mamba_cache.interop.dlpack",
     "mamba_cache.interop.arrays", "mamba_cache.precision", "mamba_cache.precision.reference",
     "mamba_cache.precision.quant8", "mamba_cache.prefix.keys", "mamba_cache.prefix.placement",
     "mamba_cache.prefix.policy", "mamba_cache.prefix.stats", "mamba_cache.snapshot", "mamba_cache.traffic",
     "mamba_cache.moving", "mamba_cache.moving.parcel"},
    # kernels (each beside its reference)
    {"mamba_cache.core.kernels", "mamba_cache.core.rows", "mamba_cache.precision.kernels",
     "mamba_cache.precision.commit_kernels", "mamba_cache.precision.word_conversions",
     "mamba_cache.precision.quant8_kernels", "mamba_cache.precision.quant8_replay",
     "mamba_cache.replay", "mamba_cache.replay.reference", "mamba_cache.replay.kernels", "mamba_cache.replay.tiled",
     "mamba_cache.replay.tiles", "mamba_cache.replay.tiled_mamba2", "mamba_cache.replay.tiled_gdn",
     "mamba_cache.prefix.host_copy", "mamba_cache.checkpoint", "mamba_cache.checkpoint.reference",
     "mamba_cache.checkpoint.kernels", "mamba_cache.checkpoint.reading",
     "mamba_cache.moving.kernels", "mamba_cache.models.chunked", "mamba_cache.models.chunked_kernels",
     "mamba_cache.models.chunked_scratch"},
    # the backend-neutral manager and its declared backend interface
    {"mamba_cache.core.backend", "mamba_cache.core.slots", "mamba_cache.core.commits", "mamba_cache.core.checkpoint",
     "mamba_cache.core.moving", "mamba_cache.core.manager", "mamba_cache.models.prefill"},
    # the backends (they bind the manager's hooks to kernels) and the prefix store (built on a manager)
    {"mamba_cache.core.numba_backend", "mamba_cache.core.numba_convert", "mamba_cache.core.numba_args",
     "mamba_cache.core.numba_device",
     "mamba_cache.core.numba_checkpoint", "mamba_cache.core.numba_moving", "mamba_cache.core.numba_quant8",
     "mamba_cache.core.numpy_backend",
     "mamba_cache.prefix", "mamba_cache.prefix.store", "mamba_cache.prefix.index", "mamba_cache.prefix.tracking"},
]  # fmt: skip


def import_graph() -> dict[str, set[str]]:
    modules = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    for candidate in (f"{target}.{alias.name}", target):
                        if candidate in modules and candidate != name:
                            graph[name].add(candidate)
                            break
            elif isinstance(node, ast.Import):
                graph[name].update(alias.name for alias in node.names if alias.name in modules)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, done, stack = [], set(), []

    def visit(module: str) -> None:
        stack.append(module)
        for target in sorted(graph[module]):
            if target in stack:
                if target != "mamba_cache":  # the package's __init__ re-exports: not a layer
                    found.append(stack[stack.index(target) :] + [target])
            elif target not in done:
                visit(target)
        stack.pop()
        done.add(module)

    for module in sorted(graph):
        if module not in done:
            visit(module)
    return found


def test_no_module_imports_one_that_imports_it_back():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_module_imports_from_a_floor_above_its_own():
    graph = import_graph()
    floor_of = {module: level for level, floor in enumerate(FLOORS) for module in floor}
    assert set(floor_of) <= set(graph), "a floor names a module that does not exist"
    upward = []
    for module, targets in graph.items():
        if module not in floor_of:
            continue
        for target in targets:
            if floor_of.get(target, len(FLOORS)) > floor_of[module]:  # unnamed: the top floor
                upward.append(f"{module} -> {target}")
    assert upward == []
