"""Streaming activation statistics (float64 mean/covariance), PCA and the choice of k.

Every non-padding token is one sample. Batches are merged with the pairwise (Chan et al.) update of the
centred scatter matrix, so no activation is stored and large means do not cancel the covariance.

Example:
    >>> import torch
    >>> m = RunningMoments(3)
    >>> m.update(torch.randn(50, 3)); m.update(torch.randn(20, 3))
    >>> m.count, tuple(m.covariance().shape)
    (70, (3, 3))
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn


class RunningMoments:
    """Count, mean and centred scatter matrix of row samples, accumulated in float64."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.count = 0
        self.mean = torch.zeros(dim, dtype=torch.float64)
        self.scatter = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, x: torch.Tensor) -> None:
        """Add the rows of ``x`` (N, dim)."""
        x = x.detach().reshape(-1, self.dim).to(device="cpu", dtype=torch.float64)
        n_b = x.shape[0]
        if n_b == 0:
            return
        mean_b = x.mean(0)
        xc = x - mean_b
        scatter_b = xc.T @ xc
        n_a = self.count
        n = n_a + n_b
        delta = mean_b - self.mean
        self.scatter += scatter_b + torch.outer(delta, delta) * (n_a * n_b / n)
        self.mean += delta * (n_b / n)
        self.count = n

    def covariance(self) -> torch.Tensor:
        """Unbiased covariance (dim, dim); needs at least two samples."""
        if self.count < 2:
            raise ValueError(
                f"PCA needs at least 2 calibration tokens, got {self.count}; pass more (or non-empty, "
                "non-padding) calibration batches."
            )
        return self.scatter / (self.count - 1)


def pca(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending, negatives from round-off clamped to 0) and eigenvectors (columns) of ``cov``."""
    evals, evecs = torch.linalg.eigh(cov.to(torch.float64))
    evals = evals.flip(0).clamp_min(0.0)
    evecs = evecs.flip(1)
    return evals, evecs


def explained_variance(evals: torch.Tensor, k: int) -> float:
    """Fraction of the total variance in the top ``k`` components (1.0 for a zero spectrum)."""
    total = float(evals.sum())
    if total <= 0.0:
        return 1.0
    return float(evals[:k].sum()) / total


def round_width(k: int, multiple_of: int, full: int) -> int:
    """Round ``k`` up to a multiple of ``multiple_of``, capped at ``full``."""
    return min(full, int(math.ceil(k / multiple_of)) * multiple_of)


def components_for_variance(evals: torch.Tensor, variance: float) -> int:
    """Smallest k whose cumulative explained variance reaches ``variance`` (at least 1)."""
    total = float(evals.sum())
    if total <= 0.0:
        return 1
    frac = torch.cumsum(evals, 0) / total
    # a relative tolerance so variance=1.0 is reached despite round-off in the cumulative sum
    reached = torch.nonzero(frac >= variance - 1e-12).flatten()
    k = int(reached[0]) + 1 if reached.numel() else evals.numel()
    return max(1, k)


def choose_width(evals: torch.Tensor, full: int, variance: float | None, width: int | float | None,
                 multiple_of: int, what: str = "layer") -> tuple[int, int]:
    """Width to keep and the number of principal components it was chosen from, as ``(width, components)``.

    ``variance`` picks the smallest k reaching it and rounds up; a float ``width`` is a fraction of ``full``
    (rounded up); an int ``width`` is used as is. Raises if an absolute width exceeds ``full``.
    """
    if variance is not None:
        k = components_for_variance(evals, variance)
        return round_width(k, multiple_of, full), k
    assert width is not None
    if isinstance(width, float):
        k = max(1, int(math.ceil(width * full - 1e-9)))
        return round_width(k, multiple_of, full), k
    if width > full:
        raise ValueError(
            f"PCNConfig.width={width} is larger than the {what} width {full}; pass a width <= {full} or a "
            "fraction in (0, 1]."
        )
    return int(width), int(width)


def _token_mask(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """Boolean (B*T,) mask of real tokens when ``mask`` matches the hidden state's (B, T), else None."""
    if mask is None or hidden.dim() < 3 or tuple(mask.shape) != tuple(hidden.shape[:2]):
        return None
    return mask.reshape(-1).to(device=hidden.device).bool()


def model_inputs(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The calibration batch without labels, on ``device``."""
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items() if k != "labels"}


@torch.no_grad()
def collect_input_moments(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]],
                          modules: Mapping[str, nn.Module]) -> tuple[dict[str, RunningMoments], int]:
    """Moments of the input of every module in ``modules`` over the calibration batches.

    Padding positions (``attention_mask == 0``) are left out. Returns the moments per key and the number of
    tokens seen per forward (the real tokens of all batches).
    """
    moments: dict[str, RunningMoments] = {}
    state: dict[str, torch.Tensor | None] = {"mask": None}

    def make_hook(key: str):
        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            keep = _token_mask(x, state["mask"])
            flat = x.reshape(-1, x.shape[-1])
            if keep is not None:
                flat = flat[keep]
            if key not in moments:
                moments[key] = RunningMoments(flat.shape[-1])
            moments[key].update(flat)
        return hook

    handles = [m.register_forward_pre_hook(make_hook(k), with_kwargs=True) for k, m in modules.items()]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    tokens = 0
    try:
        for batch in batches:
            inputs = model_inputs(batch, device)
            mask = inputs.get("attention_mask")
            state["mask"] = mask
            if mask is not None:
                tokens += int(mask.sum())
            elif "input_ids" in inputs:
                tokens += inputs["input_ids"].numel()
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not moments:
        raise ValueError("no calibration batch reached the hooked layers; pass at least one batch.")
    if tokens == 0:  # inputs without a token mask (e.g. pixel_values): every position is a sample
        tokens = next(iter(moments.values())).count
    return moments, tokens
