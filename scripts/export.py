"""Export a finished run as a timm model folder: ``python scripts/export.py RUN_DIR OUT_DIR [--push REPO_ID]``.

A thin command line over :func:`timm_bninit.experiment.cli.export_main`; see ``--help``.
"""

import sys

from timm_bninit.experiment.cli import export_main

if __name__ == "__main__":
    sys.exit(export_main())
