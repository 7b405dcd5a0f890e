"""The dependency rule of docs/architecture.md, checked on the source: no import cycles between the
project's modules and no import that goes up a layer (imports inside functions count)."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("guided_diffusion", "VAE", "exp_script", "benchmarks")
SCRIPTS = ("cell_train.py", "cell_sample.py")

LIBRARY = ("core", "data", "VAE", "diffusion", "checkpoints", "training", "sampling")
# what each layer may import (itself included); the library never imports the CLI, the scripts, exp_script
# or benchmarks
ALLOWED = {
    "core": {"core"},
    "data": {"core", "data"},
    "VAE": {"core", "data", "VAE"},
    "diffusion": {"core", "diffusion"},
    "checkpoints": {"core", "data", "VAE", "diffusion", "checkpoints"},
    "training": {"core", "data", "VAE", "diffusion", "checkpoints", "training"},
    "sampling": {"core", "data", "VAE", "diffusion", "checkpoints", "sampling"},
    "cli": {"core", "data", "cli"},
    "api": set(LIBRARY) | {"cli", "api"},
    "script": set(LIBRARY) | {"cli", "api"},
    "exp_script": set(LIBRARY) | {"cli", "api", "script", "exp_script"},
    "benchmarks": set(LIBRARY) | {"cli", "api", "script", "exp_script", "benchmarks"},
}


def layer_of(module):
    """The layer of a dotted module name (docs/architecture.md, "Layers")."""
    parts = module.split(".")
    if module in ("guided_diffusion.cli", "guided_diffusion.data.flags"):
        return "cli"
    if module in ("cell_train", "cell_sample", "VAE.VAE_train"):
        return "script"
    if module == "VAE.autoencoder_training":
        return "training"
    if parts[0] == "guided_diffusion":
        if len(parts) == 1:
            return "core"  # the package's __init__ only sets the OpenMP wait policy
        return {"checkpoints": "checkpoints", "api": "api"}.get(parts[1], parts[1])
    return parts[0]


def module_name(path, root=ROOT):
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_files(root=ROOT):
    files = [path for package in PACKAGES for path in sorted((root / package).rglob("*.py"))]
    return files + [root / script for script in SCRIPTS]


def imports_of(path, modules, root=ROOT):
    """The project modules ``path`` imports, anywhere in the file: ``from pkg import submodule`` names the
    submodule, ``from pkg import name`` the package, relative imports resolved."""
    name = module_name(path, root)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # import a.b.c -> the deepest project module named
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root=ROOT):
    files = project_files(root)
    modules = {module_name(path, root) for path in files}
    return {module_name(path, root): imports_of(path, modules, root) for path in files}


def find_cycle(graph):
    """One import cycle as a list of modules (first == last), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def layer_breaks(graph):
    return [f"{source} ({layer_of(source)}) imports {target} ({layer_of(target)})"
            for source, targets in sorted(graph.items()) for target in sorted(targets)
            if layer_of(target) not in ALLOWED[layer_of(source)]]


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_go_down_the_layers_only():
    assert layer_breaks(import_graph()) == []


def test_every_module_has_a_known_layer():
    assert {module: layer_of(module) for module in import_graph() if layer_of(module) not in ALLOWED} == {}


# the checks themselves, on a tree made for them: they must see a cycle through a function-level import,
# and a library module importing exp_script
@pytest.fixture()
def broken_tree(tmp_path):
    files = {
        "guided_diffusion/__init__.py": "",
        "guided_diffusion/core/__init__.py": "",
        "guided_diffusion/core/errors.py": "def f():\n    from guided_diffusion.sampling import pipeline\n",
        "guided_diffusion/sampling/__init__.py": "",
        "guided_diffusion/sampling/pipeline.py": "from ..core.errors import f\nimport exp_script.metrics\n",
        "VAE/__init__.py": "", "benchmarks/__init__.py": "",
        "exp_script/__init__.py": "", "exp_script/metrics.py": "",
        "cell_train.py": "", "cell_sample.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return import_graph(tmp_path)


def test_the_checks_see_a_cycle_through_a_function_level_import(broken_tree):
    assert find_cycle(broken_tree) == ["guided_diffusion.core.errors", "guided_diffusion.sampling.pipeline",
                                       "guided_diffusion.core.errors"]


def test_the_checks_see_a_layer_break(broken_tree):
    assert layer_breaks(broken_tree) == [
        "guided_diffusion.core.errors (core) imports guided_diffusion.sampling.pipeline (sampling)",
        "guided_diffusion.sampling.pipeline (sampling) imports exp_script.metrics (exp_script)"]
