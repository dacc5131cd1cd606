"""Fine-tune a timm model with a BN variant: ``accelerate launch scripts/finetune.py --recipe cub``.

A thin command line over :func:`timm_bninit.experiment.cli.finetune_main`; see ``--help``.
"""

import gc
import sys

# The imports below (torch, timm -> torch._dynamo, accelerate, datasets) create ~450k objects that live as long as the
# process. Collecting cycles while they load costs ~0.9 s of start-up here (7 full collections), and every later
# full collection, including the one at exit (~1.1 s), walks them all again. So collect nothing while importing, then
# move what was imported out of the collector's reach (gc.freeze): that also keeps forked DataLoader workers from
# copying the pages the collector would otherwise write to. Measured in benchmarks/HISTORY.md (against timm).
gc.disable()
from timm_bninit.experiment.cli import finetune_main  # noqa: E402

gc.freeze()
gc.enable()

if __name__ == "__main__":
    sys.exit(finetune_main())
