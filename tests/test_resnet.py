"""PX on Hugging Face ResNet: the exact path network (docs/px.md §4.3) checked against an independent forward.

The reference here is a functional ResNet written from the config with ``torch.nn.functional`` only (no hooks,
no ``functional_call``): a real pass records the ReLU patterns and the max-pool selections, an A pass (unit
weights, x², BatchNorm as (1/σ)², the recorded gates) and a B pass (θ², ones, BatchNorm as γ², ReLU identity,
max-pool as the window sum) give R = Σ Ā·B, and autograd gives θ²·|∂R/∂θ²|.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from tiny_models import load_script
from transformers import ResNetConfig, ResNetForImageClassification

import hf_px
from hf_px.pruning.masks import init_masks, masks_from_model
from hf_px.pruning.scoring.path_network import path_network_scores, uses_path_network
from hf_px.pruning.targets import collect_targets
from hf_px.registry import get_arch

torch.set_num_threads(1)


def tiny_resnet(layer_type: str = "basic", seed: int = 0, channels: int = 1, dtype=torch.float64, labels: int = 3):
    """A tiny ResNet with an identity (stage 1) and a projection (stage 2) shortcut and non-trivial BatchNorms."""
    torch.manual_seed(seed)
    cfg = ResNetConfig(num_channels=channels, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=labels,
                       layer_type=layer_type)
    model = ResNetForImageClassification(cfg)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model.to(dtype).eval()


def images(n: int, seed: int, channels: int = 1, size: int = 16) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.randn(n, channels, size, size, generator=g), "labels": torch.arange(n) % 3}]


# ------------------------------------------------------------------ the independent functional path network
def _conv(x, layer, w):
    return F.conv2d(x, w, None, layer.convolution.stride, layer.convolution.padding)


def _bn(x, bn, mode):
    shape = (1, -1, 1, 1)
    if mode == "real":
        return F.batch_norm(x, bn.running_mean.double(), bn.running_var.double(), bn.weight.double(), bn.bias.double(),
                            False, 0.0, bn.eps)
    if mode == "A":
        return x / (bn.running_var.double() + bn.eps).view(shape)
    return x * (bn.weight.double() ** 2).view(shape)


def _relu(x, mode, gates):
    if mode == "real":
        gates.append(x > 0)
        return torch.relu(x)
    if mode == "A":
        return x * gates.pop(0)
    return x


def functional_resnet(model, x, mode, weights, gates):
    """``mode``: real (records ``gates``), A (consumes them in order) or B; ``weights``: conv -> tensor."""
    r = model.resnet
    stem = r.embedder.embedder
    h = _relu(_bn(_conv(x, stem, weights[stem.convolution]), stem.normalization, mode), mode, gates)
    if mode == "real":
        h, idx = F.max_pool2d(h, 3, 2, 1, return_indices=True)
        gates.append(idx)
    elif mode == "A":
        idx = gates.pop(0)
        h = h.flatten(2).gather(2, idx.flatten(2)).view_as(idx)
    else:
        h = F.avg_pool2d(h, 3, 2, 1, count_include_pad=True) * 9  # every window edge on
    for stage in r.encoder.stages:
        for block in stage.layers:
            branch = h
            convs = list(block.layer)
            for i, layer in enumerate(convs):
                branch = _bn(_conv(branch, layer, weights[layer.convolution]), layer.normalization, mode)
                if i < len(convs) - 1:
                    branch = _relu(branch, mode, gates)
            if isinstance(block.shortcut, torch.nn.Identity):
                skip = h
            else:
                sc = block.shortcut
                skip = _bn(_conv(h, sc, weights[sc.convolution]), sc.normalization, mode)
            h = _relu(branch + skip, mode, gates)
    pooled = h.mean((2, 3))
    fc = model.classifier[1]
    return F.linear(pooled, fc.weight.double(), fc.bias.double() if mode == "real" else None)


def independent_scores(model, x, masks):
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    name = {id(p): n for n, p in model.named_parameters()}
    gates: list = []
    real = functional_resnet(model, x.double(), "real", {c: c.weight.double() for c in convs}, gates)
    a = functional_resnet(model, x.double() ** 2, "A", {c: masks[name[id(c.weight)]].double() for c in convs}, gates)
    leaves = {c: (c.weight.double() ** 2).requires_grad_(True) for c in convs}
    b = functional_resnet(model, torch.ones(1, *x.shape[1:], dtype=torch.float64), "B", leaves, [])
    r = (a.sum(0) * b[0]).sum()
    grads = torch.autograd.grad(r, list(leaves.values()))
    scores = {name[id(c.weight)]: g.abs() * leaves[c].detach() for c, g in zip(convs, grads, strict=True)}
    return real, a.sum(0), scores, r.detach(), leaves


# ----------------------------------------------------------------------------------------------- tests
def test_resnet_is_registered_and_scored_by_the_path_network():
    model = tiny_resnet()
    assert get_arch(model).name == "resnet"
    assert uses_path_network(model)
    targets = collect_targets(model)
    convs = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert {t.param_name for t in targets} == {f"{n}.weight" for n in convs}  # the shortcut's 1x1 conv included
    assert "classifier.1.weight" not in {t.param_name for t in targets}  # the head stays dense


@pytest.mark.parametrize("layer_type", ["basic", "bottleneck"])
def test_px_equals_an_independent_path_network(layer_type):
    model = tiny_resnet(layer_type)
    batch = images(6, seed=1)
    x = batch[0]["pixel_values"]
    targets = collect_targets(model)
    masks = init_masks(targets)
    g = torch.Generator().manual_seed(3)
    for t in targets[::2]:  # a partly pruned network: masks enter the A pass
        masks[t.param_name] &= torch.rand(t.param.shape, generator=g) > 0.3
    with torch.no_grad():
        for t in targets:
            t.param.mul_(masks[t.param_name])
    real, a_bar, expected, r_expected, _ = independent_scores(model, x, masks)
    with torch.no_grad():  # the functional forward is the HF model's: same logits
        assert torch.allclose(real, model(pixel_values=x.double()).logits, atol=1e-10)
    scores, r = path_network_scores(model, targets, masks, batch)
    assert r == pytest.approx(float(r_expected), rel=1e-10)
    for t in targets:
        assert torch.allclose(scores[t.key], expected[t.param_name], rtol=1e-9, atol=1e-12 * float(r_expected)), t.key
    assert all(bool((scores[t.key][~masks[t.param_name]] == 0).all()) for t in targets)  # pruned weights score 0
    assert not torch.allclose(a_bar, a_bar.mean().expand_as(a_bar))  # the raw head makes Ā differ per class


def test_zeroing_a_weight_lowers_r_by_its_score():
    """Exclusion (docs/px.md §2.4) through residual adds, a projection shortcut and the gated max-pool."""
    model = tiny_resnet()
    batch = images(5, seed=2)
    x = batch[0]["pixel_values"]
    targets = collect_targets(model)
    masks = init_masks(targets)
    scores, r = path_network_scores(model, targets, masks, batch)
    _, a_bar, _, _, leaves = independent_scores(model, x, masks)
    by_name = {t.param_name: t for t in targets}
    for pname, index in (("resnet.embedder.embedder.convolution.weight", (3, 0, 2, 4)),
                         ("resnet.encoder.stages.1.layers.0.shortcut.convolution.weight", (5, 2, 0, 0)),
                         ("resnet.encoder.stages.0.layers.0.layer.1.convolution.weight", (1, 7, 1, 2))):
        conv = next(m for n, m in model.named_modules() if f"{n}.weight" == pname)
        weights = {c: leaf.detach().clone() for c, leaf in leaves.items()}
        weights[conv][index] = 0.0
        with torch.no_grad():
            b = functional_resnet(model, torch.ones(1, *x.shape[1:], dtype=torch.float64), "B", weights, [])
        drop = r - float((a_bar * b[0]).sum())
        assert drop == pytest.approx(float(scores[by_name[pname].key][index]), rel=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_prune_end_to_end_exact_sparsity(dtype):
    model = tiny_resnet(dtype=dtype)
    batches = images(8, seed=4)
    before = model.classifier[1].weight.detach().clone()
    result = hf_px.prune(model, batches, hf_px.PruneConfig(sparsity=0.8, rounds=4), progress=False)
    masks = masks_from_model(model)
    kept, total = sum(int(m.sum()) for m in masks.values()), sum(m.numel() for m in masks.values())
    assert abs(kept - round(0.2 * total)) <= 0  # exact top-k: round(d * N) weights kept
    assert result.report["achieved_sparsity"] == pytest.approx(0.8, abs=0.5 / total)
    assert all(int(m.sum()) > 0 for m in masks.values())  # no conv emptied (the min-density floor)
    assert torch.equal(model.classifier[1].weight, before)  # the head is dense and untouched
    assert next(model.parameters()).dtype == dtype
    with torch.no_grad():
        assert torch.isfinite(model(**{"pixel_values": batches[0]["pixel_values"].to(dtype)}).logits.float()).all()


def test_float32_scores_match_float64():
    m64 = tiny_resnet()
    m32 = tiny_resnet().float()
    batch = images(4, seed=5)
    t64, t32 = collect_targets(m64), collect_targets(m32)
    s64, r64 = path_network_scores(m64, t64, init_masks(t64), batch)
    s32, r32 = path_network_scores(m32, t32, init_masks(t32), batch)
    assert r32 == pytest.approx(r64, rel=1e-5)  # the record pass in float32 can only flip near-zero ReLU gates
    for a, b in zip(t64, t32, strict=True):
        assert torch.allclose(s32[b.key], s64[a.key], rtol=1e-4, atol=1e-9 * r64)


def test_scores_depend_on_the_calibration_data():
    model = tiny_resnet()
    targets = collect_targets(model)
    s1, r1 = path_network_scores(model, targets, init_masks(targets), images(6, seed=10))
    s2, r2 = path_network_scores(model, targets, init_masks(targets), images(6, seed=11))
    differs = [not torch.allclose(s1[t.key] / r1, s2[t.key] / r2, rtol=1e-3) for t in targets]
    assert all(differs)
    masks = []
    for seed in (10, 11):
        m = tiny_resnet()
        hf_px.prune(m, images(6, seed=seed), hf_px.PruneConfig(sparsity=0.9, rounds=3), progress=False)
        masks.append(masks_from_model(m))
    assert any(not torch.equal(masks[0][k], masks[1][k]) for k in masks[0])


def test_max_pool_options_and_bn_batch_degeneracy():
    model = tiny_resnet()
    batch = images(4, seed=6)
    targets = collect_targets(model)
    gated, _ = path_network_scores(model, targets, init_masks(targets), batch)
    own, _ = path_network_scores(model, targets, init_masks(targets), batch, max_pool="own")
    assert any(not torch.allclose(gated[t.key], own[t.key]) for t in targets)
    with pytest.raises(ValueError, match="max_pool"):
        hf_px.PruneConfig(options={"max_pool": "mean"})
    # bn="batch": every path into the global average ends in a train-mode BatchNorm, whose B output averages to β,
    # so the B output does not depend on any conv weight and every score is rounding noise (docs/px.md §4.3)
    batch_scores, _ = path_network_scores(model, targets, init_masks(targets), batch, bn="batch")
    top = max(float(s.max()) for s in gated.values())
    assert max(float(s.abs().max()) for s in batch_scores.values()) < 1e-9 * top


def test_hf_px_run_on_a_saved_resnet(tmp_path):
    import numpy as np
    from PIL import Image
    from transformers import AutoModelForImageClassification, ViTImageProcessor

    from hf_px.pipeline import run as run_pipeline

    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 4)):
        for c, mean in (("cat", 60), ("dog", 190)):
            (tmp_path / "images" / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(rng.normal(mean, 40, (16, 16, 3)), 0, 255).astype("uint8")
                Image.fromarray(pixels).save(tmp_path / "images" / split / c / f"{i}.png")
    base = tmp_path / "base"
    pretrained = tiny_resnet(channels=3, dtype=torch.float32, labels=4)  # a head for other classes (ImageNet's)
    pretrained.config.id2label = dict(enumerate(["tench", "goldfish", "great white shark", "tiger shark"]))
    pretrained.config.label2id = {v: k for k, v in pretrained.config.id2label.items()}
    pretrained.save_pretrained(base)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(base)
    cfg = {"model": {"name_or_path": str(base), "task": "image-classification"},
           "data": {"dataset": str(tmp_path / "images"), "per_class": 4, "calibration_batch_size": 8},
           "prune": {"sparsity": 0.75, "rounds": 3},
           "finetune": {"epochs": 2, "batch_size": 8, "learning_rate": 1e-3, "progress_bar": False},
           "output": {"output_dir": str(tmp_path / "run")}}
    result = run_pipeline(cfg, progress=False)
    assert result.report["prune"]["method"] == "px"
    assert result.report["prune"]["achieved_sparsity"] == pytest.approx(0.75, abs=1e-3)
    stage = json.loads(next((tmp_path / "run").glob("*-evaluate/metrics.json")).read_text())
    assert 0.0 <= stage["eval_accuracy"] <= 1.0
    for loader in (ResNetForImageClassification, AutoModelForImageClassification):
        reloaded = loader.from_pretrained(result.model_dir).eval()
        assert isinstance(reloaded, ResNetForImageClassification)
        masks = masks_from_model(reloaded)
        kept, total = sum(int(m.sum()) for m in masks.values()), sum(m.numel() for m in masks.values())
        assert abs(kept - round(0.25 * total)) <= 1  # the pruned zeros survived fine-tuning, saving and reloading
    with torch.no_grad():
        out = reloaded(pixel_values=torch.randn(2, 3, 16, 16)).logits
    assert out.shape == (2, 2)  # the transfer case: a new head for cat/dog, not the 4-way one
    assert reloaded.config.id2label == {0: "cat", 1: "dog"}


def test_bench_vision_quick_synthetic(tmp_path):
    """The transfer benchmark's smoke mode on synthetic images (no data sets needed) writes its JSON and plot."""
    bench = load_script("bench_vision")
    out = tmp_path / "vision.json"
    argv = ["--quick", "--synthetic", "--methods", "px", "random", "--sparsities", "0.9", "--bn-sparsities",
            "--pretrain-examples", "600", "--depths", "1", "1", "1", "--work-dir", str(tmp_path / "work"), "--json", str(out),
            "--png", str(tmp_path / "vision.png")]
    assert bench.main(argv) == 0
    data = json.loads(out.read_text())
    assert data["header"]["threads"] == 1 and data["header"]["data"] == "synthetic"
    records = data["records"]
    assert {r["method"] for r in records} == {"dense", "px", "random"}
    for r in records:
        assert {"method", "sparsity", "seed", "accuracy", "dense_accuracy"} <= set(r)
        assert r["depths"] == [1, 1, 1]
        assert 0.0 <= r["accuracy"] <= 1.0
        if r["method"] != "dense":  # exact sparsity, and the masks held through fine-tuning
            assert r["achieved_sparsity"] == pytest.approx(0.9, abs=1e-4)
            assert r["final_sparsity"] == pytest.approx(r["achieved_sparsity"], abs=1e-9)
    assert (tmp_path / "vision.png").stat().st_size > 0
    assert list((tmp_path / "work").glob("pretrained-*/config.json"))  # the cached source checkpoint
