"""Export a finished run as a timm model folder: ``python scripts/export.py RUN_DIR OUT_DIR [--push REPO_ID]``.

A thin command line over :func:`timm_bninit.experiment.cli.export_main`; see ``--help``.
"""

import gc
import sys

# as in finetune.py: no cycle collection while the imports load, then freeze what they created
gc.disable()
from timm_bninit.experiment.cli import export_main  # noqa: E402

gc.freeze()
gc.enable()

if __name__ == "__main__":
    sys.exit(export_main())
