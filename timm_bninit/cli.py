"""Command line of ``scripts/finetune.py``: recipe + overrides in, one run directory out."""

from __future__ import annotations

import argparse
import sys

from .recipe import RecipeError, apply_overrides, list_recipes, load_recipe

__all__ = ["finetune_main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finetune.py",
        description="Fine-tune (or train from scratch) a timm model with a BN variant. Hyper-parameters live in a "
                    "recipe (recipes/*.yaml); any key can be overridden with --set key=value.",
    )
    parser.add_argument("--recipe", default="demo",
                        help="recipe name in recipes/ or a path to a .yaml file (default: demo, offline on a CPU)")
    parser.add_argument("--data-dir", help="local data folder (official CUB/Cars archive layout or imagefolder); "
                                           "default: the recipe's, else the hub copy")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key, e.g. --set norm_layer=bn_gamma01 --set lr=0.01 (repeatable)")
    parser.add_argument("--run-dir", help="run directory (default: <output-dir>/<recipe>/<method>-lr<lr>-s<seed>)")
    parser.add_argument("--output-dir", default="runs", help="parent of the default run directory")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    parser.add_argument("--data-cache-dir", help="cache for built data sets (default ~/.cache/timm_bninit)")
    parser.add_argument("--list-recipes", action="store_true", help="list the available recipes and exit")
    return parser


def finetune_main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.list_recipes:
        print("\n".join(list_recipes()))
        return 0
    from .data import DatasetError
    from .finetune import RunError, default_run_dir, run_finetune
    from .pretrained import PretrainedLoadError
    from .registry import UnknownNormLayerError

    try:
        config = apply_overrides(load_recipe(args.recipe), args.overrides)
        if args.data_dir:
            config["data_dir"] = args.data_dir
        run_dir = args.run_dir or default_run_dir(config, args.output_dir)
        final = run_finetune(config, run_dir, resume=args.resume, quiet=args.quiet,
                             data_cache_dir=args.data_cache_dir)
    except (RecipeError, RunError, DatasetError, PretrainedLoadError, UnknownNormLayerError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{run_dir}: test accuracy {final['test_acc_at_best_val']:.2f}% at the best-validation epoch "
          f"{final['best_epoch']}, {final['test_acc_last']:.2f}% at the last epoch")
    return 0
