"""How t2f's packages import each other, read from the source (every import, the ones inside functions included).

The core (t2f/) imports none of the tools and never click; the engine runs artifacts without the export tool (the
on-demand export is its one use of it); no two modules import each other, and module-level imports form no cycle.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = next(ast.literal_eval(k.value) for k in ast.walk(ast.parse((ROOT / "setup.py").read_text(encoding="utf-8")))
                if isinstance(k, ast.keyword) and k.arg == "package_dir")      # setup.py's package_dir: package -> folder


def _modules() -> dict[str, pathlib.Path]:
    modules = {}
    for package, folder in PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules


MODULES = _modules()


def imported(module: str, top_level_only: bool = False) -> list[tuple[str, int, bool]]:
    """(imported name, line, at module level) of every import in `module`: `from A import B` gives A and A.B, and a
    relative import is resolved against the module's package."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    top = set(map(id, tree.body))
    found = []
    for node in (tree.body if top_level_only else ast.walk(tree)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{node.module}" if node.module else anchor
            found.append((base, node.lineno, id(node) in top))
            found += [(f"{base}.{alias.name}", node.lineno, id(node) in top) for alias in node.names]
    return found


def _internal_graph(top_level_only: bool = False) -> dict[str, set[str]]:
    return {m: {name for name, _, _ in imported(m, top_level_only) if name in MODULES and name != m} for m in MODULES}


def test_the_scan_reads_every_package_and_resolves_relative_imports():
    """The rules below would pass on nothing: the scan must find the modules and the imports they are about."""
    assert {"t2f.artifacts", "t2f.cli", "t2f.export.convert", "t2f.engine.backends.base"} <= set(MODULES)
    assert "t2f.artifacts" in {name for name, _, _ in imported("t2f.engine.backends.base")}
    assert "t2f.engine.backends.types" in {name for name, _, _ in imported("t2f.engine.backends.base")}    # from .types
    assert any(name == "click" for name, _, _ in imported("t2f.cli"))


def test_no_module_of_the_core_imports_click():
    """Option types and the CLIs' error handling live with the CLIs (t2f.cli); the core is a library."""
    found = [(m, line) for m, path in MODULES.items() if path.parent == ROOT / "t2f"
             for name, line, _ in imported(m) if name.split(".")[0] == "click"]
    assert found == []


def test_the_core_imports_none_of_the_tools():
    tools = ("t2f.cli", "t2f.engine", "t2f.export", "t2f.trainer")
    found = [(m, name) for m, path in MODULES.items() if path.parent == ROOT / "t2f"
             for name, _, _ in imported(m) if name in tools or name.startswith(tuple(t + "." for t in tools))]
    assert found == []


def test_the_engine_runs_artifacts_without_the_export_tool():
    """The manifest, artifact checks and loaders are the core's (t2f.artifacts); the engine's one use of t2f.export is
    the on-demand export of graphs into the cache, imported inside the function that runs it."""
    found = sorted((m, name, top) for m in MODULES if m.startswith("t2f.engine")
                   for name, _, top in imported(m) if name == "t2f.export" or name.startswith("t2f.export."))
    assert found == [("t2f.engine.backends.ondemand", "t2f.export.onnx_export", False),
                     ("t2f.engine.backends.ondemand", "t2f.export.onnx_export.export_artifacts", False)]


def test_no_two_modules_import_each_other():
    graph = _internal_graph()
    assert sorted({tuple(sorted((a, b))) for a in graph for b in graph[a] if a in graph[b]}) == []


def test_module_level_imports_have_no_cycle():
    """No module reaches itself through module-level imports (each would depend on the other's import order)."""
    graph = _internal_graph(top_level_only=True)
    cycles = []
    for module in graph:
        seen, stack = set(), [(module, (module,))]
        while stack:
            current, path = stack.pop()
            for nxt in graph[current]:
                if nxt == module:
                    cycles.append(" -> ".join(path + (nxt,)))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + (nxt,)))
    assert cycles == []


MAX_LINES = 420


def test_no_module_is_over_420_lines():
    """A module a newcomer can read whole: split by responsibility before one grows past MAX_LINES."""
    scripts = sorted((ROOT / "benchmarks").glob("*.py"))
    long = {str(path.relative_to(ROOT)): n for path in [*MODULES.values(), *scripts]
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert len(MODULES) > 50 and scripts                                  # the scan reads the packages and the scripts
    assert long == {}


def test_benchmark_scripts_write_their_results_atomically():
    """A script's --json result goes through t2f.files (atomic_path, write_json), never open(path, "w"), which follows
    a symlink, blocks on a FIFO and leaves a half-written file where it fails. (A subprocess's log, opened to append
    in the script's own work directory, is a stream, not a result.)"""
    scripts = sorted((ROOT / "benchmarks").glob("*.py"))
    truncating = []
    for path in scripts:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "open":
                mode = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "mode"), None)
                if isinstance(mode, ast.Constant) and set(str(mode.value)) & set("wx"):
                    truncating.append(f"{path.name}:{node.lineno}")
    assert scripts and truncating == []


def test_the_core_package_exports_what_it_declares():
    """t2f.__all__ is derived from the lazily imported names (plus load_generator, defined there): each one resolves."""
    import t2f

    assert set(t2f.__all__) == set(t2f._EXPORTS) | {"load_generator"}
    assert all(getattr(t2f, name) is not None for name in t2f.__all__)
