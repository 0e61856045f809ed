"""Latency of several models measured side by side: interleaved calls, order flipped every round, medians.

Absolute milliseconds on a shared machine move with its load; the ratio of two models measured turn by turn in
the same run does not, which is why every speed-up hf_px reports comes from here.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class LatencyResult:
    """Median milliseconds per call, by model name; ``speedup(name)`` is against ``reference``."""

    ms: dict[str, float]
    reference: str
    runs: int
    threads: int = field(default_factory=torch.get_num_threads)
    load_average: float | None = None
    shape: tuple[int, int] | None = None

    def speedup(self, name: str) -> float:
        return self.ms[self.reference] / self.ms[name]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["speedup"] = {n: self.speedup(n) for n in self.ms}
        return out


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return None


@torch.no_grad()
def measure_latency(models: Mapping[str, nn.Module], inputs: Sequence[Mapping[str, torch.Tensor]] | Mapping[str, Any],
                    runs: int = 10, reference: str | None = None, warmup: int = 1) -> LatencyResult:
    """Median milliseconds of one forward pass of every model on every input, measured turn by turn.

    Args:
        models: name -> model (put in eval mode here); ``reference`` (default: the first) is the denominator of
            :meth:`LatencyResult.speedup`.
        inputs: one batch (a mapping of tensors) or a list of them; every model sees each in turn.
        runs: rounds per input, the order of the models flipped every round; the reported time is the median
            over inputs of each input's median.
        warmup: untimed calls per model and input first (allocation, kernel choice).

    Example:
        >>> import torch
        >>> small, big = torch.nn.Linear(8, 8), torch.nn.Sequential(*[torch.nn.Linear(8, 8)] * 50)
        >>> res = measure_latency({"big": big, "small": small}, [{"input": torch.randn(4, 8)}], runs=5)
        >>> sorted(res.ms), res.reference
        (['big', 'small'], 'big')
    """
    if isinstance(inputs, Mapping):
        inputs = [inputs]
    if not models or not inputs:
        raise ValueError("measure_latency needs at least one model and one input batch.")
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}.")
    from ..inference.timing import interleaved_median_ms

    for model in models.values():
        model.eval()
    per_input = []
    for x in inputs:
        calls = {name: (lambda m=model, x=x: m(**x)) for name, model in models.items()}
        for _ in range(max(warmup - 1, 0)):  # interleaved_median_ms makes one untimed call itself
            for call in calls.values():
                call()
        per_input.append(interleaved_median_ms(calls, runs))
    ms = {name: statistics.median(t[name] for t in per_input) for name in models}
    first = next(iter(inputs))
    ids = first.get("input_ids") if hasattr(first, "get") else None
    shape = tuple(int(s) for s in ids.shape[:2]) if torch.is_tensor(ids) and ids.dim() >= 2 else None
    return LatencyResult(ms=ms, reference=reference or next(iter(models)),
                         runs=runs, load_average=_load(), shape=shape)
