"""PX on plain networks: BatchNorm in any dtype, both BatchNorm statistics, raw-leaf heads, the reference keep rule.

The train-mode BatchNorm scores and the raw-head scores are checked against an independent computation: three
copies of the network (real, unit weights, squared weights) run the way the reference code runs them.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import load_script
from torch import nn

import hf_px
from hf_px.pruning.masks import init_masks, select_masks
from hf_px.pruning.scoring.px import PXOptions, path_scores
from hf_px.pruning.targets import Target, collect_targets


class ConvBN(nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(4, 6, 3, 2, 1, bias=False), nn.BatchNorm2d(6), nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(24, classes)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.fc(self.pool(x).flatten(1))


def conv_bn(seed: int = 0, dtype=torch.float32) -> ConvBN:
    """A small conv-BN-ReLU net whose BatchNorm statistics and affine parameters are not the defaults."""
    torch.manual_seed(seed)
    model = ConvBN()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.3, 3.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
    return model.to(dtype).eval()


def mlp(seed: int = 0, dtype=torch.float64) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 7), nn.ReLU(), nn.Linear(7, 4)).to(dtype)


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 2, 6, 6, generator=torch.Generator().manual_seed(seed))


def reference_style_scores(model: nn.Module, batches: list, head: str = "") -> dict[str, torch.Tensor]:
    """PX computed with three copies, as the reference code does, in float64.

    The real copy runs in eval mode and records every ReLU pattern; the unit copy (kept weights 1, biases 1) and
    the squared copy (weights and biases θ²) run in train mode, so each BatchNorm renormalises that copy's own
    batch with its raw γ and β. The modules under ``head`` keep raw weights in both. R = Σ unit(x²)·squared(1),
    summed over batches; a weight's score is |∂R/∂leaf|·θ² with the squared copy's entry as the leaf.
    """
    real = copy.deepcopy(model).double().eval()
    unit = copy.deepcopy(model).double().train()
    square = copy.deepcopy(model).double().train()
    norm_params = {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                   for p, _ in m.named_parameters()}
    with torch.no_grad():
        for (name, pu), ps in zip(unit.named_parameters(), square.parameters(), strict=True):
            if name in norm_params or (head and name.startswith(head + ".")):
                continue
            pu.copy_((pu != 0).double() if name.endswith("weight") else torch.ones_like(pu))
            ps.pow_(2)
    patterns: list[torch.Tensor] = []
    state = {"mode": "record"}

    def relu_hook(module, args, output):
        if state["mode"] == "record":
            patterns.append(args[0] > 0)
            return None
        if state["mode"] == "unit":
            return args[0] * patterns.pop(0).double()
        return args[0]

    for net in (real, unit, square):
        for m in net.modules():
            if isinstance(m, nn.ReLU):
                m.register_forward_hook(relu_hook)
    total = None
    for x in batches:
        with torch.no_grad():
            state["mode"] = "record"
            real(x.double())
            state["mode"] = "unit"
            z1 = unit(x.double() ** 2)
        state["mode"] = "square"
        z2 = square(torch.ones_like(x, dtype=torch.float64))
        r = (z1 * z2).sum()
        total = r if total is None else total + r
    grads = torch.autograd.grad(total, list(square.parameters()))
    theta = dict(model.named_parameters())
    return {n: g.abs() * theta[n].detach().double() ** 2 for (n, _), g in zip(square.named_parameters(), grads,
                                                                          strict=True)}


# ------------------------------------------------------------------------------------------ BatchNorm

@pytest.mark.parametrize("bn", ["running", "batch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_batchnorm_net_prunes_in_any_float_dtype(bn, dtype):
    model = conv_bn(dtype=dtype)
    result = hf_px.prune(model, [images(6, 1), images(4, 2)], hf_px.PruneConfig(
        sparsity=0.8, rounds=3, options={"bn": bn}), progress=False)
    assert result.report["achieved_sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert model.conv1.weight.dtype == dtype and model.bn1.running_var.dtype == dtype
    assert all(not model.get_parameter(n)[~m].any() for n, m in result.masks.items())  # pruned ones are zero


@pytest.mark.parametrize("bn", ["running", "batch"])
def test_float32_scores_equal_those_of_a_float64_copy(bn):
    """The passes run in float64 either way; only the real pass (the ReLU patterns) sees the model's dtype."""
    model = conv_bn(seed=3)
    batches = [images(5, 4)]
    targets = collect_targets(model)
    scores32, r32 = path_scores(model, targets, init_masks(targets), batches, bn=bn)
    model64 = copy.deepcopy(model).double()
    targets64 = collect_targets(model64)
    scores64, r64 = path_scores(model64, targets64, init_masks(targets64), batches, bn=bn)
    assert r32 == pytest.approx(r64, rel=1e-9)
    for t, t64 in zip(targets, targets64, strict=True):
        torch.testing.assert_close(scores32[t.key], scores64[t64.key], rtol=1e-9, atol=0)


def test_batch_statistics_match_train_mode_copies():
    model = conv_bn(seed=1).double()
    with torch.no_grad():  # part of the net already pruned: masks enter the unit copy as zeros
        model.conv2.weight[0, :2] = 0
    batches = [images(6, 5), images(3, 6)]
    targets = collect_targets(model)
    masks = {t.param_name: t.param.detach() != 0 for t in targets}
    before = {n: b.clone() for n, b in model.named_buffers()}
    scores, _ = path_scores(model, targets, masks, batches, head_modules=(model.fc,), bn="batch")
    expected = reference_style_scores(model, batches, head="fc")
    for t in targets:
        torch.testing.assert_close(scores[t.key], expected[t.param_name], rtol=1e-9, atol=1e-12)
    assert all(torch.equal(before[n], b) for n, b in model.named_buffers())  # running statistics never move


def test_batch_statistics_differ_from_running_statistics():
    model = conv_bn(seed=2).double()
    targets = collect_targets(model)
    batches = [images(8, 7)]
    running, _ = path_scores(model, targets, init_masks(targets), batches, bn="running")
    batch, _ = path_scores(model, targets, init_masks(targets), batches, bn="batch")
    assert not torch.allclose(running["conv1.weight"], batch["conv1.weight"])


def test_bn_option_is_validated():
    with pytest.raises(ValueError, match="bn must be one of 'running', 'batch'"):
        PXOptions(bn="eval")
    assert PXOptions().bn in ("running", "batch")


# ------------------------------------------------------------------------------------------ raw-leaf heads

def test_head_modules_prune_end_to_end_and_rank_the_head():
    model = conv_bn(seed=4)
    result = hf_px.prune(model, [images(6, 8)], hf_px.PruneConfig(
        sparsity=0.7, rounds=2, options={"head_modules": ["fc"]}), progress=False)
    assert "fc.weight" in result.masks
    assert result.report["achieved_sparsity"] == pytest.approx(0.7, abs=1e-3)
    assert 0 < float(result.masks["fc.weight"].float().mean()) < 1  # ranked with the rest, not kept whole


def test_raw_head_scores_are_grad_times_theta_squared():
    """Without BatchNorm the raw-head rule needs no train-mode quirk: the three copies give the same scores."""
    model = mlp(seed=1)
    batches = [torch.randn(6, 5, generator=torch.Generator().manual_seed(9))]
    targets = collect_targets(model)
    scores, _ = path_scores(model, targets, init_masks(targets), batches, head_modules=(model[4],))
    expected = reference_style_scores(model, batches, head="4")
    for t in targets:
        torch.testing.assert_close(scores[t.key], expected[t.param_name], rtol=1e-10, atol=1e-14)


def test_pure_form_first_round_ignores_the_data_and_raw_head_does_not():
    """With unit head weights in the A pass every Ā_k is the same number, so the scores are one data-dependent
    constant times a data-free profile (docs/px.md §4); the raw head makes the profile itself data-dependent."""
    model = mlp(seed=2)
    targets = collect_targets(model)
    g = torch.Generator().manual_seed(0)
    set_a = [torch.randn(10, 5, generator=g)]
    set_b = [3.0 + torch.rand(7, 5, generator=g) * torch.tensor([4.0, 0.1, 2.0, 0.5, 1.0])]  # unrelated data

    def normalised(heads):
        scores, r = path_scores(model, targets, init_masks(targets), set_a, heads)
        scores_b, r_b = path_scores(model, targets, init_masks(targets), set_b, heads)
        return [(scores[t.key] / r, scores_b[t.key] / r_b) for t in targets]

    for a, b in normalised(()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    masks = [select_masks(targets, path_scores(model, targets, init_masks(targets), s)[0], init_masks(targets), 0.5)
             for s in (set_a, set_b)]
    assert all(torch.equal(masks[0][n], masks[1][n]) for n in masks[0])

    raw = normalised((model[4],))
    assert max(float(((a - b).abs() / b.abs().clamp_min(1e-300)).max()) for a, b in raw) > 1e-2


# ------------------------------------------------------------------------------------------ keep rule

def _tied_targets() -> tuple[list[Target], dict, dict]:
    """Two 'matrices' of 10 scores with exact ties: 1..6 once each, and 7.0 in eight places."""
    p1, p2 = nn.Parameter(torch.ones(2, 5)), nn.Parameter(torch.ones(10))
    targets = [Target(key="a", param_name="a", param=p1), Target(key="b", param_name="b", param=p2)]
    scores = {"a": torch.tensor([[9.0, 7.0, 1.0, 7.0, 2.0], [7.0, 8.0, 7.0, 3.0, 10.0]]),
              "b": torch.tensor([7.0, 4.0, 7.0, 11.0, 7.0, 5.0, 7.0, 6.0, 12.0, 13.0])}
    return targets, scores, init_masks(targets)


def _kept(masks: dict) -> int:
    return sum(int(m.sum()) for m in masks.values())


def test_exact_rule_keeps_round_density_and_breaks_ties_by_position():
    targets, scores, masks = _tied_targets()
    new = select_masks(targets, scores, masks, 0.5, keep_rule="exact")  # cut inside the eight 7.0s
    assert _kept(new) == 10
    above = sum(int((s > 7.0).sum()) for s in scores.values())  # 9, 8, 10, 11, 12, 13
    tied_kept = sum(int((new[k] & (scores[k] == 7.0)).sum()) for k in scores)
    assert above == 6 and tied_kept == 4
    first_tied = torch.nonzero(scores["a"].flatten() == 7.0).squeeze(1)  # matrix order, then position
    assert new["a"].flatten()[first_tied].all() and not (new["b"] & (scores["b"] == 7.0)).any()


def test_reference_rule_prunes_every_tie_at_the_threshold():
    targets, scores, masks = _tied_targets()
    n = 20
    new = select_masks(targets, scores, masks, 0.5, keep_rule="reference")
    # int(0.5 * 20) = 10 would be kept; the threshold (the 10th smallest score) is 7.0 and all eight 7.0s go,
    # including the four the exact rule keeps: 10 - 4 = 6 are left, exactly the scores above the threshold
    assert int(0.5 * n) == n - int((1 - 0.5) * n) == 10
    assert _kept(new) == 10 - 4
    for k in scores:
        assert torch.equal(new[k], scores[k] > 7.0)


def test_reference_rule_counts_the_pruned_side_like_the_reference():
    """Without ties the reference keeps N - int((1 - d) N): one more than int(d N) where d N is not whole."""
    p = nn.Parameter(torch.ones(10))
    targets = [Target(key="w", param_name="w", param=p)]
    scores = {"w": torch.arange(1.0, 11.0)}
    for density, ref, exact in [(0.55, 6, 6), (0.34, 4, 3), (0.3, 3, 3), (0.26, 3, 3)]:
        assert _kept(select_masks(targets, scores, init_masks(targets), density, keep_rule="reference")) == ref
        assert _kept(select_masks(targets, scores, init_masks(targets), density, keep_rule="exact")) == exact
        assert ref == 10 - int((1.0 - density) * 10)


def test_reference_rule_with_dead_entries_and_zero_scores():
    """Dead weights enter the threshold at score 0 and never come back; live zero scores tie with them."""
    p = nn.Parameter(torch.ones(8))
    targets = [Target(key="w", param_name="w", param=p)]
    masks = {"w": torch.tensor([False, False, True, True, True, True, True, True])}
    scores = {"w": torch.tensor([0.0, 0.0, 0.0, 5.0, 6.0, 7.0, 8.0, 9.0])}
    new = select_masks(targets, scores, masks, 0.75, keep_rule="reference")  # prunes int(0.25 * 8) = 2: τ = 0
    assert new["w"].tolist() == [False, False, False, True, True, True, True, True]
    assert _kept(select_masks(targets, scores, masks, 0.75, keep_rule="exact")) == 6


def test_reference_rule_through_prune_keeps_no_more_than_exact():
    model = mlp(seed=6)
    batches = [torch.randn(8, 5, generator=torch.Generator().manual_seed(1))]
    exact = hf_px.prune(copy.deepcopy(model), batches, hf_px.PruneConfig(sparsity=0.6, rounds=4,
                                                                          min_density_ratio=0.0), progress=False)
    ref = hf_px.prune(copy.deepcopy(model), batches, hf_px.PruneConfig(sparsity=0.6, rounds=4, min_density_ratio=0.0,
                                                                        keep_rule="reference"), progress=False)
    n = exact.report["prunable_params"]
    assert exact.report["kept_params"] == round(0.4 * n)
    assert ref.report["kept_params"] <= n - int((1.0 - 0.4) * n)
    assert ref.config.to_dict()["keep_rule"] == "reference"


def test_keep_rule_is_validated():
    with pytest.raises(ValueError, match="keep_rule must be 'exact'"):
        hf_px.PruneConfig(keep_rule="floor")
    targets, scores, masks = _tied_targets()
    with pytest.raises(ValueError, match="keep_rule"):
        select_masks(targets, scores, masks, 0.5, keep_rule="truncate")


# ------------------------------------------------------------------------------------------ the bn benchmark

def test_bn_benchmark_runs_and_merges(tmp_path):
    bench = load_script("bench_px_bn")
    out = tmp_path / "px_bn.json"
    tiny = ["--seeds", "0", "--sparsities", "0.9", "--rounds", "2", "--per-class", "2", "--train", "60",
            "--test", "40", "--pretrain-epochs", "1", "--finetune-epochs", "1", "--scratch-epochs", "1",
            "--out", str(out)]
    first = bench.main(tiny)
    assert {(r["regime"], r["bn"]) for r in first["records"]} == {
        ("transfer", "dense"), ("transfer", "running"), ("transfer", "batch"), ("init", "running"), ("init", "batch")}
    merged = bench.main([*tiny, "--head", "fc", "--arch", "flatten", "--regimes", "init", "--merge"])
    assert len(merged["records"]) == 7 and len(merged["runs"]) == 2
    assert {(r["arch"], r["head"]) for r in merged["summary"]} == {("gap", "pure"), ("flatten", "fc")}
    assert all(0.0 <= r["mean"] <= 1.0 for r in merged["summary"])
