"""The README's first two commands are the whole set-up; its main command must work twice in a row."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _first_block() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_the_first_block_installs_then_runs_the_main_job_then_the_tests():
    setup, tests = _first_block()
    assert setup.startswith("pip install torch==2.14.1 torchvision==0.29.1 && pip install -e .")
    assert "accelerate launch scripts/finetune.py" in setup
    assert tests.endswith("python -m pytest -q")


@pytest.mark.slow
def test_the_main_command_works_twice_in_a_row(tmp_path):
    main = _first_block()[0].split("&&")[-1].strip()  # after the installs: the main job itself
    assert main.startswith("accelerate launch scripts/finetune.py")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TIMM_BNINIT_DATA_CACHE": str(tmp_path / "cache")}
    env.pop("WORLD_SIZE", None)
    outputs = []
    # the command as written (accelerate's launcher run with this interpreter), its runs kept in tmp_path; then the
    # same command again, shortened to one epoch: what is tested the second time is that it starts a new run
    # directory beside the first, which the number of epochs does not change
    for extra in ([], ["--set", "epochs=1"]):
        result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *main.split()[2:],
                                 "--output-dir", str(tmp_path / "runs"), *extra], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        outputs.append(result.stdout)
    run_dirs = [re.search(r"^run directory: (.+)$", out, re.M).group(1) for out in outputs]
    assert run_dirs[0] != run_dirs[1]  # each invocation its own new run directory, printed
    for run_dir in run_dirs:
        assert (Path(run_dir) / "final.json").is_file()
        assert Path(run_dir).parent == tmp_path / "runs" / "demo"
