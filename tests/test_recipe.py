"""Recipes: loading, overrides read as the type their key expects, and every bad value refused in one line."""

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import yaml

from timm_bninit.experiment.cli import finetune_main
from timm_bninit.experiment.recipe import (
    GROUPS,
    KEYS,
    Recipe,
    RecipeError,
    apply_overrides,
    list_recipes,
    load_recipe,
    recipe_from_mapping,
)

ROOT = Path(__file__).resolve().parent.parent


def test_recipes_parse_and_refuse_unknown_keys(tmp_path):
    config = load_recipe("demo")
    assert config.recipe == "demo" and config.dataset == "digits"
    config = apply_overrides(config, ["lr=1e-3", "norm_layer=rbn", "epochs=3", "gamma_lr_div=50", "ema=true"])
    assert config.lr == 0.001 and isinstance(config.lr, float)
    assert config.norm_layer == "rbn" and config.epochs == 3 and config.gamma_lr_div == 50
    assert config.ema is True
    with pytest.raises(RecipeError, match="unknown recipe key 'weight_decy'. Did you mean 'weight_decay'"):
        apply_overrides(config, ["weight_decy=0.1"])
    with pytest.raises(RecipeError, match="Valid keys: .*augmentation.*weight_decay"):
        apply_overrides(config, ["nope=1"])
    with pytest.raises(RecipeError, match="expects an integer"):
        apply_overrides(config, ["epochs=many"])
    with pytest.raises(RecipeError, match="not of the form key=value"):
        apply_overrides(config, ["lr"])
    with pytest.raises(RecipeError, match="unknown recipe 'cubb'.*available: .*cub"):
        load_recipe("cubb")
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 2\nbatchsize: 3\n")
    with pytest.raises(RecipeError, match="unknown recipe key 'batchsize'. Did you mean 'batch_size'"):
        load_recipe(bad)


def test_every_shipped_recipe_loads_with_known_keys():
    names = list_recipes()
    assert {"demo", "cub", "cars", "cub_scratch", "cars_scratch", "cifar10", "cifar100"} <= set(names)
    assert not [name for name in names if "study" in name]  # recipes/ holds the user recipes; studies hold theirs
    study_recipes = sorted((ROOT / "studies").glob("*/recipes/*.yaml"))
    per_study = {study: sorted(p.stem for p in study_recipes if p.parent.parent.name == study)
                 for study in {p.parent.parent.name for p in study_recipes}}
    assert per_study == {"v1": ["finetune", "pretrain", "scratch"], "v2": ["finetune", "pretrain", "scratch"],
                         "v3": ["finetune", "pretrain", "scratch"], "v4": ["scratch", "scratch_10px"]}
    for name in [*names, *study_recipes]:
        config = load_recipe(name)
        assert set(config.to_dict()) == set(KEYS) | {"recipe"}
        assert timm.is_model(config.model), name


def test_a_run_config_reads_back_as_the_recipe_it_was_written_from():
    for name in list_recipes():
        recipe = load_recipe(name)
        assert recipe_from_mapping(yaml.safe_load(yaml.safe_dump(recipe.to_dict(), sort_keys=True))) == recipe
    written = load_recipe("demo").to_dict()
    del written["fused_optimizer"]  # a config.yaml from before the key existed
    assert recipe_from_mapping(written).fused_optimizer is True
    with pytest.raises(RecipeError, match=r"^in run/config.yaml: unknown recipe key 'epoch'. Did you mean 'epochs'"):
        recipe_from_mapping({**written, "epoch": 3}, "in run/config.yaml")
    with pytest.raises(RecipeError, match="recipe key 'lr' expects a number > 0, got -1"):
        recipe_from_mapping({**written, "lr": -1})
    with pytest.raises(RecipeError, match="protocol 'official' sets min_lr=1e-08"):
        recipe_from_mapping({"protocol": "official", "min_lr": 0.5})


def test_values_are_read_as_the_type_their_key_expects():
    config = load_recipe("cub")
    assert apply_overrides(config, ["mixed_precision=no"]).mixed_precision == "no"  # not YAML 1.1's False
    assert apply_overrides(config, ["ema=no"]).ema is False
    assert apply_overrides(config, ["gamma_lr_div=null"]).gamma_lr_div is None
    assert apply_overrides(config, ["gamma_lr_div=100"]).gamma_lr_div == 100.0
    assert apply_overrides(config, ["pretrained=resnet50.a1_in1k"]).pretrained == "resnet50.a1_in1k"
    assert apply_overrides(config, ["pretrained=false"]).pretrained is False
    assert apply_overrides(config, ["classes=[3, 1]"]).classes == [3, 1]
    assert apply_overrides(config, ["norm_layer=null"]).norm_layer is None
    assert apply_overrides(config, ["imports=[my_variants, lab.data]"]).imports == ["my_variants", "lab.data"]


# For every key: a value of the wrong type, and one of the right type but out of range (None where the type admits
# every value: booleans, free text whose meaning only a later stage can judge). Wrong-typed text values go through
# --set; values that text cannot make wrong-typed (for string keys) go through a recipe file as a YAML list.
BAD_VALUES = {
    "dataset": ([1, 2], "nosuchset"), "data_dir": ([1, 2], "/no/such/folder"), "hub_revision": ([1], "abc"),
    "classes": ("abc", "[1]"), "preload": ("maybe", None), "val_fraction": ("abc", "1.5"),
    "split_seed": ("abc", "-1"), "skip_corrupt": ("maybe", None), "num_workers": ("1.5", "-1"),
    "model": ([1], "resnet5O"), "pretrained": ([1], None), "pretrained_file": ([1], "/no/such/file.pth"),
    "norm_layer": ([1], "bn_gama01"), "bn_transfer": ([1], "bogus"), "gamma_init": ("abc", "0"),
    "gamma_lr_div": ("abc", "0"), "zero_init_last": ("maybe", None), "cifar_stem": ("maybe", None),
    "bn_only": ("maybe", None), "train_classifier": ("maybe", None), "drop_rate": ("abc", "1"),
    "drop_path_rate": ("abc", "-0.1"), "optimizer": ([1], "sgdd"), "lr": ("abc", "0"), "momentum": ("abc", "1"),
    "weight_decay": ("abc", "-1"), "sched": ([1], "bogus"), "step_on_epochs": ("maybe", None),
    "warmup_epochs": ("abc", "-1"), "warmup_lr": ("abc", "-1"), "min_lr": ("abc", "-1"), "epochs": ("abc", "0"),
    "batch_size": ("2.5", "0"), "grad_accum_steps": ("abc", "0"), "label_smoothing": ("abc", "1"),
    "ema": ("maybe", None), "ema_decay": ("abc", "1"), "mixed_precision": ([1], "fp8"), "img_size": ("abc", "4"),
    "augmentation": ([1], "bogus"), "decode": ([1], "simd"), "precise_bn_batches": ("abc", "-1"), "seed": ("abc", "-1"),
    "train_per_class": ("abc", "0"), "input_bn": ("maybe", None), "protocol": ([1], "paper"),
    "sync_bn": ("maybe", None), "log_with": ([1], "neptune"), "channels_last": ("maybe", None),
    "fused_optimizer": ("maybe", None), "compile": ("maybe", None), "compile_mode": ([1], "fastest"),
    "decay_milestones": ("abc", "[0, 5]"), "decay_rate": ("abc", "0"), "imports": ("abc", "[1]"),
}


def test_the_bad_value_table_covers_every_key():
    assert set(BAD_VALUES) == set(KEYS) == {f.name for f in dataclasses.fields(Recipe)} - {"recipe"}


def _cli_error(tmp_path, capsys, key, value):
    args = ["--run-dir", str(tmp_path / "never")]
    if isinstance(value, list):  # not expressible as --set text: a recipe file
        recipe = tmp_path / f"bad_{key}.yaml"
        recipe.write_text(f"{key}: {value}\n")
        args += ["--recipe", str(recipe)]
    else:
        args += ["--set", f"{key}={value}"]
    code = finetune_main(args)
    err = capsys.readouterr().err
    assert code == 2, (key, value, err)
    assert not (tmp_path / "never").exists()  # refused before any work
    return err


@pytest.mark.parametrize("key", sorted(BAD_VALUES))
def test_every_bad_value_is_a_one_line_error_naming_the_key(key, tmp_path, capsys):
    for value in BAD_VALUES[key]:
        if value is None:
            continue
        err = _cli_error(tmp_path, capsys, key, value)
        assert err.count("\n") == 1 and err.startswith("error: "), err
        assert f"'{key}'" in err or (key == "data_dir" and "'dataset'/'data_dir'" in err), err
        assert "Traceback" not in err


def test_error_says_what_the_key_accepts(tmp_path, capsys):
    assert "expects a number > 0" in _cli_error(tmp_path, capsys, "lr", "0")
    assert "one of no, fp16, bf16" in _cli_error(tmp_path, capsys, "mixed_precision", "fp8")
    assert "expects an integer ≥ 1" in _cli_error(tmp_path, capsys, "epochs", "abc")
    assert "Did you mean 'bn_gamma01'" in _cli_error(tmp_path, capsys, "norm_layer", "bn_gama01")


def test_bad_values_through_the_script_print_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "finetune.py"), "--set", "gamma_lr_div=abc",
                             "--set", "epochs=1"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: recipe key 'gamma_lr_div' expects a number > 0, or null, got 'abc'"]


def test_list_keys_prints_every_declared_key_from_its_declaration(capsys):
    assert finetune_main(["--list-keys"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if not line.startswith(" ")] == [f"{group}:" for group in GROUPS]
    group, listed = None, {}  # key -> (group, its line, its help as printed)
    for line in lines:
        if not line.startswith(" "):
            group = line[:-1]
        elif not line.startswith("      "):
            name = line.split(":")[0].strip()
            listed[name] = [group, line, ""]
        else:
            listed[name][2] = f"{listed[name][2]} {line.strip()}".strip()
    declared = [f for f in dataclasses.fields(Recipe) if f.name != "recipe"]
    assert list(listed) == [f.name for f in declared]  # every key, in the order of the declaration
    for f in declared:
        group, line, text = listed[f.name]
        assert group == f.metadata["group"] and text == f.metadata["help"], f.name
        assert line.startswith(f"  {f.name}: {f.type} = "), line  # the declared type as written
        assert f.metadata["check"].words in line, line
        # the default is printed as --set text that reads back as the declared default
        shown = line.split(" = ", 1)[1].split("    accepts ")[0]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        assert getattr(apply_overrides(Recipe(), [f"{f.name}={shown}"]), f.name) == default, line
        assert line.endswith("    (may differ on --resume)") is (not f.metadata["changes_result"]), line


def test_the_keys_free_on_resume_are_declared_once_and_listed_in_the_guide():
    free = [name for name, spec in KEYS.items() if not spec.changes_result]
    assert free == ["preload", "num_workers", "log_with"]  # each with the reason it changes no number, in recipe.py
    guide = (ROOT / "docs" / "guide" / "finetuning.md").read_text()
    listed = re.search(r"\*\*free on resume: (.*?)\*\*", guide, re.S).group(1)
    assert re.findall(r"`(\w+)`", listed) == free


def test_cars_steps_the_lr_where_its_baseline_does():
    import timm_bninit as tb

    training = tb.build_training("cars", num_classes=196, train_size=7330, pretrained=False)
    # mmclassification's stanford_cars_bs8 schedule: lr 0.003, × 0.1 from (0-indexed) epochs 40, 70 and 90
    want = {0: 3e-3, 39: 3e-3, 40: 3e-4, 69: 3e-4, 70: 3e-5, 89: 3e-5, 90: 3e-6, 99: 3e-6}
    for epoch, lr in want.items():
        assert training.scheduler._get_lr(epoch)[0] == pytest.approx(lr, rel=1e-9), epoch
