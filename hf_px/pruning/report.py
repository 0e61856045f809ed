"""Sparsity reports: per-layer density tables for a pruning run or any checkpoint."""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[f"{c:.4f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    line = lambda row: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))  # noqa: E731
    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths), *map(line, cells[1:])])


class Report(dict):
    """A plain dict (JSON-ready, see ``to_dict``) that prints as a readable table."""

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(self))

    def __str__(self) -> str:
        rows = [[lay["name"], "x".join(map(str, lay["shape"])), lay["numel"], lay["density"]] for lay in self["layers"]]
        out = [format_table(["layer", "shape", "params", "density"], rows), ""]
        summary = [
            ("method", self.get("method")),
            ("target sparsity", self.get("target_sparsity")),
            ("achieved sparsity", self.get("achieved_sparsity")),
            ("prunable params", self.get("prunable_params")),
            ("kept params", self.get("kept_params")),
            ("total params (model)", self.get("total_params")),
            ("rounds", self.get("rounds")),
            ("time (s)", self.get("time_s")),
            ("time per round (s)", self.get("time_per_round_s")),
        ]
        out += [f"{k:>22}: {v:.4f}" if isinstance(v, float) else f"{k:>22}: {v}" for k, v in summary if v is not None]
        return "\n".join(out)

    __repr__ = __str__


def layer_rows(named_masks: list[tuple[str, torch.Tensor]]) -> list[dict[str, Any]]:
    return [
        {"name": name, "shape": list(m.shape), "numel": m.numel(), "density": float(m.sum()) / max(m.numel(), 1)}
        for name, m in named_masks
    ]


def masks_report(model: nn.Module, masks: dict[str, torch.Tensor], generic: bool = False) -> dict[str, Any]:
    """Per-matrix densities (with block and role), kept count and sparsity of ``masks`` over ``model``'s targets.

    What a pruning report says after the masks changed outside :func:`hf_px.prune` (gradual pruning).
    """
    from .targets import collect_targets

    targets = [t for t in collect_targets(model, generic=generic) if t.param_name in masks]
    named = [(t.key, t.view(masks[t.param_name])) for t in targets]
    layers = layer_rows(named)
    for lay, t in zip(layers, targets, strict=True):
        lay.update(block=t.block, role=t.role)
    prunable, kept = sum(lay["numel"] for lay in layers), sum(int(m.sum()) for _, m in named)
    return {"layers": layers, "prunable_params": prunable, "kept_params": kept,
            "achieved_sparsity": 1.0 - kept / max(prunable, 1)}


def sparsity_report(model: nn.Module, generic: bool = True) -> Report:
    """Density of every prunable matrix of ``model``, read from its zeros; works on any checkpoint.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        ...                              intermediate_size=64))
        >>> sparsity_report(model)["achieved_sparsity"]
        0.0
    """
    from .targets import collect_targets

    targets = collect_targets(model, generic=generic)
    named = [(t.key, t.view(t.param.detach()) != 0) for t in targets]
    layers = layer_rows(named)
    prunable = sum(lay["numel"] for lay in layers)
    kept = sum(int(m.sum()) for _, m in named)
    return Report(
        layers=layers,
        prunable_params=prunable,
        kept_params=kept,
        total_params=sum(p.numel() for p in model.parameters()),
        achieved_sparsity=1.0 - kept / max(prunable, 1),
    )
