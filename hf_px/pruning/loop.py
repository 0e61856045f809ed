"""``hf_px.prune``: the iterative pruning loop, written once for every scoring method."""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import PruneConfig
from ..registry import find_arch
from .masks import apply_masks, density_schedule, init_masks, select_masks
from .report import Report, layer_rows
from .scoring import ScoringContext, get_scorer
from .sharded import is_sharded, prune_sharded
from .targets import collect_targets, is_transformers_model


@dataclass
class PruneResult:
    """What :func:`prune` returns.

    ``model`` is the pruned model itself (zeros baked into its weights, no hooks left), ``masks`` the boolean
    masks by parameter name, ``report`` a :class:`~hf_px.pruning.report.Report` (prints as a table, ``to_dict()`` for JSON).
    """

    model: nn.Module
    masks: dict[str, torch.Tensor]
    report: Report
    config: PruneConfig
    tokenizer: Any = None
    extras: dict[str, Any] = field(default_factory=dict)

    def save_pretrained(self, save_directory: str, format: str = "dense", **kwargs: Any):
        """Save model (+ tokenizer, model card, hf_px.json) atomically; ``format`` is "dense" or "sparse"."""
        from ..export.serialization import save_pretrained

        kwargs.setdefault("tokenizer", self.tokenizer)
        return save_pretrained(self.model, save_directory, format=format, masks=self.masks,
                               metadata={"report": self.report.to_dict()}, **kwargs)

    def push_to_hub(self, repo_id: str, format: str = "dense", private: bool = False, **kwargs: Any) -> str:
        """Save to a temporary folder and push it as one commit; returns the commit URL."""
        import tempfile

        from ..export.card import build_card, pipeline_tag_for
        from ..export.hub import push_to_hub

        card = build_card(self.report.to_dict(), base_model=self.report.get("base_model"), format=format,
                          pipeline_tag=pipeline_tag_for(self.model), repo_id=repo_id)
        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(f"{tmp}/model", format=format, card=card)
            return push_to_hub(str(folder), repo_id, private=private, **kwargs)


def _check_batches(batches: list) -> None:
    if batches is None or len(batches) == 0:
        raise ValueError(
            "empty calibration set: pass a non-empty list of batches (e.g. hf_px.calibration_batches(dataset, "
            "tokenizer, per_class=10))."
        )


def check_sparsity(sparsity: float, sizes: list[int]) -> None:
    """Refuse a sparsity whose kept count, round(d * N), is smaller than the number of prunable matrices.

    Below that some matrix keeps no weight at all (at 100% the model is all zeros) and its block computes
    nothing; the message gives the largest sparsity that leaves at least one weight per matrix.
    """
    if sparsity <= 0 or not sizes:
        return
    total, matrices = sum(sizes), len(sizes)
    kept = int(round((1.0 - float(sparsity)) * total))
    if kept >= matrices:
        return
    largest = math.floor((1.0 - matrices / total) * 1e6) / 1e6  # rounded down, so it keeps >= one per matrix
    raise ValueError(
        f"sparsity {sparsity:g} keeps {kept} of {total:,} prunable weights, fewer than one per prunable matrix "
        f"({matrices}): some matrix would be all zeros. Use a sparsity of at most {largest:g}."
    )


def check_trainable_layers(model: nn.Module) -> None:
    """Refuse a model loaded with sparse inference kernels: its CSR layers have no weight to score or mask."""
    csr = [name for name, m in model.named_modules() if type(m).__name__ == "CSRLinear"]
    if csr:
        raise ValueError(
            f"{len(csr)} layers of this model are sparse inference kernels (CSRLinear, e.g. {csr[0]!r}), "
            "which have no weight to score or mask. Load it without kernels (hf_px.load(path)) or call "
            "hf_px.densify(model) first."
        )


def prune(
    model: nn.Module,
    batches: list,
    config: PruneConfig | None = None,
    *,
    tokenizer: Any = None,
    progress: bool = True,
) -> PruneResult:
    """Prune ``model`` in place to ``config.sparsity`` over its prunable set and return a :class:`PruneResult`.

    Rounds follow d_r = d^(r/R); every round re-scores with the current masks and applies one global threshold
    (PX's off-path Q/K keep their block's density). Embeddings, norms, biases, pooler and heads stay dense.
    With several processes each passes its share of the batches and all get the same masks; an FSDP2-sharded
    ``transformers`` model is scored on a gathered copy and its shards masked (:mod:`hf_px.pruning.sharded`).

    Example:
        >>> import torch, hf_px
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> model = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
        ...     num_attention_heads=2, intermediate_size=64, num_labels=2))
        >>> batches = [{"input_ids": torch.randint(0, 100, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long)}]
        >>> result = hf_px.prune(model, batches, hf_px.PruneConfig(sparsity=0.8, rounds=5), progress=False)
        >>> round(result.report["achieved_sparsity"], 3)
        0.8
    """
    config = config or PruneConfig()
    if is_sharded(model):  # FSDP2: score a gathered copy, mask the live shards
        return prune_sharded(model, batches, config, tokenizer=tokenizer, progress=progress)
    if config.method == "px" and is_transformers_model(model) and find_arch(model) is None and config.generic:
        warnings.warn("PX needs a registered architecture; generic mode scores with 'ntk_diag' instead.", stacklevel=2)
        config = dataclasses.replace(config, method="ntk_diag",
                                     options={"hutchinson_probes": config.options.hutchinson_probes})
    scorer = get_scorer(config.method, config.options)
    check_trainable_layers(model)
    if scorer.needs_data:
        _check_batches(batches)

    extras: dict[str, Any] = {}
    if config.pcn is not None:
        from ..pcn import apply_pcn

        extras["pcn"] = apply_pcn(model, batches, config.pcn)

    targets = collect_targets(model, generic=config.generic)
    if not scorer.uses_off_path:
        targets = [dataclasses.replace(t, on_path=True, follows=()) for t in targets]
    check_sparsity(config.sparsity, [t.numel() for t in targets])
    masks = init_masks(targets)
    schedule = density_schedule(config.density, config.rounds) if config.sparsity > 0 else []
    generator = torch.Generator().manual_seed(config.seed)
    ctx = ScoringContext(model=model, targets=targets, masks=masks, batches=batches, config=config,
                         generator=generator)

    start = time.perf_counter()
    scorer.prepare(ctx)
    bar = tqdm(schedule, desc=f"{config.method} rounds", unit="round", disable=not progress)
    for r, d in enumerate(bar, start=1):
        ctx.round = r
        scores = scorer.score(ctx)
        ctx.masks = select_masks(targets, scores, ctx.masks, d, config.min_density_ratio,
                                 keep_rule=config.keep_rule)
        del scores  # not held while the next round scores: one float64 copy of the prunable weights less at its peak
        apply_masks(model, ctx.masks)
        bar.set_postfix(density=f"{d:.4f}")
    elapsed = time.perf_counter() - start

    named = [(t.key, t.view(ctx.masks[t.param_name])) for t in targets]
    layers = layer_rows(named)
    for lay, t in zip(layers, targets, strict=True):
        lay.update(block=t.block, role=t.role)
    prunable = sum(lay["numel"] for lay in layers)
    kept = sum(int(m.sum()) for _, m in named)
    n_batches = len(batches) if batches else 0
    n_examples = sum(_batch_size(b) for b in batches) if batches else 0
    report = Report(
        method=config.method,
        target_sparsity=float(config.sparsity),
        achieved_sparsity=1.0 - kept / max(prunable, 1),
        rounds=len(schedule),
        prunable_params=prunable,
        kept_params=kept,
        total_params=sum(p.numel() for p in model.parameters()),
        layers=layers,
        calibration={"num_examples": n_examples, "num_batches": n_batches, "per_class": None, "dataset": None},
        base_model=getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        time_s=elapsed,
        time_per_round_s=elapsed / max(len(schedule), 1),
        config=config.to_dict(),
    )
    if "pcn" in extras and hasattr(extras["pcn"], "to_dict"):
        report["pcn"] = extras["pcn"].to_dict()
    return PruneResult(model=model, masks=ctx.masks, report=report, config=config, tokenizer=tokenizer,
                       extras=extras)


def _batch_size(batch: Any) -> int:
    if isinstance(batch, dict):
        first = next(iter(batch.values()))
        return int(first.shape[0])
    if isinstance(batch, (tuple, list)):
        return int(batch[0].shape[0])
    return int(batch.shape[0])
