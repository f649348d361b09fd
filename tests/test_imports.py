"""One-way imports: every `import` in hybridmoe (module level or inside a function) goes down the pipeline
formats -> quant -> kernels -> layers -> models -> offload -> hardware -> engine -> cli, and none closes a cycle.
The chat UI (tui/) imports hybridmoe's public API, never the command line."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Each package may import from its own rank and the ranks below it.
RANK = {"errors": 0, "options": 0, "formats": 1, "quant": 2, "kernels": 3, "layers": 4, "models": 5, "offload": 6,
        "hardware": 7, "engine": 8, "": 9, "pull": 9, "cli": 10, "cluster_cli": 10, "repl": 10,
        "__main__": 11}


def modules(package: Path, name: str) -> dict[str, Path]:
    out = {}
    for path in package.rglob("*.py"):
        parts = [name, *path.relative_to(package).with_suffix("").parts]
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(mod: str, path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that `mod` imports anywhere in its body."""
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:  # `from . import x` imports the module x when there is one
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in known and m != mod}


def graph() -> dict[str, set[str]]:
    mods = modules(ROOT / "hybridmoe", "hybridmoe")
    return {m: imports(m, p, set(mods)) for m, p in mods.items()}


def rank(mod: str) -> int:
    parts = mod.split(".")
    return RANK[parts[1] if len(parts) > 1 else ""]


def test_the_walk_sees_imports():
    g = graph()
    assert "hybridmoe.errors" in g["hybridmoe.formats.gguf"]
    assert "hybridmoe.engine.engine" in g["hybridmoe"]  # a lazy import inside a function counts too


def test_imports_go_down_the_pipeline():
    upward = [f"{a} -> {b}" for a, bs in graph().items() for b in bs if rank(b) > rank(a)]
    assert not upward, upward


def test_no_import_cycle():
    g = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for n in sorted(g[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n] if n in path else [m, n]
            if n not in state and (cycle := visit(n, path + [n])):
                return cycle
        state[m] = 2
        return None

    for m in sorted(g):
        if m not in state:
            cycle = visit(m, [m])
            assert cycle is None, " -> ".join(cycle)


def test_formats_import_nothing_from_models_or_engine():
    bad = [f"{a} -> {b}" for a, bs in graph().items() if a.startswith("hybridmoe.formats")
           for b in bs if b.startswith(("hybridmoe.models", "hybridmoe.engine"))]
    assert not bad, bad


def test_the_chat_ui_uses_the_public_api_not_the_command_line():
    for path in (ROOT / "tui").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith(("hybridmoe.cli", "hybridmoe.repl")), f"{path.name}: {node.module}"


def test_import_hybridmoe_loads_neither_textual_nor_torch():
    code = "import sys, hybridmoe; print(sorted({m.split('.')[0] for m in sys.modules} & {'textual', 'torch'}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_each_registered_family_has_its_module_and_one_registration():
    from hybridmoe.formats.families import ARCH_OF_MODEL_TYPE, FAMILIES
    from hybridmoe.models import MODULES
    assert MODULES.keys() == FAMILIES.keys()
    for name, module in MODULES.items():
        assert module.NAMES is FAMILIES[name] and callable(module.build) and module.ModelArgs.from_config
    types = [t for f in FAMILIES.values() for t in f.model_types]
    assert len(types) == len(set(types))  # a model_type belongs to one family
    assert set(ARCH_OF_MODEL_TYPE) <= set(types)
