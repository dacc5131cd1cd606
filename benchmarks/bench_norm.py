"""Forward+backward time of the timm-bninit norm layers relative to ``nn.BatchNorm2d`` (a script, not a test).

Shapes are the activations of ResNet-50's four stages at 224 px, (B, 256, 56, 56) … (B, 2048, 7, 7), in training
mode (batch statistics, running-statistics update) and float32, in both memory formats: NCHW (contiguous) and NHWC
(``channels_last``, what the recipes train in). The layers are the registered variants (``list_norm_layers()``), one
per kind of layer: names that differ only in a number of their initialisation or blend (``bn_gamma001`` …
``bn_gamma1``, ``bn_blend01`` … ``bn_blend09``) run the same code, so the one with the class's default stands for
them (``--variants all`` times every name). Every candidate is timed side by side with ``nn.BatchNorm2d`` in the
same memory format in the same run: each round times every candidate once, in a freshly shuffled order, and a
candidate's ratio is the median over rounds of (its time / BN's time in that round), so machine noise hits all of
them alike. A second ``nn.BatchNorm2d`` instance is timed as a control: its ratio shows the noise floor, and the
γ-init variants (which run BN's own kernel) should sit within it.

Time is the calling thread's CPU time when torch runs one thread (time the scheduler gives other processes is not
counted: the machines this runs on are shared), wall time otherwise. Before timing, the script tells glibc's
allocator to keep the memory it frees in the process (``mallopt``: no mmap'd blocks, no trimming), as a GPU's
caching allocator does: by default glibc hands a freed 25-51 MB activation back to the OS, and the next step's
output or input gradient is fresh memory that faults in page by page (≈ 2 µs per 4 KiB page here; 25,000 faults and
about 53 ms of kernel time in every 81 ms BN step at the 56×56 stage, as many for every layer; HISTORY.md, "Less
Python per step"), and at 28×28 it faulted in some steps and not others, depending on what ran before, not on the
candidate. ``--system-allocator`` times with glibc's defaults (where ``mallopt`` is missing, e.g. not glibc, the
script says so and frees one 30 MiB block first instead, which keeps the smaller stages' buffers in the heap).

RBN and IEBN are also compared with a straightforward implementation of the same formulas, written below the way the
official code does it but out of place (calibrate x → ``F.batch_norm`` without affine → GAP → sigmoid → multiply).
Before timing, the script asserts that each optimised layer and its straightforward twin agree on the benchmarked
input in each memory format (output, input gradient, every parameter gradient, running statistics), with the same
non-default parameters.

``--compiled`` times something else: one training step (forward, backward, SGD update) of a small conv net whose
every norm layer is BN, RBN, IEBN or blended-σ BN, eager and ``torch.compile``-d, paired and shuffled the same way;
it reports each step time, the compiled / eager ratio and the compile time (the first compiled step).

Example::

    python benchmarks/bench_norm.py --threads 1    # B = 16, 40 rounds, both memory formats, one layer per kind
    python benchmarks/bench_norm.py --threads 1 --formats channels_last --variants rbn,iebn
    python benchmarks/bench_norm.py --quick        # smoke run: B = 4, 5 rounds
    python benchmarks/bench_norm.py --compiled     # compiled vs eager training step, inductor
    python benchmarks/bench_norm.py --imports my_variants --norm-layer scaled_bn   # also time a layer of your own

``--norm-layer NAME`` (repeatable) adds any registered norm layer to either table, timed and judged like the others;
``--imports MODULE`` imports a module of your own first, so that a layer it registers can be named.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import functools
import importlib
import inspect
import math
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import timm_bninit as tb

# (channels, height = width) of ResNet-50's stage outputs at 224 px
RESNET50_STAGES = ((256, 56), (512, 28), (1024, 14), (2048, 7))


# ---- straightforward implementations of the formulas (docs/methods.md §2, §3), for comparison ----------


class _Straightforward(nn.BatchNorm2d):
    def _batch_norm_without_affine(self, x: torch.Tensor) -> torch.Tensor:
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        return F.batch_norm(x, self.running_mean, self.running_var, None, None,
                            self.training or not self.track_running_stats, factor, self.eps)


class StraightforwardRBN(_Straightforward):
    """RBN as the official code computes it, with the centering calibration out of place."""

    def __init__(self, num_features: int, identity_init: bool = False, **kwargs):
        super().__init__(num_features, **kwargs)
        self.identity_init = identity_init
        self.centering_weight = nn.Parameter(torch.zeros(num_features))
        self.scaling_weight = nn.Parameter(torch.zeros(num_features))
        self.scaling_bias = nn.Parameter(torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.centering_weight.view(1, -1, 1, 1) * F.adaptive_avg_pool2d(x, 1)
        out = self._batch_norm_without_affine(x)
        scale = torch.sigmoid(self.scaling_weight.view(1, -1, 1, 1) * F.adaptive_avg_pool2d(out, 1)
                              + self.scaling_bias.view(1, -1, 1, 1))
        if self.identity_init:
            scale = scale / _sigmoid(1.0)
        return self.weight.view(1, -1, 1, 1) * out * scale + self.bias.view(1, -1, 1, 1)


class StraightforwardIEBN(_Straightforward):
    """IEBN as the official code computes it."""

    def __init__(self, num_features: int, identity_init: bool = False, **kwargs):
        super().__init__(num_features, **kwargs)
        self.identity_init = identity_init
        self.instance_weight = nn.Parameter(torch.zeros(num_features))
        self.instance_bias = nn.Parameter(torch.full((num_features,), -1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attention = torch.sigmoid(F.adaptive_avg_pool2d(x, 1) * self.instance_weight.view(1, -1, 1, 1)
                                  + self.instance_bias.view(1, -1, 1, 1))
        if self.identity_init:
            attention = attention / _sigmoid(-1.0)
        out = self._batch_norm_without_affine(x)
        return out * (self.weight.view(1, -1, 1, 1) * attention) + self.bias.view(1, -1, 1, 1)


def _sigmoid(value: float) -> float:
    return 1.0 / (1.0 + math.exp(-value))


# ---- candidates ---------------------------------------------------------------------------------------------------

FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
BASELINE, CONTROL = "nn.BatchNorm2d", "nn.BatchNorm2d (control)"
# issue 20: forward+backward ≤ 1.0× nn.BatchNorm2d in the same memory format (geometric mean over the four stages),
# no single stage above 1.2×
TARGET_GEOMEAN, TARGET_STAGE = 1.0, 1.2
# variants that execute nn.BatchNorm2d.forward itself (the γ-init ones) can only be judged to within the noise floor
NOISE_FLOOR = 1.02
# straightforward twin of the plain (default-argument) RBN and IEBN, timed beside them
TWINS = {tb.RepresentativeBatchNorm2d: ("straightforward RBN", StraightforwardRBN),
         tb.InstanceEnhancementBatchNorm2d: ("straightforward IEBN", StraightforwardIEBN)}


@dataclass(frozen=True)
class Candidate:
    name: str
    build: Callable[[int], nn.Module]
    judged: bool = True  # held to the targets (False: reference rows)
    plain_bn: bool = False  # runs nn.BatchNorm2d.forward: judged against NOISE_FLOOR instead of TARGET_GEOMEAN
    twin: str | None = None  # straightforward implementation it is compared against


def _kind(factory: Callable[..., nn.Module]) -> tuple:
    """What decides a registered layer's run-time code: its class and its keyword arguments other than numbers
    (γ0, α only change values; ``identity_init`` changes the computation)."""
    if isinstance(factory, functools.partial):
        return factory.func, tuple(sorted((k, v) for k, v in factory.keywords.items() if not isinstance(v, float)))
    return factory, ()


def _has_default_numbers(factory: Callable[..., nn.Module]) -> bool:
    """Whether a registered factory's numeric keyword arguments are its class's defaults (bn_gamma01: γ0 = 0.1)."""
    if not isinstance(factory, functools.partial):
        return True
    defaults = inspect.signature(factory.func).parameters
    return all(k in defaults and defaults[k].default == v for k, v in factory.keywords.items() if isinstance(v, float))


def select_variants(selection: str) -> list[str]:
    """Registered names to time: ``kinds`` (one per kind, the one with the class's default numbers when there is
    one), ``all``, or a comma-separated list."""
    if selection == "all":
        return tb.list_norm_layers()
    if selection != "kinds":
        names = [name.strip() for name in selection.split(",") if name.strip()]
        for name in names:
            tb.get_norm_layer(name)  # an unknown name stops here with the registry's one-line message
        return names
    kinds: dict[tuple, list[str]] = {}
    for name in tb.list_norm_layers():
        kinds.setdefault(_kind(tb.get_norm_layer(name)), []).append(name)
    return [next((n for n in group if _has_default_numbers(tb.get_norm_layer(n))), group[0])
            for group in kinds.values()]


def build_candidates(variants: list[str]) -> list[Candidate]:
    """BN, its control, the variants, and the straightforward twins of the plain RBN and IEBN among them."""
    candidates = [Candidate(BASELINE, nn.BatchNorm2d, judged=False), Candidate(CONTROL, nn.BatchNorm2d, judged=False)]
    twins = []
    for name in variants:
        factory = tb.get_norm_layer(name)
        twin = TWINS.get(factory)
        plain_bn = type(factory(8)).forward is nn.BatchNorm2d.forward
        candidates.append(Candidate(name, factory, plain_bn=plain_bn, twin=twin[0] if twin else None))
        twins += [twin] if twin else []
    return candidates + [Candidate(twin_name, twin_type, judged=False) for twin_name, twin_type in twins]


# optimised layer -> straightforward twin checked for agreement (timed ones and the identity_init versions)
AGREEMENT_PAIRS = (
    (tb.RepresentativeBatchNorm2d, StraightforwardRBN, False),
    (tb.RepresentativeBatchNorm2d, StraightforwardRBN, True),
    (tb.InstanceEnhancementBatchNorm2d, StraightforwardIEBN, False),
    (tb.InstanceEnhancementBatchNorm2d, StraightforwardIEBN, True),
)
AGREEMENT_TOL = 1e-4  # max |difference| / max |reference| in float32; the float64 formulas are checked in tests/


def randomize_parameters(module: nn.Module, seed: int) -> None:
    """Non-default values for every parameter so that every calibration term matters (same seed → same values)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(module.named_parameters()):
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(1.0 + 0.2 * noise if name == "weight" else 0.5 * noise)


def make_activation(shape: tuple[int, ...], seed: int, memory_format: torch.memory_format) -> torch.Tensor:
    """A float32 activation whose per-(sample, channel) means and scales differ, as a conv output's do."""
    gen = torch.Generator().manual_seed(seed)
    n, c = shape[:2]
    offset = torch.randn(n, c, 1, 1, generator=gen)
    scale = 0.5 + torch.rand(n, c, 1, 1, generator=gen)
    return (offset + scale * torch.randn(shape, generator=gen)).to(memory_format=memory_format).requires_grad_()


def make_grad(shape: tuple[int, ...], seed: int, memory_format: torch.memory_format) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1)).to(memory_format=memory_format)


def forward_backward(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, clock: Callable[[], float]) -> float:
    x.grad = None
    module.zero_grad(set_to_none=True)
    start = clock()
    module(x).backward(grad)
    return clock() - start


def settle_allocator(keep_freed_memory: bool) -> str:
    """Make the timed steps reuse memory instead of page-faulting fresh memory in (see the module docstring); returns
    what was done, for the header.

    With ``keep_freed_memory`` and glibc: no allocation is served by its own mmap and the heap is never trimmed, so
    after the warm-up rounds every buffer comes from memory the process already holds. Otherwise one freed 30 MiB
    block raises glibc's mmap threshold, as in any process that has freed a large tensor: allocations below it (every
    activation here but the 51 MB one at 56×56) then come from the heap, which glibc may still trim."""
    if keep_freed_memory:
        try:
            mallopt = ctypes.CDLL(None).mallopt
        except (OSError, AttributeError):
            mallopt = None
        m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
        if mallopt is not None and mallopt(m_mmap_max, 0) == 1 and mallopt(m_trim_threshold, 2**31 - 1) == 1:
            return "allocator: freed memory kept in the process (glibc mallopt: no mmap'd blocks, no trimming)"
    block = torch.empty(30 << 20, dtype=torch.uint8)
    del block
    return ("allocator: system defaults" if not keep_freed_memory
            else "allocator: mallopt unavailable, system defaults") + " after one freed 30 MiB block"


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def check_agreement(x: torch.Tensor, grad: torch.Tensor, seed: int) -> float:
    """Assert each optimised layer equals its straightforward twin on ``x``; return the worst relative error."""
    worst = 0.0
    for layer_type, twin_type, identity_init in AGREEMENT_PAIRS:
        layer = layer_type(x.shape[1], identity_init=identity_init).train()
        twin = twin_type(x.shape[1], identity_init=identity_init).train()
        randomize_parameters(layer, seed)
        randomize_parameters(twin, seed)
        assert dict(layer.named_parameters()).keys() == dict(twin.named_parameters()).keys()
        results = []
        for module in (layer, twin):
            x.grad = None
            y = module(x)
            y.backward(grad)
            results.append({"output": y.detach(), "input grad": x.grad.clone(),
                            **{f"{n} grad": p.grad for n, p in module.named_parameters()},
                            "running_mean": module.running_mean, "running_var": module.running_var})
            x.grad = None
        for key, want in results[1].items():
            error = relative_error(results[0][key], want)
            assert error <= AGREEMENT_TOL, (f"{layer_type.__name__}(identity_init={identity_init}) disagrees with "
                                            f"{twin_type.__name__} on {key} at shape {tuple(x.shape)}: "
                                            f"relative error {error:.2e} > {AGREEMENT_TOL:g}")
            worst = max(worst, error)
    return worst


def time_shape(shape: tuple[int, ...], memory_format: torch.memory_format, candidates: list[Candidate],
               args: argparse.Namespace) -> dict[str, list[float]]:
    """Per candidate, its forward+backward times (s), one per round; every round times every candidate once."""
    x = make_activation(shape, args.seed, memory_format)
    grad = make_grad(shape, args.seed, memory_format)
    modules = {}
    for cand in candidates:
        module = cand.build(shape[1]).train()
        randomize_parameters(module, args.seed)
        modules[cand.name] = module
    order = list(modules)
    shuffle = random.Random(args.seed)
    times: dict[str, list[float]] = {name: [] for name in modules}
    for round_index in range(args.warmup + args.repeats):
        shuffle.shuffle(order)
        for name in order:
            elapsed = forward_backward(modules[name], x, grad, args.clock_fn)
            if round_index >= args.warmup:
                times[name].append(elapsed)
    return times


def paired_ratio(times: dict[str, list[float]], name: str, reference: str) -> float:
    """Median over rounds of ``name``'s time / ``reference``'s time in the same round."""
    return statistics.median(t / r for t, r in zip(times[name], times[reference]))


def best_ratio(times: dict[str, list[float]], name: str, reference: str) -> float:
    """``name``'s fastest round / ``reference``'s fastest round: what is left when other processes only ever add
    time (a cross-check of the median on a busy machine)."""
    return min(times[name]) / min(times[reference])


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


# ---- compiled vs eager training step ------------------------------------------------------------------------------

COMPILED_LAYERS: dict[str, Callable[[int], nn.Module]] = {
    "BatchNorm2d": nn.BatchNorm2d,
    "RepresentativeBatchNorm2d": tb.RepresentativeBatchNorm2d,
    "InstanceEnhancementBatchNorm2d": tb.InstanceEnhancementBatchNorm2d,
    "BlendedStdBatchNorm2d": tb.BlendedStdBatchNorm2d,
}
# (channels, stride) of the net's conv → norm → ReLU stages: three resolutions, as a small ResNet's stages
SMALL_NET_STAGES = ((32, 1), (32, 1), (64, 2), (64, 1), (128, 2), (128, 1))


def small_net(norm: Callable[[int], nn.Module], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    channels = 3
    for width, stride in SMALL_NET_STAGES:
        layers += [nn.Conv2d(channels, width, 3, stride, 1, bias=False), norm(width), nn.ReLU(inplace=True)]
        channels = width
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10)).train()
    randomize_parameters(net, seed)
    return net


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                  target: torch.Tensor) -> tuple[float, torch.Tensor]:
    """One SGD step: its wall time (s) and the loss."""
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), target)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start, loss.detach()


def time_compiled(args: argparse.Namespace, layers: dict[str, Callable[[int], nn.Module]] = COMPILED_LAYERS) -> None:
    """Eager vs compiled training step of :func:`small_net` for each of ``layers`` (``BatchNorm2d`` among them)."""
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=gen)
    target = torch.randint(0, 10, (args.batch,), generator=gen)
    steps, compile_seconds = {}, {}
    for name, norm in layers.items():
        eager = small_net(norm, args.seed)
        compiled_net = copy.deepcopy(eager)
        compiled = torch.compile(compiled_net, backend=args.backend)
        optimizers = {"eager": torch.optim.SGD(eager.parameters(), lr=0.01, momentum=0.9),
                      "compiled": torch.optim.SGD(compiled_net.parameters(), lr=0.01, momentum=0.9)}
        _, eager_loss = training_step(eager, optimizers["eager"], x, target)
        compile_seconds[name], compiled_loss = training_step(compiled, optimizers["compiled"], x, target)
        error = relative_error(compiled_loss, eager_loss)
        assert error <= AGREEMENT_TOL, f"{name}: compiled first-step loss differs from eager by {error:.1e}"
        print(f"  {name}: compiled in {compile_seconds[name]:.0f} s; first-step loss compiled == eager "
              f"(relative error {error:.1e})", flush=True)
        steps[(name, "eager")] = (eager, optimizers["eager"])
        steps[(name, "compiled")] = (compiled, optimizers["compiled"])
    order = list(steps)
    shuffle = random.Random(args.seed)
    times: dict[tuple[str, str], list[float]] = {key: [] for key in steps}
    for round_index in range(args.warmup + args.repeats):
        shuffle.shuffle(order)
        for key in order:
            elapsed, _ = training_step(*steps[key], x, target)
            if round_index >= args.warmup:
                times[key].append(elapsed)
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}\n")
    width = max(len(name) for name in layers) + 2
    line = (f"{'training step, ' + args.backend:<{width}}{'eager ms':>10}{'compiled ms':>13}{'compiled/eager':>16}"
            f"{'(best)':>8}{'eager/BN eager':>16}{'compiled/BN compiled':>22}{'compile s':>11}")
    print(line)
    print("-" * len(line))
    for name in layers:
        eager_t, compiled_t = times[(name, "eager")], times[(name, "compiled")]
        ratio = statistics.median(c / e for c, e in zip(compiled_t, eager_t))
        best = min(compiled_t) / min(eager_t)
        vs_bn_eager = statistics.median(e / b for e, b in zip(eager_t, times[("BatchNorm2d", "eager")]))
        vs_bn_compiled = statistics.median(c / b for c, b in zip(compiled_t, times[("BatchNorm2d", "compiled")]))
        print(f"{name:<{width}}{statistics.median(eager_t) * 1e3:>10.1f}{statistics.median(compiled_t) * 1e3:>13.1f}"
              f"{ratio:>16.3f}{best:>8.3f}{vs_bn_eager:>16.3f}{vs_bn_compiled:>22.3f}{compile_seconds[name]:>11.0f}")
    print("\nRatios are medians over rounds of paired (same-round) ratios; (best) is fastest compiled round / fastest"
          " eager round.")


# ---- the layer table -------------------------------------------------------------------------------------------


def time_format(memory_format: torch.memory_format, shapes: list[tuple[int, ...]], candidates: list[Candidate],
                args: argparse.Namespace) -> dict[tuple[int, ...], dict[str, list[float]]]:
    """Agreement check, then the timed rounds, at every shape in one memory format."""
    results = {}
    for shape in shapes:
        x = make_activation(shape, args.seed, memory_format)
        worst = check_agreement(x, make_grad(shape, args.seed, memory_format), args.seed)
        print(f"  {tuple(shape)}: optimised RBN/IEBN (incl. identity_init) == straightforward, "
              f"max relative error {worst:.1e}", flush=True)
        start = time.perf_counter()
        results[shape] = time_shape(shape, memory_format, candidates, args)
        print(f"  {tuple(shape)}: timed in {time.perf_counter() - start:.0f} s", flush=True)
    return results


def verdict(cand: Candidate, ratios: list[float]) -> tuple[bool, str]:
    """Whether a judged candidate met the targets, and the table's words for it."""
    limit = NOISE_FLOOR if cand.plain_bn else TARGET_GEOMEAN
    overall, worst = geometric_mean(ratios), max(ratios)
    met = overall <= limit and worst <= TARGET_STAGE
    words = f"≤ {limit:.2f} (stage ≤ {TARGET_STAGE:.1f}): {'met' if met else 'MISSED'}"
    return met, words + (f" (stage at {worst:.2f})" if worst > TARGET_STAGE else "")


def print_format_table(format_name: str, results: dict, candidates: list[Candidate]) -> dict[str, tuple]:
    """The ratio table of one memory format; returns {variant: (geomean, worst stage, met)} of the judged rows."""
    shapes = list(results)
    headers = [f"{c}x{h}x{w}" for _, c, h, w in shapes]
    width = max(len(c.name) for c in candidates) + 2
    line = (f"{'time / nn.BatchNorm2d, ' + format_name:<{width}}" + "".join(f"{h:>12}" for h in headers)
            + f"{'geomean':>9}{'(best)':>8}{'worst':>7}  target")
    print(line)
    print("-" * len(line))
    print(f"{'nn.BatchNorm2d (ms)':<{width}}"
          + "".join(f"{statistics.median(results[s][BASELINE]) * 1e3:>12.2f}" for s in shapes))
    summary = {}
    for cand in candidates[1:]:
        ratios = [paired_ratio(results[s], cand.name, BASELINE) for s in shapes]
        best = geometric_mean([best_ratio(results[s], cand.name, BASELINE) for s in shapes])
        met, words = verdict(cand, ratios) if cand.judged else (None, "")
        if cand.judged:
            summary[cand.name] = (geometric_mean(ratios), max(ratios), met)
        print(f"{cand.name:<{width}}" + "".join(f"{r:>12.3f}" for r in ratios)
              + f"{geometric_mean(ratios):>9.3f}{best:>8.3f}{max(ratios):>7.2f}  {words}")
    twins = [c for c in candidates if c.twin is not None]
    if twins:
        print()
        line = f"{'optimised / straightforward':<{width}}" + "".join(f"{h:>12}" for h in headers) + f"{'geomean':>9}"
        print(line)
        print("-" * len(line))
        for cand in twins:
            ratios = [paired_ratio(results[s], cand.name, cand.twin) for s in shapes]
            print(f"{cand.name:<{width}}" + "".join(f"{r:>12.3f}" for r in ratios) + f"{geometric_mean(ratios):>9.3f}")
    print()
    return summary


def print_targets(summaries: dict[str, dict[str, tuple]]) -> None:
    print(f"Targets (issue 20): forward+backward ≤ {TARGET_GEOMEAN:.1f}× nn.BatchNorm2d in the same memory format, "
          f"geometric mean over the stages, no stage above {TARGET_STAGE:.1f}×; variants that run BN's own forward "
          f"within the {NOISE_FLOOR - 1:.0%} noise floor (the control row shows it)")
    for name in next(iter(summaries.values())):
        parts = [f"{fmt} {s[name][0]:.3f}× (worst stage {s[name][1]:.2f}×) {'met' if s[name][2] else 'MISSED'}"
                 for fmt, s in summaries.items()]
        print(f"  {name}: " + "; ".join(parts))
    print("Ratios are medians over rounds of paired (same-round) ratios; (best) is the geometric mean of"
          " fastest-round ratios.")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16, help="batch size B of every shape (default 16)")
    parser.add_argument("--repeats", type=int, default=40, help="timed rounds per shape (default 40)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds per shape first (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--formats", default=",".join(FORMATS),
                        help=f"memory formats to time, comma-separated (default: {','.join(FORMATS)})")
    parser.add_argument("--variants", default="kinds",
                        help="registered layers to time: 'kinds' (one per kind, default), 'all', or names (rbn,iebn)")
    parser.add_argument("--clock", choices=("auto", "thread", "wall"), default="auto",
                        help="thread CPU time or wall time; auto: thread time with one torch thread, else wall")
    parser.add_argument("--system-allocator", action="store_true",
                        help="time with glibc's default allocator settings (freed activations go back to the OS and "
                             "fault in again)")
    parser.add_argument("--quick", action="store_true", help="smoke run: B = 4, 5 rounds, 1 warm-up round")
    parser.add_argument("--compiled", action="store_true",
                        help="instead: time a training step of a small conv net, eager vs torch.compile")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend of --compiled (default inductor)")
    parser.add_argument("--image-size", type=int, default=32, help="input size of --compiled (default 32)")
    parser.add_argument("--norm-layer", action="append", default=[], metavar="NAME",
                        help="also time this registered norm layer (repeatable), e.g. one of your own")
    parser.add_argument("--imports", action="append", default=[], metavar="MODULE",
                        help="import this module first (repeatable): one that registers the layers --norm-layer names")
    args = parser.parse_args()
    unknown = sorted(set(args.formats.split(",")) - set(FORMATS))
    if unknown:
        parser.error(f"unknown memory format(s) {', '.join(unknown)}; known: {', '.join(FORMATS)}")
    for module in args.imports:
        try:
            importlib.import_module(module)
        except ImportError as error:
            parser.error(f"--imports {module}: {error}; is it on PYTHONPATH?")
    try:
        args.registered = {name: tb.get_norm_layer(name) for name in args.norm_layer}
    except tb.UnknownNormLayerError as error:
        parser.error(f"--norm-layer: {error}")
    if args.quick:
        args.batch, args.repeats, args.warmup = 4, 5, 1
    return args


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    threads = torch.get_num_threads()
    if args.compiled:
        print(f"CPU: {cpu_model()} ({os.cpu_count()} logical cores); torch {torch.__version__}, {threads} "
              f"thread{'s' if threads != 1 else ''}; float32; small conv net {SMALL_NET_STAGES}, "
              f"B = {args.batch}, {args.image_size} px; {args.repeats} timed rounds (+{args.warmup} warm-up), "
              f"shuffled; load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
        time_compiled(args, {**COMPILED_LAYERS, **args.registered})
        return

    clock = args.clock if args.clock != "auto" else ("thread" if threads == 1 else "wall")
    args.clock_fn = time.thread_time if clock == "thread" else time.perf_counter
    try:
        # once each: a --norm-layer whose class is a kind of its own is in the default selection already
        candidates = build_candidates(list(dict.fromkeys(select_variants(args.variants) + args.norm_layer)))
    except tb.BNInitError as error:
        raise SystemExit(f"bench_norm.py: {error}") from None
    shapes = [(args.batch, c, hw, hw) for c, hw in RESNET50_STAGES]
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical cores); torch {torch.__version__}, "
          f"{threads} thread{'s' if threads != 1 else ''}; float32, training mode, forward+backward; "
          f"{clock} time")
    print(f"B = {args.batch}; {args.repeats} timed rounds (+{args.warmup} warm-up) per shape and memory format, "
          f"shuffled order; load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(settle_allocator(not args.system_allocator))
    print(f"variants: {', '.join(c.name for c in candidates if c.judged)}", flush=True)
    results = {}
    for format_name in args.formats.split(","):
        print(f"{format_name}:", flush=True)
        results[format_name] = time_format(FORMATS[format_name], shapes, candidates, args)
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}\n")
    summaries = {name: print_format_table(name, times, candidates) for name, times in results.items()}
    print_targets(summaries)


if __name__ == "__main__":
    main()
