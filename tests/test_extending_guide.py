"""docs/extending.md shows only what runs: the files it builds are extracted from it as a reader would copy them, and
every snippet followed by an output block prints exactly that output.

A code block whose first line names a file (``# my_variants.py``, ``# my_variants.py, continued``, ``# shapes.yaml:
...``) is that file, or is appended to it; a ``python`` block followed directly by a block without a language is a
snippet and the output it prints. The snippets run, in the guide's order, in one subprocess whose working folder holds
the files (and the stand-in hub repository the guide's command writes), as the guide's reader runs them from the
repository root; the test file the guide writes runs too. The whole runs (finetune.py, compare.py, torchrun) are
tested with the same kind of modules in tests/test_user_code.py; the recipe-key walk-through edits the package, so it
is not re-run here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GUIDE = (ROOT / "docs" / "extending.md").read_text(encoding="utf-8")
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)
FILE_LINE = re.compile(r"# ([\w.]+\.(?:py|yaml))(, continued|:.*)?")

# Runs each snippet with its prints captured; the guide's own test function too. One interpreter: torch and timm are
# imported once.
RUNNER = """
import contextlib, io, json, sys
snippets, outputs = json.load(sys.stdin), []
for source in snippets:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(source, "<docs/extending.md>", "exec"), {"__name__": "__guide__"})
    outputs.append(printed.getvalue())
print(json.dumps(outputs))
"""


def _blocks() -> list[tuple[str, str]]:
    return [(match.group(1), match.group(2)) for match in BLOCK.finditer(GUIDE)]


def _files() -> dict[str, str]:
    files: dict[str, str] = {}
    for language, body in _blocks():
        named = FILE_LINE.fullmatch(body.partition("\n")[0])
        if language in ("python", "yaml") and named:
            name = named.group(1)
            files[name] = files[name] + "\n\n" + body if named.group(2) == ", continued" else body
    return files


def _snippets() -> list[tuple[str, str]]:
    """``(source, printed output)`` of every python block followed directly by an output block."""
    blocks = _blocks()
    return [(body, blocks[i + 1][1]) for i, (language, body) in enumerate(blocks[:-1])
            if language == "python" and blocks[i + 1][0] == "" and not FILE_LINE.fullmatch(body.partition("\n")[0])]


def test_the_guide_names_the_files_it_builds():
    files = _files()
    assert set(files) == {"my_variants.py", "test_my_variants.py", "my_datasets.py", "shapes.yaml"}
    assert files["my_variants.py"].count("register_norm_layer(") == 3
    assert len(_snippets()) == 3  # the layers by name, SyncBN, build_training


@pytest.mark.slow
def test_what_the_guide_shows_runs_and_prints_what_it_shows(tmp_path):
    for name, text in _files().items():
        (tmp_path / name).write_text(text)
    (tmp_path / "tests").symlink_to(ROOT / "tests")  # the guide's commands run from the repository root
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)]), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("WORLD_SIZE", None)
    stand_in = next(line for language, body in _blocks() if language == "bash"
                    for line in body.splitlines() if "make_validation_hub_repo" in line)
    made = subprocess.run(["bash", "-c", stand_in], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "shapes_hub" / "data" / "validation-00000-of-00001.parquet").is_file()

    snippets = _snippets()
    test_module = _files()["test_my_variants.py"] + "\ntest_fused_backward_equals_the_autograd_path()\n"
    ran = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps([s for s, _ in snippets] + [test_module]),
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, ran.stderr[-3000:]
    printed = json.loads(ran.stdout.strip().splitlines()[-1])
    for (source, shown), output in zip(snippets, printed):
        assert output == shown, source
    assert printed[-1] == ""  # the guide's test of the fused backward passed, silently
