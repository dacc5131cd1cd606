"""How the C plane kernels (``timm_bninit.native_kernels``) are built and what happens without them.

Their numbers are tested in test_norm_kernels.py, where every gradcheck and formula test runs once with them and once
with BN's stock kernels. Here: a fresh cache builds them, and a machine without a C compiler (or a user who turns them
off) gets the same results from the stock kernels, after one warning or none.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

STEP = """
import json, sys, warnings
import torch
from timm_bninit import InstanceEnhancementBatchNorm2d, RepresentativeBatchNorm2d, native_kernels

warnings.simplefilter("always")
gen = torch.Generator().manual_seed(0)
results, messages = {}, []
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for name, layer_type in [("rbn", RepresentativeBatchNorm2d), ("iebn", InstanceEnhancementBatchNorm2d)]:
        layer = layer_type(5, dtype=torch.float64).train()
        x = torch.randn(4, 5, 6, 7, generator=gen, dtype=torch.float64).to(memory_format=torch.channels_last)
        x.requires_grad_()
        for _ in range(2):
            y = layer(x)
            y.backward(torch.randn(y.shape, generator=gen, dtype=torch.float64))
        results[name] = {"y": y.detach(), "grad": x.grad, "running_var": layer.running_var,
                         "params": {n: p.grad for n, p in layer.named_parameters()}}
torch.save(results, sys.argv[1])
print(json.dumps({"built": native_kernels.library() is not None,
                  "warnings": [str(w.message) for w in caught if w.category is RuntimeWarning]}))
"""


def _step(tmp_path: Path, name: str, **env: str) -> tuple[dict, dict]:
    out = tmp_path / f"{name}.pt"
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_CACHE_HOME": str(tmp_path / f"{name}-cache"), **env}
    run = subprocess.run([sys.executable, "-c", STEP, str(out)], env=environment, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1]), torch.load(out)


@pytest.mark.skipif(not any(shutil.which(n) for n in ("cc", "gcc", "clang")), reason="needs a C compiler")
def test_without_a_compiler_the_layers_warn_once_and_give_the_same_results(tmp_path):
    built, with_kernels = _step(tmp_path, "built")
    assert built == {"built": True, "warnings": []}
    assert any((tmp_path / "built-cache" / "timm_bninit" / "kernels").glob("plane_kernels-*.so"))

    # no compiler on PATH and a CC that does not exist: one warning that says what to do, then the stock kernels
    no_compiler, without_kernels = _step(tmp_path, "no-compiler", PATH=str(Path(sys.executable).parent),
                                         CC="/nonexistent/cc")
    assert no_compiler["built"] is False and len(no_compiler["warnings"]) == 1, no_compiler
    assert "could not be built" in no_compiler["warnings"][0] and "TIMM_BNINIT_NATIVE_KERNELS=0" in \
        no_compiler["warnings"][0]

    switched_off, stock = _step(tmp_path, "off", TIMM_BNINIT_NATIVE_KERNELS="0")
    assert switched_off == {"built": False, "warnings": []}

    # the same step in another summation order: float64 sums of ~100 terms agree to a few hundred ulps
    for name in with_kernels:
        for result in (without_kernels, stock):
            torch.testing.assert_close(result[name], with_kernels[name], rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not any(shutil.which(n) for n in ("cc", "gcc", "clang")), reason="needs a C compiler")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_kernels_sigmoid_is_within_four_ulps_everywhere(dtype):
    """RBN's and IEBN's σ(z) = 1/(1 + e^(−z)) in C, against torch's float64 sigmoid over every z where it is a normal
    number. The bound: e^t within 2 ulps (a Taylor remainder below half an ulp, the roundings of the reduction and of
    Horner's steps), 1 + e^t and the division half an ulp each."""
    from timm_bninit import native_kernels

    if native_kernels.library() is None:
        pytest.skip("the C kernels could not be built here")
    gen = torch.Generator().manual_seed(0)
    limit = 750.0 if dtype == torch.float64 else 100.0
    z = torch.cat([torch.linspace(-limit, limit, 400_001, dtype=torch.float64),
                   torch.randn(100_000, generator=gen, dtype=torch.float64) * 4]).to(dtype)
    s = torch.empty_like(z)
    native_kernels._function("sigmoid", dtype)(z.data_ptr(), z.numel(), s.data_ptr())
    want = torch.sigmoid(z.double())
    normal = want > torch.finfo(dtype).tiny
    relative = ((s.double() - want).abs() / want)[normal]
    assert relative.max() <= 4 * torch.finfo(dtype).eps
    assert (s[~normal] <= torch.finfo(dtype).tiny).all() and (s >= 0).all() and (s <= 1).all()

    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0], dtype=dtype)
    out = torch.empty_like(special)
    native_kernels._function("sigmoid", dtype)(special.data_ptr(), special.numel(), out.data_ptr())
    assert out[0].isnan() and out[1] == 1 and 0 <= out[2] <= torch.finfo(dtype).tiny and out[3] == 0.5
