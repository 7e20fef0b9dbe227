"""The module graph, read from the source with `ast` (imports inside functions included): one way, no cycles.

Each library module has a layer; a module may import only modules of lower layers (and its own package's
`__init__` never counts). `conversion/` uses the library and is never imported by it. A new module must
be given a layer here, which is the point: where it sits is decided, not discovered.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The layers of gptoss_jax, lowest first (docs/architecture.md draws the same graph).
LAYERS = [
    ["progress", "config"],
    ["mxfp4"],
    ["ops"],
    ["weights"],
    ["sharding"],
    ["kernels._common"],
    ["kernels.attention", "kernels.mxfp4_matmul"],
    ["kernels.paged_attention"],
    ["kernels"],
    ["cache", "moe"],
    ["model"],
    ["sampling", "logprobs", "lora"],
    ["generate"],
    ["checkpoint.untrusted"],
    ["checkpoint.safetensors"],
    ["checkpoint.keys", "checkpoint.synthetic", "checkpoint.orbax"],
    ["checkpoint.source", "checkpoint.integrity"],
    ["checkpoint"],
    ["hub"],
    ["loading", "adapters"],
    ["tokenizer"],
    ["harmony.stops", "harmony.conversation"],
    ["harmony.parser", "harmony.settings"],
    ["harmony.session"],
    ["harmony"],
    ["tools.base"],
    ["tools.python", "tools.fetch"],
    ["tools.browser", "tools.mcp"],
    ["tools"],
    ["engine.paged", "engine.requests", "engine.adapters"],
    ["engine.scheduler"],
    ["engine.engine"],
    ["engine", "memory", "training.loss", "training.data", "inspect"],
    ["training.memory"],
    ["training.loop", "training.merge"],
    ["training", "training.command"],
    ["api.protocol"],
    ["api.hosted", "api.sealed"],
    ["api.constraints"],
    ["api.harmony_io", "api.backend"],
    ["api.run"],
    ["api.toolloop"],
    ["api.chat"],
    ["api.responses", "api.completions"],
    ["api.app"],
    ["api.cli", "api"],
    ["demo"],
    ["cli"],
    ["__main__"],
]
RANK = {f"gptoss_jax.{m}": i for i, layer in enumerate(LAYERS) for m in layer}


def module_name(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports(path: Path, root: Path = ROOT) -> set[str]:
    """Every module `path` imports, anywhere in the file, as absolute names (relative imports resolved)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = package.split(".")
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([node.module] if node.module else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import submodule`
    return out


def graph() -> dict[str, set[str]]:
    files = sorted((ROOT / "gptoss_jax").rglob("*.py")) + sorted((ROOT / "conversion").rglob("*.py"))
    mods = {module_name(f): f for f in files}
    return {m: {i for i in imports(f) if i in mods and i != m} for m, f in mods.items()}


def test_every_library_module_has_a_layer():
    lib = [m for m in graph() if m.startswith("gptoss_jax.")]
    assert lib and not [m for m in lib if m not in RANK], "give new modules a layer in LAYERS"


def test_imports_go_down_the_layers():
    bad = []
    for mod, deps in graph().items():
        if mod not in RANK:
            continue
        for dep in deps:
            if dep == "gptoss_jax" or dep == mod.rsplit(".", 1)[0]:
                continue  # the package __init__ (not a layer)
            if dep.startswith("conversion"):
                bad.append(f"{mod} imports {dep}: the library never imports the converter")
            elif RANK.get(dep, -1) >= RANK[mod] and not dep.startswith(mod + "."):
                bad.append(f"{mod} (layer {RANK[mod]}) imports {dep} (layer {RANK.get(dep)})")
    assert not bad, "\n".join(bad)


def find_cycles(g: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for d in sorted(g.get(m, ())):
            if d in ("gptoss_jax", "conversion"):
                continue
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d) :] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    return cycles


def test_no_import_cycles():
    cycles = find_cycles(graph())
    assert not cycles, "\n".join(cycles)


def test_the_checker_sees_cycles_and_function_local_imports(tmp_path):
    """The tests above could not fail if `imports` missed function-local or relative imports, or if
    `find_cycles` missed a cycle."""
    assert "gptoss_jax.loading" in imports(ROOT / "gptoss_jax" / "cli.py")  # imported inside a function
    src = tmp_path / "gptoss_jax" / "checkpoint" / "x.py"
    src.parent.mkdir(parents=True)
    src.write_text(
        "def f():\n    from ..generate import generate\n    from . import keys\n    import conversion.cli\n"
    )
    got = imports(src, tmp_path)
    assert {"gptoss_jax.generate", "gptoss_jax.checkpoint.keys", "conversion.cli"} <= got
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a -> b -> c -> a"]
