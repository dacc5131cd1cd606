"""Users' own code through a recipe's ``imports`` (mmcv's ``custom_imports``): a module on PYTHONPATH, written here,
registers an extension that the recipe then names, and every process a run or a sweep starts imports it first:
``finetune.py``, ``compare.py`` with the local executor (in the planning process and in spawned workers) and with
submitit's local executor, and each rank of a 2-process ``torchrun``.

Each extension a user can register is one :class:`UserCode` case: the module's source, the overrides that name what
it registers, and what a finished run must show. The norm-layer variant is the case here; a data set registered
through the data-set registry (``timm_bninit.data.registry.register_dataset``) joins :data:`CASES` beside it when
that registry exists, and every test below runs it too.

Registering happens only in subprocesses: a registration made in the test process would stay in timm's maps for
every later test of the session.
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
from fake_datasets import make_imagefolder

from timm_bninit.experiment.layout import read_metrics
from timm_bninit.experiment.recipe import Recipe, RecipeError, apply_overrides, check_config, load_recipe

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class UserCode:
    """A user's module and how a recipe uses it."""

    module: str
    source: str
    name: str                                            # what the module registers
    overrides: tuple[str, ...]                           # what names it (finetune.py --set)
    methods: tuple[str, str]                             # two compare.py methods that need the module
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
    first = read_metrics(run_dir)[0]
    assert first["lr_gamma"] == pytest.approx(first["lr"] / 100, rel=1e-12)  # its γ group: the class's c = 100


CASES = {
    "variant": UserCode("my_variants", VARIANT_SOURCE, "my_gamma02", ("norm_layer=my_gamma02",),
                        ("my_gamma02", "my_gamma02+gamma_lr_div=10"), _ran_the_variant),
}


@pytest.fixture(scope="module")
def user_code(tmp_path_factory) -> Path:
    """A folder holding every case's module: what goes on PYTHONPATH."""
    folder = tmp_path_factory.mktemp("user_code")
    for case in CASES.values():
        (folder / f"{case.module}.py").write_text(case.source)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A recipe of the smallest run that trains: test_resnet at 16 px, one epoch of two updates, no workers."""
    base = tmp_path_factory.mktemp("user_runs")
    make_imagefolder(base / "folder", counts={"train": 8, "test": 2})
    recipe = replace(load_recipe("demo"), dataset="imagefolder", data_dir=str(base / "folder"), model="test_resnet",
                     img_size=16, epochs=1, batch_size=8, num_workers=0, precise_bn_batches=0, val_fraction=0.25,
                     augmentation="flip", preload=False, lr=0.01)
    path = base / "tiny.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in recipe.to_dict().items() if k != "recipe"}))
    return path


def _env(user_code: Path) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(user_code)])}
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
@pytest.mark.parametrize("case", CASES)
def test_finetune_imports_the_users_module_before_building(case, user_code, tiny, tmp_path):
    code = CASES[case]
    imports = f"imports=[{code.module}]"
    ran = _run([sys.executable, *_finetune(tiny, tmp_path / "run", imports, *code.overrides)], user_code)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    code.check(json.loads((tmp_path / "run" / "final.json").read_text()), tmp_path / "run")
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["imports"] == [code.module]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("executor, parallel", [("local", 1), ("local", 2), ("submitit-local", 1)])
def test_every_sweep_executor_imports_the_users_module(case, executor, parallel, user_code, tiny, tmp_path):
    code = CASES[case]
    methods = code.methods[:parallel]  # as many runs as processes to run them: each must import the module
    # planning resolves the methods' names in this process; each run then imports the module in whichever process
    # runs it (this one at --parallel 1, a spawned worker, a submitit job)
    ran = _run([sys.executable, str(ROOT / "scripts" / "compare.py"), "run", "--recipe", str(tiny),
                "--methods", ",".join(methods), "--seeds", "1", "--out", str(tmp_path / "out"),
                "--set", f"imports=[{code.module}]", "--executor", executor, "--parallel", str(parallel),
                "--data-cache-dir", str(tiny.parent / "cache")], user_code)
    assert ran.returncode == 0 and f"{parallel} of {parallel} runs finished" in ran.stdout, ran.stdout + ran.stderr
    finished = sorted((tmp_path / "out").glob("*/lr*/seed1/final.json"))
    assert len(finished) == parallel
    for path in finished:
        code.check(json.loads(path.read_text()), path.parent)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_every_torchrun_rank_imports_the_users_module(case, user_code, tiny, tmp_path):
    code = CASES[case]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(29700 + os.getpid() % 1000)]
    ran = _run([*launcher, *_finetune(tiny, tmp_path / "run", f"imports=[{code.module}]", *code.overrides)],
               user_code)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    # a rank that had not imported the module would have refused the name and failed the job
    assert final["environment"]["num_processes"] == 2
    code.check(final, tmp_path / "run")
