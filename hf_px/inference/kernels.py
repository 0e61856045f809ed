"""The CSR kernel for pruned ``nn.Linear`` layers, and the helpers that swap it in and out of a model.

:class:`CSRLinear` keeps a layer's weight as a ``torch.sparse`` CSR tensor and multiplies with MKL's sparse
BLAS (the CPU build of torch uses it for ``addmm``/``addmv`` on CSR). Measured at MiniLM shapes (384x384,
1536x384, 384x1536) on torch 2.13, one thread, 90% unstructured zeros:

* CSR ``W @ xᵀ`` beats dense ``x @ Wᵀ`` by 1.5-3x up to a few hundred rows, and loses beyond ~1,000 rows;
* ``x @ W_csrᵀ`` (dense on the left), COO and BSR (4x4 blocks: unstructured zeros leave most blocks non-empty)
  are 2-20x slower than dense: none of them is worth keeping;
* int32 indices are 5-20% faster than int64 (MKL is LP64; int64 indices are converted on every call);
* a single row goes through ``addmv`` (2-3x faster than ``addmm`` with one column).

So one layout (CSR, int32 indices) with two entry points; whether it pays for a layer at a given batch shape is
decided by timing (:func:`hf_px.inference.choose_kernels`).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

_INT32_MAX = 2**31 - 1


def to_csr(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (2-D, dense) as a CSR tensor, with int32 indices whenever they fit.

    Example:
        >>> to_csr(torch.eye(3)).crow_indices().dtype
        torch.int32
    """
    with warnings.catch_warnings():  # torch flags CSR support as beta on conversions
        warnings.simplefilter("ignore", UserWarning)
        csr = weight.detach().to_sparse_csr()
        if csr.values().numel() < _INT32_MAX:
            csr = torch.sparse_csr_tensor(csr.crow_indices().to(torch.int32), csr.col_indices().to(torch.int32),
                                          csr.values(), csr.shape)
    return csr


class CSRLinear(nn.Module):
    """``y = x Wᵀ + b`` with ``W`` stored as a CSR tensor (inference only).

    Its ``state_dict`` holds ``weight``/``bias`` as dense tensors, exactly like the ``nn.Linear`` it replaced,
    so ``save_pretrained``/``load_state_dict`` see the usual keys and a checkpoint saved from a model with CSR
    layers is complete.

    Example:
        >>> lin = nn.Linear(8, 4)
        >>> with torch.no_grad():
        ...     lin.weight[:, 2:] = 0
        >>> x = torch.randn(3, 8)
        >>> torch.allclose(CSRLinear(lin)(x), lin(x), atol=1e-6)
        True
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_csr", to_csr(linear.weight), persistent=False)
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        self.register_buffer("bias", bias, persistent=False)
        self.eval()  # built for inference; train() is refused in forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            # the CSR copy has no gradient: training through it would silently freeze the layer
            raise RuntimeError("CSRLinear is inference-only; call hf_px.inference.densify(model) before training.")
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] == 1:
            row = flat[0]
            out = torch.mv(self.weight_csr, row) if self.bias is None else torch.addmv(self.bias, self.weight_csr, row)
            return out.reshape(*x.shape[:-1], self.out_features)
        # CSR on the left: (out x in) @ (in x rows); xᵀ is a free view, the result is transposed back once
        if self.bias is None:
            out = torch.mm(self.weight_csr, flat.t())
        else:
            out = torch.addmm(self.bias.unsqueeze(1), self.weight_csr, flat.t())
        return out.t().reshape(*x.shape[:-1], self.out_features).contiguous()

    def dense_weight(self) -> torch.Tensor:
        """The weight as a dense ``(out_features, in_features)`` tensor (zeros where pruned)."""
        return self.weight_csr.to_dense()

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` with the same weight and bias (exact: CSR stores the kept values unchanged)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           dtype=self.weight_csr.dtype, device=self.weight_csr.device)
        with torch.no_grad():
            linear.weight.copy_(self.dense_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # noqa: ANN001 - torch's signature
        # the nn.Linear keys, so a checkpoint written from a model holding CSR layers is not missing them
        destination[prefix + "weight"] = self.dense_weight()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # noqa: ANN001 - torch's signature
        weight, bias = state_dict.get(prefix + "weight"), state_dict.get(prefix + "bias")
        if weight is None:
            missing_keys.append(prefix + "weight")
        elif tuple(weight.shape) != (self.out_features, self.in_features):
            error_msgs.append(f"size mismatch for {prefix}weight: copying a param with shape {tuple(weight.shape)}, "
                              f"the shape in current model is {(self.out_features, self.in_features)}.")
        else:
            self.weight_csr = to_csr(weight.to(self.weight_csr.dtype))
        if self.bias is not None:
            if bias is None:
                missing_keys.append(prefix + "bias")
            else:
                with torch.no_grad():
                    self.bias.copy_(bias)

    def __deepcopy__(self, memo: dict) -> CSRLinear:
        # torch cannot deepcopy a CSR tensor (no storage to copy); clone it, and copy the rest as usual
        if id(self.weight_csr) not in memo:
            memo[id(self.weight_csr)] = self.weight_csr.clone()
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        return new

    def extra_repr(self) -> str:
        nnz = self.weight_csr.values().numel()
        return f"in_features={self.in_features}, out_features={self.out_features}, nnz={nnz}"


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) of ``model`` by ``module``."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def densify(model: nn.Module) -> nn.Module:
    """Turn every :class:`CSRLinear` of ``model`` back into an ``nn.Linear``, in place (e.g. before training).

    Example:
        >>> net = nn.Sequential(CSRLinear(nn.Linear(4, 4)))
        >>> type(densify(net)[0]).__name__
        'Linear'
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, CSRLinear):
            set_module(model, name, module.to_linear())
    return model


@contextmanager
def densified(model: nn.Module) -> Iterator[dict[str, CSRLinear]]:
    """Within the block, ``model``'s CSR layers are ``nn.Linear`` again; on exit the CSR layers are put back.

    For code that needs ``module.weight`` (saving, masks, reports) on a model that holds CSR layers. Yields the
    swapped-out CSR layers by name (empty for a dense model, which is left untouched).

    Example:
        >>> net = nn.Sequential(CSRLinear(nn.Linear(4, 4)))
        >>> with densified(net):
        ...     inside = type(net[0]).__name__
        >>> inside, type(net[0]).__name__
        ('Linear', 'CSRLinear')
    """
    swapped = {n: m for n, m in model.named_modules() if isinstance(m, CSRLinear)}
    for name, module in swapped.items():
        set_module(model, name, module.to_linear())
    try:
        yield swapped
    finally:
        for name, module in swapped.items():
            set_module(model, name, module)
