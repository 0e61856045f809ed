"""Option B: per-block shared input basis for Q/K/V, optionally the FFN input (docs/pcn.md §6).

For block input h with calibration mean μ and top-k principal directions U (D×k), the block computes
z = Uᵀ(h − μ) once (a frozen ``nn.Linear(D, k)`` with weight Uᵀ and bias −Uᵀμ) and Q/K/V become
``Linear(k, ·)`` with W' = WU and b' = b + Wμ, so W'z + b' = W(μ + UUᵀ(h − μ)) + b, exact when k = D.
The model is converted in place to the registered ``pcn_bert`` classes (see ``modeling.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..registry import ArchSpec, base_model_of, get_module
from .config import PCNConfig, PCNLayerReport
from .modeling import CONVERSIONS, PCNBertConfig, PCNBertIntermediate, PCNBertSelfAttention
from .stats import choose_width, collect_input_moments, explained_variance, pca


def _check_supported(model: nn.Module, spec: ArchSpec) -> None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type == "pcn_bert":
        raise ValueError("this model is already in PCN projection mode; apply projection mode once, to a "
                         "stock BERT model (structured mode may run before it).")
    if spec.name != "bert" or model_type != "bert" or type(model) not in CONVERSIONS:
        supported = ", ".join(c.__name__ for c in CONVERSIONS)
        raise ValueError(
            f"PCN projection mode supports BERT-family models ({supported}); got {type(model).__name__} "
            f"(model_type {model_type!r}). Use PCNConfig(mode='structured'), which supports every registered "
            "architecture with an FFN."
        )


def _fold(linear: nn.Linear, basis: torch.Tensor, mean: torch.Tensor) -> nn.Linear:
    """A Linear(k, out) reading z = Uᵀ(h − μ): W' = WU, b' = b + Wμ (computed in float64)."""
    w = linear.weight.detach().double()
    basis, mean = basis.to(w.device), mean.to(w.device)  # statistics live on the CPU
    b = linear.bias.detach().double() if linear.bias is not None else \
        torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
    new = nn.Linear(basis.shape[1], w.shape[0], dtype=linear.weight.dtype, device=linear.weight.device)
    with torch.no_grad():
        new.weight.copy_(w @ basis)
        new.bias.copy_(b + w @ mean)
    new.weight.requires_grad_(linear.weight.requires_grad)
    new.bias.requires_grad_(linear.weight.requires_grad)
    return new


def _set_basis(proj: nn.Linear, basis: torch.Tensor, mean: torch.Tensor, like: torch.Tensor) -> None:
    proj.to(device=like.device)
    basis, mean = basis.to(like.device), mean.to(like.device)
    with torch.no_grad():
        proj.weight.copy_(basis.T)
        proj.bias.copy_(-(basis.T @ mean))
    proj.to(dtype=like.dtype, device=like.device)


def _ranks(moments: dict, keys: list[str], full: int, config: PCNConfig, what: str):
    plans = []
    for key in keys:
        evals, evecs = pca(moments[key].covariance())
        width, k = choose_width(evals, full, config.variance, config.width, config.multiple_of, what=what)
        plans.append([key, evals, evecs, width, k])
    if config.uniform:
        target = max(p[3] for p in plans)
        for p in plans:
            p[3] = target
    return plans


def _convert_config(model: nn.Module, qkv: list[int], ffn: list[int | None]) -> PCNBertConfig:
    old = model.config
    data = old.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "auto_map"):
        data.pop(key, None)
    new = PCNBertConfig(**data, qkv_proj_ranks=qkv, ffn_in_proj_ranks=ffn)
    new._attn_implementation = old._attn_implementation
    new.name_or_path = old.name_or_path
    return new


def projection_pcn(model: nn.Module, batches: list[dict[str, torch.Tensor]], config: PCNConfig,
                   spec: ArchSpec) -> tuple[list[PCNLayerReport], int]:
    """Insert the bases, rewrite Q/K/V (and FFN-in) and turn ``model`` into its ``pcn_bert`` class in place."""
    _check_supported(model, spec)
    roles = {ref.role: ref.path for ref in spec.layers}
    blocks = list(spec.blocks(base_model_of(model)))
    hooked = {f"qkv{i}": get_module(b, roles["q"]) for i, b in enumerate(blocks)}
    if config.project_ffn_input:
        hooked.update({f"ffn{i}": get_module(b, roles["ffn_in"]) for i, b in enumerate(blocks)})
    moments, tokens = collect_input_moments(model, batches, hooked)
    hidden = model.config.hidden_size
    qkv_plans = _ranks(moments, [f"qkv{i}" for i in range(len(blocks))], hidden, config, "attention input")
    ffn_plans = (_ranks(moments, [f"ffn{i}" for i in range(len(blocks))], hidden, config, "FFN input")
                 if config.project_ffn_input else [])
    qkv_ranks = [int(p[3]) for p in qkv_plans]
    ffn_ranks: list[int | None] = [int(p[3]) for p in ffn_plans] or [None] * len(blocks)
    new_config = _convert_config(model, qkv_ranks, ffn_ranks)
    reports = []
    for i, block in enumerate(blocks):
        _, evals, evecs, rank, k = qkv_plans[i]
        basis, mean = evecs[:, :rank], moments[f"qkv{i}"].mean
        old = block.attention.self
        new = PCNBertSelfAttention(new_config, rank, is_causal=old.is_causal, layer_idx=old.layer_idx)
        _set_basis(new.proj_a, basis, mean, old.query.weight)
        new.query, new.key, new.value = (_fold(m, basis, mean) for m in (old.query, old.key, old.value))
        new.train(old.training)
        block.attention.self = new
        reports.append(PCNLayerReport(layer=i, kind="qkv_in", width_before=hidden, width_after=rank,
                                      explained_variance=explained_variance(evals, rank), components=k))
        if ffn_plans:
            _, evals, evecs, rank, k = ffn_plans[i]
            basis, mean = evecs[:, :rank], moments[f"ffn{i}"].mean
            old_int = block.intermediate
            new_int = PCNBertIntermediate(new_config, rank)
            _set_basis(new_int.proj_f, basis, mean, old_int.dense.weight)
            new_int.dense = _fold(old_int.dense, basis, mean)
            new_int.intermediate_act_fn = old_int.intermediate_act_fn
            new_int.train(old_int.training)
            block.intermediate = new_int
            reports.append(PCNLayerReport(layer=i, kind="ffn_in", width_before=hidden, width_after=rank,
                                          explained_variance=explained_variance(evals, rank), components=k))
    old_config = model.config
    for m in model.modules():
        if getattr(m, "config", None) is old_config:
            m.config = new_config
    # the converted class only differs in __init__ (which builds these same modules) and its config class
    model.__class__ = CONVERSIONS[type(model)]
    return reports, tokens
