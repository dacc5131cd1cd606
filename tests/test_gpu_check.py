"""benchmarks/gpu_check.py cannot rot: its CPU rows run here, and a wrong layer makes it fail.

The script certifies a GPU machine (benchmarks/README.md); ``--quick --device cpu`` runs every row it can on this
machine at small shapes: the layers against float64, their speed eager and compiled (inductor), the data path, a
short fine-tuning run, and the 2-process sync step on gloo.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import timm_bninit as tb

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module("gpu_check")


class SlightlyWrongBatchNorm2d(tb.BatchNormGamma2d):
    """BN whose output is 1e-3 too large on the run's dtypes, as a kernel bug on a path the float64 reference does not
    take would be (the formulas themselves are the test suite's to check); far smaller than a layout mistake."""

    def forward(self, x):
        return super().forward(x) * (1.0 if x.dtype == torch.float64 else 1.001)


def _row(output: str, check: str) -> str:
    return next(line for line in output.splitlines() if line.startswith(check + " "))


def test_a_wrong_layer_fails_its_row_and_the_exit_code(gpu_check, restore_registries, capsys):
    assert gpu_check.main(["--quick", "--device", "cpu", "--rows", "layers"]) == 0
    healthy = capsys.readouterr().out
    assert "every correctness row passed" in healthy and " FAIL " not in healthy
    tb.register_norm_layer("wrong_bn", SlightlyWrongBatchNorm2d)
    assert gpu_check.main(["--quick", "--device", "cpu", "--rows", "layers"]) == 1
    output = capsys.readouterr().out
    wrong = _row(output, "layer wrong_bn")
    ratios = dict(re.findall(r"(\w+/\w+) ([\d.e+-]+)", wrong))
    assert " FAIL " in wrong and set(ratios) == {"fp32/NCHW", "fp32/NHWC", "bf16/NCHW", "bf16/NHWC"}
    assert float(ratios["fp32/NCHW"]) > 5 and float(ratios["fp32/NHWC"]) > 5  # 1e-3 against 4·256·eps ≈ 1.2e-4
    assert " ok " in _row(output, "layer rbn")  # one wrong layer fails its own row only
    assert "FAILED: layer wrong_bn" in output


def test_tolerances_come_from_the_dtype(gpu_check):
    stored, statistics = gpu_check.tolerances(torch.float32, 256)
    assert stored == statistics == 4 * 256 * torch.finfo(torch.float32).eps
    stored, statistics = gpu_check.tolerances(torch.bfloat16, 256)
    assert statistics == 4 * 256 * torch.finfo(torch.float32).eps
    assert stored == pytest.approx(statistics + 2 * 2 ** -7)  # two bf16 roundings: output, input gradient


@pytest.mark.slow
def test_the_quick_cpu_run_passes_and_prints_every_row(tmp_path):
    # inductor compiles two layers, a fine-tuning subprocess and a 2-process gloo job: minutes on 2 shared cores
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--quick", "--device", "cpu"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    for check in ("layer BatchNorm2d", "layer rbn", "layer iebn_unit", "speed rbn (eager)", "speed rbn (compiled)",
                  "compile rbn", "data path", "finetune.py", "sync_bn rbn", "sync_bn bn_blend01"):
        assert check + " " in out, check
    assert "every correctness row passed" in out
    assert " FAIL " not in out
