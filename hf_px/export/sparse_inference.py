"""Opt-in sparse CPU inference: run very sparse ``nn.Linear`` layers with ``torch.sparse`` CSR kernels.

The kernels and the automatic choice live in :mod:`hf_px.inference` (:func:`hf_px.inference.choose_kernels`,
used by ``hf_px.load(path, kernels="auto")``, decides per layer and checks that the whole model got faster).
This module keeps the earlier per-layer entry point, :func:`sparsify_for_cpu`, and re-exports
:class:`CSRLinear` and :func:`densify`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..inference.kernels import CSRLinear, densify, set_module
from ..inference.timing import interleaved_median_ms

__all__ = ["CSRLinear", "densify", "sparsify_for_cpu"]


@torch.no_grad()
def sparsify_for_cpu(
    model: nn.Module,
    min_sparsity: float = 0.8,
    tokens: int = 512,
    repeats: int = 5,
    timing: bool = True,
) -> dict[str, dict]:
    """Replace, in place, the float32 ``nn.Linear`` layers of ``model`` where a CSR kernel is faster.

    Layer by layer only, on ``tokens`` rows; :func:`hf_px.inference.choose_kernels` also times the whole model at
    a real batch shape and reverts when the mix is not faster, and is the one to use for inference.

    Args:
        model: a pruned model (zeros in its weights), on CPU.
        min_sparsity: layers below this fraction of zeros are never converted.
        tokens: rows of the random input used to time each layer (batch size x sequence length).
        repeats: timing rounds per kernel (interleaved; the median counts).
        timing: ``False`` converts every layer at or above ``min_sparsity`` without timing.

    Returns:
        ``{layer name: {"sparsity", "dense_ms", "csr_ms", "converted"}}`` for every candidate layer.

    Example:
        >>> lin = nn.Sequential(nn.Linear(64, 64))
        >>> with torch.no_grad():
        ...     lin[0].weight[:, 4:] = 0
        >>> report = sparsify_for_cpu(lin, timing=False)
        >>> type(lin[0]).__name__, report["0"]["converted"]
        ('CSRLinear', True)
    """
    report: dict[str, dict] = {}
    candidates = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]
    for name, module in candidates:
        weight = module.weight
        if weight.dtype != torch.float32 or weight.device.type != "cpu":
            continue
        sparsity = float((weight == 0).float().mean())
        if sparsity < min_sparsity:
            continue
        sparse = CSRLinear(module)
        entry: dict = {"sparsity": sparsity, "dense_ms": None, "csr_ms": None, "converted": True}
        if timing:
            x = torch.randn(tokens, module.in_features)
            fns = {"dense": lambda m=module, x=x: m(x), "sparse": lambda s=sparse, x=x: s(x)}
            t = interleaved_median_ms(fns, repeats, name)
            entry["dense_ms"], entry["csr_ms"] = t["dense"], t["sparse"]
            entry["converted"] = entry["csr_ms"] < entry["dense_ms"]
        if entry["converted"]:
            set_module(model, name, sparse)
        report[name] = entry
    return report
