"""Multi-seed comparisons: ``scripts/compare.py run --recipe cub --methods base,bn_gamma01 --lr 0.1,0.01 --seeds 1-15
--out runs/cub`` then ``scripts/compare.py report runs/cub``.

A thin command line over :func:`timm_bninit.experiment.cli.compare_main`; see ``--help``.
"""

import gc
import sys

# as in finetune.py: no cycle collection while the imports load, then freeze what they created
gc.disable()
from timm_bninit.experiment.cli import compare_main  # noqa: E402

gc.freeze()
gc.enable()

if __name__ == "__main__":
    sys.exit(compare_main())
