"""Import hygiene: each module loads no heavier stack than it needs (checked in fresh interpreters),
the library never imports Prefect or DVC at module level, and no modules import each other."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, cli_env

PACKAGES = ("cifarflow",)
ORCHESTRATION_LAYER = ("cifarflow.flows", "cifarflow.tasks")  # the Prefect layer: above the library
HEAVY = ("tensorflow", "keras")
DOWNLOAD_STACK = (
    "cifarflow.data.download",
    "cifarflow.data.fetch",
    "cifarflow.data.extract",
    "cifarflow.data.image_folder",
    "cifarflow.data.preprocess",
)
THIRD_PARTY_EXTRAS = ("requests", "PIL", "tqdm")
ORCHESTRATION = ("prefect", "dvc")


def loaded_after(*modules: str) -> set[str]:
    """sys.modules of a fresh interpreter (run from the repository) after importing `modules`."""
    code = f"import json, sys\nfor m in {list(modules)!r}:\n    __import__(m)\nprint(json.dumps(sorted(sys.modules)))"
    env = cli_env() | {"TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"importing {modules} failed:\n{done.stderr[-3000:]}"
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def roots(modules: set[str], names: tuple[str, ...]) -> set[str]:
    """Which of the top-level packages `names` (or their submodules) are among `modules`."""
    return {name for name in names if any(m == name or m.startswith(f"{name}.") for m in modules)}


@pytest.mark.parametrize(
    "module",
    [
        "cifarflow.cli",
        "cifarflow.settings",
        "cifarflow.resolved",
        "cifarflow.contract",
        "cifarflow.policy",
        "cifarflow.leaderboard",
        "cifarflow.flow_options",
        "cifarflow.errors",
        "cifarflow.executables",
        "cifarflow.registry",
        "cifarflow.models",
        "cifarflow.models.catalog",
        "cifarflow.models.registry",
        "cifarflow.data.download",
        "cifarflow.verify",
        "cifarflow.tasks.stages",
        "cifarflow.flows.pipeline",
        "cifarflow.flows.serve",
    ],
)
def test_light_modules_import_no_tensorflow(module: str) -> None:
    assert roots(loaded_after(module), HEAVY) == set(), f"{module} imports TensorFlow/Keras"


@pytest.fixture(scope="module")
def tensorflow_baseline() -> set[str]:
    """What `import tensorflow, keras` alone loads (TensorFlow itself imports requests, PIL, pyarrow)."""
    return loaded_after("tensorflow", "keras")


@pytest.mark.parametrize("module", ["cifarflow.training.trainer", "cifarflow.export"])
def test_training_and_export_load_no_download_stack(module: str, tensorflow_baseline: set[str]) -> None:
    loaded = loaded_after(module)
    assert sorted(set(DOWNLOAD_STACK) & loaded) == [], f"{module} imports the download/preprocess stack"
    extra = roots(loaded, THIRD_PARTY_EXTRAS) - roots(tensorflow_baseline, THIRD_PARTY_EXTRAS)
    assert extra == set(), f"{module} imports {sorted(extra)} beyond what tensorflow and keras load"


def in_layer(module: str, layer: tuple[str, ...]) -> bool:
    return any(module == top or module.startswith(f"{top}.") for top in layer)


def library_modules() -> list[str]:
    """The library: every cifarflow module but the Prefect layer (cifarflow.flows, cifarflow.tasks)."""
    return sorted(
        name
        for path in (REPO / "cifarflow").rglob("*.py")
        if path.name != "__main__.py" and "__pycache__" not in path.parts
        if not in_layer(name := module_name(path), ORCHESTRATION_LAYER)
    )


def test_library_modules_do_not_import_prefect_or_dvc() -> None:
    """Every cifarflow module, imported one after another in one interpreter: Prefect and DVC stay out
    (the CLI reaches them lazily, inside its commands). The first module that loads one is named."""
    code = (
        "import json, sys\n"
        f"for m in {library_modules()!r}:\n"
        "    __import__(m)\n"
        f"    bad = sorted(n for n in sys.modules if n.split('.')[0] in {ORCHESTRATION!r})\n"
        "    if bad:\n"
        "        print(json.dumps([m, bad[:5]])); break\n"
        "else:\n"
        "    print(json.dumps(None))\n"
    )
    env = cli_env() | {"TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    culprit = json.loads(done.stdout.strip().splitlines()[-1])
    assert culprit is None, f"importing {culprit[0]} loads {culprit[1]}"


# --- the module-level import graph ----------------------------------------------------------------


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Import statements that run when the module is imported: in its body, also under top-level
    if/try/with, but not inside functions or classes, nor under `if TYPE_CHECKING:`."""
    found: list[ast.Import | ast.ImportFrom] = []
    pending: list[ast.stmt] = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.If):
            if "TYPE_CHECKING" not in ast.unparse(node.test):
                pending += node.body + node.orelse
        elif isinstance(node, ast.Try):
            pending += node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body]
        elif isinstance(node, ast.With):
            pending += node.body
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports at module level (importing a.b.c also runs the
    packages a and a.b, except those the importer is itself inside)."""
    paths = {module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py") if "__pycache__" not in p.parts}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
        targets: set[str] = set()
        for node in top_level_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
                continue
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], *([base] if base else [])])
            targets.add(base)
            targets |= {f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in paths}
        edges = set()
        for target in targets:
            parts = target.split(".")
            edges |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}  # the packages run first
        graph[name] = {t for t in edges if t in paths and t not in ancestors}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_sees_the_known_edges() -> None:
    graph = import_graph()
    assert "cifarflow.models.catalog" in graph["cifarflow.settings"]
    assert "cifarflow.tasks.stages" in graph["cifarflow.flows.pipeline"]
    assert {"cifarflow.errors", "cifarflow.executables"} <= graph["cifarflow.tasks.stages"]
    assert "cifarflow.models" in graph["cifarflow.settings"]  # importing cifarflow.models.catalog runs the package first


def test_library_modules_import_no_orchestration_at_module_level() -> None:
    """The static side of the layering: the library never imports prefect, dvc or the Prefect layer
    (cifarflow.flows, cifarflow.tasks) at module level."""
    bad = {}
    for path in (REPO / "cifarflow").rglob("*.py"):
        if in_layer(module_name(path), ORCHESTRATION_LAYER):
            continue
        for node in top_level_imports(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            hits = [n for n in names if n.split(".")[0] in ORCHESTRATION or in_layer(n, ORCHESTRATION_LAYER)]
            if hits:
                bad[module_name(path)] = hits
    assert bad == {}


def every_import(path: Path) -> set[str]:
    """Every module a file names in an import statement, at any depth (functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return found


@pytest.mark.parametrize(("lower", "other"), [("cifarflow.data", "cifarflow.models"), ("cifarflow.models", "cifarflow.data")])
def test_data_and_models_do_not_import_each_other(lower: str, other: str) -> None:
    """Both sit on the shared leaves (cifarflow.pixels for shapes and normalization names,
    cifarflow.normalization for the ops); neither reaches into the other, lazily or not."""
    folder = REPO / lower.replace(".", "/")
    bad = {module_name(p): sorted(i for i in every_import(p) if in_layer(i, (other,))) for p in folder.rglob("*.py")}
    assert {m: i for m, i in bad.items() if i} == {}


def test_no_import_climbs_back_up_into_the_prefect_layer() -> None:
    """Anywhere in the library, at any depth, only the CLI's `flow run` reaches up into cifarflow.flows."""
    bad = {}
    for path in (REPO / "cifarflow").rglob("*.py"):
        name = module_name(path)
        if in_layer(name, ORCHESTRATION_LAYER):
            continue
        hits = sorted(i for i in every_import(path) if in_layer(i, ORCHESTRATION_LAYER))
        if hits and not (name == "cifarflow.cli" and hits == ["cifarflow.flows.pipeline", "cifarflow.flows.pipeline.run_flow"]):
            bad[name] = hits
    assert bad == {}


def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "modules import each other at module level: " + " -> ".join(cycle or [])
