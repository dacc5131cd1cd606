"""Where one ``scripts/finetune.py`` run spends its time: timers around its pieces (a script, not a test).

Runs the fine-tuning command line in this process with wall-clock timers wrapped around the pieces of
:mod:`timm_bninit.experiment.train` (data-set load, model build, loaders, each evaluation, each checkpoint, the final
γ analyses, ...), the imports timed before, and a pre-hook on the model that stamps every training forward, so each
epoch's first-batch latency (worker start-up included) and median step are printed. Arguments are those of
``scripts/finetune.py``.

Example (the benchmark's ``scratch`` job on a tree ``bench_vs_timm.py --keep`` left behind)::

    python benchmarks/profile_finetune.py --recipe demo --quiet --run-dir /tmp/prof-run --data-cache-dir C \\
        --set dataset=imagefolder --set data_dir=D --set norm_layer=null --set img_size=64 --set batch_size=32 \\
        --set epochs=3 --set lr=0.05 --set optimizer=momentum --set num_workers=2 --set preload=false \\
        --set val_fraction=0 --set precise_bn_batches=0
"""

from __future__ import annotations

import functools
import itertools
import statistics
import sys
import time
from collections import defaultdict
from typing import Any

timings: dict[str, list[float]] = defaultdict(list)


def timed(owner: Any, name: str, label: str | None = None) -> None:
    """Replace ``owner.name`` by a wrapper that adds each call's wall time to ``timings[label]``."""
    function = getattr(owner, name)
    label = label or name

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            timings[label].append(time.perf_counter() - start)

    setattr(owner, name, wrapper)


def main() -> int:
    start = time.perf_counter()
    import torch  # noqa: F401
    timings["import torch"].append(time.perf_counter() - start)
    start = time.perf_counter()
    import timm  # noqa: F401
    timings["import timm"].append(time.perf_counter() - start)
    start = time.perf_counter()
    from timm_bninit.experiment import cli, loaders, model, train
    timings["import the project's CLI (accelerate, datasets, report, sweep, ...)"].append(time.perf_counter() - start)

    for name in ("load_image_dataset", "make_accelerator", "build_model", "build_pipelines", "build_loaders",
                 "build_optimizer", "build_scheduler", "validate", "evaluate", "save_checkpoint", "save_best_model",
                 "train_one_epoch", "_final_result"):
        if hasattr(train, name):
            timed(train, name)
    timed(model.timm, "create_model", "timm.create_model (inside build_model)")
    timed(model, "_copy_shared_weights")

    forwards: list[float] = []
    build = train.build_model

    def build_and_stamp(*args: Any, **kwargs: Any) -> Any:
        built = build(*args, **kwargs)
        built.register_forward_pre_hook(lambda module, _: forwards.append(time.perf_counter()) if module.training
                                        else None)
        return built

    train.build_model = build_and_stamp
    epoch_starts: dict[int, float] = {}
    set_epoch = loaders.EpochShuffleSampler.set_epoch

    def stamp_epoch(self: Any, epoch: int) -> None:
        epoch_starts.setdefault(epoch, time.perf_counter())  # accelerate and the loop both set it
        set_epoch(self, epoch)

    loaders.EpochShuffleSampler.set_epoch = stamp_epoch
    start = time.perf_counter()
    code = cli.finetune_main(sys.argv[1:])
    timings["finetune_main (everything after the imports)"].append(time.perf_counter() - start)

    print(f"\n{'piece':<72} {'calls':>5} {'total s':>8}  each (s)")
    for label, values in timings.items():
        shown = ", ".join(f"{v:.3f}" for v in values[:8]) + (", ..." if len(values) > 8 else "")
        print(f"{label:<72} {len(values):>5} {sum(values):8.3f}  {shown}")
    starts = sorted(epoch_starts.items())
    for position, (epoch, begun) in enumerate(starts):
        until = starts[position + 1][1] if position + 1 < len(starts) else float("inf")
        stamps = [t for t in forwards if begun <= t < until]
        if len(stamps) > 1:
            steps = [b - a for a, b in itertools.pairwise(stamps)]
            print(f"epoch {epoch}: first training forward {stamps[0] - begun:.3f} s after the epoch began; "
                  f"{len(stamps)} steps, median step {statistics.median(steps):.3f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
