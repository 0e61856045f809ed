"""The gated-linear path surrogate of a transformer (docs/px.md §5) as hooks on the real modules.

One real forward pass (``record``) stores, per module and call, every data-dependent quantity: the trunk
input x, the activation gates, the LayerNorm/RMSNorm 1/σ and the attention probabilities P. The two auxiliary
passes then run the *same* modules with substituted parameters (``torch.func.functional_call``):

* ``A`` (data side, float64, no grad): input x², weights = masks, gates g², norms (1/σ)², attention P².
* ``B`` (weight side, with grad): all-ones input, weights θ², identity gates, norms γ², all-ones attention.

Attention is intercepted through a registered ``transformers`` attention function, so Q/K never enter the
auxiliary passes (they are off-path, docs/px.md §5.7). Records are keyed by module object and call index, never by
global call order.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..registry import HeadSpec

ATTN_IMPL = "hf_px_surrogate"
_ACTIVE: SurrogateRun | None = None


def _surrogate_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    run = _ACTIVE
    n_rep = query.shape[1] // value.shape[1]
    if n_rep > 1:  # grouped-query attention: each K/V head serves n_rep query heads
        key = key.repeat_interleave(n_rep, dim=1)
        value = value.repeat_interleave(n_rep, dim=1)
    mode = run.mode if run is not None else "real"
    if mode in ("real", "record"):
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        scores = torch.matmul(query, key.transpose(2, 3)) * scaling
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
            else:
                scores = scores + attention_mask[..., : key.shape[-2]]
        low_precision = scores.dtype in (torch.float16, torch.bfloat16)
        probs = torch.softmax(scores.float() if low_precision else scores, dim=-1).to(query.dtype)
        if mode == "record":
            run.push(module, "P", probs.detach())
        out = torch.matmul(probs, value)
    elif mode == "A":
        probs = run.pop(module, "P").to(value.dtype)
        out = torch.matmul(probs * probs, value)
    elif mode == "replay":
        out = torch.matmul(run.pop(module, "P").to(value.dtype), value)
    else:  # B: every token route counts once: all-ones (causal: lower-triangular) mixing
        out = value.cumsum(dim=-2) if run.causal else value.sum(dim=-2, keepdim=True).expand_as(value)
    return out.transpose(1, 2).contiguous(), None


ALL_ATTENTION_FUNCTIONS.register(ATTN_IMPL, _surrogate_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPL, eager_mask)


def secant_gate(act: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """g(z) = φ(z)/z, with the limit φ'(0) at z = 0 (so act(z) == g(z) * z exactly)."""
    fn = act.forward  # bypass hooks: this runs inside the activation's own forward hook
    z64 = z.double()
    h = 1e-4
    at_zero = (fn(torch.tensor([h], dtype=torch.float64)) - fn(torch.tensor([-h], dtype=torch.float64))) / (2 * h)
    safe = torch.where(z64 == 0, torch.ones_like(z64), z64)
    return torch.where(z64 == 0, at_zero.expand_as(z64), fn(z64) / safe)


def bound_gate(act: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """G(z) = max(|φ(z)/z|, |φ'(z)|): squared, it certifies the NTK-trace bound for smooth activations."""
    z64 = z.detach().double().requires_grad_(True)
    with torch.enable_grad():
        (deriv,) = torch.autograd.grad(act.forward(z64).sum(), z64)
    return torch.maximum(secant_gate(act, z).abs(), deriv.abs())


def batch_statistics_norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A train-mode BatchNorm of ``x`` with ``x``'s own batch statistics and the module's raw γ and β.

    Plain networks' ``bn="batch"`` (docs/px.md §4): each auxiliary pass renormalises its own activations, as a
    BatchNorm left in train mode would, so the A and B passes see their own statistics, not the real network's.
    Computed here rather than by switching the module to train mode, so running statistics never move and a
    one-sample B pass of a BatchNorm1d is allowed (its variance is 0: the output is β).
    """
    dims = [d for d in range(x.dim()) if d != 1]
    mean = x.mean(dim=dims, keepdim=True)
    var = x.var(dim=dims, unbiased=False, keepdim=True)
    out = (x - mean) * (var + module.eps).rsqrt()
    shape = (1, -1, *([1] * (x.dim() - 2)))
    if getattr(module, "weight", None) is not None:
        out = out * module.weight.to(x.dtype).view(shape)
    if getattr(module, "bias", None) is not None:
        out = out + module.bias.to(x.dtype).view(shape)
    return out


@dataclass
class SurrogateRun:
    """Hooks on blocks, activations and norms of a model, switched between record / A / B modes."""

    blocks: list[nn.Module]
    activations: list[nn.Module]
    norms: list[tuple[nn.Module, str]]  # (module, "layernorm" | "rmsnorm" | "batchnorm" | "batchnorm-batch")
    gated: bool = False
    causal: bool = False
    a_gate: str = "secant"
    rescale: float = 1.0  # A-pass divisor at every block boundary
    relus: list[nn.Module] = field(default_factory=list)  # plain networks: ReLU modules (path mode)
    mode: str = "real"
    pad_mask: torch.Tensor | None = None  # (batch, length) for the A-pass input
    store: dict = field(default_factory=lambda: defaultdict(list))
    cursor: dict = field(default_factory=lambda: defaultdict(int))

    # -- record storage: per (module, kind), in call order; replay consumes in the same order
    def push(self, module: nn.Module, kind: str, value: torch.Tensor) -> None:
        self.store[(id(module), kind)].append(value)

    def pop(self, module: nn.Module, kind: str) -> torch.Tensor:
        key = (id(module), kind)
        i = self.cursor[key]
        self.cursor[key] = i + 1
        return self.store[key][i]

    def clear(self) -> None:
        self.store.clear()
        self.cursor.clear()

    # -- hooks
    def _block0_pre(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if self.mode == "record":
            self.push(module, "x", hidden.detach())
            return None
        # the trunk input of the auxiliary passes is built here, in the block weights' dtype (the embeddings
        # that would have produced it may run in another dtype: their output is discarded)
        dtype = next(module.parameters()).dtype
        if self.mode == "replay":
            new = self.pop(module, "x").to(dtype)
        elif self.mode == "A":
            x = self.pop(module, "x").to(dtype)
            new = x * x
            if self.pad_mask is not None:
                new = new * self.pad_mask.to(new.dtype).unsqueeze(-1)
        elif self.mode == "B":
            new = torch.ones_like(hidden, dtype=dtype)
        else:
            return None
        if args:
            return (new, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": new}

    def _block_post(self, module, args, output):
        if self.mode != "A" or self.rescale == 1.0:
            return None
        if isinstance(output, tuple):
            return (output[0] / self.rescale, *output[1:])
        return output / self.rescale

    def _act(self, module, args, output):
        z = args[0]
        if self.mode == "record":
            if self.gated:
                self.push(module, "c", output.detach())
            else:
                # detached: with Q/K probes the record pass runs with grad, and a gate built from the live z
                # would keep its float64 autograd graph (about 3 float64 copies of the FFN activations per
                # layer) alive until the round ends; the probes never differentiate through the gate
                zd = z.detach()
                gate = bound_gate(module, zd) if self.a_gate == "bound" else secant_gate(module, zd)
                self.push(module, "g", gate.to(z.dtype))
            return None
        if self.mode in ("A", "replay"):
            square = self.mode == "A"
            if self.gated:  # act(gate) * up: the gate value is a frozen data coefficient, the gate proj is off-path
                c = self.pop(module, "c").to(z.dtype)
                return c * c if square else c
            g = self.pop(module, "g").to(z.dtype)
            return z * g * g if square else z * g
        if self.mode == "B":
            return torch.ones_like(output) if self.gated else z
        return None

    def _relu(self, module, args, output):
        z = args[0]
        if self.mode == "record":
            self.push(module, "g", (z > 0).detach())
            return None
        if self.mode == "A":
            return z * self.pop(module, "g").to(z.dtype)
        if self.mode == "B":
            return z
        return None

    def _norm(self, kind: str):
        def hook(module, args, output):
            x = args[0]
            if self.mode == "record":
                if kind == "layernorm":
                    var = x.detach().double().var(dim=-1, unbiased=False, keepdim=True)
                    self.push(module, "s", (var + module.eps).rsqrt())
                    self.push(module, "m", x.detach().double().mean(-1, keepdim=True))
                elif kind == "rmsnorm":
                    eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
                    self.push(module, "s", (x.detach().double().pow(2).mean(-1, keepdim=True) + eps).rsqrt())
                return None
            if self.mode == "replay":  # the frozen-statistics norm, with centring, γ and β: equals the real one
                s = self.pop(module, "s").to(x.dtype)
                centred = x - self.pop(module, "m").to(x.dtype) if kind == "layernorm" else x
                out = centred * s
                if getattr(module, "weight", None) is not None:
                    out = out * module.weight
                if getattr(module, "bias", None) is not None:
                    out = out + module.bias
                return out
            if kind == "batchnorm-batch" and self.mode in ("A", "B"):
                return batch_statistics_norm(module, x)
            if self.mode == "A":
                if kind == "batchnorm":
                    s = (module.running_var + module.eps).rsqrt().to(x.dtype)
                    return x * (s * s).view(1, -1, *([1] * (x.dim() - 2)))
                s = self.pop(module, "s").to(x.dtype)
                return x * s * s
            if self.mode == "B":
                gamma = getattr(module, "weight", None)
                if gamma is None:
                    return x
                g2 = (gamma * gamma).to(x.dtype)
                return x * (g2.view(1, -1, *([1] * (x.dim() - 2))) if kind == "batchnorm" else g2)
            return None

        return hook

    @contextlib.contextmanager
    def installed(self) -> Iterator[SurrogateRun]:
        """Register the hooks and make this run the active one for the attention function."""
        global _ACTIVE
        handles = []
        try:
            if self.blocks:
                handles.append(self.blocks[0].register_forward_pre_hook(self._block0_pre, with_kwargs=True))
                for block in self.blocks:
                    handles.append(block.register_forward_hook(self._block_post))
            for act in self.activations:
                handles.append(act.register_forward_hook(self._act))
            for relu in self.relus:
                handles.append(relu.register_forward_hook(self._relu))
            for norm, kind in self.norms:
                handles.append(norm.register_forward_hook(self._norm(kind)))
            _ACTIVE = self
            yield self
        finally:
            _ACTIVE = None
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def use(self, mode: str) -> Iterator[None]:
        previous, self.mode = self.mode, mode
        try:
            yield
        finally:
            self.mode = previous
            self.cursor.clear()


@contextlib.contextmanager
def surrogate_attention(model: nn.Module) -> Iterator[None]:
    """Route every attention call of ``model`` through the surrogate attention function."""
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
    before = {k: c._attn_implementation for k, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = ATTN_IMPL
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation = before[k]


# ------------------------------------------------------------------------------------------ task heads
# Heads keep their raw signed weights in both auxiliary passes (docs/px.md §5.6): entered as all-ones they would make
# every output's data term equal and the ranking independent of the data. Their activations are gated like the
# trunk's (g² in A, identity in B). Heads are never pruned.
_ACTS = {"tanh": nn.Tanh(), "relu": nn.ReLU()}


def run_head(spec: HeadSpec, pooled: torch.Tensor, mode: str, gates: dict | None = None) -> torch.Tensor:
    """Apply the head in ``mode``: real (records gates into ``gates``), A (raw weights, g², no bias), B."""
    x = pooled
    for i, (linear, act) in enumerate(spec.layers):
        weight = linear.weight.to(x.dtype)
        if mode in ("real", "record"):
            x = nn.functional.linear(x, weight, None if linear.bias is None else linear.bias.to(x.dtype))
            if act is not None:
                if gates is not None:
                    gates[i] = secant_gate(_ACTS[act], x.detach())
                x = _ACTS[act](x)
        else:
            x = nn.functional.linear(x, weight)
            if act is not None and mode == "A":
                g = gates[i].to(x.dtype)
                x = x * g * g
    return x
