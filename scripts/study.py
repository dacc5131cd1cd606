"""A study in one command: ``python scripts/study.py studies/v3`` (runs under runs/studies/v3, reports into
studies/v3; see docs/studies.md).

A thin command line over :func:`timm_bninit.experiment.cli.study_main`; see ``--help``.
"""

import gc
import sys

# as in finetune.py: no cycle collection while the imports load, then freeze what they created
gc.disable()
from timm_bninit.experiment.cli import study_main  # noqa: E402

gc.freeze()
gc.enable()

if __name__ == "__main__":
    sys.exit(study_main())
