"""One run: fine-tune (or train from scratch) a model with a BN variant into one run directory.

Reads like timm's ``train.py``: :func:`train_one_epoch` and :func:`validate` are the loop, :func:`run_finetune` wires
them: build data, model, optimizer and scheduler; ``accelerator.prepare`` once; train; evaluate with
``gather_for_metrics``; save. What the run directory holds is :mod:`timm_bninit.experiment.layout`'s.
"""

from __future__ import annotations

import inspect
import itertools
import math
import os
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import accelerate
import datasets
import timm
import torch
from accelerate.utils import is_compiled_module
from safetensors.torch import save_file
from timm.optim import create_optimizer_v2, get_optimizer_info
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..convert import recalibrate_bn_stats
from ..data import DeviceNormalize, get_dataset, load_image_dataset, resolve_source
from ..errors import BNInitError
from ..gammas import bn_gammas
from ..optim import param_group_fn
from ..sync import convert_sync_batchnorm
from . import layout
from .analysis import (
    GAMMA_THRESHOLDS,
    clamped_gammas,
    effective_initial_scale,
    freeze_all_but_norm,
    gamma_change,
    gamma_statistics,
)
from .checkpoint import load_checkpoint, raise_if_any_failed, remove_checkpoint, save_best_model, save_checkpoint
from .distributed import average_bn_statistics, make_accelerator
from .layout import RunError
from .loaders import Loaders, build_loaders, build_pipelines, eval_data_config
from .lock import hold_run_dir
from .model import build_model
from .protocol import train_per_class_subset
from .recipe import KEYS, Recipe, apply_overrides, check_config, load_recipe, recipe_from_mapping
from .seeding import seed_for
from .stopping import RunDiverged, RunInterrupted, StepChecks, StopRequest, stop_on_signals

__all__ = ["RunError", "Run", "Training", "Evaluation", "build_training", "build_optimizer", "build_scheduler",
           "run_finetune", "train_one_epoch", "validate", "evaluate", "gamma_values"]

LOG_INTERVAL = 50  # training steps between the progress bar's loss updates (timm's train.py --log-interval default)


@dataclass
class Run:
    """What one run trains: the prepared objects and the loaders."""

    config: Recipe
    accelerator: Any
    model: nn.Module
    optimizer: Any
    scheduler: Any
    loaders: Loaders
    train_loader: Any
    eval_loaders: dict[str, Any]
    ema: Any
    criterion: nn.Module
    data_info: Any
    initial_scale: float | None
    normalize: DeviceNormalize  # the workers' uint8 batches -> the model's float input, on the device
    compiled_evaluated: nn.Module | None = None  # ``evaluated`` through torch.compile, with the recipe's ``compile``

    @property
    def unwrapped(self) -> nn.Module:
        # the module itself, without the compiled wrapper (whose state-dict keys carry ``_orig_mod.``; accelerate's
        # unwrap_model keeps or strips that wrapper depending on its version) or DDP's
        return self.accelerator.unwrap_model(getattr(self.model, "_orig_mod", self.model))

    @property
    def evaluated(self) -> nn.Module:
        """The weights that are evaluated and saved: the EMA when the recipe asks for one."""
        return self.ema.module if self.ema is not None else self.unwrapped

    @property
    def evaluator(self) -> nn.Module:
        """What evaluates ``evaluated``: the same module, compiled when the recipe compiles."""
        return self.compiled_evaluated if self.compiled_evaluated is not None else self.evaluated


def build_optimizer(config: Recipe, model: nn.Module) -> Any:
    """timm's optimizer over the method's parameter groups (γ at lr / c, no decay on γ, β, biases).

    With ``fused_optimizer``, torch's own optimizers (timm's ``sgd``, ``momentum``, ``adam``, ``adamw``, ...) get
    their fused kernel, which updates every tensor in one pass instead of timm's default per-tensor loop on a CPU: the
    same update, half the time of that loop for a resnet18 here (benchmarks/README.md).
    """
    fused = config.fused_optimizer and "fused" in inspect.signature(
        get_optimizer_info(config.optimizer).opt_class).parameters
    return create_optimizer_v2(model, config.optimizer, lr=config.lr, weight_decay=config.weight_decay,
                               momentum=config.momentum,
                               param_group_fn=param_group_fn(config.weight_decay,
                                                             gamma_lr_div=config.gamma_lr_div),
                               **({"fused": True} if fused else {}))


def laid_out(config: Recipe, model: nn.Module) -> nn.Module:
    """``model`` in the memory layout the run trains it in: NHWC weights with ``channels_last`` (every activation
    after the stem follows), else as built."""
    return model.to(memory_format=torch.channels_last) if config.channels_last else model


def build_scheduler(config: Recipe, optimizer: Any, updates_per_epoch: int) -> Any:
    """timm's scheduler; it stays outside ``accelerator.prepare`` and steps per update from the run's own counter."""
    scheduler, _ = create_scheduler_v2(optimizer, config.sched, num_epochs=config.epochs,
                                       warmup_epochs=config.warmup_epochs, warmup_lr=config.warmup_lr,
                                       min_lr=config.min_lr, step_on_epochs=config.step_on_epochs,
                                       updates_per_epoch=updates_per_epoch, decay_rate=config.decay_rate,
                                       **({"decay_milestones": tuple(config.decay_milestones)}
                                          if config.decay_milestones else {}))
    return scheduler


@dataclass
class Training:
    """What a run starts with, before any data is seen: inspect it to check a recipe against a paper."""

    config: Recipe
    model: nn.Module
    optimizer: Any
    scheduler: Any
    updates_per_epoch: int


def build_training(recipe: str | os.PathLike | Recipe | Mapping[str, Any] = "demo", *, num_classes: int | None = None,
                   train_size: int | None = None, **overrides: Any) -> Training:
    """The model, optimizer and scheduler a run of ``recipe`` would start with, before any training step.

    The same functions build them as in a run (``build_model``, ``build_optimizer``, ``build_scheduler``), from the
    same resolved config (``protocol: official`` pins included, see ``training.config``), on the CPU and outside
    accelerate. No data are loaded when both sizes are given, or when the data set's registry entry declares them
    (its hub copy or builtin set, every class: ``build_training("cifar10")``); a local folder, ``classes`` or
    ``train_per_class`` is read to count what the run will train on. Use it to check a recipe against a paper: the
    optimizer's groups (``name``, ``lr``, ``weight_decay``, ``momentum``, ``nesterov``), the scheduler's learning
    rate per epoch (``scheduler.step(epoch)``) or per update (``scheduler.step_update(n)``), the model's init.

    Example::

        training = timm_bninit.build_training("cifar10", seed=3)  # 10 classes, 45,000 images: no data needed
        print(training.optimizer, [m.weight[0].item() for m in training.model.modules()
                                   if isinstance(m, torch.nn.BatchNorm2d)])

    Args:
        recipe: A recipe name, a .yaml path, a :class:`Recipe`, or a mapping of recipe keys to values.
        num_classes: Classes of the classifier; None: from the registry entry or the data set (``classes`` if the
            recipe sets it).
        train_size: Training images after the validation split, ``train_per_class`` and ``classes`` (sets updates per
            epoch, which the run's loader drops the last partial batch of); None: from the registry entry or the
            data set.
        **overrides: Recipe keys, as ``--set`` would give them (``lr=0.1``).

    Returns:
        A :class:`Training`: ``config``, ``model``, ``optimizer``, ``scheduler``, ``updates_per_epoch``.
    """
    if isinstance(recipe, Recipe):
        config = recipe
    elif isinstance(recipe, Mapping):
        config = recipe_from_mapping(recipe)
    else:
        config = load_recipe(recipe)
    config = apply_overrides(config, [f"{key}={_as_text(value)}" for key, value in overrides.items()])
    check_config(config)
    if config.classes:
        num_classes = len(config.classes)
    declared = _declared_sizes(config) if num_classes is None or train_size is None else None
    if declared is not None:
        num_classes, train_size = num_classes or declared[0], train_size or declared[1]
    if num_classes is None or train_size is None:
        data, info = _load_data(config, None)
        num_classes = num_classes or info.num_classes
        kept = set(config.classes or [])  # the run trains on the kept classes only
        train_size = train_size or sum(not kept or label in kept for label in data["train"]["label"])
    model = build_model(config, num_classes)
    optimizer = build_optimizer(config, model)
    updates = max(1, math.ceil(train_size // config.batch_size / config.grad_accum_steps))
    return Training(config, model, optimizer, build_scheduler(config, optimizer, updates), updates)


def _declared_sizes(config: dict[str, Any]) -> tuple[int, int] | None:
    """``(classes, training images)`` a run of ``config`` sees, from the data set's registry entry alone.

    None when only the data can tell: a ``classes`` or ``train_per_class`` subset, a local folder (whatever it holds;
    the local readers do not check the official sizes, and ``skip_corrupt`` may leave images out), or an entry that
    declares no sizes (``imagefolder``).
    """
    if config.classes or config.train_per_class is not None:
        return None
    kind, folder = resolve_source(config.dataset, config.data_dir)
    spec = get_dataset(kind)
    train_size = spec.train_size(config.val_fraction)
    if folder is not None or spec.num_classes is None or train_size is None:
        return None
    return spec.num_classes, train_size


def _as_text(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _load_data(config: Recipe, data_cache_dir: str | os.PathLike | None) -> tuple[Any, Any]:
    data, info = load_image_dataset(config.dataset, data_dir=config.data_dir, cache_dir=data_cache_dir,
                                    val_fraction=config.val_fraction, split_seed=config.split_seed,
                                    skip_corrupt=config.skip_corrupt, hub_revision=config.hub_revision)
    if config.train_per_class is not None:
        data["train"] = train_per_class_subset(data["train"], config.train_per_class, config.split_seed)
    if config.classes and not all(0 <= c < info.num_classes for c in config.classes):
        raise RunError(f"classes {config.classes} are not all class indices of {config.dataset} "
                       f"(0..{info.num_classes - 1})")
    return data, info


def start_workers(*loaders: Any) -> None:
    """Fork the persistent DataLoader workers of the evaluation and calibration ``loaders`` now, before any step.

    Such a loader is first iterated at the end of epoch 1. Its workers, forked then, copied a process that already
    held the gradients, the optimizer's buffers and the activations' heap: 222 MiB PSS each instead of ~127 MiB,
    and every page the next step wrote was copied once more for the parent (benchmarks/README.md). The training
    loader is not started here: its workers fork at the first batch, before any gradient exists in a fresh run,
    and starting it now would compute batches its first epoch then discards. Only processes start early: each
    evaluation re-reads its (fixed-order) sampler, so the few batches the workers prefetch now are dropped and no
    number changes.
    """
    for loader in loaders:
        base = getattr(loader, "base_dataloader", loader)  # accelerate's DataLoaderShard iterates the loader it wraps
        if base.persistent_workers:  # (a DataLoader refuses persistent workers without workers)
            iter(base)


def build_run(config: Recipe, accelerator: Any, data_cache_dir: str | os.PathLike | None) -> Run:
    """Data, model, optimizer and scheduler of a run, prepared once by accelerate."""
    # the data-set cache is built once; the other ranks then load it. A data error is raised after the ranks met, so
    # every rank fails alike in one line instead of the others crashing at a barrier the first never reached
    failure, data, data_info = None, None, None
    with accelerator.main_process_first():
        try:
            data, data_info = _load_data(config, data_cache_dir)
        except BNInitError as error:
            failure = error
    if failure is not None:
        raise failure
    model = build_model(config, len(config.classes) if config.classes else data_info.num_classes)
    if config.sync_bn and accelerator.num_processes > 1:
        model = convert_sync_batchnorm(model)  # every variant keeps its class; batch statistics over all ranks
    model = laid_out(config, model)
    initial_scale = effective_initial_scale(model)
    if config.bn_only:
        freeze_all_but_norm(model, train_classifier=config.train_classifier)
    train_pipeline, eval_pipeline = build_pipelines(config, model)
    loaders = build_loaders(config, data, train_pipeline, eval_pipeline)
    # workers hand over uint8; the device converts and normalises (both pipelines share build_transforms' mean/std)
    normalize = DeviceNormalize(train_pipeline.mean, train_pipeline.std, accelerator.device, config.channels_last)
    optimizer = build_optimizer(config, model)
    # batch_size is the global batch (split over the processes): updates per epoch do not depend on their number
    updates_per_epoch = math.ceil(len(loaders.train) / config.grad_accum_steps)
    scheduler = build_scheduler(config, optimizer, updates_per_epoch)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, loaders.train)
    if config.compile and not is_compiled_module(model):  # (`accelerate launch --dynamo_backend` compiles it itself)
        # after prepare, as accelerate's dynamo plugin does (DDP's buckets split the graph; accelerate's checkpoints
        # hold the module given to prepare, so their keys stay plain), but with the recipe's mode rather than the
        # launcher's environment
        model = torch.compile(model, mode=config.compile_mode)
    eval_loaders = {name: accelerator.prepare(loader) for name, loader in
                    (("validation", loaders.validation), ("test", loaders.test)) if loader is not None}
    start_workers(*eval_loaders.values(), *([loaders.calibration] if config.precise_bn_batches else []))
    ema = ModelEmaV3(accelerator.unwrap_model(getattr(model, "_orig_mod", model)), decay=config.ema_decay) \
        if config.ema else None
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    run = Run(config, accelerator, model, optimizer, scheduler, loaders, train_loader, eval_loaders, ema, criterion,
              data_info, initial_scale, normalize)
    if config.compile:  # as timm's --torchcompile: evaluation through its own compiled module (the EMA's, or the
        # model's without DDP); BN recalibration and the saved weights use the module itself
        run.compiled_evaluated = torch.compile(run.evaluated, mode=config.compile_mode)
    return run


def train_one_epoch(run: Run, epoch: int, state: dict[str, Any], show: bool,
                    checks: StepChecks | None = None) -> dict[str, Any]:
    """One pass over the training data; returns the epoch's loss, learning rates and throughput.

    Nothing in the loop waits for the device: the loss is summed there and read every ``LOG_INTERVAL`` steps for the
    progress bar (when shown) and once at the end, and ``checks`` reads its copy of the losses every few steps, so the
    host keeps queueing steps ahead of a GPU.

    Raises:
        RunDiverged: A training loss was not finite (``checks`` reads the losses every few steps, on every rank).
        RunInterrupted: A signal asked the run to stop (``checks`` follows the run's stop request).
    """
    config, accelerator, model = run.config, run.accelerator, run.model
    checks = checks or StepChecks(accelerator)
    checks.start_epoch(epoch)
    # accelerate's loader re-sets its sampler's epoch to its own pass counter (0 after a resume): tell it too
    run.train_loader.set_epoch(epoch)
    run.loaders.train_sampler.set_epoch(epoch)
    run.loaders.train_dataset.epoch = epoch
    model.train()
    torch.manual_seed(seed_for(config.seed, "train-noise", epoch))  # dropout / drop-path draws
    group_names = [g.get("name", str(i)) for i, g in enumerate(run.optimizer.param_groups)]
    loss_sum = torch.zeros((), dtype=_sum_dtype(accelerator.device), device=accelerator.device)
    seen, started = 0, time.time()
    bar = tqdm(run.train_loader, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not show, leave=False)
    for step, (images, labels) in enumerate(bar, 1):
        with accelerator.accumulate(model):
            loss = run.criterion(model(run.normalize(images)), labels)
            accelerator.backward(loss)
            run.optimizer.step()
            run.optimizer.zero_grad()
        if accelerator.sync_gradients:
            state["num_updates"] += 1
            run.scheduler.step_update(num_updates=state["num_updates"])
            if run.ema is not None:
                run.ema.update(run.unwrapped, step=state["num_updates"])
        loss_sum += loss.detach().to(loss_sum.dtype) * labels.shape[0]
        seen += labels.shape[0]
        if show and step % LOG_INTERVAL == 0:
            bar.set_postfix(loss=f"{float(loss_sum) / seen:.4f}")
        checks.after_step(loss)  # a copy on the device; read every few steps, where a divergence or a stop is raised
    checks.read()  # the epoch's last steps, before its evaluation and checkpoint
    lrs = {name: group["lr"] for name, group in zip(group_names, run.optimizer.param_groups)}  # as last used
    if config.step_on_epochs:
        run.scheduler.step(epoch + 1)
    # the epoch's one read, which also waits for its last step before the clock stops
    loss = float(accelerator.reduce((loss_sum / max(seen, 1)).float(), "mean"))
    seconds = time.time() - started
    images = seen * accelerator.num_processes
    state["train_seconds"] += seconds
    state["train_images"] += images
    return {"train_loss": loss, "lrs": lrs, "images_per_s": images / max(seconds, 1e-9), "epoch_seconds": seconds}


def _sum_dtype(device: torch.device) -> torch.dtype:
    """The loss sums' dtype: float64, the Python float's the training loss was summed in before, so every reported
    loss is unchanged to the bit (and a sum of thousands of float32 losses keeps its digits); float32 on Apple's MPS,
    which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


@dataclass(frozen=True)
class Evaluation:
    """One pass of a model over an evaluation split, gathered over processes.

    Attributes:
        accuracy: top-1 accuracy in %.
        loss: mean plain cross-entropy (no label smoothing, whatever the recipe trains with) over the split's images.
    """

    accuracy: float
    loss: float


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, accelerator: Any,
             normalize: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Evaluation:
    """Top-1 accuracy (%) and mean cross-entropy of ``model`` on ``loader``, gathered over processes.

    The counts and the loss sum stay on the device and are read once at the end, so no batch waits for the host.
    ``normalize`` (a :class:`~timm_bninit.data.DeviceNormalize`) turns the loader's uint8 batches into the model's
    input; None: the loader's batches already are.
    """
    model.eval()
    device = accelerator.device
    correct = torch.zeros((), dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=_sum_dtype(device), device=device)
    total = 0
    for images, labels in loader:
        logits = model(images if normalize is None else normalize(images))
        losses = F.cross_entropy(logits.float(), labels, reduction="none")
        # gathered with the predictions, so the samples that pad the last batch across processes leave both alike
        predictions, losses, labels = accelerator.gather_for_metrics((logits.argmax(dim=-1), losses, labels))
        correct += (predictions == labels).sum()
        loss_sum += losses.sum(dtype=loss_sum.dtype)
        total += labels.numel()
    correct_count, loss_total = torch.stack((correct.to(loss_sum.dtype), loss_sum)).tolist()
    return Evaluation(100.0 * int(correct_count) / max(total, 1), loss_total / max(total, 1))


def validate(run: Run) -> dict[str, Evaluation]:
    """Accuracy and loss on validation (when there is a split) and test, after re-estimating BN statistics if asked."""
    # the ranks' running statistics differ (each saw its share of the batches): average them first, so evaluation,
    # recalibration and every save use one set whatever the process count
    average_bn_statistics(run.accelerator, run.unwrapped, None if run.ema is None else run.ema.module)
    if run.config.precise_bn_batches:
        count = run.config.precise_bn_batches
        batches = (run.normalize(images) for images, _ in itertools.islice(run.loaders.calibration, count))
        recalibrate_bn_stats(run.evaluated, batches, max_batches=count)
    return {name: evaluate(run.evaluator, loader, run.accelerator, run.normalize)
            for name, loader in run.eval_loaders.items()}


def _start_or_resume(run: Run, run_dir: Path, resume: bool, show: bool) -> dict[str, Any]:
    state = {"epoch": 0, "num_updates": 0, "best_val": -1.0, "best_epoch": None, "test_at_best": None,
             "last_val": None, "last_test": None, "train_seconds": 0.0, "train_images": 0}
    accelerator = run.accelerator
    if resume and load_checkpoint(accelerator, run_dir, state, run.scheduler, run.ema):
        if show:
            print(f"resuming {run_dir} after epoch {state['epoch']}")
    elif accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        layout.write_config(run_dir, run.config)
        layout.write_initial_gammas(run_dir, gamma_values(run.unwrapped))
        report = getattr(run.unwrapped, "bninit_load_report", None)
        if report is not None:
            layout.write_json(run_dir / layout.LOAD_REPORT_FILE, report.to_dict())
    if accelerator.is_main_process:
        layout.truncate_metrics(run_dir, state["epoch"])  # lines a kill left after the last checkpoint
        # what the saved weights need to be used again (timm_bninit.load_run, export): the labels of the classifier's
        # outputs (a `classes` subset relabelled in its order) and the evaluation's preprocessing
        names = run.data_info.class_names
        layout.write_model_info(run_dir, [names[c] for c in run.config.classes] if run.config.classes else names,
                                eval_data_config(run.config, run.unwrapped))
    accelerator.wait_for_everyone()
    return state


def _record_epoch(run: Run, run_dir: Path, epoch: int, state: dict[str, Any], stats: dict[str, Any],
                  evaluations: dict[str, Evaluation], show: bool) -> None:
    """Select on validation, write the epoch's metrics line and the checkpoint."""
    main = run.accelerator.is_main_process
    accuracy = {name: result.accuracy for name, result in evaluations.items()}
    loss = {name: result.loss for name, result in evaluations.items()}
    val = accuracy.get("validation", accuracy["test"])  # no validation split: select on test, said in final
    best = val > state["best_val"]
    if best:
        state.update(best_val=val, best_epoch=epoch + 1, test_at_best=accuracy["test"])
    lrs = stats["lrs"]
    record = {"epoch": epoch + 1, "train_loss": stats["train_loss"], "val_acc": accuracy.get("validation"),
              "test_acc": accuracy["test"], "val_loss": loss.get("validation"), "test_loss": loss["test"],
              "lr": lrs.get("decay"), "lr_gamma": lrs.get("bn_gamma"), "lrs": lrs,
              "images_per_s": stats["images_per_s"], "epoch_seconds": stats["epoch_seconds"]}
    state.update(epoch=epoch + 1, last_val=accuracy.get("validation"), last_test=accuracy["test"])
    failure = None
    if main:
        try:
            if best:
                save_best_model(run_dir, run.evaluated.state_dict())
            layout.append_metrics(run_dir, record)  # the source of truth; trackers get a copy
        except Exception as error:  # a full disk comes in several types (checkpoint._attempt); every rank must learn
            failure = error
    raise_if_any_failed(run.accelerator, failure, f"the results of epoch {epoch + 1}", run_dir, epoch)
    if run.config.log_with:
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("epoch", "lrs")}
        scalars.update({f"lr/{name}": lr for name, lr in lrs.items()}, **gamma_statistics(run.evaluated))
        run.accelerator.log(scalars, step=epoch + 1)
    save_checkpoint(run.accelerator, run_dir, state, run.scheduler, run.ema)
    if show:
        val_text = "n/a" if "validation" not in accuracy else f"{accuracy['validation']:.2f}"
        print(f"epoch {epoch + 1}: loss {stats['train_loss']:.4f}  val {val_text}  "
              f"test {accuracy['test']:.2f}  {stats['images_per_s']:.1f} img/s")


def save_evaluated(run: Run, path: Path) -> None:
    """The evaluated model's state dict as a plain (contiguous, CPU) safetensors file, as timm writes one."""
    save_file({k: v.contiguous().cpu() for k, v in run.evaluated.state_dict().items()}, str(path))


def _environment(accelerator: Any, config: Recipe) -> dict[str, Any]:
    return {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "accelerate": accelerate.__version__, "datasets": datasets.__version__, "platform": platform.platform(),
            "device": str(accelerator.device), "num_processes": accelerator.num_processes,
            "mixed_precision": accelerator.mixed_precision, "cpu_threads": torch.get_num_threads(),
            "global_batch": config.batch_size,
            "per_process_batch": config.batch_size // accelerator.num_processes}


def _gamma_clamp(run: Run, state: dict[str, Any]) -> list[dict[str, float]]:
    """docs/methods.md §5: how much test accuracy survives setting the small γ to 0, per threshold."""
    clamp = []
    # the clamped sets grow with the threshold: an unchanged set is the model already evaluated (none clamped: the
    # last epoch's test accuracy, on the same weights and statistics), so only a new set costs a test pass
    known = {0.0: state["last_test"]}
    for threshold in GAMMA_THRESHOLDS:
        with clamped_gammas(run.evaluated, threshold) as fraction:
            if fraction not in known:
                known[fraction] = evaluate(run.evaluator, run.eval_loaders["test"], run.accelerator,
                                           run.normalize).accuracy
            clamp.append({"threshold": threshold, "fraction": fraction, "test_acc": known[fraction]})
    return clamp


def _diverged_accuracies(run: Run, state: dict[str, Any],
                         divergence: RunDiverged) -> tuple[dict[str, Any], dict[str, Any]]:
    """A diverged run's accuracies, by docs/guide/comparisons.md's rule: chance level, 100/k % for k classes (what a
    network whose outputs are NaN scores on a balanced test set), at every endpoint; and where it diverged, with what
    its finished epochs had measured (kept for the reader, never entered in a comparison)."""
    chance = 100.0 / (len(run.config.classes) if run.config.classes else run.data_info.num_classes)
    before = None if state["best_epoch"] is None else {
        "best_epoch": state["best_epoch"], "best_val_acc": state["best_val"],
        "test_acc_at_best_val": state["test_at_best"], "test_acc_last": state["last_test"]}
    accuracies = {"test_acc_at_best_val": chance, "best_epoch": None, "best_val_acc": chance, "test_acc_last": chance,
                  "val_acc_last": chance if run.loaders.validation else None}
    return accuracies, {"epoch": divergence.epoch, "step": divergence.step, "loss": str(divergence.loss),
                        "chance_acc": chance, "epochs_completed": state["epoch"], "before": before}


def _final_result(run: Run, state: dict[str, Any], started: float, initial_gammas: dict[str, list[float]] | None,
                  divergence: RunDiverged | None = None) -> dict[str, Any]:
    """``final.json``: the selected and last accuracies (a diverged run's by the rule of
    :func:`_diverged_accuracies`), the γ analyses, throughput and environment.

    ``initial_gammas`` (the run's ``initial_gammas.json``) gives ``gamma_change``; None (a run started before they
    were recorded) or a diverged run gives None.
    """
    config = run.config
    if divergence is None:
        accuracies, record, clamp = {
            "test_acc_at_best_val": state["test_at_best"], "best_epoch": state["best_epoch"],
            "best_val_acc": state["best_val"], "test_acc_last": state["last_test"],
            "val_acc_last": state["last_val"]}, None, _gamma_clamp(run, state)
    else:  # its γ are not a trained network's: no clamping analysis
        (accuracies, record), clamp = _diverged_accuracies(run, state, divergence), []
    return {
        **accuracies, "status": "finished" if divergence is None else "diverged", "divergence": record,
        "selection": "validation" if run.loaders.validation else "test",
        "epochs": config.epochs, "seed": config.seed, "method": {
            "norm_layer": config.norm_layer, "bn_transfer": config.bn_transfer,
            "gamma_lr_div": config.gamma_lr_div, "bn_only": config.bn_only,
            "pretrained": bool(config.pretrained or config.pretrained_file)},
        "initial_effective_scale": run.initial_scale, "gamma_clamp": clamp,
        "gamma_change": None if initial_gammas is None or divergence is not None else
        gamma_change(initial_gammas, gamma_values(run.unwrapped)),
        "train_images_per_s": state["train_images"] / max(state["train_seconds"], 1e-9),
        "train_seconds": state["train_seconds"], "wall_seconds_this_session": time.time() - started,
        "num_updates": state["num_updates"],
        "data": {k: v for k, v in run.data_info.to_dict().items() if k != "class_names"},
        "environment": _environment(run.accelerator, config),
    }


def gamma_values(model: nn.Module) -> dict[str, list[float]]:
    """Every BN γ of the model, by module name (``initial_gammas.json`` at the start, ``final_gammas.json`` at the
    end)."""
    return {name: gamma.detach().float().cpu().tolist() for name, _, gamma in bn_gammas(model)}


def _check_recorded_config(config: Recipe, run_dir: Path) -> None:
    """A resumed run goes on under the recipe it started with (its ``config.yaml``, read back through the recipe's
    checks; a key added since takes its default); another recipe is refused, never mixed into one run. Only the keys
    declared ``changes_result=False`` (workers, preloading, trackers) may differ: the run then uses the new value."""
    recorded = layout.read_config(run_dir)
    if recorded is None:
        return
    recorded = recipe_from_mapping(recorded, f"in {run_dir / layout.CONFIG_FILE}")
    changed = [name for name, spec in KEYS.items()
               if spec.changes_result and getattr(recorded, name) != getattr(config, name)]
    if changed:
        shown = "; ".join(f"{name}: {_as_text(getattr(recorded, name))} there, {_as_text(getattr(config, name))} now"
                          for name in changed)
        free = ", ".join(name for name, spec in KEYS.items() if not spec.changes_result)
        raise RunError(f"{run_dir} was started with another recipe ({shown}); resume it with the recipe and overrides "
                       f"its {layout.CONFIG_FILE} records (only {free} may differ), or start a new run directory")


def run_finetune(config: Recipe, run_dir: str | os.PathLike, *, resume: bool = False, quiet: bool = False,
                 data_cache_dir: str | os.PathLike | None = None, wait: bool = False) -> dict[str, Any]:
    """Train one configuration into ``run_dir`` and return the contents of its ``final.json``.

    The run holds ``run_dir``'s lock (:mod:`.lock`) from before it reads anything there until it returns: a second
    process on the same run directory is refused, or waits with ``wait``, and then finds the run finished or goes on
    from its checkpoint. A run whose training loss stops being finite ends there: its ``final.json`` says ``status:
    diverged`` and where (``divergence``), with its accuracies at chance level (docs/guide/comparisons.md). SIGTERM
    and SIGINT stop the run at a step boundary (:func:`.stopping.stop_on_signals`, for the duration of the run) with
    :class:`.stopping.RunInterrupted`; its last checkpoint stays as it was, for ``resume``.

    Args:
        config: A resolved recipe (:func:`timm_bninit.experiment.recipe.load_recipe` plus overrides).
        run_dir: The run directory.
        resume: Continue from the run directory's checkpoint (a finished run is returned as it is, never re-run), with
            the recipe its ``config.yaml`` records.
        quiet: No progress bars (sweeps).
        data_cache_dir: Cache for built data sets (default: ``$TIMM_BNINIT_DATA_CACHE`` or ~/.cache).
        wait: Wait while another process trains ``run_dir`` instead of raising :class:`.lock.RunDirBusyError`.
    """
    check_config(config)
    run_dir = Path(run_dir)
    with stop_on_signals() as stop:  # before the loaders' workers fork, so that they inherit the handlers
        accelerator = make_accelerator(config, log_with=config.log_with, project_dir=run_dir)
        with hold_run_dir(accelerator, run_dir, wait=wait, show=accelerator.is_main_process and not quiet):
            if resume:  # a finished run too: its result is its own recipe's
                _check_recorded_config(config, run_dir)
            finished = layout.check_new_run_dir(run_dir, resume)  # under the lock: no other process can finish it now
            if finished is not None:
                return finished
            return _run(config, accelerator, run_dir, resume, quiet, data_cache_dir, stop)


def _run(config: Recipe, accelerator: Any, run_dir: Path, resume: bool, quiet: bool,
         data_cache_dir: str | os.PathLike | None, stop: StopRequest) -> dict[str, Any]:
    """Start or resume the run in ``run_dir`` (whose lock this process holds) and train it to its end, while ``stop``
    follows SIGTERM and SIGINT."""
    show = accelerator.is_main_process and not quiet
    run = build_run(config, accelerator, data_cache_dir)
    state = _start_or_resume(run, run_dir, resume, show)
    if config.log_with:  # TensorBoard: <run_dir>/tracking/
        accelerator.init_trackers("tracking", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                      for k, v in config.to_dict().items()})
    started = time.time()
    divergence = _train(run, run_dir, state, StepChecks(accelerator, stop), show)
    if divergence is None and accelerator.is_main_process:
        # the last epoch's evaluated weights (a resume restores them from the checkpoint); a diverged run's are NaN
        save_evaluated(run, run_dir / layout.LAST_MODEL_FILE)
    final = _final_result(run, state, started, layout.read_initial_gammas(run_dir), divergence)
    if accelerator.is_main_process:
        if divergence is None:  # a diverged network's γ are no result
            layout.write_json(run_dir / layout.GAMMAS_FILE, gamma_values(run.unwrapped))
        layout.write_final(run_dir, final)
        remove_checkpoint(run_dir)  # a diverged run is finished too: a retry starts it again
    if config.log_with:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return final


def _train(run: Run, run_dir: Path, state: dict[str, Any], checks: StepChecks, show: bool) -> RunDiverged | None:
    """Train, evaluate and checkpoint every remaining epoch; returns the divergence that ended them early, if one did.

    Raises:
        RunInterrupted: A signal asked the run to stop; it names the run directory and its last checkpoint.
    """
    try:
        for epoch in range(state["epoch"], run.config.epochs):
            stats = train_one_epoch(run, epoch, state, show, checks)
            _record_epoch(run, run_dir, epoch, state, stats, validate(run), show)
            if epoch + 1 < run.config.epochs:
                checks.after_epoch()  # a signal during evaluation or the checkpoint stops here, not 8 steps on
    except RunDiverged as divergence:
        return divergence
    except RunInterrupted as stop:
        stop.run_dir, stop.checkpoint_epoch = run_dir, state["epoch"]
        raise
    return None
