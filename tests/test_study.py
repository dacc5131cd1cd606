"""The study command on a tiny protocol: parts, pretraining, reports and summaries in the study's folder, resume;
protocols name their recipes relative to themselves, and every committed study still plans."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from fake_datasets import make_imagefolder
from scipy import stats

from timm_bninit.errors import BNInitError
from timm_bninit.experiment.cli import study_dirs
from timm_bninit.experiment.recipe import RecipeError, load_recipe
from timm_bninit.experiment.study import load_protocol, run_study
from timm_bninit.experiment.sweep import parse_seeds, plan_sweep

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_tiny_study_end_to_end(tmp_path):
    make_imagefolder(tmp_path / "data", class_names=("a", "b", "c", "d"), counts={"train": 10, "test": 4})
    common = {"dataset": "imagefolder", "data_dir": str(tmp_path / "data"), "model": "test_resnet", "img_size": 16,
              "batch_size": 6, "num_workers": 0, "val_fraction": 0.25, "augmentation": "none", "preload": True,
              "precise_bn_batches": 2, "epochs": 1}
    recipes = {"scratch": common, "pretrain": {**common, "classes": [0, 1], "seed": 0},
               "finetune": {**common, "classes": [2, 3], "lr": 0.01}}
    for name, recipe in recipes.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
    protocol = tmp_path / "study.yaml"
    protocol.write_text(yaml.safe_dump({"seeds": "1-2", "parts": {
        "scratch": {"recipe": "scratch.yaml", "lr": [0.05],  # relative to the protocol; the others absolute
                    "methods": ["base", "bn_gamma1+gamma_init=0.269+gamma_lr_div=1"]},
        "finetune": {"recipe": str(tmp_path / "finetune.yaml"), "pretrain": str(tmp_path / "pretrain.yaml"),
                     "lr": [0.01], "methods": ["base", "bn_gamma01+bn_transfer=scale"]}}}))
    docs, out = tmp_path / "docs", tmp_path / "runs"
    record = run_study(protocol, out, docs, parallel=1, data_cache_dir=str(tmp_path / "cache"), log=lambda _: None)
    assert record["machine"]["cores"] >= 1 and set(record["part_seconds_this_invocation"]) == {"scratch", "finetune"}
    assert (out / "finetune_pretrain" / "best_model.safetensors").is_file()
    report = json.loads((out / "finetune" / "bn_gamma01__bn_transfer=scale" / "lr0.01" / "seed1" /
                         "load_report.json").read_text())
    assert report["bn_transfer"] == "scale" and "finetune_pretrain" in report["source"]
    for part in ("scratch", "finetune"):
        summaries = json.loads((docs / part / "summaries.json").read_text())
        assert len(summaries) == 4
        by = {(r["method"], r["seed"]): r["test_acc_at_best_val"] for r in summaries}
        methods = sorted({m for m, _ in by} - {"base"})
        new, base = [by[(methods[0], s)] for s in (1, 2)], [by[("base", s)] for s in (1, 2)]
        markdown = (docs / part / "report.md").read_text()
        assert f"{np.mean(new):.2f} ± {np.std(new, ddof=1):.2f} (2)" in markdown
        assert "Holm-corrected" in markdown
        p = stats.ttest_rel(new, base, alternative="greater").pvalue
        csv_text = (docs / part / "report.csv").read_text()
        assert (f"{p:.6g}" if not np.isnan(p) else ",nan,") in csv_text
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("final.json")}
    run_study(protocol, out, docs, parallel=1, data_cache_dir=str(tmp_path / "cache"), log=lambda _: None)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("final.json")} == stamps  # resumed, nothing re-run


def test_protocol_errors(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_protocol(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="nope-folder/protocol.yaml' does not exist"):  # a folder without one
        (tmp_path / "nope-folder").mkdir()
        load_protocol(tmp_path / "nope-folder")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"seeds": "1-2", "parts": {"a": {"recipe": "demo", "lr": [0.1]}}}))
    with pytest.raises(RecipeError, match="part 'a' lacks methods"):
        load_protocol(bad)


def test_a_protocol_names_its_recipes_relative_to_itself(tmp_path, monkeypatch):
    study = tmp_path / "studies" / "v9"
    (study / "recipes").mkdir(parents=True)
    (study / "recipes" / "scratch.yaml").write_text("epochs: 1\n")
    elsewhere = tmp_path / "pretrain.yaml"
    (study / "protocol.yaml").write_text(yaml.safe_dump({"seeds": "1-2", "parts": {
        "a": {"recipe": "recipes/scratch.yaml", "lr": [0.1], "methods": ["base"]},
        "b": {"recipe": "demo", "pretrain": str(elsewhere), "lr": [0.1], "methods": ["base"]}}}))
    monkeypatch.chdir(tmp_path / "studies")  # a relative path is the protocol's, not the working directory's
    for given in ("v9", "v9/protocol.yaml", study):
        parts = load_protocol(given)["parts"]
        assert Path(parts["a"]["recipe"]).resolve() == study / "recipes" / "scratch.yaml"
        assert load_recipe(parts["a"]["recipe"]).epochs == 1
        assert parts["b"]["recipe"] == "demo" and parts["b"]["pretrain"] == str(elsewhere)  # a name, an absolute path


def test_a_study_runs_under_runs_and_reports_into_its_folder(tmp_path, monkeypatch):
    (tmp_path / "studies" / "v9").mkdir(parents=True)
    (tmp_path / "studies" / "v9" / "protocol.yaml").write_text("seeds: 1\nparts: {}\n")
    monkeypatch.chdir(tmp_path)
    assert study_dirs("studies/v9") == (Path("runs/studies/v9"), Path("studies/v9"))
    assert study_dirs("studies/v9/protocol.yaml") == (Path("runs/studies/v9"), Path("studies/v9"))
    assert study_dirs("studies/v9", "elsewhere", "reports") == (Path("elsewhere"), Path("reports"))
    outside = tmp_path.parent / "outside-study"
    assert study_dirs(str(outside / "p.yaml")) == (Path("runs/outside-study"), outside)


@pytest.mark.parametrize("protocol", ["v1", "v2", "v2/pilot.yaml", "v3"])
def test_every_committed_study_plans_from_its_own_folder(protocol):
    study = ROOT / "studies" / protocol
    loaded = load_protocol(study)
    folder = study if study.is_dir() else study.parent
    for part in loaded["parts"].values():
        for key in ("recipe", "pretrain"):
            if part.get(key):
                assert Path(part[key]).parent == folder / "recipes" and Path(part[key]).is_file()
        specs = plan_sweep(part["recipe"], part["methods"], part["lr"], parse_seeds(loaded["seeds"]), "unused")
        assert len(specs) == len(part["methods"]) * len(part["lr"]) * len(parse_seeds(loaded["seeds"]))


def _protocol(tmp_path: Path, **part) -> Path:
    path = tmp_path / "protocol.yaml"
    path.write_text(yaml.safe_dump({"seeds": "1-2", "parts": {"a": {"recipe": "demo", "lr": [0.1], "methods": [
        "base", "bn_gamma01", "bn_gamma1+gamma_init=0.269+gamma_lr_div=1"], **part}}}, allow_unicode=True))
    return path


def test_a_part_says_how_it_is_reported(tmp_path):
    from timm_bninit.experiment.study import report_options

    labels = {"base": "BASE", "bn_gamma01": "γ-init", "bn_gamma1+gamma_init=0.269+gamma_lr_div=1": "BN γ0=0.269"}
    part = load_protocol(_protocol(tmp_path, labels=labels, analysis={"metric": "last", "alternative": "two-sided",
                                                                      "holm": False}))["parts"]["a"]
    assert report_options(part) == {"metric": "last", "alternative": "two-sided", "use_holm": False,
                                    "baseline": "base", "labels": labels}
    # a part without them is reported as every study so far: best-validation epoch, one-sided, Holm, against base
    assert report_options(load_protocol(_protocol(tmp_path))["parts"]["a"]) == {
        "metric": "best_val", "alternative": "greater", "use_holm": True, "baseline": "base", "labels": None}
    budget = load_protocol(_protocol(tmp_path, methods="base+epochs=8,base+epochs=16",
                                     analysis={"baseline": "base+epochs=8"}))["parts"]["a"]
    assert report_options(budget)["baseline"] == "base+epochs=8"


@pytest.mark.parametrize("part,message", [
    ({"analysis": {"metric": "best"}}, "analysis metric must be one of best_val, last, got 'best'"),
    ({"analysis": {"alternative": "less"}}, "analysis alternative must be one of greater, two-sided"),
    ({"analysis": {"holm": "yes please"}}, "analysis holm must be one of True, False"),
    ({"analysis": {"sided": 2}}, "unknown analysis key"),
    ({"analysis": ["last"]}, "analysis must be a mapping"),
    ({"analysis": {"baseline": "rbn"}}, "analysis baseline 'rbn' is not one of the part's methods"),
    ({"labels": {"rbn": "RBN"}}, "labels name methods that are not in the sweep: rbn"),
    ({"labels": {"base": "B", "bn_gamma01": "B"}}, "have the same label 'B'"),
])
def test_a_part_with_unusable_reporting_is_refused_when_the_protocol_loads(tmp_path, part, message):
    with pytest.raises(BNInitError, match=message):
        load_protocol(_protocol(tmp_path, **part))


@pytest.mark.parametrize("protocol", ["v1", "v2", "v2/pilot.yaml", "v3"])
def test_every_committed_study_is_reported_as_it_was(protocol):
    from timm_bninit.experiment.study import report_options

    for part in load_protocol(ROOT / "studies" / protocol)["parts"].values():
        assert report_options(part) == {"metric": "best_val", "alternative": "greater", "use_holm": True,
                                        "baseline": "base", "labels": None}


def test_the_study_writes_each_part_report_with_its_options(tmp_path, monkeypatch):
    from timm_bninit.experiment import study

    calls = {}
    monkeypatch.setattr(study, "plan_sweep", lambda *args, **kwargs: [])
    monkeypatch.setattr(study, "run_sweep", lambda *args, **kwargs: {"finished": [], "diverged": []})
    monkeypatch.setattr(study, "_summaries", lambda out: [])

    def write_report(out, report_dir, **options):
        report_dir.mkdir(parents=True)
        calls[out.name] = options

    monkeypatch.setattr(study, "write_report", write_report)
    labels = {"base": "BASE"}
    path = _protocol(tmp_path, labels=labels, analysis={"alternative": "two-sided"})
    study.run_study(path, tmp_path / "runs", tmp_path / "docs", log=lambda _: None)
    assert calls == {"a": {"metric": "best_val", "alternative": "two-sided", "use_holm": True, "baseline": "base",
                           "labels": labels}}
