"""SynFlow (Tanaka et al. 2020): data-free, S = |θ ⊙ ∂R/∂θ| with R = Σ f(1; |θ|).

Every parameter and floating buffer is replaced by its absolute value through ``torch.func.functional_call``
(the model itself is never mutated, so no sign restore is needed), the input is all ones and R sums the
outputs, in float64 so the product of |θ| along deep paths does not overflow. Input per model kind:

* plain networks: ``torch.ones`` shaped like one example of the calibration batches (or
  ``SynflowOptions.input_shape``, e.g. ``(3, 32, 32)``, when no batches are given);
* Hugging Face text models: ``inputs_embeds`` of ones, (1, L, hidden) with L = ``SynflowOptions.length``
  (default: the calibration length, else 16): the word-embedding lookup is skipped, |position embeddings| and
  every block still apply, so R is the |θ|-path flow through the trunk and head;
* vision models (registry entry with ``inputs="pixel_values"``, or pixel batches): ``pixel_values`` of ones, shaped
  like one calibration image (else ``config.image_size``, default 224).

On transformers the flow is the real network's (LayerNorm, softmax and GELU included), as the official code
does on any model; it is a path product only where the network is piecewise linear.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import functional_call

from ...registry import find_arch
from ..targets import is_transformers_model
from .base import Options, Scorer, ScoringContext, check_int, register_scorer
from .ntk_diag import plain_input


@dataclass
class SynflowOptions(Options):
    """SynFlow's options (its input is all ones; these set its shape).

    Args:
        input_shape: plain networks: the shape of one example, e.g. [3, 32, 32] (None: the calibration batches').
        length: text models: the sequence length of the all-ones input (None: the calibration length, else 16).
    """

    input_shape: tuple[int, ...] | None = None
    length: int | None = None

    def __post_init__(self) -> None:
        if self.input_shape is not None:
            if isinstance(self.input_shape, (str, bytes)) or not hasattr(self.input_shape, "__iter__"):
                raise ValueError(f"input_shape must be a list of sizes, e.g. [3, 32, 32], got {self.input_shape!r}.")
            self.input_shape = tuple(self.input_shape)
            for size in self.input_shape:
                check_int("input_shape entries", size, 1)
        check_int("length", self.length, 1, none="the calibration length")


def _ones_input(ctx: ScoringContext, options: SynflowOptions) -> tuple[dict, bool]:
    """Keyword arguments of the all-ones forward, and whether they are for a plain network."""
    model = ctx.model
    if not is_transformers_model(model):
        shape = options.input_shape
        if shape is None:
            if not ctx.batches:
                raise ValueError("synflow on a plain network needs its input shape: pass calibration batches or "
                                 "PruneConfig(method='synflow', options={'input_shape': (3, 32, 32)}).")
            shape = tuple(plain_input(ctx.batches[0]).shape[1:])
        return {"x": torch.ones(1, *shape, dtype=torch.float64)}, True
    cfg, spec = model.config, find_arch(model)
    first = ctx.batches[0] if ctx.batches else {}
    if isinstance(first, dict) and "pixel_values" in first:  # the images the model is used on (ResNet has no image_size)
        return {"pixel_values": torch.ones(1, *first["pixel_values"].shape[1:], dtype=torch.float64)}, False
    if spec is not None and spec.inputs == "pixel_values":
        size = getattr(cfg, "image_size", 224)
        return {"pixel_values": torch.ones(1, getattr(cfg, "num_channels", 3), size, size, dtype=torch.float64)}, False
    length = options.length
    if length is None:
        length = int(ctx.batches[0]["input_ids"].shape[1]) if ctx.batches and "input_ids" in ctx.batches[0] else 16
    hidden = model.get_input_embeddings().weight.shape[1]
    return {"inputs_embeds": torch.ones(1, length, hidden, dtype=torch.float64),
            "attention_mask": torch.ones(1, length, dtype=torch.long)}, False


@register_scorer
class SynFlowScorer(Scorer):
    """SynFlow: |θ ⊙ ∂R/∂θ|, R = summed output of the |θ| network on an all-ones input (data-free)."""

    method = "synflow"
    description = "|θ⊙∂R/∂θ| of the |θ| network on all-ones input; data-free (SynFlow, Tanaka et al. 2020)"
    needs_data = False
    options_class = SynflowOptions
    options: SynflowOptions

    def score(self, ctx: ScoringContext) -> dict[str, torch.Tensor]:
        model = ctx.model
        target_ids = {id(t.param) for t in ctx.targets}
        leaves, state = {}, {}
        for name, p in model.named_parameters():
            v = p.detach().abs().double()
            if id(p) in target_ids:
                v.requires_grad_(True)
                leaves[id(p)] = v
            state[name] = v
        for name, b in model.named_buffers():
            state[name] = b.abs().double() if b.is_floating_point() else b
        kwargs, plain = _ones_input(ctx, self.options)
        with torch.enable_grad():
            if plain:
                out = functional_call(model, state, (kwargs["x"],))
            else:
                out = functional_call(model, state, (), kwargs)
                out = out.logits if getattr(out, "logits", None) is not None else out[0]
            grads = torch.autograd.grad(out.sum(), list(leaves.values()), allow_unused=True)
        by_param = {}
        for (pid, v), g in zip(leaves.items(), grads, strict=True):
            by_param[pid] = (v.detach() * g).abs() if g is not None else torch.zeros_like(v.detach())
        return {t.key: t.view(by_param[id(t.param)]) for t in ctx.targets}
