"""Fine-tune a timm model with a BN variant: ``accelerate launch scripts/finetune.py --recipe cub``.

A thin command line over :func:`timm_bninit.experiment.cli.finetune_main`; see ``--help``.
"""

import sys

from timm_bninit.experiment.cli import finetune_main

if __name__ == "__main__":
    sys.exit(finetune_main())
