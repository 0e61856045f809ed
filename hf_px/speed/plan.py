"""Toward a requested speed-up: choose how many blocks to remove and how wide the FFNs stay, by timing.

Unstructured sparsity barely moves CPU latency with stock kernels; smaller dense matrices always do. For every
candidate shape (k blocks removed, FFN width w) hf_px builds a randomly initialised model of that shape from the
config, times it side by side with the full-size model at the user's batch shapes on this machine, and keeps the
candidate that meets the target at every shape with the fewest blocks removed and then the most block parameters
(narrowing the FFNs costs much less accuracy than removing blocks of the same size). The plan is then applied to the real weights: the PX-lowest-ranked blocks go and
structured PCN narrows every FFN to the chosen width.

Example:
    >>> from hf_px.speed.plan import SpeedConfig
    >>> SpeedConfig(target_speedup=2.0).shapes
    ((1, 32), (1, 128), (32, 64))
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import _finite, short_repr
from ..errors import ConfigError
from ..inference.choose import example_inputs
from .latency import measure_latency

_FRACTIONS = (1.0, 0.75, 0.5, 0.375, 0.25)


@dataclass
class SpeedConfig:
    """What speed to aim for (``hf-px run``'s ``speed`` section, ``--target-speedup``).

    Args:
        target_speedup: wanted latency ratio dense / shrunk at every shape (> 1), measured on this machine.
        shapes: (batch, tokens) pairs to time; the default covers batch-1 latency on short and long inputs and
            batch-32 throughput.
        blocks_removed: a fixed number of blocks to remove instead of planning it (None: planned).
        ffn_fraction: a fixed FFN width, as a fraction of the original, instead of planning it (None: planned).
        runs: interleaved timing rounds per candidate (the median counts).
        confirm_runs: rounds of the second, longer timing that a chosen candidate must pass before it is accepted
            (a few rounds on a busy machine can overstate a speed-up); one that fails is dropped and the next
            tried.
        min_blocks: never keep fewer blocks than this.
    """

    target_speedup: float = 2.0
    shapes: tuple[tuple[int, int], ...] = ((1, 32), (1, 128), (32, 64))
    blocks_removed: int | None = None
    ffn_fraction: float | None = None
    runs: int = 5
    confirm_runs: int = 20
    min_blocks: int = 1

    def __post_init__(self) -> None:
        if not _finite(self.target_speedup) or self.target_speedup <= 1.0:
            raise ConfigError(f"speed.target_speedup must be a number > 1 (e.g. 2 for twice as fast), got "
                              f"{short_repr(self.target_speedup)}.")
        try:
            self.shapes = tuple((int(b), int(t)) for b, t in self.shapes)
        except (TypeError, ValueError):
            raise ConfigError(f"speed.shapes must be [batch, tokens] pairs, e.g. [[1, 128], [32, 64]], got "
                              f"{short_repr(self.shapes)}.") from None
        if not self.shapes or any(b < 1 or t < 1 for b, t in self.shapes):
            raise ConfigError(f"speed.shapes needs at least one [batch, tokens] pair of positive sizes, got "
                              f"{short_repr(self.shapes)}.")
        if self.ffn_fraction is not None and not (_finite(self.ffn_fraction) and 0 < self.ffn_fraction <= 1):
            raise ConfigError(f"speed.ffn_fraction must be in (0, 1], got {short_repr(self.ffn_fraction)}.")
        for name in ("runs", "confirm_runs", "min_blocks"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"speed.{name} must be an integer >= 1, got {short_repr(v)}.")
        if self.blocks_removed is not None and (isinstance(self.blocks_removed, bool)
                                                or not isinstance(self.blocks_removed, int) or self.blocks_removed < 0):
            raise ConfigError(f"speed.blocks_removed must be an integer >= 0 or null, got "
                              f"{short_repr(self.blocks_removed)}.")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["shapes"] = [list(s) for s in self.shapes]
        return out


@dataclass
class SpeedPlan:
    """The chosen shape and the measurements behind it."""

    blocks_removed: int
    ffn_fraction: float
    ffn_width: int
    num_blocks: int
    speedups: dict[str, float]
    met: bool
    candidates: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _shape_key(shape: tuple[int, int]) -> str:
    return f"{shape[0]}x{shape[1]}"


def _dims(model: nn.Module) -> tuple[Any, str, int, str, int]:
    """(spec, layer-count attribute, blocks, FFN width attribute, FFN width) of a registered model."""
    from ..registry import base_model_of, find_arch
    from ..structure.blocks import config_attr

    spec = find_arch(model)
    if spec is None:
        from ..registry import supported_architectures

        raise ConfigError(f"speed planning needs a registered architecture; {type(model).__name__} is not one "
                          f"(supported: {', '.join(supported_architectures())}).")
    cfg = model.config
    layers_attr = config_attr(cfg, "num_hidden_layers")
    return spec, layers_attr, len(spec.blocks(base_model_of(model))), spec.ffn_width_attr, int(
        getattr(cfg, spec.ffn_width_attr))


def _block_params(hidden: int, ffn: int, blocks: int) -> int:
    return blocks * (4 * hidden * hidden + 2 * hidden * ffn)


def _build(model: nn.Module, layers_attr: str, blocks: int, ffn_attr: str, ffn: int) -> nn.Module:
    cfg = copy.deepcopy(model.config)
    setattr(cfg, layers_attr, blocks)
    setattr(cfg, ffn_attr, ffn)
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = list(cfg.layer_types)[:blocks]
    torch.manual_seed(0)
    return type(model)(cfg).eval()  # random weights time like real ones


def _speedups(reference: nn.Module, candidate: nn.Module, inputs: dict, runs: int) -> dict[str, float]:
    """dense / candidate latency ratio at every shape, timed side by side."""
    return {_shape_key(shape): measure_latency({"dense": reference, "shrunk": candidate}, x, runs=runs).speedup("shrunk")
            for shape, x in inputs.items()}


def plan_speed(model: nn.Module, config: SpeedConfig) -> SpeedPlan:
    """Time candidate shapes against the full model and choose one (see the module docstring)."""
    from ..pcn.stats import round_width

    _, layers_attr, n_blocks, ffn_attr, ffn_full = _dims(model)
    hidden = int(getattr(model.config, "hidden_size", 0) or getattr(model.config, "n_embd", 0) or ffn_full // 4)
    removals = [config.blocks_removed] if config.blocks_removed is not None else range(n_blocks - config.min_blocks + 1)
    if config.blocks_removed is not None and n_blocks - config.blocks_removed < config.min_blocks:
        raise ConfigError(f"speed.blocks_removed={config.blocks_removed} leaves fewer than speed.min_blocks="
                          f"{config.min_blocks} of the model's {n_blocks} blocks.")
    fractions = [config.ffn_fraction] if config.ffn_fraction is not None else list(_FRACTIONS)
    full_params = _block_params(hidden, ffn_full, n_blocks)
    reference = _build(model, layers_attr, n_blocks, ffn_attr, ffn_full)
    inputs = {s: example_inputs(reference, s) for s in config.shapes}
    candidates = []
    for k in removals:
        for frac in fractions:
            width = ffn_full if frac >= 1 else round_width(math.ceil(frac * ffn_full), 8, ffn_full)
            params = _block_params(hidden, width, n_blocks - k)
            # a shape far from the target is not worth timing: block FLOPs bound the speed-up from both sides
            flop_speedup = full_params / max(params, 1)
            fixed = config.blocks_removed is not None and config.ffn_fraction is not None
            if not fixed and not (0.6 * config.target_speedup <= flop_speedup <= 2.5 * config.target_speedup):
                continue
            candidate = _build(model, layers_attr, n_blocks - k, ffn_attr, width)
            speedups = _speedups(reference, candidate, inputs, config.runs)
            candidates.append({"blocks_removed": k, "ffn_fraction": frac, "ffn_width": width,
                               "block_params": params, "speedups": speedups,
                               "met": all(v >= config.target_speedup for v in speedups.values())})
    if not candidates:
        raise ConfigError(f"no model shape of {n_blocks} blocks x FFN {ffn_full} comes near a "
                          f"{config.target_speedup:g}x speed-up; lower speed.target_speedup.")
    best = None
    # fewest blocks removed first, then the most block parameters: at equal parameters, narrower FFNs kept far more
    # accuracy than fewer blocks in bench_speed (6 x 384 vs 3 x 1536: 98.9% vs 88.2% of dense; 5 x 384 vs
    # 3 x 1152: 96.1% vs 88.4%)
    for c in sorted((c for c in candidates if c["met"]), key=lambda c: (-c["blocks_removed"], c["block_params"]),
                    reverse=True):
        # confirm the choice with a longer timing before trusting it; a failure demotes it
        c["speedups_screening"] = c["speedups"]
        c["speedups"] = _speedups(reference, _build(model, layers_attr, n_blocks - c["blocks_removed"], ffn_attr,
                                                    c["ffn_width"]), inputs, config.confirm_runs)
        c["met"] = all(v >= config.target_speedup for v in c["speedups"].values())
        if c["met"]:
            best = c
            break
    met = [c for c in candidates if c["met"]]
    if not met:
        best = max(candidates, key=lambda c: min(c["speedups"].values()))
        warnings.warn(f"no candidate reached {config.target_speedup:g}x at every shape on this machine; using the "
                      f"fastest ({min(best['speedups'].values()):.2f}x at its slowest shape).", stacklevel=2)
    return SpeedPlan(blocks_removed=best["blocks_removed"], ffn_fraction=best["ffn_fraction"],
                     ffn_width=best["ffn_width"], num_blocks=n_blocks, speedups=best["speedups"], met=bool(met),
                     candidates=candidates)


def apply_plan(model: nn.Module, plan: SpeedPlan, batches: list, method: str = "px",
               options: Any = None, pcn_batches: list | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Remove the plan's lowest-ranked blocks and narrow the FFNs with structured PCN; returns (model, record).

    ``batches`` rank the blocks (``method``'s scores); the PCA that narrows the FFNs uses ``pcn_batches`` when
    given, else ``batches``. A PCA of a layer wants at least a few tokens per unit of its width, far more than the
    few examples per class that scoring needs.
    """
    from ..pcn import PCNConfig, apply_pcn
    from ..structure.blocks import rank_blocks, remove_blocks

    record: dict[str, Any] = {"plan": plan.to_dict()}
    if plan.blocks_removed:
        ranking = rank_blocks(model, batches, method=method, options=options)
        drop = sorted(r["block"] for r in ranking[: plan.blocks_removed])
        record["block_ranking"] = ranking
        record["removed"] = remove_blocks(model, drop)
    if plan.ffn_fraction < 1:
        report = apply_pcn(model, pcn_batches if pcn_batches is not None else batches,
                           PCNConfig(width=plan.ffn_width, mode="structured"))
        model = report.model if report.model is not None else model
        record["pcn"] = report.to_dict()
    return model, record
