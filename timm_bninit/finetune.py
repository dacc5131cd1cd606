"""Fine-tuning (or training from scratch) with a BN variant: one run, one run directory.

Reads top to bottom like accelerate's examples: build data, model, optimizer and scheduler; ``accelerator.prepare``
once; train; evaluate with ``gather_for_metrics``; save. The run directory holds everything needed to understand and
resume the run:

* ``config.yaml``: the resolved recipe;
* ``metrics.jsonl``: one line per epoch (train loss, val/test accuracy, learning rates of the base and γ groups,
  images/s);
* ``final.json``: test accuracy at the best-validation epoch and at the last epoch, wall time, throughput,
  environment;
* ``best_model.safetensors``: the weights of the best-validation epoch; ``final_gammas.json``: every BN γ at the end;
* ``checkpoint/``: the state after the last finished epoch, from which ``--resume`` continues.

Seeds are split into independent streams, so two runs with the same seed that differ only in the method see the same
shared-weight initialisation, the same data order and the same augmentation draws (the pairing a paired t-test needs).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import platform
import random
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from .recipe import RecipeError

__all__ = ["RunError", "seed_for", "rng_scope", "run_finetune", "default_run_dir", "FINAL_FILE"]

_logger = logging.getLogger(__name__)

FINAL_FILE = "final.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "trainer_state.json"


class RunError(RuntimeError):
    """A run that cannot start or continue; the message says what to do."""


# ---------------------------------------------------------------------------------------------------------------
# Seed streams


def seed_for(seed: int, stream: str, *parts: int) -> int:
    """A seed for one named random stream of a run, independent of every other stream.

    Derived by hashing, so adding a stream (or a method consuming more random numbers in one) never shifts another.
    """
    text = ":".join([str(seed), stream, *map(str, parts)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


@contextlib.contextmanager
def rng_scope(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator, ``random`` and numpy for the block, then restore their previous states."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        # the CPU generator only, as fork_rng(devices=[]) restores: torch.manual_seed would also queue a lazy CUDA
        # seeding (recording a stack trace, ~0.5 ms per sample) and leak that seed out of the block
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


_DECODED: dict[str, list[Any]] = {}  # per process: decoded images of a split, shared by the runs of a sweep worker


def decoded_images(rows: Any) -> list[Any]:
    """Every image of a ``datasets`` split decoded once (RGB), memoised per process by the split's fingerprint."""
    key = getattr(rows, "_fingerprint", None) or str(id(rows))
    if key not in _DECODED:
        _DECODED[key] = [image.convert("RGB") for image in rows["image"]]
    return _DECODED[key]


def transformed_samples(rows: Any, transform: Any) -> list[Any]:
    """Every image of a split through a deterministic transform, once per process (memoised like the decoding)."""
    key = f"{getattr(rows, '_fingerprint', None) or id(rows)}|{transform!r}"
    if key not in _DECODED:
        _DECODED[key] = [transform(image) for image in decoded_images(rows)]
    return _DECODED[key]


class SeededImageDataset(Dataset):
    """A ``datasets`` split whose transform of sample ``i`` in epoch ``e`` draws from the stream (seed, e, i).

    Augmentation is then a pure function of the run seed, the epoch and the index: the same for every method, the
    same with any number of workers, and the same after a resume. ``classes`` keeps a subset of the classes,
    relabelled 0..k-1 in the given order; ``preload`` decodes every image once instead of on every access, and
    without a seed (a transform that draws nothing) also transforms it once.
    """

    def __init__(self, rows: Any, transform: Any, seed: int | None, classes: list[int] | None = None,
                 preload: bool = False):
        self.rows, self.transform, self.seed, self.epoch = rows, transform, seed, 0
        labels = rows["label"]
        if classes is None:
            self.indices, self.labels = list(range(len(labels))), list(labels)
        else:
            relabel = {original: new for new, original in enumerate(classes)}
            self.indices = [i for i, label in enumerate(labels) if label in relabel]
            self.labels = [relabel[labels[i]] for i in self.indices]
        self.images = decoded_images(rows) if preload else None
        self.prepared = transformed_samples(rows, transform) if preload and seed is None else None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        row = self.indices[index]
        if self.prepared is not None:
            return self.prepared[row], self.labels[index]
        image = self.images[row] if self.images is not None else self.rows[row]["image"].convert("RGB")
        if self.seed is None:
            return self.transform(image), self.labels[index]
        with rng_scope(seed_for(self.seed, "augment", self.epoch, index)):
            return self.transform(image), self.labels[index]


class EpochShuffleSampler(Sampler[int]):
    """A random order per epoch drawn from the stream (seed, epoch): identical across methods and after resume."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(seed_for(self.seed, "data-order", self.epoch))
        return iter(torch.randperm(self.size, generator=generator).tolist())


# ---------------------------------------------------------------------------------------------------------------
# Building blocks


def default_run_dir(config: dict[str, Any], output_dir: str | os.PathLike = "runs") -> Path:
    method = config["norm_layer"] or "bn"
    if config["pretrained"] or config["pretrained_file"]:
        method += f"-{config['bn_transfer']}"
    if config["gamma_lr_div"] is not None:
        method += f"-div{config['gamma_lr_div']:g}"
    return Path(output_dir) / str(config["recipe"]) / f"{method}-lr{config['lr']:g}-s{config['seed']}"


def check_config(config: dict[str, Any]) -> None:
    """Refuse, before any work, what cannot run: unknown model, norm layer or policy; bad numbers."""
    import timm

    from .convert import check_bn_transfer
    from .registry import resolve_norm_layer

    if not timm.is_model(config["model"]):
        import difflib

        close = difflib.get_close_matches(config["model"], timm.list_models(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise RecipeError(f"unknown timm model {config['model']!r}.{hint} See timm.list_models().")
    if config["norm_layer"] is not None:
        norm = resolve_norm_layer(config["norm_layer"])[0]
    if config["gamma_init"] is not None:
        from .norm import BatchNormGamma2d

        base = getattr(norm, "func", norm) if config["norm_layer"] is not None else None
        if not (isinstance(base, type) and issubclass(base, BatchNormGamma2d)):
            raise RecipeError(f"gamma_init sets γ0 of a bn_gamma* layer, but norm_layer is {config['norm_layer']!r}; "
                              f"use e.g. norm_layer=bn_gamma1 gamma_init=0.731")
    if config["classes"] is not None and (not isinstance(config["classes"], list) or len(config["classes"]) < 2
                                          or len(set(config["classes"])) != len(config["classes"])):
        raise RecipeError(f"classes must be a list of at least 2 distinct class indices, got {config['classes']!r}")
    check_bn_transfer(config["bn_transfer"])
    for key in ("epochs", "batch_size", "grad_accum_steps", "img_size"):
        if config[key] < 1:
            raise RecipeError(f"{key} must be ≥ 1, got {config[key]}")
    if not 0 <= config["val_fraction"] < 1:
        raise RecipeError(f"val_fraction must be in [0, 1), got {config['val_fraction']}")
    if config["augmentation"] not in ("rrc", "flip", "none"):
        raise RecipeError(f"augmentation must be rrc, flip or none, got {config['augmentation']!r}")
    if config["pretrained_file"] is not None and not Path(config["pretrained_file"]).is_file():
        raise RecipeError(f"pretrained_file {config['pretrained_file']!r} does not exist; pass the path of a "
                          f".safetensors/.pth/.bin weights file")
    if config["mixed_precision"] not in ("no", "fp16", "bf16"):
        raise RecipeError(f"mixed_precision must be no, fp16 or bf16, got {config['mixed_precision']!r}")


def build_model(config: dict[str, Any], num_classes: int) -> nn.Module:
    """The model with its variant, pretrained weights and a shared-weight initialisation drawn from the run seed.

    Every tensor that is not part of a norm layer is initialised from a plain-BN model built under the seed's
    ``init`` stream, so two methods with the same seed start from identical convolution and classifier weights
    whatever random numbers their own layers consume (``bn_uniform`` draws γ).
    """
    import timm

    from .convert import BNTransferWarning
    from .factory import create_model
    from .registry import get_norm_layer

    kwargs = {"num_classes": num_classes, "drop_rate": config["drop_rate"]}
    if config["drop_path_rate"]:
        kwargs["drop_path_rate"] = config["drop_path_rate"]
    if config["zero_init_last"]:
        kwargs["zero_init_last"] = True
    with rng_scope(seed_for(config["seed"], "init")):
        reference = timm.create_model(config["model"], **kwargs)
    pretrained = False if config["pretrained_file"] else config["pretrained"]
    norm_layer = config["norm_layer"]
    if config["gamma_init"] is not None:
        norm_layer = functools.partial(get_norm_layer(norm_layer), gamma_init=config["gamma_init"])
    with rng_scope(seed_for(config["seed"], "init-method")), warnings.catch_warnings():
        if config["precise_bn_batches"]:  # the run re-estimates BN statistics before every evaluation
            warnings.simplefilter("ignore", BNTransferWarning)
        model = create_model(config["model"], norm_layer, pretrained=pretrained,
                             pretrained_file=config["pretrained_file"], bn_transfer=config["bn_transfer"], **kwargs)
    if config["norm_layer"] is None and not (pretrained or config["pretrained_file"] or config["zero_init_last"]):
        # BASE is the same network with γ0 = 1 on every BN: undo timm ResNets' zeroed last-BN γ (REFERENCE §9)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.weight is not None:
                    module.weight.fill_(1.0)
    if config["cifar_stem"]:
        reference = cifar_stem(reference, seed_for(config["seed"], "init-stem"))
        model = cifar_stem(model, seed_for(config["seed"], "init-stem"))
    report = getattr(model, "bninit_load_report", None)
    # with pretrained weights only what they did not provide (the new classifier) comes from the shared init
    _copy_shared_weights(reference, model, only=None if report is None else set(report.initialised))
    return model


def cifar_stem(model: nn.Module, seed: int) -> nn.Module:
    """Replace a ResNet's 7×7 stride-2 stem and max-pool by a 3×3 stride-1 convolution (CIFAR ResNets)."""
    if not (hasattr(model, "conv1") and hasattr(model, "maxpool") and isinstance(model.conv1, nn.Conv2d)):
        raise RecipeError(f"cifar_stem applies to timm ResNets with a single-conv stem; {type(model).__name__} has "
                          f"none (use a resnet* model or cifar_stem=false)")
    old = model.conv1
    with rng_scope(seed):
        model.conv1 = nn.Conv2d(old.in_channels, old.out_channels, 3, 1, 1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_in", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


def _is_norm_tensor(model: nn.Module, key: str) -> bool:
    module_name = key.rpartition(".")[0]
    module = model.get_submodule(module_name) if module_name else model
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


@torch.no_grad()
def _copy_shared_weights(reference: nn.Module, model: nn.Module, only: set[str] | None = None) -> None:
    target = model.state_dict()
    for key, tensor in reference.state_dict().items():
        if only is not None and key not in only:
            continue
        if key in target and target[key].shape == tensor.shape and not _is_norm_tensor(model, key):
            target[key].copy_(tensor)


def build_transforms(config: dict[str, Any], model: nn.Module) -> tuple[Any, Any]:
    """Train and eval transforms from timm (``resolve_model_data_config`` + ``create_transform``)."""
    from timm.data import create_transform, resolve_model_data_config
    from torchvision import transforms as T

    data_config = resolve_model_data_config(model)
    size = config["img_size"]
    eval_transform = create_transform(input_size=(3, size, size), is_training=False, mean=data_config["mean"],
                                      std=data_config["std"], interpolation=data_config["interpolation"],
                                      crop_pct=data_config["crop_pct"] if size >= 128 else 1.0)
    if config["augmentation"] == "rrc":
        train_transform = create_transform(input_size=(3, size, size), is_training=True, mean=data_config["mean"],
                                           std=data_config["std"], interpolation=data_config["interpolation"])
    elif config["augmentation"] == "flip":
        train_transform = T.Compose([T.Resize(size), T.CenterCrop(size), T.RandomHorizontalFlip(),
                                     T.ToTensor(), T.Normalize(data_config["mean"], data_config["std"])])
    else:
        train_transform = eval_transform
    return train_transform, eval_transform


@dataclass
class Loaders:
    train: DataLoader
    validation: DataLoader | None
    test: DataLoader
    calibration: DataLoader
    train_dataset: SeededImageDataset
    train_sampler: EpochShuffleSampler


def build_loaders(config: dict[str, Any], data: Any, train_transform: Any, eval_transform: Any) -> Loaders:
    seed, batch, workers = config["seed"], config["batch_size"], config["num_workers"]
    subset = {"classes": config["classes"], "preload": config["preload"]}
    # without augmentation the transform draws nothing: skip the per-sample random-state scope
    train = SeededImageDataset(data["train"], train_transform, None if config["augmentation"] == "none" else seed,
                               **subset)
    sampler = EpochShuffleSampler(len(train), seed)
    common = {"num_workers": workers, "persistent_workers": False, "pin_memory": torch.cuda.is_available()}
    if len(train) < batch:
        raise RunError(f"the training split has {len(train)} images, fewer than batch_size={batch}; lower "
                       f"batch_size (--set batch_size=...)")
    train_loader = DataLoader(train, batch_size=batch, sampler=sampler, drop_last=True, **common)

    def evaluation(split: str) -> DataLoader:
        return DataLoader(SeededImageDataset(data[split], eval_transform, None, **subset), batch_size=batch,
                          shuffle=False, **common)

    validation = evaluation("validation") if "validation" in data and len(data["validation"]) else None
    # BN recalibration batches: training images with eval transforms, fixed order -> deterministic
    calibration = DataLoader(SeededImageDataset(data["train"], eval_transform, None, **subset), batch_size=batch,
                             shuffle=False, drop_last=True, **common)
    return Loaders(train_loader, validation, evaluation("test"), calibration, train, sampler)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, accelerator: Any) -> float:
    model.eval()
    correct = total = 0
    for images, labels in loader:
        predictions = model(images).argmax(dim=-1)
        predictions, labels = accelerator.gather_for_metrics((predictions, labels))
        correct += int((predictions == labels).sum())
        total += labels.numel()
    return 100.0 * correct / max(total, 1)


def final_gammas(model: nn.Module) -> dict[str, list[float]]:
    return {name: module.weight.detach().float().cpu().tolist() for name, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and isinstance(module.weight, nn.Parameter)}


def environment(accelerator: Any) -> dict[str, Any]:
    import accelerate
    import datasets
    import timm

    return {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "accelerate": accelerate.__version__, "datasets": datasets.__version__, "platform": platform.platform(),
            "device": str(accelerator.device), "num_processes": accelerator.num_processes,
            "mixed_precision": accelerator.mixed_precision, "cpu_threads": torch.get_num_threads()}


def _write_json(path: Path, payload: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# The run


def run_finetune(config: dict[str, Any], run_dir: str | os.PathLike, *, resume: bool = False, quiet: bool = False,
                 data_cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Train one configuration into ``run_dir`` and return the contents of its ``final.json``.

    Args:
        config: a resolved recipe (:func:`timm_bninit.recipe.load_recipe` plus overrides).
        run_dir: the run directory.
        resume: continue from ``run_dir/checkpoint`` (a finished run is returned as it is, never re-run).
        quiet: no progress bars (sweeps).
        data_cache_dir: cache for built data sets (default: ``$TIMM_BNINIT_DATA_CACHE`` or ~/.cache).
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration
    from safetensors.torch import save_file
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3
    from tqdm.auto import tqdm

    from .analysis import CLAMP_THRESHOLDS, clamped_gammas, effective_initial_scale, freeze_all_but_norm
    from .convert import recalibrate_bn_stats
    from .data import load_image_dataset
    from .optim import param_group_fn

    check_config(config)
    run_dir = Path(run_dir)
    final_path, checkpoint = run_dir / FINAL_FILE, run_dir / CHECKPOINT_DIR
    if final_path.is_file():
        if resume:
            return json.loads(final_path.read_text())
        raise RunError(f"{run_dir} holds a finished run ({FINAL_FILE}); it is never overwritten. Choose another "
                       f"run directory, or pass --resume to return its result")
    if run_dir.exists() and any(run_dir.iterdir()) and not resume:
        raise RunError(f"{run_dir} holds an unfinished run; pass --resume to continue it from its last checkpoint, "
                       f"or choose another run directory")
    accelerator = Accelerator(mixed_precision=config["mixed_precision"],
                              gradient_accumulation_steps=config["grad_accum_steps"],
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=False))
    show = accelerator.is_main_process and not quiet

    data, data_info = load_image_dataset(config["dataset"], data_dir=config["data_dir"], cache_dir=data_cache_dir,
                                         val_fraction=config["val_fraction"], split_seed=config["split_seed"],
                                         skip_corrupt=config["skip_corrupt"])
    if config["classes"] and not all(0 <= c < data_info.num_classes for c in config["classes"]):
        raise RunError(f"classes {config['classes']} are not all class indices of {config['dataset']} "
                       f"(0..{data_info.num_classes - 1})")
    model = build_model(config, len(config["classes"]) if config["classes"] else data_info.num_classes)
    initial_scale = effective_initial_scale(model)
    if config["bn_only"]:
        freeze_all_but_norm(model, train_classifier=config["train_classifier"])
    train_transform, eval_transform = build_transforms(config, model)
    loaders = build_loaders(config, data, train_transform, eval_transform)

    optimizer = create_optimizer_v2(model, config["optimizer"], lr=config["lr"], weight_decay=config["weight_decay"],
                                    momentum=config["momentum"],
                                    param_group_fn=param_group_fn(config["weight_decay"],
                                                                  gamma_lr_div=config["gamma_lr_div"]))
    updates_per_epoch = math.ceil(len(loaders.train) / config["grad_accum_steps"] / accelerator.num_processes)
    # timm schedulers stay outside accelerator.prepare: they step per update from our own counter
    scheduler, _ = create_scheduler_v2(optimizer, config["sched"], num_epochs=config["epochs"],
                                       warmup_epochs=config["warmup_epochs"], warmup_lr=config["warmup_lr"],
                                       min_lr=config["min_lr"], step_on_epochs=config["step_on_epochs"],
                                       updates_per_epoch=updates_per_epoch)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, loaders.train)
    eval_loaders = {name: accelerator.prepare(loader) for name, loader in
                    (("validation", loaders.validation), ("test", loaders.test)) if loader is not None}
    ema = ModelEmaV3(accelerator.unwrap_model(model), decay=config["ema_decay"]) if config["ema"] else None
    criterion = nn.CrossEntropyLoss(label_smoothing=config["label_smoothing"])

    state = {"epoch": 0, "num_updates": 0, "best_val": -1.0, "best_epoch": None, "test_at_best": None,
             "last_val": None, "last_test": None, "train_seconds": 0.0, "train_images": 0}
    previous = checkpoint.with_name(CHECKPOINT_DIR + ".old")
    if resume and not checkpoint.exists() and (previous / STATE_FILE).is_file() and accelerator.is_main_process:
        os.replace(previous, checkpoint)  # killed between the two renames of a checkpoint swap
    accelerator.wait_for_everyone()
    if resume and (checkpoint / STATE_FILE).is_file():
        accelerator.load_state(str(checkpoint))
        saved = json.loads((checkpoint / STATE_FILE).read_text())
        state.update(saved["state"])
        scheduler.load_state_dict(saved["scheduler"])
        if ema is not None:
            ema.load_state_dict(torch.load(checkpoint / "ema.pt", map_location=accelerator.device))
        if show:
            print(f"resuming {run_dir} after epoch {state['epoch']}")
    elif accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=True))
        report = getattr(accelerator.unwrap_model(model), "bninit_load_report", None)
        if report is not None:
            _write_json(run_dir / "load_report.json", report.to_dict())
    if accelerator.is_main_process:
        _truncate_metrics(run_dir / METRICS_FILE, state["epoch"])  # lines a kill left after the last checkpoint
    accelerator.wait_for_everyone()

    unwrapped = accelerator.unwrap_model(model)
    evaluated = ema.module if ema is not None else unwrapped
    group_names = [g.get("name", str(i)) for i, g in enumerate(optimizer.param_groups)]
    started = time.time()
    for epoch in range(state["epoch"], config["epochs"]):
        # accelerate's loader re-sets its sampler's epoch to its own pass counter (0 after a resume): tell it too
        train_loader.set_epoch(epoch)
        loaders.train_sampler.set_epoch(epoch)
        loaders.train_dataset.epoch = epoch
        model.train()
        torch.manual_seed(seed_for(config["seed"], "train-noise", epoch))  # dropout / drop-path draws
        loss_sum, seen, epoch_start = 0.0, 0, time.time()
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{config['epochs']}", disable=not show, leave=False)
        for images, labels in bar:
            with accelerator.accumulate(model):
                loss = criterion(model(images), labels)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                state["num_updates"] += 1
                scheduler.step_update(num_updates=state["num_updates"])
                if ema is not None:
                    ema.update(unwrapped, step=state["num_updates"])
            loss_sum += float(loss.detach()) * labels.shape[0]
            seen += labels.shape[0]
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
        lrs = {name: group["lr"] for name, group in zip(group_names, optimizer.param_groups)}  # as last used
        if config["step_on_epochs"]:
            scheduler.step(epoch + 1)
        train_time = time.time() - epoch_start
        seen_all = seen * accelerator.num_processes
        state["train_seconds"] += train_time
        state["train_images"] += seen_all
        train_loss = float(accelerator.reduce(torch.tensor(loss_sum / max(seen, 1), device=accelerator.device),
                                              "mean"))

        if config["precise_bn_batches"]:
            recalibrate_bn_stats(evaluated, loaders.calibration, max_batches=config["precise_bn_batches"])
        accuracy = {name: evaluate(evaluated, loader, accelerator) for name, loader in eval_loaders.items()}
        val = accuracy.get("validation", accuracy["test"])  # no validation split: select on test, said in final
        if val > state["best_val"]:
            state.update(best_val=val, best_epoch=epoch + 1, test_at_best=accuracy["test"])
            if accelerator.is_main_process:
                save_file({k: v.contiguous().cpu() for k, v in evaluated.state_dict().items()},
                          str(run_dir / "best_model.safetensors"))
        record = {"epoch": epoch + 1, "train_loss": train_loss, "val_acc": accuracy.get("validation"),
                  "test_acc": accuracy["test"], "lr": lrs.get("decay"), "lr_gamma": lrs.get("bn_gamma"),
                  "lrs": lrs, "images_per_s": seen_all / max(train_time, 1e-9), "epoch_seconds": train_time}
        state.update(epoch=epoch + 1, last_val=accuracy.get("validation"), last_test=accuracy["test"])
        if accelerator.is_main_process:
            with open(run_dir / METRICS_FILE, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        _save_checkpoint(accelerator, checkpoint, state, scheduler, ema)
        if show:
            val_text = "n/a" if "validation" not in accuracy else f"{accuracy['validation']:.2f}"
            print(f"epoch {epoch + 1}: loss {train_loss:.4f}  val {val_text}  "
                  f"test {accuracy['test']:.2f}  {record['images_per_s']:.1f} img/s")

    # REFERENCE §5: how much of the final network's accuracy survives setting its small γ to 0
    clamp = []
    for threshold in CLAMP_THRESHOLDS:
        with clamped_gammas(evaluated, threshold) as fraction:
            clamp.append({"threshold": threshold, "fraction": fraction,
                          "test_acc": evaluate(evaluated, eval_loaders["test"], accelerator)})
    final = {
        "test_acc_at_best_val": state["test_at_best"], "best_epoch": state["best_epoch"],
        "best_val_acc": state["best_val"], "test_acc_last": state["last_test"], "val_acc_last": state["last_val"],
        "selection": "validation" if loaders.validation else "test",
        "epochs": config["epochs"], "seed": config["seed"], "method": {
            "norm_layer": config["norm_layer"], "bn_transfer": config["bn_transfer"],
            "gamma_lr_div": config["gamma_lr_div"], "bn_only": config["bn_only"],
            "pretrained": bool(config["pretrained"] or config["pretrained_file"])},
        "initial_effective_scale": initial_scale, "gamma_clamp": clamp,
        "train_images_per_s": state["train_images"] / max(state["train_seconds"], 1e-9),
        "train_seconds": state["train_seconds"], "wall_seconds_this_session": time.time() - started,
        "data": {k: v for k, v in data_info.to_dict().items() if k != "class_names"},
        "environment": environment(accelerator),
    }
    if accelerator.is_main_process:
        _write_json(run_dir / "final_gammas.json", final_gammas(unwrapped))
        _write_json(final_path, final)
        shutil.rmtree(checkpoint, ignore_errors=True)  # the run is finished; best_model.safetensors stays
    accelerator.wait_for_everyone()
    return final


def _truncate_metrics(path: Path, epochs: int) -> None:
    """Drop lines a killed run wrote after its last checkpoint."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line)["epoch"] <= epochs]
    path.write_text("".join(line + "\n" for line in kept))


def _save_checkpoint(accelerator: Any, checkpoint: Path, state: dict, scheduler: Any, ema: Any) -> None:
    """Write the checkpoint beside the old one, then swap, so a kill at any moment leaves one whole checkpoint."""
    staging = checkpoint.with_name(CHECKPOINT_DIR + ".new")
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    if accelerator.is_main_process:
        if ema is not None:
            torch.save(ema.state_dict(), staging / "ema.pt")
        _write_json(staging / STATE_FILE, {"state": state, "scheduler": scheduler.state_dict()})
        previous = checkpoint.with_name(CHECKPOINT_DIR + ".old")
        if checkpoint.exists():
            os.replace(checkpoint, previous)
        os.replace(staging, checkpoint)
        shutil.rmtree(previous, ignore_errors=True)
    accelerator.wait_for_everyone()
