"""PX on networks that are already a path network: plain ReLU nets and registered ConvNets (docs/px.md §4).

Conv/Linear + BatchNorm + ReLU + max/average pooling + residual additions are piecewise linear, so PX is computed
literally, with no surrogate: the real (record) pass fixes every ReLU pattern and max-pool selection, then

* A (data side, float64, no grad): input x², prunable weights = masks, other weights 1, biases 1, each ReLU
  multiplies by its recorded 0/1 pattern, each max-pool takes the input the real pass selected;
* B (weight side, float64, with grad): all-ones input, weights θ², biases b², ReLU = identity, max-pool = the sum
  of its window (every edge on, as a ReLU in B has every gate on);

R = Σ_k Ā_k·B_k and one backward gives every score θ²·|∂R/∂θ²|. BatchNorm follows ``bn`` (folded running
statistics, or each pass's own batch statistics); head modules keep raw signed weights in both passes so that the
ranking depends on the data (docs/px.md §4.2, §4.3).

Which models take this route: any ``nn.Module`` that is not a ``transformers`` model, and registered
``transformers`` families whose ArchSpec has ``norm_kind="batchnorm"`` (ResNet; hf_px.registry).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ...registry import find_arch, get_module, head_spec, is_linear_like
from ..surrogate import SurrogateRun
from ..targets import Target, is_transformers_model
from .base import all_reduce_sum
from .ntk_diag import plain_input

MAX_POOL_MODES = ("gated", "own")


def uses_path_network(model: nn.Module) -> bool:
    """Whether PX scores ``model`` with the exact path network (plain nets, BatchNorm ConvNet families)."""
    if not is_transformers_model(model):
        return True
    spec = find_arch(model)
    return spec is not None and spec.norm_kind == "batchnorm"


def registered_heads(model: nn.Module) -> tuple[nn.Module, ...]:
    """The classifier layers of a registered ConvNet (its ArchSpec's ``heads``); refused when unknown."""
    head = head_spec(model)
    if head is None or not head.layers:
        raise ValueError(f"PX does not know the classifier of {type(model).__name__}: add a HeadRef for it to its "
                         "ArchSpec's heads (hf_px.registry), or use method='ntk_diag'.")
    return tuple(module for module, _ in head.layers)


def _logits(out) -> torch.Tensor:
    """The output tensor of a plain net, or the logits of a ``transformers`` output."""
    if torch.is_tensor(out):
        return out
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out[0]


def _aux_params(model: nn.Module, targets: list[Target], masks: dict) -> tuple[dict, dict, dict]:
    """Parameter dicts of the A and B passes and the B-pass leaves {param id: θ² (requires grad)}.

    Linear/Conv weights: mask (target) or 1 in A, θ² in B; their biases 1 in A, b² in B (an edge from a
    constant-1 unit); every other parameter (BatchNorm γ, β) θ in float64, since its module's output is replaced
    by a hook anyway.
    """
    target_ids = {id(t.param): t.param_name for t in targets}
    kinds = {}
    for module in model.modules():
        if is_linear_like(module) or isinstance(module, nn.Conv2d):
            kinds[id(module.weight)] = "weight"
            if module.bias is not None:
                kinds[id(module.bias)] = "bias"
    params_a, params_b, leaves = {}, {}, {}
    for name, p in model.named_parameters():
        theta = p.detach().double()
        kind = kinds.get(id(p))
        if kind == "weight":
            mname = target_ids.get(id(p))
            params_a[name] = masks[mname].double() if mname else torch.ones_like(theta)
            sq = theta * theta
            if mname:
                sq.requires_grad_(True)
                leaves[id(p)] = sq
            params_b[name] = sq
        elif kind == "bias":
            params_a[name], params_b[name] = torch.ones_like(theta), theta * theta
        else:
            params_a[name] = params_b[name] = theta
    return params_a, params_b, leaves


def _raw_heads(model: nn.Module, head_modules: tuple[nn.Module, ...], params_a: dict, params_b: dict,
               leaves: dict, bias: str = "raw") -> set[int]:
    """Give the head modules' weights their raw signed values in both passes; returns the raw leaves' ids.

    The reference code's classifier convention: the head enters A and B once each with its real weights, so
    Ā_k differs between outputs and the ranking depends on the data (with unit head weights in A every Ā_k is
    equal, docs/px.md §4.2). A prunable head weight stays a B-pass leaf, now θ rather than θ², so it is still
    ranked with the rest instead of silently dropping out of the scores. ``bias``: "raw" (the reference's, plain
    nets) or "zero" (registered ConvNets, like transformer heads: a bias is no path of the input).
    """
    head_ids = {id(p) for head in head_modules for p in head.parameters()}
    bias_ids = {id(h.bias) for h in head_modules if getattr(h, "bias", None) is not None}
    raw = set()
    for name, p in model.named_parameters():
        if id(p) not in head_ids:
            continue
        theta = p.detach().double()
        if bias == "zero" and id(p) in bias_ids:
            params_a[name] = params_b[name] = torch.zeros_like(theta)
            continue
        params_a[name] = theta
        if id(p) in leaves:
            leaf = theta.clone().requires_grad_(True)
            params_b[name] = leaves[id(p)] = leaf
            raw.add(id(p))
        else:
            params_b[name] = theta
    return raw


@contextlib.contextmanager
def _max_pool_gates(run: SurrogateRun, pools: list[nn.MaxPool2d]) -> Iterator[None]:
    """Max-pooling as a gated linear map: the record pass fixes which input each window selects.

    A pass: each output reads the input the real network selected (its 0/1 gate, like a ReLU pattern); B pass:
    each output is the sum of its window, every edge on (a ReLU is the identity in B for the same reason). R then
    stays a sum over paths: exclusion and conservation hold through the pool (docs/px.md §4.3).
    """
    def hook(module: nn.MaxPool2d, args, output):
        x = args[0]
        if run.mode == "record":
            _, idx = F.max_pool2d(x.detach(), module.kernel_size, module.stride, module.padding, module.dilation,
                                  ceil_mode=module.ceil_mode, return_indices=True)
            run.push(module, "i", idx)
            return None
        if run.mode == "A":
            idx = run.pop(module, "i")
            return x.flatten(2).gather(2, idx.flatten(2)).view_as(idx)
        if run.mode == "B":
            return F.avg_pool2d(x, module.kernel_size, module.stride, module.padding, ceil_mode=module.ceil_mode,
                                count_include_pad=True, divisor_override=1)
        return None

    for pool in pools:
        if pool.dilation not in (1, (1, 1)) or pool.return_indices:
            raise ValueError(f"PX's gated max-pool supports dilation 1 without return_indices, got {pool}; use "
                             "PXOptions(max_pool='own') to let each pass take its own maximum.")
    handles = [pool.register_forward_hook(hook) for pool in pools]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def path_scores(model: nn.Module, targets: list[Target], masks: dict, batches: list,
                head_modules: tuple[nn.Module, ...] = (), bn: str = "running", max_pool: str = "gated",
                head_bias: str = "raw") -> tuple[dict[str, torch.Tensor], float]:
    """PX on a piecewise-linear network; returns (scores by target key, R).

    ``head_modules`` keep raw signed weights in both passes (their biases raw or, with ``head_bias="zero"``,
    dropped); a prunable weight among them is a raw B-pass leaf scored |∂R/∂θ|·θ². ``bn`` is "running" (eval
    statistics folded in) or "batch" (each auxiliary pass uses its own batch statistics); ``max_pool`` is "gated"
    (the real selection in A, the window sum in B) or "own" (each pass takes its own maximum, as the reference
    code does). The record pass runs in the model's dtype, both auxiliary passes in float64.
    """
    if max_pool not in MAX_POOL_MODES:
        raise ValueError(f"max_pool must be one of {MAX_POOL_MODES}, got {max_pool!r}.")
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    kind = "batchnorm-batch" if bn == "batch" else "batchnorm"
    norms = [(m, kind) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)] if max_pool == "gated" else []
    run = SurrogateRun(blocks=[], activations=[], norms=norms, relus=relus)
    params_a, params_b, leaves = _aux_params(model, targets, masks)
    # BatchNorm's own forward still runs inside the float64 passes (its output is then replaced by the hook), so
    # its running statistics must be float64 too, or a float32 model fails on mixed dtypes
    for name, buf in model.named_buffers():
        if buf.is_floating_point():
            params_a[name] = params_b[name] = buf.detach().double()
    raw = _raw_heads(model, head_modules, params_a, params_b, leaves, bias=head_bias)
    was_training = model.training
    model.eval()
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    a_bar, example = None, None
    try:
        with run.installed(), _max_pool_gates(run, pools):
            for batch in batches:
                x = plain_input(batch)
                example = x
                run.clear()
                with run.use("record"), torch.no_grad():  # the real network, in its own dtype
                    model(x.to(dtype) if dtype is not None and x.is_floating_point() else x)
                with run.use("A"), torch.no_grad():
                    out = _logits(functional_call(model, params_a, (x.double() ** 2,)))
                a_bar = out.sum(0) if a_bar is None else a_bar + out.sum(0)
            run.clear()
            if a_bar is None:
                raise ValueError("empty calibration set: PX needs at least one batch.")
            a_bar = all_reduce_sum(a_bar)
            with run.use("B"), torch.enable_grad():
                ones = torch.ones((1, *example.shape[1:]), dtype=torch.float64)
                out_b = _logits(functional_call(model, params_b, (ones,)))
                r = (a_bar * out_b[0]).sum()
                ids = list(leaves)
                grads = torch.autograd.grad(r, [leaves[i] for i in ids], allow_unused=True) if ids else ()
                grads = {i: torch.zeros_like(leaves[i]) if g is None else g for i, g in zip(ids, grads, strict=True)}
    finally:
        model.train(was_training)
    scores = {}
    for t in targets:
        if id(t.param) not in leaves:
            continue
        leaf, g = leaves[id(t.param)].detach(), grads[id(t.param)].abs()
        # a raw head leaf is θ itself: |∂R/∂θ|·θ²; every other leaf is θ²: |∂R/∂θ²|·θ²
        scores[t.key] = t.view(g * leaf * leaf if id(t.param) in raw else g * leaf)
    return scores, float(r.detach())


def path_network_scores(model: nn.Module, targets: list[Target], masks: dict, batches: list, *,
                        head_modules: tuple[str, ...] = (), bn: str = "running", max_pool: str = "gated",
                        ) -> tuple[dict[str, torch.Tensor], float]:
    """PX for :func:`uses_path_network` models: the heads named in ``head_modules``, else (registered ConvNets)
    the registry's classifier, raw and with its bias dropped; plain nets without names get the pure head."""
    if head_modules:
        heads = tuple(get_module(model, n) for n in head_modules)
        bias = "raw"
    elif is_transformers_model(model):
        heads, bias = registered_heads(model), "zero"
    else:
        heads, bias = (), "raw"
    return path_scores(model, targets, masks, batches, heads, bn=bn, max_pool=max_pool, head_bias=bias)
