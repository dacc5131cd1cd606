"""Multi-seed comparisons: ``scripts/compare.py run --recipe cub --methods base,bn_gamma01 --lr 0.1,0.01 --seeds 1-15
--out runs/cub`` then ``scripts/compare.py report runs/cub``.

A thin command line over :func:`timm_bninit.experiment.cli.compare_main`; see ``--help``.
"""

import sys

from timm_bninit.experiment.cli import compare_main

if __name__ == "__main__":
    sys.exit(compare_main())
