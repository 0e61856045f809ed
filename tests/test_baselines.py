"""Baseline scorers (snip, grasp, synflow, wanda) against independent computations, and in the pruning loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny, tiny_batches
from torch import nn
from torch.func import functional_call, grad, hessian

import hf_px
from hf_px.pruning.masks import init_masks
from hf_px.pruning.scoring import ScoringContext, WandaOptions, get_scorer
from hf_px.pruning.targets import collect_targets

BASELINES = ["snip", "grasp", "synflow", "wanda"]
GLOBAL = WandaOptions(per_row=False)  # raw |W|·‖X‖, no per-row ranks



def _ctx(model: nn.Module, batches: list) -> ScoringContext:
    targets = collect_targets(model)
    return ScoringContext(model=model, targets=targets, masks=init_masks(targets), batches=batches,
                          config=hf_px.PruneConfig(method="snip"), generator=torch.Generator().manual_seed(0))


def _mlp(bias: bool = True, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7, bias=bias), nn.ReLU(), nn.Linear(7, 6, bias=bias), nn.ReLU(),
                         nn.Linear(6, 3, bias=bias)).double()


def _mlp_batches(n: int = 2, seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g))
            for _ in range(n)]


def test_snip_matches_manual_autograd_on_mlp():
    model, batches = _mlp(), _mlp_batches()
    scores = get_scorer("snip").score(_ctx(model, batches))
    weights = [model[0].weight, model[2].weight, model[4].weight]
    total = [torch.zeros_like(w) for w in weights]
    for x, y in batches:
        for acc, g in zip(total, torch.autograd.grad(F.cross_entropy(model(x), y), weights), strict=True):
            acc += g
    raw = [(g * w).abs().detach() for g, w in zip(total, weights, strict=True)]
    norm = sum(r.sum() for r in raw)
    for name, r in zip(["0.weight", "2.weight", "4.weight"], raw, strict=True):
        torch.testing.assert_close(scores[name].double(), r / norm)
    assert abs(sum(float(s.sum()) for s in scores.values()) - 1.0) < 1e-9


def test_snip_matches_hf_loss_gradient_on_tiny_bert():
    model = tiny("bert")
    batches = tiny_batches(model)
    scores = get_scorer("snip").score(_ctx(model, batches))
    targets = collect_targets(model)
    weights = [t.param for t in targets]
    total = [torch.zeros_like(w) for w in weights]
    for b in batches:  # the model's own loss (labels passed in), not the scorer's loss function
        for acc, g in zip(total, torch.autograd.grad(model(**b).loss, weights), strict=True):
            acc += g
    raw = [(g * w).abs().detach().double() for g, w in zip(total, weights, strict=True)]
    norm = sum(r.sum() for r in raw)
    for t, r in zip(targets, raw, strict=True):
        torch.testing.assert_close(scores[t.key], r / norm, rtol=1e-4, atol=1e-9)


def test_snip_without_labels_names_the_problem():
    model = tiny("bert")
    batches = [{k: v for k, v in b.items() if k != "labels"} for b in tiny_batches(model)]
    with pytest.raises(ValueError, match="labelled calibration batches"):
        get_scorer("snip").score(_ctx(model, batches))


def test_grasp_matches_explicit_hessian_on_mlp():
    model, batches = _mlp(bias=False), _mlp_batches()
    names = ["0.weight", "2.weight", "4.weight"]
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}

    def loss(params, x, y):
        return F.cross_entropy(functional_call(model, params, (x,)) / 200.0, y)

    flat = lambda d: torch.cat([d[n].flatten() for n in names])  # noqa: E731
    g = sum(flat(grad(loss)(theta, x, y)) for x, y in batches)
    hess = sum(torch.cat([torch.cat([h[a][b].reshape(theta[a].numel(), -1) for b in names], 1) for a in names], 0)
               for h in (hessian(loss)(theta, x, y) for x, y in batches))
    expected = flat(theta) * (hess @ g)  # +θ⊙Hg: higher = keep (the paper's −θ⊙Hg, largest removed)
    expected = expected / (expected.sum().abs() + 1e-10)
    scores = get_scorer("grasp").score(_ctx(model, batches))
    torch.testing.assert_close(torch.cat([scores[n].flatten() for n in names]), expected, rtol=1e-6, atol=1e-12)


def test_grasp_runs_double_backward_through_attention():
    model = tiny("gpt2")
    scores = get_scorer("grasp").score(_ctx(model, tiny_batches(model)))
    values = torch.cat([s.flatten() for s in scores.values()])
    assert torch.isfinite(values).all() and (values != 0).any()


def test_synflow_conservation_and_no_mutation():
    model = _mlp(bias=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ctx = _ctx(model, _mlp_batches())
    scores = get_scorer("synflow").score(ctx)
    # bias-free ReLU net with |θ| on positive input: every layer carries the whole flow R
    sums = [float(scores[n].sum()) for n in ["0.weight", "2.weight", "4.weight"]]
    ones = torch.ones(1, 5, dtype=torch.float64)
    r = float(functional_call(model, {n: p.abs() for n, p in before.items()}, (ones,)).sum())
    for s in sums:
        assert s == pytest.approx(r, rel=1e-9)
    for n, p in model.named_parameters():  # signs untouched: the |θ| copy is functional
        assert torch.equal(p, before[n])
    # data-free: other calibration inputs of the same shape give the same scores
    ctx2 = _ctx(model, _mlp_batches(seed=7))
    for k, v in get_scorer("synflow").score(ctx2).items():
        torch.testing.assert_close(v, scores[k])


def test_wanda_matches_manual_column_norms_on_mlp():
    model, batches = _mlp(), _mlp_batches()
    scores = get_scorer("wanda", GLOBAL).score(_ctx(model, batches))  # raw |W|·‖X‖
    x = torch.cat([b[0] for b in batches])
    h1 = torch.relu(model[0](x))
    h2 = torch.relu(model[2](h1))
    for name, inp, layer in [("0.weight", x, model[0]), ("2.weight", h1, model[2]), ("4.weight", h2, model[4])]:
        expected = layer.weight.detach().abs() * inp.detach().norm(dim=0)[None, :]
        torch.testing.assert_close(scores[name], expected)


def test_wanda_excludes_padding_and_matches_hidden_states_on_bert():
    model = tiny("bert")
    batches = tiny_batches(model)
    scores = get_scorer("wanda", GLOBAL).score(_ctx(model, batches))  # raw |W|·‖X‖
    sq = 0
    for b in batches:  # the query layer of block 0 reads hidden_states[0] (the embeddings' output)
        hs = model(**{k: v for k, v in b.items() if k != "labels"}, output_hidden_states=True).hidden_states[0]
        sq = sq + (hs.detach().double() ** 2 * b["attention_mask"].unsqueeze(-1)).sum(dim=(0, 1))
    w = model.bert.encoder.layer[0].attention.self.query.weight
    key = "bert.encoder.layer.0.attention.self.query.weight"
    torch.testing.assert_close(scores[key], w.detach().double().abs() * sq.sqrt()[None, :])
    # the ids under padding are invisible to the scores
    changed = [dict(b) for b in batches]
    changed[0]["input_ids"] = changed[0]["input_ids"].masked_fill(changed[0]["attention_mask"] == 0, 42)
    for k, v in get_scorer("wanda", GLOBAL).score(_ctx(model, changed)).items():
        torch.testing.assert_close(v, scores[k])


def test_wanda_gpt2_conv1d_feature_axis_is_the_first():
    model = tiny("gpt2")
    ctx = _ctx(model, tiny_batches(model))
    scores = get_scorer("wanda", GLOBAL).score(ctx)
    for t in ctx.targets:  # Conv1D weight (in, out): S/|W| depends on the row (input feature) only
        ratio = scores[t.key] / t.view(t.param).detach().double().abs()
        torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio))
        assert not torch.allclose(ratio[:, 0], ratio[0, 0].expand(ratio.shape[0]))


def test_wanda_per_row_gives_each_row_the_target_density():
    model = tiny("bert")
    cfg = hf_px.PruneConfig(method="wanda", sparsity=0.5, rounds=1, min_density_ratio=0.0)  # per row by default
    result = hf_px.prune(model, tiny_batches(model), cfg, progress=False)
    rows = torch.cat([m.float().mean(dim=1) for m in result.masks.values()])
    assert (rows - 0.5).abs().max() <= 1 / 32 + 1e-6  # at most one weight per row off (rows of 32 or 64)
    glob = hf_px.prune(tiny("bert"), tiny_batches(tiny("bert")), hf_px.PruneConfig(
        method="wanda", sparsity=0.5, rounds=1, min_density_ratio=0.0, options={"per_row": False}),
        progress=False)
    rows_glob = torch.cat([m.float().mean(dim=1) for m in glob.masks.values()])
    assert rows_glob.std() > rows.std()  # the global option does not balance rows


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "vit"])
@pytest.mark.parametrize("method", BASELINES)
def test_loop_reaches_target_sparsity(method, family):
    model = tiny(family)
    result = hf_px.prune(model, tiny_batches(model), hf_px.PruneConfig(method=method, sparsity=0.9, rounds=2),
                         progress=False)
    report = result.report
    assert abs(report["kept_params"] - round(0.1 * report["prunable_params"])) <= 1
    params = dict(model.named_parameters())
    for name, mask in result.masks.items():
        assert not params[name][~mask].any()  # the model carries the zeros


def test_prune_help_lists_baselines(capsys):
    from hf_px.cli import main

    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    out = capsys.readouterr().out
    for method in BASELINES:
        assert method in out
