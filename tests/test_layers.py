"""The package's layering, read from its source (no Ray started): no import cycle, Ray imported
only where Ray runs, one TorchTrainer, and the plain-data helpers the layers share."""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path

import pytest

import hilomoe

PACKAGE = Path(hilomoe.__file__).resolve().parent
ROOT = PACKAGE.parent  # the source root: module names are paths under it

# where `ray` may be imported, and why
RAY_ALLOWED = {
    "hilomoe.distributed": "the Ray folder: Ray Data, the Ray connection, the trainer, workers",
    "hilomoe.study": "Ray Tune drives a study",
    "hilomoe.cli": "dispatches to the commands that run on Ray",
    "hilomoe.bench": "the benchmarks of the Ray Data and Ray Train paths start Ray themselves",
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _targets(node: ast.Import | ast.ImportFrom, package: str, modules: dict) -> list[str]:
    """What one import statement imports: `from pkg import submodule` is the submodule (not
    the package), `from pkg import name` the package, `import a.b` the module a.b."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:  # relative: resolved against the importing module's package
        base = package.split(".")[:len(package.split(".")) - node.level + 1]
        module = ".".join(base + ([node.module] if node.module else []))
    else:
        module = node.module or ""
    subs = [f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in modules]
    names = [a.name for a in node.names if f"{module}.{a.name}" not in modules]
    return subs + ([module] if names else [])


@functools.lru_cache(maxsize=1)
def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Every module's imports of package modules, and of outside top-level packages: every
    import statement counts, those inside functions and TYPE_CHECKING blocks too."""
    modules = _modules()
    inner: dict[str, set[str]] = {}
    outer: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        inner[name], outer[name] = set(), set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _targets(node, package, modules):
                if target.split(".")[0] != "hilomoe":
                    outer[name].add(target.split(".")[0])
                    continue
                while target not in modules and "." in target:  # a name inside a module
                    target = target.rpartition(".")[0]
                if target != name:
                    inner[name].add(target)
    return inner, outer


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, edges = work[-1]
            w = next(edges, None)
            if w is not None:
                if w not in graph:
                    continue
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_counts_every_import_statement():
    inner, _ = import_graph()
    # inside a function (driver._open_run), and `from package import submodule`
    assert "hilomoe.distributed.runtime" in inner["hilomoe.study.driver"]
    assert "hilomoe.model.fused" in inner["hilomoe.model.routing"]
    # a TYPE_CHECKING import
    assert "hilomoe.engine.metrics" in inner["hilomoe.engine.parallel"]


def test_no_import_cycle_between_modules():
    inner, _ = import_graph()
    assert cycles(inner) == []


def test_ray_is_imported_only_by_the_ray_folder_study_bench_and_cli():
    _, outer = import_graph()
    importers = {m for m, packages in outer.items() if "ray" in packages}
    allowed = lambda m: any(m == p or m.startswith(p + ".") for p in RAY_ALLOWED)
    assert sorted(m for m in importers if not allowed(m)) == []
    assert "hilomoe.distributed.worker" in importers  # the walk does see Ray's importers


# the core's imports of the Ray folder, each loaded only on the path that runs on Ray
CORE_TO_RAY = {("hilomoe.data.convert", "hilomoe.distributed.ray_convert"):
               "`hilomoe data convert --ray` hands its chunks to Ray tasks"}


def test_the_core_imports_nothing_from_the_ray_folder():
    inner, _ = import_graph()
    core = ("hilomoe.data", "hilomoe.model", "hilomoe.engine", "hilomoe.session",
            "hilomoe.schema", "hilomoe.metrics", "hilomoe.config")
    found = {(m, d) for m, deps in inner.items() if m.startswith(core)
             for d in deps if d.startswith("hilomoe.distributed")}
    assert found == set(CORE_TO_RAY)


def test_one_torch_trainer_in_the_package():
    calls = {str(p.relative_to(ROOT)): p.read_text().count("TorchTrainer(")
             for p in PACKAGE.rglob("*.py")}
    assert {p: n for p, n in calls.items() if n} == {"hilomoe/distributed/trainer.py": 1}


def test_the_study_trial_takes_no_names_from_the_worker():
    inner, _ = import_graph()
    assert "hilomoe.distributed.worker" not in inner["hilomoe.study.trial"]


# ----------------------------------------------------------------------------------------------
# plain data with a typed view


def test_a_typed_view_is_validated_once_and_again_when_its_field_is_replaced():
    from hilomoe.config import ConfigError, TypedView

    parsed = []

    def parse(raw, source):
        parsed.append(source)
        if "bad" in raw:
            raise ConfigError(f"{source}: bad.")
        return dict(raw)

    @dataclass
    class Holder:
        name: str
        raw: dict
        view = TypedView("raw", lambda h: f"{h.name}.json", parse)

    h = Holder("x", {"a": 1})
    assert h.view == {"a": 1} and h.view is h.view and parsed == ["x.json"]
    h.raw = {"a": 2}
    assert h.view == {"a": 2} and len(parsed) == 2
    with pytest.raises(ConfigError, match="x.json: bad"):
        Holder("x", {"bad": 1}).view


def test_the_run_files_hold_the_json_form_only(tmp_path):
    from dataclasses import asdict

    from hilomoe.config import TrainConfig
    from hilomoe.distributed.driver import TrainRun

    run = TrainRun(str(tmp_path), TrainConfig().model_dump(mode="json"), "ds", "n", "s")
    assert run.cfg.seed == 0 and run.cfg is run.cfg
    assert set(asdict(run)) == {"out_dir", "config", "dataset", "name", "storage",
                                "dataset_hash"}


# ----------------------------------------------------------------------------------------------
# the fault-injection test hook (an environment variable, outside the user's configuration)


def test_the_fault_hook_is_read_from_the_environment_and_checked(monkeypatch):
    from hilomoe.config import StageName
    from hilomoe.distributed.worker import FAULT_ENV, Fault, fault_injection
    from hilomoe.errors import HilomoeError

    monkeypatch.delenv(FAULT_ENV, raising=False)
    assert fault_injection(2) is None
    monkeypatch.setenv(FAULT_ENV, '{"stage": "experts", "epoch": 1, "rank": 1}')
    assert fault_injection(2) == Fault(StageName.EXPERTS, 1, 1)
    with pytest.raises(HilomoeError, match=r"rank \(1\) must be below the number of workers \(1\)"):
        fault_injection(1)
    monkeypatch.setenv(FAULT_ENV, '{"stage": "nowhere"}')
    with pytest.raises(HilomoeError, match=FAULT_ENV):
        fault_injection(2)


# ----------------------------------------------------------------------------------------------
# runtime settings: one section, honoured by every path


def test_precision_and_compile_are_one_runtime_section_that_old_files_still_reach():
    from hilomoe.config import ConfigError, parse_config

    old = parse_config({"ray": {"precision": "bf16", "compile": True, "workers": 2}})
    new = parse_config({"runtime": {"precision": "bf16", "compile": True},
                        "ray": {"workers": 2}})
    assert old == new and old.runtime.precision == "bf16" and old.runtime.compile
    assert "precision" not in old.model_dump()["ray"]
    assert old.with_overrides(**{"ray.precision": "fp32"}).runtime.precision == "fp32"
    with pytest.raises(ConfigError, match="ray.precision .* and runtime.precision .* disagree"):
        parse_config({"ray": {"precision": "bf16"}, "runtime": {"precision": "fp32"}})
    with pytest.raises(ConfigError, match="ray.fail_at: unknown key"):  # a test hook, not a setting
        parse_config({"ray": {"fail_at": {"stage": "joint"}}})


def test_an_in_process_session_compiles_as_the_runtime_section_asks():
    """`--local` and a one-worker trial build their Parallel from the configuration."""
    from hilomoe.config import parse_config
    from hilomoe.engine.parallel import Parallel

    assert Parallel.single(parse_config({"runtime": {"compile": True}})).compile
    assert not Parallel.single(parse_config({})).compile
