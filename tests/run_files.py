"""Files of a sweep that is still writing: its checkpoints are replaced while a test looks."""
from __future__ import annotations

import os
from pathlib import Path


def files_named(root: Path, name: str) -> list[Path]:
    """Every file called `name` under `root`; a folder that vanishes during the walk (a checkpoint being replaced by
    its successor) is skipped, where `Path.rglob` raises FileNotFoundError."""
    return sorted(Path(folder) / name for folder, _, files in os.walk(root) if name in files)
