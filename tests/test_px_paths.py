"""PX on plain ReLU networks against the paper's definitions, computed independently by path enumeration."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from hf_px import PruneConfig
from hf_px.pruning.masks import init_masks
from hf_px.pruning.scoring.base import ScoringContext
from hf_px.pruning.scoring.ntk_diag import NTKDiagScorer
from hf_px.pruning.scoring.px import path_scores
from hf_px.pruning.targets import collect_targets


def mlp(seed: int = 0, sizes=(5, 7, 6, 3)) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        lin = nn.Linear(a, b, bias=False)
        nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
        layers.append(lin)
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).double()


def brute_force(model: nn.Sequential, x: torch.Tensor):
    """Ā_k, and S for every weight, by enumerating every input-output path of a 3-layer MLP."""
    w1, w2, w3 = (m.weight.detach() for m in model if isinstance(m, nn.Linear))
    z1 = x @ w1.T
    z2 = torch.relu(z1) @ w2.T
    g1, g2 = (z1 > 0).double(), (z2 > 0).double()
    n_in, n1, n2, n_out = w1.shape[1], w1.shape[0], w2.shape[0], w3.shape[0]
    a_bar = torch.zeros(n_out, dtype=torch.float64)
    paths = list(itertools.product(range(n_in), range(n1), range(n2), range(n_out)))
    for s, u1, u2, k in paths:
        a_bar[k] += (g1[:, u1] * g2[:, u2] * x[:, s] ** 2).sum()
    scores = [torch.zeros_like(w) for w in (w1, w2, w3)]
    r = 0.0
    for s, u1, u2, k in paths:
        v2 = float(w1[u1, s] * w2[u2, u1] * w3[k, u2]) ** 2
        contrib = float(a_bar[k]) * v2
        r += contrib
        scores[0][u1, s] += contrib
        scores[1][u2, u1] += contrib
        scores[2][k, u2] += contrib
    return a_bar, scores, r


def r_with_fixed_a(model: nn.Sequential, a_bar: torch.Tensor) -> float:
    """R = Σ_k Ā_k B_k(θ) with B from θ² on an all-ones input and identity activations."""
    h = torch.ones(1, model[0].in_features, dtype=torch.float64)
    for m in model:
        if isinstance(m, nn.Linear):
            h = h @ (m.weight.detach() ** 2).T
    return float((a_bar * h[0]).sum())


@pytest.fixture
def setup():
    model = mlp()
    x = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    targets = collect_targets(model)
    scores, r = path_scores(model, targets, init_masks(targets), [x])
    return model, x, targets, scores, r


def test_scores_equal_brute_force_path_enumeration(setup):
    model, x, targets, scores, r = setup
    _, expected, r_bf = brute_force(model, x)
    assert r == pytest.approx(r_bf, rel=1e-10)
    for t, exp in zip(targets, expected, strict=True):
        torch.testing.assert_close(scores[t.key], exp, rtol=1e-9, atol=1e-12)


def test_every_layer_sums_to_r(setup):
    _, _, targets, scores, r = setup
    for t in targets:
        assert float(scores[t.key].sum()) == pytest.approx(r, rel=1e-10)


def test_zeroing_a_weight_lowers_r_by_its_score(setup):
    model, x, targets, scores, r = setup
    a_bar, _, _ = brute_force(model, x)
    for layer_idx, (i, j) in [(0, (2, 3)), (1, (4, 0)), (2, (1, 5))]:
        lin = [m for m in model if isinstance(m, nn.Linear)][layer_idx]
        saved = lin.weight.data[i, j].item()
        lin.weight.data[i, j] = 0.0
        r_excluded = r_with_fixed_a(model, a_bar)
        lin.weight.data[i, j] = saved
        assert r - r_excluded == pytest.approx(float(scores[targets[layer_idx].key][i, j]), rel=1e-9)


def test_bound_is_at_least_exact_ntk_trace(setup):
    model, x, targets, scores, _ = setup
    params = {n: p.detach() for n, p in model.named_parameters()}
    jac = jacrev(lambda p: functional_call(model, p, (x,)))(params)
    trace = sum(float((j**2).sum()) for j in jac.values())
    bound = sum(float((scores[t.key] / t.param.detach() ** 2).sum()) for t in targets)
    assert trace > 0
    assert bound >= trace


def test_pruned_weights_score_zero_and_masks_respected():
    model = mlp(seed=3)
    x = torch.randn(6, 5, dtype=torch.float64)
    targets = collect_targets(model)
    masks = init_masks(targets)
    masks[targets[1].param_name][0, :] = False
    with torch.no_grad():
        targets[1].param[0, :] = 0
    scores, r = path_scores(model, targets, masks, [x])
    assert float(scores[targets[1].key][0].abs().sum()) == 0.0
    for t in targets:  # conservation still holds on the pruned network
        assert float(scores[t.key].sum()) == pytest.approx(r, rel=1e-10)


def test_ntk_diag_hutchinson_converges_to_exact_diagonal():
    model = mlp(seed=5)
    x = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    targets = collect_targets(model)
    params = {n: p.detach() for n, p in model.named_parameters()}
    jac = jacrev(lambda p: functional_call(model, p, (x,)))(params)  # (n, k, *param)
    exact = {n: (j**2).sum(dim=(0, 1)) * params[n] ** 2 for n, j in jac.items()}
    cfg = PruneConfig(method="ntk_diag", sparsity=0.5, options={"hutchinson_probes": 400})
    ctx = ScoringContext(model=model, targets=targets, masks=init_masks(targets), batches=[x], config=cfg,
                         generator=torch.Generator().manual_seed(0))
    est = NTKDiagScorer(cfg.options).score(ctx)
    for t in targets:
        rel = float((est[t.key] - exact[t.param_name]).norm() / exact[t.param_name].norm())
        assert rel < 0.15
