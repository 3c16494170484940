"""The app's shape, read from its source with `ast` (the app is not imported; finding the library's files
imports `megabatch`, ~2 s on a loaded 2-core machine, the rest takes 0.1 s).

- No module of src/megabatch_train is over 400 lines.
- The training loop (run/loop.py, at most 300 lines) and the run's step-time modules read the run's plan
  (run/plan.py), no config field: the run's decisions are taken once, in plan.make_plan, on the config
  fitted before it (run/build.py's _fit); no module takes `cfg: Any` or reads it with getattr, and a data
  spec is split in one place (config/data_spec.py's parse_data).
- No facades: no app module (the package's own __init__, its public API, aside) lists in `__all__` a name
  it imports; no `_name` is imported from another app module.
- No import circle inside megabatch_train, counting imports inside functions too (a lazy import hides a
  circle from the interpreter, not from the reader): every module sits above the ones it imports.
- megabatch_train uses the library through its public names only: no `megabatch._x` / `megabatch.x._y`
  module, no `_name` imported or read off a library module, nothing a module's `__all__` leaves out.
- The strategy and backend names the app's config lists (a copy: config.py needs only the standard library,
  so `--help` works before torch loads) are the library's.
"""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
from typing import Optional

from test_structure import find_cycle  # one circle finder for the library and the app

APP = Path(__file__).resolve().parents[1] / "src" / "megabatch_train"
LIMIT = 400
LOOP_LIMIT = 300


def _modules() -> dict[str, Path]:
    """Dotted name (megabatch_train.x.y) -> file, for every module of the app."""
    out = {}
    for path in sorted(APP.rglob("*.py")):
        parts = path.relative_to(APP.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _absolute(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module a `from ... import` names (relative imports resolved against `module`)."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(absolute module, names imported from it, line) for every import of a module, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((_absolute(module, path, node), [a.name for a in node.names], node.lineno))
    return out


def _app_edges() -> dict[str, set[str]]:
    """module -> the app modules it imports (`from . import x` counts as importing module x)."""
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for module, path in mods.items():
        for target, names, _ in _imports(module, path):
            for name in [f"{target}.{n}" for n in names] + [target]:
                if name in mods and name != module:
                    edges[module].add(name)
                    break  # `from .pkg import sub` is an edge to pkg.sub when sub is a module, else to pkg
    return edges


def test_no_app_module_is_over_400_lines():
    lengths = {p.relative_to(APP).as_posix(): len(p.read_text().splitlines()) for p in _modules().values()}
    too_long = {name: n for name, n in lengths.items() if n > LIMIT}
    assert not too_long, f"modules over {LIMIT} lines: {too_long}; split them along a seam"
    assert lengths["run/loop.py"] <= LOOP_LIMIT, f"run/loop.py has {lengths['run/loop.py']} lines; it reads the plan"


STEP_TIME = ("loop", "step", "checkpoint", "preempt", "faults", "teardown", "health", "fsdp")


def test_the_loop_reads_the_plan_not_the_config():
    reads = [f"run/{name}.py:{i}: {line.strip()}" for name in STEP_TIME
             for i, line in enumerate((APP / "run" / f"{name}.py").read_text().splitlines(), 1) if "cfg." in line]
    assert "plan." in (APP / "run" / "loop.py").read_text(), "the loop reads the plan"
    assert not reads, "step-time modules read config fields (decide them in run/plan.py):\n" + "\n".join(reads)


def test_the_config_is_typed_and_its_data_spec_parsed_once():
    bad = []
    for module, path in _modules().items():
        where = path.relative_to(APP).as_posix()
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if "cfg: Any" in line or 'getattr(cfg, "' in line:
                bad.append(f"{where}:{i}: {line.strip()}")
            if 'partition(":")' in line and where not in ("config/data_spec.py", "run/faults.py"):
                bad.append(f"{where}:{i}: a spec split outside config/data_spec.py: {line.strip()}")
    assert not bad, "\n".join(bad)


def test_no_facade_and_no_private_name_across_app_modules():
    mods = _modules()
    bad = []
    for module, path in mods.items():
        where = path.relative_to(APP).as_posix()
        tree = ast.parse(path.read_text())
        for target, names, line in _imports(module, path):
            if target in mods or target.startswith("megabatch_train."):
                bad += [f"{where}:{line}: private name {target}.{n}" for n in names if n.startswith("_")]
        if module == "megabatch_train":
            continue  # the package's public API (README): TrainConfig, from_preset, train
        imported = {a.asname or a.name for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))
                    for a in n.names}
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in node.targets):
                bad += [f"{where}: re-exports {n}" for n in ast.literal_eval(node.value) if n in imported]
    assert not bad, "facades or private names across the app's modules:\n" + "\n".join(bad)


def test_no_import_circle_inside_the_app():
    edges = _app_edges()
    assert len(edges) > 20 and sum(map(len, edges.values())) > 40, edges  # the parse found the app's imports
    circle = find_cycle(edges)
    assert circle is None, "import circle: " + " -> ".join(circle or [])


def test_the_circle_finder_finds_circles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def _public_names(module: str) -> Optional[set[str]]:
    """A library module's `__all__` (None when it has none), read from its source."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    for node in ast.parse(Path(spec.origin).read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    return None


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _private_uses(module: str, path: Path) -> list[str]:
    """Where a module of the app reaches into the library's private parts ("file:line: what")."""
    bad = []
    where = path.name
    for target, names, line in _imports(module, path):
        if target != "megabatch" and not target.startswith("megabatch."):
            continue
        if any(part.startswith("_") for part in target.split(".")):
            bad.append(f"{where}:{line}: private module {target}")
            continue
        public = _public_names(target)
        for name in names:
            if name.startswith("_"):
                bad.append(f"{where}:{line}: private name {target}.{name}")
            elif public is not None and name not in public and not _is_module(f"{target}.{name}"):
                bad.append(f"{where}:{line}: {target}.{name} is not in {target}.__all__")
    # `import megabatch as mb` ... `mb._x`: a private name read off the library's top module.
    tree = ast.parse(path.read_text())
    aliases = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
               if a.name == "megabatch"}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_")):
            bad.append(f"{where}:{node.lineno}: private name megabatch.{node.attr}")
    return bad


def test_the_app_uses_only_public_library_names():
    bad = [b for module, path in _modules().items() for b in _private_uses(module, path)]
    assert not bad, "the app reaches into the library's private parts:\n" + "\n".join(bad)


def test_the_private_name_check_finds_private_uses(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import megabatch as mb\nfrom megabatch._checks import x\nfrom megabatch.cli import _p, main\n"
                   "from megabatch import clip_loss, _numerics, modules, ClipLoss\n"
                   "def f():\n    from megabatch import reference_loss\n    return mb._numerics, mb.GradCache\n")
    assert _private_uses("megabatch_train.m", src) == [
        "m.py:2: private module megabatch._checks", "m.py:3: private name megabatch.cli._p",
        "m.py:4: private name megabatch._numerics", "m.py:6: megabatch.reference_loss is not in megabatch.__all__",
        "m.py:7: private name megabatch._numerics"]


def test_the_apps_strategy_and_backend_lists_are_the_librarys():
    from megabatch.kernels import BACKENDS
    from megabatch.strategies import STRATEGIES

    from megabatch_train.config import sections

    assert sections.STRATEGIES == STRATEGIES and sections.BACKENDS == BACKENDS
