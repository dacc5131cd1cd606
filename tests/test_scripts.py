"""The scripts/ entry points: they import with the cycle collector off, then freeze the imports and turn it back on."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROBE = """
import gc, runpy, sys
runpy.run_path(sys.argv[1], run_name="imported")  # the script's top level, without running its main
print(gc.isenabled(), gc.get_freeze_count())
"""


@pytest.mark.parametrize("script", ["finetune.py", "compare.py", "study.py", "export.py"])
def test_a_script_leaves_the_collector_on_and_its_imports_frozen(script):
    out = subprocess.run([sys.executable, "-c", PROBE, str(ROOT / "scripts" / script)], capture_output=True,
                         text=True, timeout=300, check=True).stdout.split()
    enabled, frozen = out[0] == "True", int(out[1])
    assert enabled  # cycles created after start-up (a run, a sweep) are still collected
    assert frozen > 100_000  # torch, timm, accelerate, datasets: hundreds of thousands of objects never walked again
