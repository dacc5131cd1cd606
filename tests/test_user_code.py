"""Users' own code through a recipe's ``imports`` (mmcv's ``custom_imports``): modules on PYTHONPATH, written here,
register extensions that the recipe then names, and every process a run or a sweep starts imports them first:
``finetune.py``, ``compare.py`` with the local executor (in the planning process and in spawned workers) and with
submitit's local executor, and each rank of a 2-process ``torchrun``.

Each extension a user can register is one :class:`UserCode` case: its module, the overrides that name what it
registers, and what a finished run must show. The cases are a norm-layer variant (``register_norm_layer``) and a data
set (``register_dataset``: a hub copy, here a local Parquet stand-in, whose source ships an official validation
split). The runs through the command lines are the slow part, so each command runs once with every case's module in
``imports`` and every case's overrides, and each case's check is asserted on its result: one run trains the user's
variant on the user's data set.

Registering happens only in subprocesses: a registration made in the test process would stay in timm's maps and the
data-set registry for every later test of the session.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from fake_datasets import make_imagefolder, make_validation_hub_repo, stand_in_spec
from ports import free_port

from timm_bninit.experiment.layout import read_metrics
from timm_bninit.experiment.recipe import Recipe, RecipeError, apply_overrides, check_config, load_recipe

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class UserCode:
    """A user's module and how a recipe uses it."""

    module: str
    source: Callable[[Path], str]                        # the module's text, given its folder (it may write there)
    name: str                                            # what the module registers
    overrides: tuple[str, ...]                           # what names it (finetune.py --set)
    methods: tuple[str, ...]                             # compare.py methods that need the module, if any
    check: Callable[[dict[str, Any], Path], None]        # what a finished run directory must show


VARIANT_SOURCE = '''
"""A norm layer of the user's own: BatchNormGamma2d with γ0 = 0.2, a value no built-in name has."""
import timm_bninit


class MyGamma02(timm_bninit.BatchNormGamma2d):
    def __init__(self, num_features, *args, gamma_init=0.2, **kwargs):
        super().__init__(num_features, *args, gamma_init=gamma_init, **kwargs)


timm_bninit.register_norm_layer("my_gamma02", MyGamma02)
'''


def _ran_the_variant(final: dict[str, Any], run_dir: Path) -> None:
    assert final["method"]["norm_layer"] == "my_gamma02"
    # every BN of the model started at the module's γ0; the mean of float32 copies of 0.2 is 0.2 to float32's
    # rounding (eps 1.2e-7, times the summation depth): 1e-5 is far inside that and far from any built-in γ0
    assert final["initial_effective_scale"] == pytest.approx(0.2, rel=1e-5)
    # its γ group: the class's c = 100, unless the method set another (the tiny recipe's constant schedule keeps the
    # rates at lr and lr / c to the end of the epoch, where they are recorded)
    first = read_metrics(run_dir)[0]
    assert first["lr"] == 0.01
    assert first["lr_gamma"] == pytest.approx(first["lr"] / (final["method"]["gamma_lr_div"] or 100), rel=1e-12)


DATASET_SOURCE = '''
"""A data set of the user's own: a hub repository (here a local stand-in beside this file) whose source ships an
official validation split, one Parquet file per split."""
from pathlib import Path

from timm_bninit.data.registry import DatasetSpec, HubCopy, register_dataset

register_dataset(DatasetSpec(
    name={name!r},
    title="Shapes",
    num_classes={num_classes!r},
    split_sizes={split_sizes!r},
    hub=HubCopy(str(Path(__file__).with_name({folder!r})), None, data_files={data_files!r}),
))
'''


def _dataset_source(folder: Path) -> str:
    """The module registering ``my_shapes``, with the stand-in repository it reads written beside it."""
    spec = stand_in_spec("my_shapes", make_validation_hub_repo(folder / "shapes_hub"))
    return DATASET_SOURCE.format(name=spec.name, num_classes=spec.num_classes, split_sizes=spec.split_sizes,
                                 folder="shapes_hub", data_files=spec.hub.data_files)


def _trained_on_the_data_set(final: dict[str, Any], run_dir: Path) -> None:
    data = final["data"]
    assert data["name"] == "my_shapes" and data["origin"] == "hub" and data["num_classes"] == 3
    # make_validation_hub_repo's 8 train, 3 validation and 3 test rows of each of 3 classes; the official validation
    # split is used as it is: train keeps its 24 rows (a 0.25 draw from train would have left 24 - 6 = 18)
    assert data["split_sizes"] == {"train": 24, "validation": 9, "test": 9}
    assert data["val_fraction"] is None and final["selection"] == "validation"
    assert final["num_updates"] == 24 // 8  # one epoch of the global batch of 8
    assert read_metrics(run_dir)[0]["val_acc"] is not None


CASES = {
    "variant": UserCode("my_variants", lambda folder: VARIANT_SOURCE, "my_gamma02", ("norm_layer=my_gamma02",),
                        ("my_gamma02", "my_gamma02+gamma_lr_div=10"), _ran_the_variant),
    "data set": UserCode("my_datasets", _dataset_source, "my_shapes", ("dataset=my_shapes", "data_dir=null"), (),
                         _trained_on_the_data_set),
}
IMPORTS = f"imports=[{', '.join(case.module for case in CASES.values())}]"
OVERRIDES = [override for case in CASES.values() for override in case.overrides]
METHODS = [method for case in CASES.values() for method in case.methods]


def _check_every_case(final: dict[str, Any], run_dir: Path) -> None:
    for case in CASES.values():
        case.check(final, run_dir)


@pytest.fixture(scope="module")
def user_code(tmp_path_factory) -> Path:
    """A folder holding every case's module: what goes on PYTHONPATH."""
    folder = tmp_path_factory.mktemp("user_code")
    for case in CASES.values():
        (folder / f"{case.module}.py").write_text(case.source(folder))
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A recipe of the smallest run that trains: test_resnet at 16 px, one epoch of batches of 8, no workers, a
    constant learning rate."""
    base = tmp_path_factory.mktemp("user_runs")
    make_imagefolder(base / "folder", counts={"train": 8, "test": 2})
    recipe = replace(load_recipe("demo"), dataset="imagefolder", data_dir=str(base / "folder"), model="test_resnet",
                     img_size=16, epochs=1, batch_size=8, num_workers=0, precise_bn_batches=0, val_fraction=0.25,
                     augmentation="flip", preload=False, lr=0.01, sched="constant")
    path = base / "tiny.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in recipe.to_dict().items() if k != "recipe"}))
    return path


def _env(user_code: Path) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(user_code)]),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # the hub copy is a local folder: no network
    env.pop("WORLD_SIZE", None)
    return env


def _run(command: list[str], user_code: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=_env(user_code), capture_output=True, text=True, timeout=timeout)


def _finetune(tiny: Path, run_dir: Path, *overrides: str) -> list[str]:
    sets = [item for override in overrides for item in ("--set", override)]
    return [str(ROOT / "scripts" / "finetune.py"), "--recipe", str(tiny), "--run-dir", str(run_dir), "--quiet",
            "--data-cache-dir", str(tiny.parent / "cache"), *sets]


# --- in this process: nothing is registered ----------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_without_the_module_the_name_is_unknown(case, tiny):
    code = CASES[case]
    with pytest.raises(RecipeError, match=re.escape(repr(code.name))):  # a run that knows it learnt it from the module
        check_config(apply_overrides(load_recipe(tiny), list(code.overrides)))


def test_a_module_that_cannot_be_imported_is_a_one_line_error(tmp_path, monkeypatch):
    with pytest.raises(RecipeError) as error:
        check_config(replace(Recipe(), imports=["no_such_module_here"]))
    assert str(error.value) == ("recipe key 'imports': cannot import 'no_such_module_here' (No module named "
                                "'no_such_module_here'); is it on PYTHONPATH?")
    (tmp_path / "needs_more.py").write_text("import no_such_dependency_here\n")  # found, but its own import fails
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RecipeError, match=r"^recipe key 'imports': cannot import 'needs_more' \(No module named "
                                          r"'no_such_dependency_here'\); is it on PYTHONPATH\?$"):
        check_config(replace(Recipe(), imports=["needs_more"]))


# --- through the command lines ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_finetune_imports_the_users_modules_before_building(user_code, tiny, tmp_path):
    ran = _run([sys.executable, *_finetune(tiny, tmp_path / "run", IMPORTS, *OVERRIDES)], user_code)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    _check_every_case(json.loads((tmp_path / "run" / "final.json").read_text()), tmp_path / "run")
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["imports"] == [
        case.module for case in CASES.values()]


@pytest.mark.slow
@pytest.mark.parametrize("executor, parallel", [("local", 1), ("local", 2), ("submitit-local", 1)])
def test_every_sweep_executor_imports_the_users_modules(executor, parallel, user_code, tiny, tmp_path):
    methods = METHODS[:parallel]  # as many runs as processes to run them: each must import the modules
    # planning resolves the methods' names and checks every run's data set in this process; each run then imports the
    # modules in whichever process runs it (this one at --parallel 1, a spawned worker, a submitit job)
    sets = [item for override in (IMPORTS, *OVERRIDES) for item in ("--set", override)]
    ran = _run([sys.executable, str(ROOT / "scripts" / "compare.py"), "run", "--recipe", str(tiny),
                "--methods", ",".join(methods), "--seeds", "1", "--out", str(tmp_path / "out"), *sets,
                "--executor", executor, "--parallel", str(parallel), "--data-cache-dir", str(tiny.parent / "cache")],
               user_code)
    assert ran.returncode == 0 and f"{parallel} of {parallel} runs finished" in ran.stdout, ran.stdout + ran.stderr
    finished = sorted((tmp_path / "out").glob("*/lr*/seed1/final.json"))
    assert len(finished) == parallel
    for path in finished:
        _check_every_case(json.loads(path.read_text()), path.parent)


@pytest.mark.slow
def test_every_torchrun_rank_imports_the_users_modules(user_code, tiny, tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port())]
    ran = _run([*launcher, *_finetune(tiny, tmp_path / "run", IMPORTS, *OVERRIDES)], user_code)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    # a rank that had not imported the modules would have refused the names and failed the job
    assert final["environment"]["num_processes"] == 2
    _check_every_case(final, tmp_path / "run")
