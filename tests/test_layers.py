"""Layers: the core (synth3d included) imports no orchestration library, tasks know nothing of
where they run, dermml never imports the layers above it, and its import graph has no cycle."""

import ast
import subprocess
import sys
from pathlib import Path

CORE = ["dermml.models.unet", "dermml.losses.segmentation", "dermml.metrics.segmentation",
        "dermml.metrics.gan", "dermml.metrics.skin_tone", "dermml.data.stylegan_zip",
        "dermml.data.manifest", "dermml.data.datasets", "dermml.data.demo",
        "dermml.data.importers", "dermml.data.splits", "dermml.training.loop",
        "dermml.training.ema", "dermml.models.diffusion", "dermml.models.schedulers",
        "dermml.tasks", "dermml.synth3d.generate", "dermml.synth3d.blend",
        "dermml.synth3d.views", "dermml.synth3d.raster", "dermml.synth3d.features",
        "dermml.models.stylegan2", "dermml.losses.gan", "dermml.data.ada",
        "dermml.models.gan_sampling", "dermml.training.gan_loop", "dermml.tasks.gan"]
FORBIDDEN = ["ray", "mlflow", "kfp", "kubernetes", "great_expectations"]


def test_core_modules_import_no_orchestration_library():
    code = (f"import sys\nfor m in {CORE!r}: __import__(m)\n"
            f"bad = [m for m in {FORBIDDEN!r} if m in sys.modules]\n"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "", f"core pulled in: {out.stdout.strip()}"


# ----------------------------------------------------------------- the import graph of dermml

ROOT = Path(__file__).resolve().parents[1]


def _module_names(package: str = "dermml") -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under the package."""
    names = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_names(path: Path, module: str) -> set[str]:
    """Every dotted name ``module`` imports: at module level and inside functions alike (an
    ``if TYPE_CHECKING:`` block runs for type checkers only and is left out)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    pending: list[ast.AST] = [ast.parse(path.read_text(), str(path))]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            pending.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        pending.extend(ast.iter_child_nodes(node))
    return names


def import_graph(package: str = "dermml") -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports (``from a.b import c`` is ``a.b.c``
    when that is a module, else ``a.b``)."""
    modules = _module_names(package)
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets = set()
        for name in imported_names(path, module):
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_and_prints_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_dermml_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 50 and graph["dermml.cli"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


PLACEMENT = ("kubernetes", "kfp", "dermml.orchestration.k8s", "dermml.orchestration.rayjob",
             "dermml.orchestration.platform", "dermml.orchestration.kfp_local",
             "dermml.orchestration.kfp_client", "dermml.orchestration.kserve")


def test_tasks_say_what_to_train_and_know_nothing_of_where_it_runs():
    """Images, pools, tolerations, secrets and RayJobs are the platform config's: no module of
    dermml/tasks imports Kubernetes, KFP, the RayJob builder or the platform config."""
    offenders = sorted(
        f"{module} imports {name}"
        for module, path in _module_names().items() if module.startswith("dermml.tasks")
        for name in imported_names(path, module)
        if any(name == p or name.startswith(f"{p}.") for p in PLACEMENT))
    assert not offenders, offenders
    from dermml.tasks.base import RayConfig

    assert not {"kubernetes", "namespace", "image", "node_selector", "tolerations", "secrets",
                "service_account"} & set(RayConfig.model_fields)


def test_dermml_never_imports_the_layers_above_it():
    """``pipelines/`` and ``components/`` build on dermml; only the CLI (the entry point that
    hands a pipeline to the KFP adapter) looks pipelines up."""
    offenders = sorted(
        f"{module} imports {name}"
        for module, path in _module_names().items() if module != "dermml.cli"
        for name in imported_names(path, module)
        if name.split(".")[0] in ("pipelines", "components"))
    assert not offenders, offenders


def test_the_registry_knows_nothing_of_where_models_are_served():
    """The gate moves aliases; following them on Kubernetes (KServe canary, rollback) is the
    orchestration layer's, called by the CLI and the pipelines' rollout step."""
    offenders = sorted(
        f"{module} imports {name}"
        for module, path in _module_names().items() if module.startswith("dermml.registry")
        for name in imported_names(path, module)
        if any(name == p or name.startswith(f"{p}.") for p in PLACEMENT))
    assert not offenders, offenders
