"""PX's memory-saving transformer path gives the scores of the straightforward one, bit for bit.

``_reference_transformer_scores`` is the implementation before the memory work (both float64 parameter dicts
built up front and held through every pass, gradients returned by ``autograd.grad``, scores as new tensors),
kept here as the comparison: the saving path may change when memory is held, never a score.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny, tiny_batches
from torch import nn
from torch.func import functional_call

import hf_px
from hf_px.pruning import masks as masks_mod
from hf_px.pruning.masks import init_masks, select_masks
from hf_px.pruning.scoring import px
from hf_px.pruning.scoring.base import grads_for, model_inputs
from hf_px.pruning.scoring.ntk_diag import accumulate_probe_grads
from hf_px.pruning.surrogate import run_head, surrogate_attention
from hf_px.pruning.targets import Target, collect_targets
from hf_px.registry import is_linear_like, pool


def _reference_aux_params(root: nn.Module, targets: list[Target], masks: dict, keep_dtype: set[int]):
    target_ids = {id(t.param): t.param_name for t in targets}
    layer_params = {}
    for module in root.modules():
        if is_linear_like(module):
            layer_params[id(module.weight)] = "weight"
            if module.bias is not None:
                layer_params[id(module.bias)] = "bias"
    params_a, params_b, leaves = {}, {}, {}
    for name, p in root.named_parameters():
        kind = layer_params.get(id(p))
        if id(p) in keep_dtype and kind is None:
            params_a[name] = params_b[name] = p.detach()
            continue
        theta = p.detach().double()
        if kind == "weight":
            mname = target_ids.get(id(p))
            params_a[name] = masks[mname].double() if mname else torch.ones_like(theta)
            sq = theta * theta
            if mname:
                sq.requires_grad_(True)
                leaves[id(p)] = sq
            params_b[name] = sq
        elif kind == "bias":
            params_a[name] = torch.zeros_like(theta)
            params_b[name] = torch.zeros_like(theta)
        else:
            params_a[name] = params_b[name] = theta
    return params_a, params_b, leaves


def _reference_transformer_scores(model, targets, masks, batches, *, qk_score="ntk_diag", a_gate="secant",
                                  rescale=None, probes=1, b_length=None, generator=None):
    run, head = px.build_run(model, a_gate=a_gate, rescale=rescale)
    base = model.base_model
    on = [t for t in targets if t.on_path]
    off = [t for t in targets if not t.on_path]
    off_params = list({id(t.param): t.param for t in off}.values()) if qk_score == "ntk_diag" else []
    acc = [torch.zeros_like(p, dtype=torch.float64) for p in off_params]
    inside = {id(p) for m in list(run.blocks) + [m for m, _ in run.norms] for p in m.parameters()}
    keep_dtype = {id(p) for p in base.parameters()} - inside
    params_a, params_b, leaves = _reference_aux_params(base, on, masks, keep_dtype)
    pad_id = getattr(model.config, "pad_token_id", None)
    a_bar, lengths, example = None, torch.zeros(2, dtype=torch.float64), None
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
                run.pad_mask = mask
                with run.use("A"), torch.no_grad():
                    hidden_a = functional_call(base, params_a, (), inputs)[0]
                    out_a = run_head(head, pool(head, hidden_a, inputs, pad_id), "A", gates)
                    if head.pooling == "none" and mask is not None:
                        out_a = out_a * mask.to(out_a.dtype).unsqueeze(-1)
                run.pad_mask = None
                a_bar = px._add_padded(a_bar, out_a.sum(0))
                if mask is not None:
                    lengths += torch.tensor([float(mask.sum()), float(mask.shape[0])], dtype=torch.float64)
            with run.use("B"), torch.enable_grad():
                b_inputs = px._b_inputs(example, head.pooling, a_bar, lengths, b_length)
                hidden_b = functional_call(base, params_b, (), b_inputs)[0]
                out_b = run_head(head, pool(head, hidden_b, {}, None), "B")
                r = (a_bar * out_b[0]).sum()
                ids = list(leaves)
                raw = torch.autograd.grad(r, [leaves[i] for i in ids], allow_unused=True)
                grads = {i: torch.zeros_like(leaves[i]) if g is None else g for i, g in zip(ids, raw, strict=True)}
    finally:
        run.clear()
    scores = {t.key: t.view(grads[id(t.param)].abs() * leaves[id(t.param)].detach()) for t in on}
    by_param = {id(p): a for p, a in zip(off_params, acc, strict=True)}
    for t in off:
        theta = t.view(t.param.detach().double())
        scores[t.key] = theta.abs() if qk_score == "magnitude" else theta * theta * t.view(by_param[id(t.param)])
    return scores, float(r.detach())


def _assert_same(new, old):
    (s_new, r_new), (s_old, r_old) = new, old
    assert r_new == r_old
    assert s_new.keys() == s_old.keys()
    for key in s_old:
        assert s_new[key].dtype == s_old[key].dtype == torch.float64, key
        assert torch.equal(s_new[key], s_old[key]), key


def _both(model, targets, masks, batches, **kw):
    seed = kw.pop("seed", 0)
    new = px.transformer_scores(model, targets, masks, batches, generator=torch.Generator().manual_seed(seed), **kw)
    old = _reference_transformer_scores(model, targets, masks, batches, generator=torch.Generator().manual_seed(seed),
                                        **kw)
    return new, old


@pytest.mark.parametrize("family", ["bert", "gpt2", "gpt2-cls", "llama", "distilbert", "vit"])
def test_scores_equal_the_reference_dense_and_pruned(family):
    model = tiny(family)
    targets = collect_targets(model)
    batches = tiny_batches(model, n_batches=2)
    masks = init_masks(targets)
    _assert_same(*_both(model, targets, masks, batches))
    # a pruned state: zeros in the weights, masks with holes, Q/K probes on the masked model
    scores = _reference_transformer_scores(model, targets, masks, batches, generator=torch.Generator().manual_seed(1))[0]
    masks = select_masks(targets, scores, masks, 0.4, 0.1)
    masks_mod.apply_masks(model, masks)
    for kw in ({}, {"qk_score": "magnitude"}, {"a_gate": "bound", "probes": 2, "b_length": 3}):
        _assert_same(*_both(model, targets, masks, batches, **kw))


def test_qk_forced_on_path_still_match():
    """Forced on-path, Q/K are B leaves, not discarded weights: their (zero) scores come out the same."""
    model = tiny("bert")
    targets = [Target(**{**t.__dict__, "on_path": True, "follows": ()}) for t in collect_targets(model)]
    _assert_same(*_both(model, targets, init_masks(targets), tiny_batches(model)))


def test_prune_gives_the_reference_masks(monkeypatch):
    """Three PX rounds through hf_px.prune: the same masks as with the reference scores."""
    config = hf_px.PruneConfig(sparsity=0.8, rounds=3)
    model = tiny("llama")
    batches = tiny_batches(model, n_batches=2)
    new = hf_px.prune(model, batches, config, progress=False).masks
    model = tiny("llama")  # the same seeded weights again

    def reference(model, targets, masks, batches, cache=None, **kw):
        return _reference_transformer_scores(model, targets, masks, batches, **kw)

    monkeypatch.setattr(px, "transformer_scores", reference)
    old = hf_px.prune(model, batches, config, progress=False).masks
    assert new.keys() == old.keys()
    for name in new:
        assert torch.equal(new[name], old[name]), name


def test_scoring_leaves_the_model_as_it_was():
    model = tiny("bert")
    targets = collect_targets(model)
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    scores, _ = px.transformer_scores(model, targets, init_masks(targets), tiny_batches(model),
                                      generator=torch.Generator().manual_seed(0))
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n][0]) and p.requires_grad == before[n][1], n
        assert p.grad is None, n
    for s in scores.values():  # plain tensors: no leaf, no graph, no pending gradient
        assert not s.requires_grad and s.grad_fn is None
