"""PX (Path eXclusion) saliency: S_j = θ_j²·|∂R/∂(θ_j²)|, R = Σ_{n,k} A_k(x_n)·B_k(θ) (docs/px.md §2, §5).

* Plain networks (Linear/Conv2d + nn.ReLU, no ``transformers`` base class) and registered BatchNorm ConvNets
  (ResNet) use the paper's path network, :mod:`hf_px.pruning.scoring.path_network` (docs/px.md §4).
* Registered transformers use the gated-linear surrogate of :mod:`hf_px.pruning.surrogate`; the A pass runs in float64
  with a fixed rescale at each block boundary; heads keep raw weights. Q/K (and a gated MLP's gate) are
  off-path: scored by the exact NTK diagonal (or magnitude) and ranked inside their block by ``hf_px.pruning.masks``.

Ā = Σ_n A(x_n) is the only place the data enter, so it is summed over batches (and all-reduced over
processes) before the single B pass of the round.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from ...registry import get_arch, get_module, head_spec, is_linear_like, pool, weight_out_in
from ..surrogate import SurrogateRun, run_head, surrogate_attention
from ..targets import Target
from .base import (
    Options,
    Scorer,
    ScoringContext,
    all_reduce_max,
    all_reduce_sum,
    check_choice,
    check_int,
    check_positive,
    grads_for,
    model_inputs,
    register_scorer,
)
from .ntk_diag import accumulate_probe_grads
from .path_network import MAX_POOL_MODES, path_network_scores, path_scores, uses_path_network

__all__ = ["PXOptions", "PXScorer", "path_scores", "transformer_scores"]


@dataclass
class PXOptions(Options):
    """PX's options (docs/px.md §10).

    Args:
        qk_score: how the off-path matrices (Q/K, a gated MLP's gate) are ranked inside their block: ntk_diag
            (Hutchinson estimate of the exact NTK diagonal) or magnitude.
        a_gate: A-pass gate for smooth activations: secant (g = φ(z)/z, reproduces the forward pass) or bound
            (G = max(|φ(z)/z|, |φ'(z)|), certifies the trace bound).
        hutchinson_probes: Rademacher probes per batch for the ntk_diag Q/K scores.
        b_length: encoders: sequence length of the B pass, which sets how much attention (token-route) paths count
            against skip and MLP paths. None: the calibration set's mean real length (docs/px.md §5.5); 1: no
            token-route factor.
        rescale: divide the residual stream by this constant at every block boundary in the A pass (None:
            hidden_size * max(hidden_size, FFN width)); keeps float64 from overflowing, masks do not change.
        head_modules: plain networks: names of modules that keep raw signed weights in both passes, e.g. [fc] (the
            reference code's classifier convention); their weights stay prunable, scored |∂R/∂θ|·θ², and make
            the ranking depend on the data.
        bn: plain networks: the BatchNorm statistics of the auxiliary passes: running (eval statistics folded in:
            (1/σ)² in A, γ² in B) or batch (each pass renormalises its own activations with their batch
            statistics and raw γ, β, as the reference code's train-mode copies do).
        max_pool: path networks: gated (the A pass takes the input the real pass selected, the B pass sums the
            window: R stays a path sum) or own (each pass takes its own maximum, as the reference code does).
    """

    qk_score: str = "ntk_diag"
    a_gate: str = "secant"
    hutchinson_probes: int = 1
    b_length: int | None = None
    rescale: float | None = None
    head_modules: tuple[str, ...] = ()
    bn: str = "running"
    max_pool: str = "gated"

    def __post_init__(self) -> None:
        check_choice("qk_score", self.qk_score, ("ntk_diag", "magnitude"))
        check_choice("a_gate", self.a_gate, ("secant", "bound"))
        check_choice("bn", self.bn, ("running", "batch"))
        check_choice("max_pool", self.max_pool, MAX_POOL_MODES)
        check_int("hutchinson_probes", self.hutchinson_probes, 1, 1000)
        check_int("b_length", self.b_length, 1, none="the mean real length")
        check_positive("rescale", self.rescale, none="hidden_size * max(hidden_size, FFN width)")
        if isinstance(self.head_modules, str) or not all(isinstance(n, str) for n in self.head_modules):
            raise ValueError(f"head_modules must be a list of module names, got {self.head_modules!r}.")
        self.head_modules = tuple(self.head_modules)


def default_rescale(model: nn.Module) -> float:
    spec = get_arch(model)
    block = spec.block_modules(model.base_model)[0]
    ffn_in = next(get_module(block, ref.path) for ref in spec.layers if ref.role == "ffn_in")
    inter, hidden = weight_out_in(ffn_in).shape
    return float(hidden * max(hidden, inter))


def build_run(model: nn.Module, a_gate: str = "secant", rescale: float | None = None):
    """The surrogate hooks and the head layout of a registered transformer."""
    spec = get_arch(model)
    head = head_spec(model)
    if head is None:
        raise ValueError(f"PX does not know the head of {type(model).__name__}: add a HeadRef for it to the "
                         f"{spec.name!r} ArchSpec's heads (hf_px.registry), or use method='ntk_diag'.")
    base = model.base_model
    blocks = spec.block_modules(base)
    norms = [(get_module(b, p), spec.norm_kind) for b in blocks for p in spec.norms]
    if spec.final_norm:
        norms.append((get_module(base, spec.final_norm), spec.norm_kind))
    run = SurrogateRun(blocks=blocks, activations=[get_module(b, spec.activation) for b in blocks], norms=norms,
                       gated=spec.gated_mlp, causal=spec.causal, a_gate=a_gate,
                       rescale=rescale or default_rescale(model))
    return run, head


def _layer_kinds(root: nn.Module) -> dict[int, str]:
    """{param id: "weight" | "bias"} for the linear layers of ``root``."""
    kinds = {}
    for module in root.modules():
        if is_linear_like(module):
            kinds[id(module.weight)] = "weight"
            if module.bias is not None:
                kinds[id(module.bias)] = "bias"
    return kinds


def _discarded_params(on: list[Target], off: list[Target]) -> set[int]:
    """Ids of the off-path weights (Q/K, a gated MLP's gate) that no on-path target shares.

    The surrogate discards their outputs in both auxiliary passes (attention reads the recorded P or all-ones
    mixing, the gated MLP its recorded coefficient or 1; docs/px.md §5.7), so they need no float64 copy: a
    zero of the right shape that takes no memory (an expanded scalar) gives the same passes.
    """
    on_ids = {id(t.param) for t in on}
    return {id(t.param) for t in off if id(t.param) not in on_ids}


def _placeholder(p: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=torch.float64).expand(p.shape)


def _a_params(root: nn.Module, on: list[Target], masks: dict, keep_dtype: set[int], discarded: set[int]) -> dict:
    """Parameters of the A pass: masks for targets, 1 for other weights, 0 for biases, θ (float64) elsewhere.

    Built per batch and dropped after its A pass, so these float64 copies never coexist with the record pass's
    autograd graph or with the B pass's leaves.
    """
    kinds, target_ids = _layer_kinds(root), {id(t.param): t.param_name for t in on}
    params = {}
    for name, p in root.named_parameters():
        kind = kinds.get(id(p))
        if id(p) in keep_dtype and kind is None:
            params[name] = p.detach()
        elif id(p) in discarded:
            params[name] = _placeholder(p)
        elif kind == "weight":
            mname = target_ids.get(id(p))
            params[name] = masks[mname].double() if mname else torch.ones_like(p, dtype=torch.float64)
        elif kind == "bias":
            params[name] = torch.zeros_like(p, dtype=torch.float64)
        else:
            params[name] = p.detach().double()
    return params


def _b_params(root: nn.Module, on: list[Target], keep_dtype: set[int], discarded: set[int],
              cache: dict | None) -> tuple[dict, dict]:
    """Parameters of the B pass (θ² for weights, 0 for biases, θ elsewhere) and its leaves {param id: θ²}.

    ``cache`` keeps the float64 θ of dense, never-pruned weights between rounds.
    """
    kinds, target_ids = _layer_kinds(root), {id(t.param) for t in on}
    cache = {} if cache is None else cache
    params, leaves = {}, {}
    for name, p in root.named_parameters():
        kind = kinds.get(id(p))
        if id(p) in keep_dtype and kind is None:
            params[name] = p.detach()
        elif id(p) in discarded:
            params[name] = _placeholder(p)
        elif kind == "weight":
            if id(p) in target_ids:
                theta = p.detach().double()
            elif name not in cache:  # a dense, never-pruned weight: its θ² is the same every round
                theta = cache[name] = p.detach().double()
            else:
                theta = cache[name]
            sq = theta * theta
            if id(p) in target_ids:
                sq.requires_grad_(True)
                leaves[id(p)] = sq
            params[name] = sq
        elif kind == "bias":
            params[name] = torch.zeros_like(p, dtype=torch.float64)
        else:
            params[name] = p.detach().double()
    return params, leaves


def _scores_into_leaves(r: torch.Tensor, leaves: dict[int, torch.Tensor]) -> None:
    """Backpropagate R and overwrite every leaf θ² with its PX score |∂R/∂θ²|·θ², in place.

    A leaf's accumulate hook fires once its gradient is complete, after every node that saved the leaf has run,
    so the leaf can take its score right there and the gradient can go: the scores cost no memory beyond the
    leaves, and one gradient exists at a time instead of all of them. (Were a later node still to need the leaf,
    autograd's version counter would raise, not miscompute.) |g|·θ² and θ²·|g| are the same float64 product;
    a leaf that gets no gradient scores 0·θ², as a zero gradient would.
    """
    done: set[int] = set()

    def hook(leaf: torch.Tensor) -> None:
        g, leaf.grad = leaf.grad, None
        with torch.no_grad():
            leaf.mul_(g.abs())
        done.add(id(leaf))

    tensors = list(leaves.values())
    handles = [leaf.register_post_accumulate_grad_hook(hook) for leaf in tensors]
    try:
        if tensors and r.requires_grad:
            torch.autograd.backward(r, inputs=tensors)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        for leaf in tensors:
            if id(leaf) not in done:
                leaf.mul_(0.0)
            leaf.requires_grad_(False)


def transformer_scores(model: nn.Module, targets: list[Target], masks: dict, batches: list, *,
                       qk_score: str = "ntk_diag", a_gate: str = "secant", rescale: float | None = None,
                       probes: int = 1, b_length: int | None = None, generator: torch.Generator | None = None,
                       cache: dict | None = None) -> tuple[dict[str, torch.Tensor], float]:
    """PX with the gated-linear surrogate on a registered transformer; returns (scores, R).

    Peak memory (scripts/bench_px_memory.py): the record pass's graph, the A pass's float64 parameters and the
    B pass's leaves are never held at once, the recorded gates carry no graph, the discarded Q/K (gate) weights
    get no float64 copy, and each B leaf becomes its score in place.
    """
    run, head = build_run(model, a_gate=a_gate, rescale=rescale)
    base = model.base_model
    on = [t for t in targets if t.on_path]
    off = [t for t in targets if not t.on_path]
    off_params = list({id(t.param): t.param for t in off}.values()) if qk_score == "ntk_diag" else []
    acc = [torch.zeros_like(p, dtype=torch.float64) for p in off_params]
    blocks_and_norms = list(run.blocks) + [m for m, _ in run.norms]
    inside = {id(p) for m in blocks_and_norms for p in m.parameters()}
    keep_dtype = {id(p) for p in base.parameters()} - inside  # embeddings: their output is replaced
    discarded = _discarded_params(on, off)
    pad_id = getattr(model.config, "pad_token_id", None)

    a_bar, lengths, example = None, torch.zeros(2, dtype=torch.float64), None
    was_training = model.training
    model.eval()
    try:
        with grads_for(model, off_params), surrogate_attention(model), run.installed():
            for batch in batches:
                inputs = model_inputs(batch)
                example = inputs
                mask = inputs.get("attention_mask")
                run.clear()
                gates: dict = {}
                with run.use("record"), torch.set_grad_enabled(bool(off_params)):
                    hidden = base(**inputs)[0]
                    out = run_head(head, pool(head, hidden, inputs, pad_id), "record", gates)
                    if off_params:
                        valid = mask.to(out.dtype).unsqueeze(-1) if head.pooling == "none" and mask is not None else None
                        accumulate_probe_grads(out, off_params, acc, probes, generator, valid)
                del hidden, out
                run.pad_mask = mask
                params_a = _a_params(base, on, masks, keep_dtype, discarded)
                with run.use("A"), torch.no_grad():
                    hidden_a = functional_call(base, params_a, (), inputs)[0]
                    out_a = run_head(head, pool(head, hidden_a, inputs, pad_id), "A", gates)
                    if head.pooling == "none" and mask is not None:
                        out_a = out_a * mask.to(out_a.dtype).unsqueeze(-1)
                del params_a, hidden_a
                run.pad_mask = None
                a_bar = _add_padded(a_bar, out_a.sum(0))
                if mask is not None:
                    lengths += torch.tensor([float(mask.sum()), float(mask.shape[0])], dtype=torch.float64)
            run.clear()  # the B pass reads no record
            if a_bar is None:
                raise ValueError("empty calibration set: PX needs at least one batch.")
            if head.pooling == "none":  # per-position outputs: ranks may have seen different lengths
                a_bar = _pad_rows(a_bar, int(all_reduce_max(torch.tensor(float(a_bar.shape[0])))))
            a_bar = all_reduce_sum(a_bar)
            acc = [all_reduce_sum(a) for a in acc]
            lengths = all_reduce_sum(lengths)

            params_b, leaves = _b_params(base, on, keep_dtype, discarded, cache)
            with run.use("B"), torch.enable_grad():
                b_inputs = _b_inputs(example, head.pooling, a_bar, lengths, b_length)
                hidden_b = functional_call(base, params_b, (), b_inputs)[0]
                out_b = run_head(head, pool(head, hidden_b, {}, None), "B")
                r = (a_bar * out_b[0]).sum()
                del params_b, hidden_b, out_b
                _scores_into_leaves(r, leaves)
    finally:
        run.clear()
        model.train(was_training)

    scores = {t.key: t.view(leaves[id(t.param)].detach()) for t in on}
    by_param = {id(p): a for p, a in zip(off_params, acc, strict=True)}
    for t in off:
        theta = t.view(t.param.detach().double())
        scores[t.key] = theta.abs() if qk_score == "magnitude" else theta * theta * t.view(by_param[id(t.param)])
    return scores, float(r.detach())


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] >= rows:
        return t
    return torch.cat([t, t.new_zeros((rows - t.shape[0], *t.shape[1:]))])


def _add_padded(total: torch.Tensor | None, part: torch.Tensor) -> torch.Tensor:
    """Sum of per-batch Ā; causal-LM outputs are per position and batches differ in length (zero-padded)."""
    if total is None:
        return part
    rows = max(total.shape[0], part.shape[0]) if part.dim() > 1 else None
    if rows is None:
        return total + part
    return _pad_rows(total, rows) + _pad_rows(part, rows)


def _b_inputs(example: dict, pooling: str, a_bar: torch.Tensor, lengths: torch.Tensor,
              b_length: int | None = None) -> dict:
    """Inputs of the B pass: one sequence of ``b_length`` or the typical real length (the LM's full length)."""
    if "input_ids" not in example:
        return {k: torch.zeros_like(v[:1]) for k, v in example.items() if torch.is_tensor(v)}
    if pooling == "none":
        length = a_bar.shape[0]
    elif b_length is not None:
        length = b_length
    elif lengths[1] > 0:
        length = max(1, int(round(float(lengths[0] / lengths[1]))))
    else:
        length = example["input_ids"].shape[1]
    return {"input_ids": torch.zeros((1, length), dtype=torch.long),
            "attention_mask": torch.ones((1, length), dtype=torch.long)}


@register_scorer
class PXScorer(Scorer):
    """PX: θ²·|∂R/∂θ²| of the data-weighted path norm (NTK-trace bound); Q/K by the NTK diagonal per block."""

    method = "px"
    description = "Path eXclusion: θ²·|∂R/∂θ²|, R = Σ Ā·B (data-weighted path norm); Q/K per block"
    uses_off_path = True
    options_class = PXOptions
    options: PXOptions

    def __init__(self, options: PXOptions | dict | None = None) -> None:
        super().__init__(options)
        self._cache: dict = {}
        self.last_r: float | None = None

    def prepare(self, ctx: ScoringContext) -> None:
        self._cache = {}

    def score(self, ctx: ScoringContext) -> dict[str, torch.Tensor]:
        opt = self.options
        if uses_path_network(ctx.model):
            scores, r = path_network_scores(ctx.model, ctx.targets, ctx.masks, ctx.batches,
                                            head_modules=opt.head_modules, bn=opt.bn, max_pool=opt.max_pool)
        else:
            scores, r = transformer_scores(
                ctx.model, ctx.targets, ctx.masks, ctx.batches, qk_score=opt.qk_score, a_gate=opt.a_gate,
                rescale=opt.rescale, probes=opt.hutchinson_probes, b_length=opt.b_length,
                generator=ctx.generator, cache=self._cache,
            )
        self.last_r = r
        return scores
