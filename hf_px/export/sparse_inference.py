"""Opt-in sparse CPU inference: run very sparse ``nn.Linear`` layers with ``torch.sparse`` CSR kernels.

A CSR matmul only beats the dense BLAS kernel at high sparsity (roughly above 85-90% on CPU, depending on the
shape and the thread count), so :func:`sparsify_for_cpu` times both kernels on each candidate layer and converts
only the layers where CSR is faster. The result is for inference only: weights are frozen, outputs match the
dense model up to float rounding (summation order differs), and ``save_pretrained`` needs :func:`densify` first.
"""

from __future__ import annotations

import time
import warnings

import torch
from torch import nn
from torch.nn import functional as F


class CSRLinear(nn.Module):
    """``y = x Wᵀ + b`` with ``W`` stored as a CSR tensor (inference only)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with warnings.catch_warnings():  # torch flags CSR support as beta on every conversion
            warnings.simplefilter("ignore", UserWarning)
            weight_csr = linear.weight.detach().to_sparse_csr()
        self.register_buffer("weight_csr", weight_csr, persistent=False)
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).t()
        if self.bias is None:
            out = torch.mm(self.weight_csr, flat)
        else:
            out = torch.addmm(self.bias.unsqueeze(1), self.weight_csr, flat)
        return out.t().reshape(*x.shape[:-1], self.out_features).contiguous()

    def to_linear(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(self.weight_csr.to_dense())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        nnz = self.weight_csr.values().numel()
        return f"in_features={self.in_features}, out_features={self.out_features}, nnz={nnz}"


def _best_ms(fn, repeats: int) -> float:
    fn()  # warm-up: first calls allocate
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


@torch.no_grad()
def sparsify_for_cpu(
    model: nn.Module,
    min_sparsity: float = 0.8,
    tokens: int = 512,
    repeats: int = 5,
    timing: bool = True,
) -> dict[str, dict]:
    """Replace, in place, the float32 ``nn.Linear`` layers of ``model`` where a CSR kernel is faster.

    Args:
        model: a pruned model (zeros in its weights), on CPU.
        min_sparsity: layers below this fraction of zeros are never converted.
        tokens: rows of the random input used to time each layer (batch size x sequence length).
        repeats: timing repeats per kernel (the best time counts).
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
            entry["dense_ms"] = _best_ms(lambda m=module, x=x: F.linear(x, m.weight, m.bias), repeats)
            entry["csr_ms"] = _best_ms(lambda s=sparse, x=x: s(x), repeats)
            entry["converted"] = entry["csr_ms"] < entry["dense_ms"]
        if entry["converted"]:
            _set(model, name, sparse)
        report[name] = entry
    return report


def densify(model: nn.Module) -> nn.Module:
    """Undo :func:`sparsify_for_cpu` in place (e.g. before ``save_pretrained`` or training)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, CSRLinear):
            _set(model, name, module.to_linear())
    return model
