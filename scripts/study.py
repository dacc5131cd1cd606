"""The reproduction study in one command: ``python scripts/study.py`` (see the README's "Reproduction study").

A thin command line over :func:`timm_bninit.experiment.cli.study_main`; see ``--help``.
"""

import sys

from timm_bninit.experiment.cli import study_main

if __name__ == "__main__":
    sys.exit(study_main())
