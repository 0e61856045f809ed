"""Option A: FFN-intermediate PCA -> neuron selection (docs/pcn.md §5). The result reloads with stock classes.

Per block, a centred float64 PCA of what the FFN output matrix reads (act(in(x)), or act(gate(x)) * up(x) for a
gated MLP) picks k principal directions; every intermediate neuron is scored by its loading on them
(leverage or L1) and the top ones keep their rows of the input (and gate) matrices and their columns of the
output matrix. The dropped neurons' calibration mean is folded into the output bias.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..registry import (
    ArchSpec,
    base_model_of,
    get_arch,
    get_module,
    is_linear_like,
    is_transposed,
    weight_out_in,
)
from .config import PCNConfig, PCNLayerReport
from .stats import choose_width, collect_input_moments, explained_variance, pca


@dataclass
class FFNSite:
    index: int
    ffn_in: nn.Module
    ffn_out: nn.Module
    ffn_gate: nn.Module | None = None


def ffn_sites(model: nn.Module, spec: ArchSpec) -> list[FFNSite]:
    """The FFN matrices of every block, found through the registry roles ``ffn_in``/``ffn_gate``/``ffn_out``."""
    paths = {ref.role: ref.path for ref in spec.layers}
    if "ffn_in" not in paths or "ffn_out" not in paths:
        raise ValueError(
            f"the registry entry {spec.name!r} has no FFN (roles 'ffn_in' and 'ffn_out'), so PCN cannot select "
            "FFN neurons; register them in its ArchSpec.layers or use another architecture."
        )
    sites = []
    for i, block in enumerate(spec.blocks(base_model_of(model))):
        gate = get_module(block, paths["ffn_gate"]) if "ffn_gate" in paths else None
        sites.append(FFNSite(i, get_module(block, paths["ffn_in"]), get_module(block, paths["ffn_out"]), gate))
    return sites


def _set_weight(m: nn.Module, w_out_in: torch.Tensor) -> None:
    w = w_out_in.T if is_transposed(m) else w_out_in
    m.weight = nn.Parameter(w.contiguous(), requires_grad=m.weight.requires_grad)
    if is_transposed(m):
        m.nx, m.nf = m.weight.shape
    else:
        m.out_features, m.in_features = m.weight.shape


def keep_outputs(m: nn.Module, idx: torch.Tensor) -> None:
    """Keep output units ``idx`` of a Linear/Conv1D (weight rows and bias entries)."""
    _set_weight(m, weight_out_in(m).detach()[idx])
    if m.bias is not None:
        m.bias = nn.Parameter(m.bias.detach()[idx].contiguous(), requires_grad=m.bias.requires_grad)


def keep_inputs(m: nn.Module, idx: torch.Tensor) -> None:
    """Keep input features ``idx`` of a Linear/Conv1D (weight columns)."""
    _set_weight(m, weight_out_in(m).detach()[:, idx])


def ensure_bias(m: nn.Module) -> bool:
    """Give a bias-less Linear a zero bias; returns True if one was created."""
    if m.bias is not None:
        return False
    w = m.weight
    m.bias = nn.Parameter(torch.zeros(weight_out_in(m).shape[0], dtype=w.dtype, device=w.device),
                          requires_grad=w.requires_grad)
    return True


def neuron_order(evecs: torch.Tensor, evals: torch.Tensor, variances: torch.Tensor, k: int, score: str,
                 out_norms: torch.Tensor | None = None) -> torch.Tensor:
    """Neuron indices, best first, by loading on the top ``k`` principal directions.

    ``leverage``: Σ_{i≤k} V[j,i]²; ``l1``: Σ_{i≤k} |V[j,i]| (PCN); ``weighted``: Σ_{i≤k} λ_i V[j,i]² (PCN's
    eigenvalue-weighted rows, the neuron's variance inside the top-k subspace); ``output``: ``weighted`` times
    ‖W_out[:, j]‖², the neuron's share of the FFN output variance. Ties (e.g. leverage once k reaches the
    activation rank, where every leverage is 1) go to the neuron with the larger variance.
    """
    top = evecs[:, :k]
    if score == "leverage":
        scores = (top**2).sum(1)
    elif score == "l1":
        scores = top.abs().sum(1)
    else:
        scores = (top**2) @ evals[:k]
        if score == "output":
            assert out_norms is not None
            scores = scores * out_norms
    by_var = torch.sort(variances, descending=True, stable=True).indices
    by_score = torch.sort(scores[by_var], descending=True, stable=True).indices
    return by_var[by_score]


def _select(site: FFNSite, keep: torch.Tensor, zeroed: torch.Tensor, mean: torch.Tensor,
            mean_compensation: bool) -> bool:
    """Cut ``site`` to ``keep`` neurons; ``zeroed`` (a subset of ``keep``) become exact-zero padding.

    Returns True if a bias had to be created on the output matrix.
    """
    w_out = weight_out_in(site.ffn_out).detach()
    created = False
    if mean_compensation:
        dropped = torch.ones(w_out.shape[1], dtype=torch.bool)
        dropped[keep] = False
        dropped[zeroed] = True
        if bool(dropped.any()):
            created = ensure_bias(site.ffn_out)
            shift = w_out[:, dropped.to(w_out.device)].double() @ mean[dropped].to(w_out.device)
            with torch.no_grad():
                site.ffn_out.bias += shift.to(site.ffn_out.bias.dtype)
    for m in (site.ffn_in, site.ffn_gate):
        if m is not None:
            keep_outputs(m, keep)
    keep_inputs(site.ffn_out, keep)
    if zeroed.numel():
        pos = torch.searchsorted(keep, zeroed)  # positions of the padding neurons after the cut
        with torch.no_grad():
            for m in (site.ffn_in, site.ffn_gate):
                if m is not None:
                    weight_out_in(m)[pos] = 0
                    if m.bias is not None:
                        m.bias[pos] = 0
            weight_out_in(site.ffn_out)[:, pos] = 0
    return created


def structured_pcn(model: nn.Module, batches: list[dict[str, torch.Tensor]], config: PCNConfig,
                   spec: ArchSpec) -> tuple[list[PCNLayerReport], int]:
    """Select FFN neurons of every block in place; returns the per-layer reports and calibration tokens."""
    sites = ffn_sites(model, spec)
    moments, tokens = collect_input_moments(model, batches, {str(s.index): s.ffn_out for s in sites})
    plans = []
    for site in sites:
        mom = moments[str(site.index)]
        full = mom.dim
        cov = mom.covariance()
        evals, evecs = pca(cov)
        width, k = choose_width(evals, full, config.variance, config.width, config.multiple_of,
                                what=f"FFN (block {site.index})")
        plans.append((site, mom, cov, evals, evecs, width, k, full))
    target = max(p[5] for p in plans)
    reports, created_any = [], False
    for site, mom, cov, evals, evecs, width, k, full in plans:
        kept_width = target if config.uniform else width
        out_norms = (weight_out_in(site.ffn_out).detach().double() ** 2).sum(0)
        order = neuron_order(evecs, evals, torch.diagonal(cov), min(k, full), config.score, out_norms)
        real = order[:kept_width]
        keep = torch.sort(order[:target]).values
        zeroed = torch.sort(order[kept_width:target]).values
        var = torch.diagonal(cov)
        selected = float(var[real].sum() / var.sum()) if float(var.sum()) > 0 else 1.0
        if target < full or zeroed.numel():
            created_any |= _select(site, keep, zeroed, mom.mean, config.mean_compensation)
        reports.append(PCNLayerReport(layer=site.index, kind="ffn", width_before=full, width_after=kept_width,
                                      explained_variance=explained_variance(evals, k), components=k,
                                      selected_variance=selected))
    _record_widths(model, spec, sites, target, [r.width_after for r in reports], config, created_any)
    return reports, tokens


def _record_widths(model: nn.Module, spec: ArchSpec, sites: list[FFNSite], target: int, widths: list[int],
                   config: PCNConfig, created_bias: bool) -> None:
    cfg = model.config
    if not hasattr(cfg, spec.ffn_width_attr):
        raise ValueError(f"{type(cfg).__name__} has no {spec.ffn_width_attr!r} (the {spec.name!r} ArchSpec's "
                         "ffn_width_attr); PCN cannot record the new FFN width in the config.")
    setattr(cfg, spec.ffn_width_attr, target)
    if not config.uniform:
        cfg.hf_px_pcn = {"mode": "structured", "intermediate_sizes": [int(w) for w in widths],
                         "padded_to": int(target)}
    if created_bias:
        # one flag (Llama: mlp_bias) gives every MLP matrix a bias, so the reloaded model has the new output
        # bias; the input/gate matrices get zero biases to match
        if spec.ffn_bias_attr is not None:
            setattr(cfg, spec.ffn_bias_attr, True)
            for s in sites:
                for m in (s.ffn_in, s.ffn_gate, s.ffn_out):
                    if m is not None:
                        ensure_bias(m)
        else:
            warnings.warn(
                "mean compensation created an FFN output bias that this architecture's config cannot express; "
                "stock from_pretrained will drop it. Use PCNConfig(mean_compensation=False) for an exact reload.",
                stacklevel=3,
            )


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def linear_flops(model: nn.Module, nonzero: bool = False) -> int:
    """Matmul FLOPs per token: 2 (a multiply and an add) x the weights of every Linear/Conv1D of the model.

    The one count hf-px reports, in PCN's report and in ``hf-px run``'s size table and card: blocks, pooler and
    heads (a causal LM's output matrix too); embedding lookups and the attention score products, which grow with
    the sequence rather than the weights, are not counted. ``nonzero=True`` counts the non-zero weights only (what
    a sparse kernel multiplies). Only shapes are read without ``nonzero``, so a meta-device model works.
    """
    total = 0
    for m in model.modules():
        if is_linear_like(m):
            w = weight_out_in(m)
            total += 2 * (int(torch.count_nonzero(w)) if nonzero else w.numel())
    return total


def measured_width(model: nn.Module, config: PCNConfig) -> int:
    """The widest activation PCN takes a PCA of: the FFN width (structured) or the hidden size (projection).

    Reads shapes only, so a meta-device skeleton answers without loading weights.
    """
    spec = get_arch(model)
    if config.mode == "structured":
        return max(weight_out_in(s.ffn_out).shape[1] for s in ffn_sites(model, spec))
    return int(model.config.hidden_size)
