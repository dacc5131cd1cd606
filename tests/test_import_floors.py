"""Imports point down the floors: the plugin (``timm_bninit/*.py``) under the data layer (``timm_bninit/data``) under
the engine (``timm_bninit/experiment``), whose configuration layer (the recipe, the run layout) sits under its data
loading and training code; and no module imports itself back through another.

Read from the source with ``ast``, every import statement counted wherever it stands (inside a function, under
``if TYPE_CHECKING``): a cycle or a wrong-way import is found without running anything.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "timm_bninit"

CONFIG_LAYER = {"timm_bninit.experiment.recipe", "timm_bninit.experiment.layout"}
# what the configuration layer must never import: the data-reading modules of the data layer and the `datasets`
# package. It may ask the data layer's front (`timm_bninit.data`: resolve_source names a data set) and its
# declarations (`data.registry`'s entries, `data.errors`); from the engine, only the configuration layer itself.
DATA_READING = {f"timm_bninit.data.{name}" for name in
                ("loading", "local", "cifar", "imagefolder", "digits", "archives", "cache", "verify", "splits",
                 "transforms")}
# the package's ways up: `timm_bninit.build_training` and `timm_bninit.load_run`, imported on first use from the
# package's __getattr__
FRONT_DOORS = ("timm_bninit.experiment.train", "timm_bninit.experiment.trained")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, top_level_only: bool = False) -> set[str]:
    """Every module ``name`` imports: ``from pkg import sub`` counts as ``pkg.sub`` when that is a module, relative
    imports are resolved. A submodule's import of its parent packages (always loaded first) is not counted."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level_only else ast.walk(tree)
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            for alias in node.names:
                found.add(f"{module}.{alias.name}" if f"{module}.{alias.name}" in MODULES else module)
    return found


def graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (itself excluded: ``from . import x`` in an ``__init__``)."""
    return {name: {m for m in imports_of(name) if m in MODULES and m != name} for name in MODULES}


def _in(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_the_reader_sees_what_a_module_imports():
    # the reader itself, on modules whose imports are known: relative, `from . import sub`, function-level
    assert {"timm_bninit.norm", "timm_bninit.registry", "timm_bninit.experiment.train"} <= imports_of("timm_bninit")
    assert "timm_bninit.experiment.train" not in imports_of("timm_bninit", top_level_only=True)
    assert {"timm_bninit.experiment.layout", "timm_bninit.experiment.train"} <= imports_of("timm_bninit.experiment.cli")
    assert "timm_bninit.experiment.report" in imports_of("timm_bninit.experiment.cli")  # inside compare_main


def test_no_import_cycle_in_the_package():
    sorter = graphlib.TopologicalSorter(graph())
    try:
        sorter.prepare()
    except graphlib.CycleError as error:
        pytest.fail(f"import cycle: {' -> '.join(error.args[1])}")


def test_the_plugin_never_imports_the_data_layer_or_the_engine():
    plugin = [name for name, path in MODULES.items() if path.parent == PACKAGE and name != "timm_bninit"]
    assert {"timm_bninit.norm", "timm_bninit.registry", "timm_bninit.errors"} <= set(plugin)
    wrong = {name: sorted(m for m in imports_of(name) if _in(m, "timm_bninit.experiment", "timm_bninit.data"))
             for name in plugin}
    assert not {name: found for name, found in wrong.items() if found}
    # the package's own __init__: the plugin at import, the engine only through its lazy front door
    top = imports_of("timm_bninit", top_level_only=True)
    assert not [m for m in top if _in(m, "timm_bninit.experiment", "timm_bninit.data")]
    upward = sorted(m for m in imports_of("timm_bninit") if _in(m, "timm_bninit.experiment", "timm_bninit.data"))
    assert upward == sorted(FRONT_DOORS)


def test_the_data_layer_never_imports_the_engine():
    wrong = {name: sorted(m for m in imports_of(name) if _in(m, "timm_bninit.experiment"))
             for name in MODULES if _in(name, "timm_bninit.data")}
    assert not {name: found for name, found in wrong.items() if found}


def test_the_configuration_layer_imports_no_data_loading_or_training_code():
    assert set(MODULES) >= CONFIG_LAYER and set(MODULES) >= DATA_READING
    for name in sorted(CONFIG_LAYER):
        imported = imports_of(name)
        engine = sorted(m for m in imported if _in(m, "timm_bninit.experiment") and m not in CONFIG_LAYER)
        reading = sorted(m for m in imported if m in DATA_READING or _in(m, "datasets"))
        assert not engine and not reading, f"{name} imports {engine + reading}"


def test_reports_import_neither_the_recipe_nor_training():
    # a report runs on a copied results folder: the statistics, tables and plots read run folders through the layout
    report_side = {f"timm_bninit.experiment.{name}" for name in ("report", "tables", "power", "plots", "analysis",
                                                                      "convergence")}
    for name in sorted(report_side & set(MODULES)):
        engine = sorted(m for m in imports_of(name) if _in(m, "timm_bninit.experiment")
                        and m not in report_side | {"timm_bninit.experiment.layout"})
        assert not engine, f"{name} imports {engine}"
    assert report_side <= set(MODULES)
