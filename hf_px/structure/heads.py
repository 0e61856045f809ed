"""Attention-head removal that stock ``from_pretrained`` rebuilds (Llama family), and per-head scores.

A stock config has one head count for every layer, so :func:`remove_heads` removes the same number of heads in
every block and writes ``num_attention_heads``, ``num_key_value_heads`` and an explicit ``head_dim``. With
grouped-query attention the query heads of one key/value head form a group: removing the KV head removes its
group, and removing query heads must leave every remaining group the same size. Families whose head size is
``hidden_size / num_attention_heads`` (BERT, DistilBERT, GPT-2, ViT) cannot express fewer heads and are refused.
:func:`rank_heads` scores heads of any registered family.

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from hf_px.structure import remove_heads
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
    ...     num_attention_heads=4, num_key_value_heads=2, intermediate_size=32))
    >>> record = remove_heads(model, {0: [1], 1: [0]}, kv_heads=True)
    >>> model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim
    (2, 1, 4)
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import ArchSpec, base_model_of, get_module, is_transposed, weight_out_in
from .blocks import arch_or_error, check_indices, check_reloadable, config_attr, score_once

_ATTN_ROLES = ("q", "k", "v", "o")


def _head_counts(config: Any, spec: ArchSpec) -> tuple[int, int]:
    """(query heads, key/value heads) from the config's standard fields."""
    n_heads = int(getattr(config, config_attr(config, spec.heads_attr)))
    n_kv = getattr(config, config_attr(config, spec.kv_heads_attr)) if spec.kv_heads_attr else None
    n_kv = int(n_kv or n_heads)
    if n_heads % n_kv:
        raise ConfigError(f"{n_heads} query heads cannot be grouped over {n_kv} key/value heads.")
    return n_heads, n_kv


def _attn_modules(spec: ArchSpec, block: nn.Module, what: str) -> dict[str, nn.Module]:
    refs = {ref.role: ref for ref in spec.layers if ref.role in _ATTN_ROLES}
    missing = [r for r in _ATTN_ROLES if r not in refs]
    if missing:
        raise ConfigError(f"{what} needs the q, k, v and o layers of the {spec.name!r} ArchSpec; it lists no "
                          f"{', '.join(missing)}.")
    if what == "remove_heads" and any(refs[r].split is not None for r in _ATTN_ROLES):
        raise ConfigError(f"remove_heads cannot cut the fused attention weight of the {spec.name!r} ArchSpec.")
    return {r: get_module(block, refs[r].path) for r in _ATTN_ROLES}


@torch.no_grad()
def _keep(module: nn.Module, index: torch.Tensor, outputs: bool) -> None:
    """Keep the given output features (rows of W in (out, in) terms) or input features of a Linear/Conv1D."""
    w = module.weight
    dim = int(outputs == is_transposed(module))  # Linear stores (out, in), Conv1D (in, out)
    index = index.to(w.device)
    module.weight = nn.Parameter(w.index_select(dim, index), requires_grad=w.requires_grad)
    if outputs and module.bias is not None:
        module.bias = nn.Parameter(module.bias.index_select(0, index), requires_grad=module.bias.requires_grad)
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = weight_out_in(module).shape
    elif outputs and hasattr(module, "nf"):  # Conv1D
        module.nf = len(index)


def _rows(heads: list[int], head_dim: int) -> torch.Tensor:
    return torch.tensor([h * head_dim + j for h in heads for j in range(head_dim)], dtype=torch.long)


def _stock_heads_error(config: Any, spec: ArchSpec) -> ConfigError:
    heads = getattr(config, config_attr(config, spec.heads_attr))
    hidden = getattr(config, "hidden_size", None)
    return ConfigError(
        f"remove_heads: {type(config).__name__} ({spec.name}) derives the head size from hidden_size / "
        f"num_attention_heads ({hidden} / {heads}), so the stock config cannot express fewer heads of the same size "
        "and from_pretrained would rebuild the old shapes. Shrink the FFN with PCN widths (hf_px.pcn.PCNConfig) or "
        "remove whole blocks with hf_px.structure.remove_blocks instead."
    )


def _plan(removed: list[int], n_heads: int, n_kv: int, block: int) -> tuple[list[int], list[int]]:
    """(surviving KV heads, kept query heads) of one block, refusing groups of unequal size."""
    rep = n_heads // n_kv
    gone = set(removed)
    left = [sum(1 for q in range(g * rep, (g + 1) * rep) if q not in gone) for g in range(n_kv)]
    survivors = [g for g in range(n_kv) if left[g]]
    if len({left[g] for g in survivors}) > 1:
        raise ConfigError(
            f"remove_heads: block {block} would leave key/value groups with different numbers of query heads "
            f"({', '.join(f'group {g}: {left[g]}' for g in range(n_kv))}). With grouped-query attention ({rep} "
            f"query heads share each of {n_kv} key/value heads) every remaining group must keep the same number: "
            "remove whole groups (kv_heads=True) or the same number of query heads from every group."
        )
    return survivors, [q for q in range(n_heads) if q not in gone]


def remove_heads(model: nn.Module, heads: Mapping[int, Iterable[int]], *, kv_heads: bool = False) -> dict[str, Any]:
    """Remove attention heads in place: ``heads`` maps a block index to the heads removed there.

    Indices are query heads, or key/value heads with ``kv_heads=True`` (each takes its whole query group). Every
    block must lose the same number of heads and keep the same number of key/value heads (the stock config has
    one count for all layers); blocks not in ``heads`` lose none. The config gets ``num_attention_heads``,
    ``num_key_value_heads`` and an explicit ``head_dim``, so ``save_pretrained`` reloads with the stock classes.
    Zero a head's output columns first (``o_proj``) and its removal leaves the outputs unchanged. Returns a record
    for reports. Families whose head size is hidden_size / heads (BERT, GPT-2...) raise a ConfigError.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
        ...     num_attention_heads=4, num_key_value_heads=2, intermediate_size=32))
        >>> record = remove_heads(model, {0: [1, 3], 1: [0, 2]})   # one query head from each group
        >>> record["heads_after"], record["kv_heads_after"], tuple(model.model.layers[0].self_attn.q_proj.weight.shape)
        (2, 2, (8, 16))
    """
    spec = arch_or_error(model, "remove_heads")
    config = model.config
    if spec.head_dim_attr is None:
        raise _stock_heads_error(config, spec)
    blocks = spec.blocks(base_model_of(model))
    n_heads, n_kv = _head_counts(config, spec)
    rep = n_heads // n_kv
    check_indices(list(heads), len(blocks), "block")
    removed: dict[int, list[int]] = {}
    for b in range(len(blocks)):
        where = f" in block {b}"
        if kv_heads:
            groups = check_indices(heads.get(b, ()), n_kv, "key/value head", where)
            removed[b] = [q for g in groups for q in range(g * rep, (g + 1) * rep)]
        else:
            removed[b] = check_indices(heads.get(b, ()), n_heads, "head", where)
    counts = {b: len(r) for b, r in removed.items()}
    if len(set(counts.values())) > 1:
        raise ConfigError(
            "remove_heads: the stock config has one head count for all layers, so remove the same number of heads "
            f"in every block (query heads removed per block: {counts})."
        )
    count = counts[0]
    head_dim = weight_out_in(_attn_modules(spec, blocks[0], "remove_heads")["q"]).shape[0] // n_heads
    record: dict[str, Any] = {"architecture": spec.name, "removed": removed, "removed_kv_heads": {},
                              "heads_before": n_heads, "heads_after": n_heads - count, "kv_heads_before": n_kv,
                              "kv_heads_after": n_kv, "head_dim": head_dim, "params_removed": 0, "config": {}}
    if count == 0:
        return record
    if count == n_heads:
        raise ConfigError(f"remove_heads would remove all {n_heads} heads of every block; remove whole blocks "
                          "with hf_px.structure.remove_blocks instead.")
    plans = {b: _plan(r, n_heads, n_kv, b) for b, r in removed.items()}
    shapes = {b: len(kv) for b, (kv, _) in plans.items()}
    if len(set(shapes.values())) > 1:
        raise ConfigError(
            "remove_heads: the stock config has one key/value head count for all layers, but the blocks would keep "
            f"different numbers of key/value heads ({shapes}); remove heads from the same number of groups in every "
            "block."
        )
    new_kv, new_heads = shapes[0], n_heads - count
    changes = {config_attr(config, spec.heads_attr): new_heads, spec.head_dim_attr: head_dim}
    if spec.kv_heads_attr:
        changes[config_attr(config, spec.kv_heads_attr)] = new_kv
    trial = copy.deepcopy(config)  # check the reload first so that a refused config leaves the model untouched
    for name, value in changes.items():
        setattr(trial, name, value)
    check_reloadable(trial, "remove_heads")

    before = sum(p.numel() for p in model.parameters())
    for b, block in enumerate(blocks):
        survivors, kept = plans[b]
        mods = _attn_modules(spec, block, "remove_heads")
        q_rows, kv_rows = _rows(kept, head_dim), _rows(survivors, head_dim)
        _keep(mods["q"], q_rows, outputs=True)
        _keep(mods["k"], kv_rows, outputs=True)
        _keep(mods["v"], kv_rows, outputs=True)
        _keep(mods["o"], q_rows, outputs=False)
        attn = get_module(block, spec.attention)
        # attributes the attention module copied from the config at construction (Llama: num_key_value_groups)
        for name, value in (("num_key_value_groups", new_heads // new_kv), ("num_heads", new_heads),
                            ("num_attention_heads", new_heads), ("num_key_value_heads", new_kv)):
            if isinstance(getattr(attn, name, None), int):
                setattr(attn, name, value)
        record["removed_kv_heads"][b] = [g for g in range(n_kv) if g not in survivors]
    for name, value in changes.items():
        setattr(config, name, value)
    record.update(kv_heads_after=new_kv, config=changes,
                  params_removed=before - sum(p.numel() for p in model.parameters()))
    return record


def rank_heads(model: nn.Module, batches: list | None, method: str = "px", options: Any = None, *,
               kv_heads: bool = False) -> list[dict[str, Any]]:
    """Attention heads ordered least important first by the summed scores of their weights.

    Every prunable weight is scored once at full density by ``method``'s registered scorer. A query head sums
    its rows of Q, its columns of O and, with grouped-query attention, its share (1 / group size) of its key/value
    head's rows of K and V; with ``kv_heads=True`` a key/value head sums its K/V rows and its whole query group.
    As in :func:`~hf_px.structure.rank_blocks`, PX's off-path Q/K scores (another unit) go to ``off_path_score``
    and ``score`` sums the on-path ones; ``share`` is the part of the total over all heads.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
        ...     num_attention_heads=4, num_key_value_heads=2, intermediate_size=32)).eval()
        >>> batches = [{"input_ids": torch.randint(0, 50, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}]
        >>> sorted(r["kv_head"] for r in rank_heads(model, batches, method="magnitude", kv_heads=True))
        [0, 1]
    """
    spec, targets, scores = score_once(model, batches, method, options, "rank_heads")
    n_heads, n_kv = _head_counts(model.config, spec)
    rep = n_heads // n_kv
    by_role = {(t.block, t.role): t for t in targets}
    rows = []
    for b, block in enumerate(spec.blocks(base_model_of(model))):
        mods = _attn_modules(spec, block, "rank_heads")
        per: dict[str, tuple[torch.Tensor, bool]] = {}
        for role in _ATTN_ROLES:
            t = by_role[(b, role)]
            s = scores[t.key].double()
            s = s.T if is_transposed(mods[role]) else s  # now (out, in) like the head layout
            if role == "o":  # input columns are the heads
                per[role] = (s.reshape(s.shape[0], n_heads, -1).sum((0, 2)), t.on_path)
            else:
                per[role] = (s.reshape(n_kv if role in ("k", "v") else n_heads, -1).sum(1), t.on_path)
        units = range(n_kv) if kv_heads else range(n_heads)
        for u in units:
            row = {"block": b, "kv_head": u if kv_heads else u // rep, "score": 0.0, "off_path_score": 0.0}
            if kv_heads:
                row["heads"] = list(range(u * rep, (u + 1) * rep))
            else:
                row["head"] = u
            for role, (values, on_path) in per.items():
                if role in ("k", "v"):
                    value = float(values[u]) if kv_heads else float(values[u // rep]) / rep
                else:
                    value = float(values[u * rep:(u + 1) * rep].sum()) if kv_heads else float(values[u])
                row["score" if on_path else "off_path_score"] += value
            rows.append(row)
    total = sum(r["score"] for r in rows)
    for r in rows:
        r["share"] = r["score"] / total if total else 0.0
    return sorted(rows, key=lambda r: (r["score"], r["block"], r.get("head", r["kv_head"])))
