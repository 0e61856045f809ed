"""Whole-block removal that stock ``from_pretrained`` rebuilds, and the scores that choose the blocks.

:func:`remove_blocks` deletes repeated blocks in place, renumbers what holds a layer index (the KV cache reads
``layer_idx``) and rewrites the config (block count, per-layer lists) so the saved checkpoint reloads into the
same model with the stock classes. :func:`collapsed_blocks` finds the blocks whose residual writers are all
zero (what PX's layer collapse leaves behind) and :func:`rank_blocks` orders blocks by a pruning score.

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from hf_px.structure import remove_blocks
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3,
    ...     num_attention_heads=2, intermediate_size=32))
    >>> remove_blocks(model, [1])["layers_after"], model.config.num_hidden_layers
    (2, 2)
    >>> [layer.self_attn.layer_idx for layer in model.model.layers]
    [0, 1]
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import ArchSpec, base_model_of, find_arch, get_module, supported_architectures

# Config lists with one entry per block, shortened with the blocks: transformers' attention/MLP layer types
# and the ranks of PCN projection-mode BERT (PCNBertConfig). A list of another length is left alone; the reload
# check below refuses the config if transformers validates it against the block count.
PER_LAYER_LISTS = ("layer_types", "mlp_layer_types", "qkv_proj_ranks", "ffn_in_proj_ranks")
# Attributes of the module holding the block list that copy the block count (DistilBERT's Transformer.n_layers).
_COUNT_ATTRS = ("n_layers", "num_layers", "num_hidden_layers")


def arch_or_error(model: nn.Module, what: str) -> ArchSpec:
    """The registry entry of ``model``, or a ConfigError naming the supported families."""
    spec = find_arch(model)
    if spec is None:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ConfigError(
            f"{what} needs a registered architecture and {model_type!r} is not one. Supported families: "
            f"{', '.join(supported_architectures())} (BERT covers RoBERTa and MiniLM); register an ArchSpec "
            "with hf_px.registry.register_architecture."
        )
    if getattr(model, "config", None) is None:
        raise ConfigError(f"{what} rewrites the model's config, and {type(model).__name__} has none: pass a "
                          "transformers model (PreTrainedModel).")
    return spec


def config_attr(config: Any, name: str) -> str:
    """The attribute that really stores the standard config field ``name`` (through ``attribute_map``)."""
    real = getattr(type(config), "attribute_map", {}).get(name, name)
    if not hasattr(config, real):
        raise ConfigError(f"{type(config).__name__} has no {name!r} field (stored as {real!r}); set the ArchSpec's "
                          "field naming it to the config's own name.")
    return real


def check_reloadable(config: Any, what: str) -> None:
    """Refuse a config that the stock config class would reject when ``from_pretrained`` reads it back."""
    try:
        type(config).from_dict(config.to_dict())
    except Exception as exc:  # transformers raises its validators' own types; any of them means "no reload"
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{what}: the stock {type(config).__name__} refuses the new config ({reason.strip()}), "
                          "so from_pretrained could not rebuild the model; nothing was changed.") from exc


def check_indices(indices: Iterable[int], size: int, unit: str, where: str = "") -> list[int]:
    """Sorted indices, each an int in [0, size) and given once; ``where`` places them (" in block 2")."""
    values = list(indices)
    for i in values:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < size:
            raise ConfigError(f"{unit} index {i!r}{where} is out of range: there are {size} {unit}s{where}, "
                              f"numbered 0..{size - 1}.")
    dupes = sorted({i for i in values if values.count(i) > 1})
    if dupes:
        raise ConfigError(f"{unit} indices {dupes}{where} are given more than once; list each {unit} to remove once.")
    return sorted(values)


def _shrink_config(config: Any, spec: ArchSpec, n: int, kept: list[int]) -> dict[str, Any]:
    """Rewrite ``config`` for the kept blocks; returns {attribute: new value}."""
    changes: dict[str, Any] = {config_attr(config, spec.layers_attr): len(kept)}
    for name in PER_LAYER_LISTS:
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)) and len(value) == n:
            changes[name] = type(value)(value[i] for i in kept)
    pcn = getattr(config, "hf_px_pcn", None)
    if isinstance(pcn, Mapping):  # every list PCN records there has one entry per block (intermediate_sizes)
        changes["hf_px_pcn"] = {k: [v[i] for i in kept] if isinstance(v, list) and len(v) == n else v
                                for k, v in pcn.items()}
    for name, value in changes.items():
        setattr(config, name, value)
    return changes


def _renumber(block: nn.Module, old: int, new: int, spec: ArchSpec) -> None:
    # every module of the block that knows its position (attention's layer_idx indexes the KV cache) gets the
    # new one, as the constructor would give it on reload
    for module in block.modules():
        if isinstance(getattr(module, "layer_idx", None), int):
            module.layer_idx = new
    if spec.reindex is not None:
        spec.reindex(block, old, new)


def _holder(base: nn.Module, blocks: nn.ModuleList) -> nn.Module | None:
    return next((m for m in base.modules() if any(c is blocks for c in m.children())), None)


def remove_blocks(model: nn.Module, indices: Iterable[int]) -> dict[str, Any]:
    """Delete the repeated blocks ``indices`` in place; ``save_pretrained`` then reloads with the stock classes.

    Later blocks are renumbered (``layer_idx``, used by the KV cache) and the config gets the new block count
    (``num_hidden_layers``, GPT-2's ``n_layer``, DistilBERT's ``n_layers``) and shortened per-layer lists
    (``layer_types``, ``config.hf_px_pcn["intermediate_sizes"]``). Returns a record for reports: the removed and
    kept (old) indices, block counts, parameters removed and the config fields written.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=3, n_head=2, n_positions=32))
        >>> record = remove_blocks(model, [0])
        >>> record["kept"], record["config"], len(model.transformer.h)
        ([1, 2], {'n_layer': 2}, 2)
    """
    spec = arch_or_error(model, "remove_blocks")
    base = base_model_of(model)
    blocks = spec.blocks(base)
    n = len(blocks)
    removed = check_indices(indices, n, "block")
    if len(removed) == n:
        raise ConfigError(f"remove_blocks would remove all {n} blocks; keep at least one.")
    kept = [i for i in range(n) if i not in set(removed)]
    record: dict[str, Any] = {"architecture": spec.name, "removed": removed, "kept": kept, "layers_before": n,
                              "layers_after": len(kept), "params_removed": 0, "config": {}}
    if not removed:
        return record
    config = model.config
    count_attr = config_attr(config, spec.layers_attr)
    if getattr(config, count_attr) != n:
        raise ConfigError(f"config.{count_attr} is {getattr(config, count_attr)} but the model has {n} blocks; "
                          "a reload would not rebuild this model, so blocks cannot be removed consistently.")
    # validate the new config on a copy first so that a refused config leaves the model untouched
    trial = copy.deepcopy(config)
    _shrink_config(trial, spec, n, kept)
    check_reloadable(trial, "remove_blocks")

    record["params_removed"] = sum(p.numel() for i in removed for p in blocks[i].parameters())
    record["config"] = _shrink_config(config, spec, n, kept)
    for i in reversed(removed):  # ModuleList re-keys the rest after each deletion, so go from the back
        del blocks[i]
    for new, old in enumerate(kept):
        _renumber(blocks[new], old, new, spec)
    holder = _holder(base, blocks)
    for name in _COUNT_ATTRS:
        if holder is not None and getattr(holder, name, None) == n:
            setattr(holder, name, len(kept))
    return record


def _weight_part(module: nn.Module, split: tuple[int, int, int] | None) -> torch.Tensor:
    w = module.weight
    if split is None:
        return w
    dim, index, parts = split
    return w.narrow(dim, index * (w.shape[dim] // parts), w.shape[dim] // parts)


@torch.no_grad()
def collapsed_blocks(model: nn.Module) -> list[dict[str, Any]]:
    """Blocks whose residual branches add nothing: every matrix writing into the residual stream is all zero.

    Those writers are the ArchSpec's ``residual_roles`` (attention output and FFN output projections); they are
    what PX's layer collapse zeroes. Each entry gives the block, its writer roles, which of them have a bias and
    which biases are non-zero (a non-zero bias still adds a constant), and ``identity``: on a pre-norm family
    (Llama, GPT-2, ViT) with no non-zero bias the block is exactly the identity, so removing it changes nothing;
    a post-norm family (BERT) still applies its norms.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
        ...     num_attention_heads=2, intermediate_size=32))
        >>> for layer in (model.model.layers[1].self_attn.o_proj, model.model.layers[1].mlp.down_proj):
        ...     _ = layer.weight.data.zero_()
        >>> [(c["block"], c["identity"]) for c in collapsed_blocks(model)]
        [(1, True)]
    """
    spec = arch_or_error(model, "collapsed_blocks")
    refs = [ref for ref in spec.layers if ref.role in spec.residual_roles]
    if not refs:
        raise ConfigError(f"the {spec.name!r} ArchSpec lists no layer with a residual role "
                          f"({', '.join(spec.residual_roles)}); set its residual_roles.")
    found = []
    for b, block in enumerate(spec.blocks(base_model_of(model))):
        writers = [(ref.role, get_module(block, ref.path), ref.split) for ref in refs]
        if any(_weight_part(m, split).count_nonzero() for _, m, split in writers):
            continue
        with_bias = [role for role, m, _ in writers if getattr(m, "bias", None) is not None]
        nonzero = [role for role, m, _ in writers if getattr(m, "bias", None) is not None and m.bias.count_nonzero()]
        found.append({"block": b, "roles": [role for role, _, _ in writers], "bias": with_bias,
                      "nonzero_bias": nonzero, "identity": spec.pre_norm and not nonzero})
    return found


def score_once(model: nn.Module, batches: list | None, method: str, options: Any,
               what: str) -> tuple[ArchSpec, list, dict[str, torch.Tensor]]:
    """Score every prunable weight once at full density with ``method``'s registered scorer.

    Returns (spec, targets, scores by target key). Targets keep ``on_path`` only for scorers that use it (PX's
    Q/K are scored by another quantity and only ranked within their block).
    """
    from ..config import PruneConfig
    from ..pruning.masks import init_masks
    from ..pruning.scoring import ScoringContext, get_scorer
    from ..pruning.targets import collect_targets

    spec = arch_or_error(model, what)
    config = PruneConfig(method=method, options=options)
    scorer = get_scorer(config.method, config.options)
    batches = list(batches) if batches is not None else []
    if scorer.needs_data and not batches:
        raise ConfigError(f"{what} with method {method!r} needs calibration batches: pass a non-empty list "
                          "(e.g. hf_px.calibration_batches(dataset, tokenizer, per_class=10)).")
    targets = collect_targets(model)
    if not scorer.uses_off_path:
        targets = [dataclasses.replace(t, on_path=True, follows=()) for t in targets]
    ctx = ScoringContext(model=model, targets=targets, masks=init_masks(targets), batches=batches, config=config,
                         generator=torch.Generator().manual_seed(config.seed))
    was_training = model.training  # ranking is a read-only look at the model: leave its mode as it was
    try:
        scorer.prepare(ctx)
        ctx.round = 1
        scores = scorer.score(ctx)
    finally:
        model.train(was_training)
    return spec, targets, scores


def rank_blocks(model: nn.Module, batches: list | None, method: str = "px",
                options: Any = None) -> list[dict[str, Any]]:
    """Blocks ordered least important first by the summed scores of their prunable weights.

    Every prunable weight is scored once at full density by ``method``'s registered scorer (``options`` as in
    ``PruneConfig``). A block's ``score`` sums its on-path weights; PX's off-path Q/K (and a gated MLP's gate)
    are scored by the NTK diagonal, another unit, so they are reported apart as ``off_path_score``. ``share``
    is the block's part of the total score of all blocks; ``params`` counts its scored weights. Signed scorers
    (``grasp``, ``random``) give signed sums.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
        ...     num_attention_heads=2, intermediate_size=32)).eval()
        >>> batches = [{"input_ids": torch.randint(0, 50, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}]
        >>> ranking = rank_blocks(model, batches, method="magnitude")
        >>> sorted(r["block"] for r in ranking), round(sum(r["share"] for r in ranking), 6)
        ([0, 1], 1.0)
    """
    _, targets, scores = score_once(model, batches, method, options, "rank_blocks")
    rows: dict[int, dict[str, Any]] = {}
    for t in targets:
        row = rows.setdefault(t.block, {"block": t.block, "score": 0.0, "off_path_score": 0.0, "params": 0})
        row["score" if t.on_path else "off_path_score"] += float(scores[t.key].double().sum())
        row["params"] += t.numel()
    total = sum(r["score"] for r in rows.values())
    for r in rows.values():
        r["share"] = r["score"] / total if total else 0.0
    return sorted(rows.values(), key=lambda r: (r["score"], r["block"]))
