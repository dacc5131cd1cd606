"""Checkpoints that survive damage: the manifest, the fallback to the previous checkpoint, a failed write.

Each run is the tiny recipe for three epochs, stopped in-process where a kill would have stopped it (conftest's
``stop_after``); tests/test_train.py and tests/test_distributed.py kill real 1- and 2-process runs.
"""

import errno
import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import StoppedRun
from fake_datasets import tiny_config
from safetensors.torch import load_file, save_file

from timm_bninit.experiment import checkpoint, layout
from timm_bninit.experiment.checkpoint import checkpoint_problem
from timm_bninit.experiment.cli import finetune_main
from timm_bninit.experiment.train import run_finetune

RESULT_KEYS = ("test_acc_at_best_val", "best_epoch", "best_val_acc", "test_acc_last", "val_acc_last", "num_updates")


@pytest.fixture(scope="module")
def whole(tiny_data, tmp_path_factory):
    """The uninterrupted run every resumed one must end as: ``(config, its run directory, recipe file, cache)``."""
    base = tmp_path_factory.mktemp("whole")
    config = tiny_config(tiny_data, base, epochs=3, norm_layer="rbn", augmentation="rrc", ema=True, ema_decay=0.9)
    recipe = base / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({k: v for k, v in config.to_dict().items() if k != "recipe"}))
    run_finetune(config, base / "run", quiet=True, data_cache_dir=base / "cache")
    return config, base / "run", recipe, base / "cache"


def _assert_same_run(got: Path, expected: Path) -> None:
    final, want = layout.read_final(got), layout.read_final(expected)
    assert {k: final[k] for k in RESULT_KEYS} == {k: want[k] for k in RESULT_KEYS}
    assert [(m["epoch"], m["train_loss"]) for m in layout.read_metrics(got)] == \
        [(m["epoch"], m["train_loss"]) for m in layout.read_metrics(expected)]
    best, want_best = load_file(got / layout.BEST_MODEL_FILE), load_file(expected / layout.BEST_MODEL_FILE)
    assert best.keys() == want_best.keys() and all(torch.equal(best[k], want_best[k]) for k in best)
    assert not any((got / name).exists() for name in ("checkpoint", "checkpoint.previous", "checkpoint.new"))


def _stopped_after_two_epochs(whole, run_dir: Path, stop_after) -> None:
    config, _, _, cache = whole
    stop_after(2)
    with pytest.raises(StoppedRun):
        run_finetune(config, run_dir, quiet=True, data_cache_dir=cache)
    stop_after(None)


def test_the_manifest_vouches_for_every_file_and_the_previous_checkpoint_stays(whole, tmp_path, stop_after):
    run_dir = tmp_path / "run"
    _stopped_after_two_epochs(whole, run_dir, stop_after)
    newest = run_dir / "checkpoint"
    manifest = json.loads((newest / "manifest.json").read_text())
    assert (manifest["format"], manifest["epoch"], manifest["num_processes"]) == (1, 2, 1)
    assert set(manifest["files"]) == {path.name for path in newest.iterdir()} - {"manifest.json"}
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "trainer_state.json", "ema.pt",
            "best_model.safetensors"} <= set(manifest["files"])
    for name, entry in manifest["files"].items():
        data = (newest / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    previous = json.loads((run_dir / "checkpoint.previous" / "manifest.json").read_text())
    assert previous["epoch"] == 1 and checkpoint_problem(run_dir / "checkpoint.previous") is None
    assert not (run_dir / "checkpoint.new").exists() and not (run_dir / "run.lock").exists()


def test_checkpoint_problems_are_named(tmp_path):
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    assert checkpoint_problem(folder) == "no manifest.json (written only partly, or damaged)"
    for name, data in (("trainer_state.json", b"{}"), ("random_states_0.pkl", b"rank 0"),
                       ("random_states_1.pkl", b"rank 1")):
        (folder / name).write_bytes(data)
    checkpoint._write_manifest(folder, epoch=4, num_processes=2)
    assert checkpoint_problem(folder) is None
    (folder / "random_states_1.pkl").write_bytes(b"rank 9")  # same size, other bytes
    assert checkpoint_problem(folder) == "random_states_1.pkl does not match its SHA-256 in manifest.json"
    assert checkpoint_problem(folder, checksums=False) is None
    (folder / "random_states_1.pkl").write_bytes(b"rank")
    assert checkpoint_problem(folder) == "random_states_1.pkl has 4 bytes, its manifest says 6"
    (folder / "random_states_1.pkl").unlink()
    assert checkpoint_problem(folder) == "random_states_1.pkl is missing"
    # a manifest written before every rank had written its random state: it must name them all
    checkpoint._write_manifest(folder, epoch=4, num_processes=2)
    assert checkpoint_problem(folder) == "manifest.json lists no random_states_1.pkl"
    (folder / "manifest.json").write_text('{"format": 1, "files": {}')
    assert checkpoint_problem(folder).startswith("unreadable manifest.json")


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one_and_its_best_weights(whole, tmp_path, stop_after,
                                                                                          capsys):
    config, expected, _, cache = whole
    run_dir = tmp_path / "run"
    _stopped_after_two_epochs(whole, run_dir, stop_after)
    model = run_dir / "checkpoint" / "model.safetensors"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])  # the truncated weights
    # best weights written at epoch 2, which is trained again: a re-run need not reproduce them (another GPU kernel,
    # another order of reduction), and the file must not outlive the epoch that wrote it
    save_file({"written_at_the_discarded_epoch": torch.zeros(1)}, str(run_dir / "best_model.safetensors"))
    kept_best = (run_dir / "checkpoint.previous" / "best_model.safetensors").read_bytes()
    capsys.readouterr()

    stop_after(1)  # stop right after the resume has loaded: what did it restore?
    with pytest.raises(StoppedRun):
        run_finetune(config, run_dir, resume=True, quiet=True, data_cache_dir=cache)
    said = capsys.readouterr().out.strip().splitlines()
    assert not model.exists()  # the damaged checkpoint is gone: its epoch is trained again
    assert len(said) == 1 and said[0].startswith(f"{run_dir}: skipped the newer checkpoint (checkpoint: "
                                                 "model.safetensors has ")
    assert said[0].endswith("resuming from checkpoint.previous (epoch 1)"), said
    assert (run_dir / "best_model.safetensors").read_bytes() == kept_best
    assert [m["epoch"] for m in layout.read_metrics(run_dir)] == [1]

    stop_after(None)
    run_finetune(config, run_dir, resume=True, quiet=True, data_cache_dir=cache)
    _assert_same_run(run_dir, expected)


def test_no_intact_checkpoint_is_one_line_and_exit_2(whole, tmp_path, stop_after, capsys):
    _, _, recipe, cache = whole
    run_dir = tmp_path / "run"
    _stopped_after_two_epochs(whole, run_dir, stop_after)
    model = run_dir / "checkpoint" / "model.safetensors"
    size = model.stat().st_size
    model.write_bytes(model.read_bytes()[:100])
    (run_dir / "checkpoint.previous" / "manifest.json").unlink()
    capsys.readouterr()
    assert finetune_main(["--recipe", str(recipe), "--run-dir", str(run_dir), "--resume", "--quiet",
                          "--data-cache-dir", str(cache)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {run_dir} has no intact checkpoint to resume from (checkpoint: model.safetensors has 100 "
                   f"bytes, its manifest says {size}; checkpoint.previous: no manifest.json (written only partly, or "
                   f"damaged)); start the run again in a new run directory"]
    assert (run_dir / "checkpoint").is_dir() and (run_dir / "checkpoint.previous").is_dir()  # nothing deleted


def _full_disk(monkeypatch, module, name: str, call: int, partial: bool) -> None:
    """``module.name`` fails with ENOSPC at its ``call``-th call (after writing half a file when ``partial``)."""
    original, calls = getattr(module, name), []

    def write(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            if partial:  # accelerate's save(obj, path): the file is cut off where the disk filled up
                Path(args[1]).write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, write)


@pytest.mark.parametrize("where", ["optimizer", "manifest"])
def test_a_failed_write_keeps_the_previous_checkpoint_and_is_one_line(whole, tmp_path, monkeypatch, capsys, where):
    import accelerate.checkpointing

    _, expected, recipe, cache = whole
    run_dir = tmp_path / "run"
    if where == "optimizer":  # accelerate writes the model, then the optimizer (its 2nd save call of each epoch)
        _full_disk(monkeypatch, accelerate.checkpointing, "save", call=4, partial=True)
    else:  # after every rank wrote its state, while the main process completes the checkpoint
        _full_disk(monkeypatch, checkpoint, "_write_manifest", call=2, partial=False)
    command = ["--recipe", str(recipe), "--run-dir", str(run_dir), "--quiet", "--data-cache-dir", str(cache)]
    assert finetune_main(command) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: could not write the checkpoint of epoch 2 in {run_dir} (OSError: [Errno 28] No space left "
                   f"on device); its checkpoint of epoch 1 is intact: free space or fix the disk, then resume with "
                   f"--resume --run-dir {run_dir} (a sweep: run it again with --retry-failed)"]
    assert checkpoint_problem(run_dir / "checkpoint") is None
    assert json.loads((run_dir / "checkpoint" / "manifest.json").read_text())["epoch"] == 1
    assert not (run_dir / "checkpoint.new").exists() and not (run_dir / "run.lock").exists()
    monkeypatch.undo()
    assert finetune_main([*command, "--resume"]) == 0
    _assert_same_run(run_dir, expected)
