"""The result tables of scripts/bench_quality.py (the README's tables are printed by it)."""

from __future__ import annotations

from tiny_models import load_script


def _bench():
    return load_script("bench_quality")


def _rec(method, sparsity, seed, acc, dataset="rt"):
    return {"dataset": dataset, "method": method, "sparsity": sparsity, "seed": seed, "lr": 2e-4, "steps": 150,
            "accuracy_after_prune": 0.5, "accuracy_after_finetune": acc}


def test_markdown_table_means_stds_seed_counts_and_best():
    records = [_rec("dense", 0.0, s, a) for s, a in [(0, 0.80), (1, 0.82)]]
    records += [_rec("px", 0.8, s, a) for s, a in [(0, 0.70), (1, 0.74)]]
    records += [_rec("snip", 0.8, 0, 0.75), _rec("snip", 0.9, 0, 0.60), _rec("px", 0.9, 0, 0.65)]
    records.append(_rec("px", 0.8, 0, 0.9, dataset="sst2"))
    tables = _bench().markdown_table(records).split("\n\n**")
    assert [t.splitlines()[0].strip("*") for t in tables] == ["sst2", "rt"]  # the DATASETS order
    lines = tables[1].splitlines()[2:]
    assert lines[0] == "| method | 80% | 90% |"
    rows = {line.split(" | ")[0].strip("| "): line for line in lines[2:]}
    assert list(rows) == ["dense", "px", "snip"]
    assert rows["dense"] == "| dense | 81.0 ± 1.4 | 81.0 ± 1.4 |"
    # px: mean 72.0 of two seeds; snip has one seed (marked) and wins at 80%, px wins at 90%
    assert rows["px"] == "| px | 72.0 ± 2.8 | **65.0 (n=1)** |"
    assert rows["snip"] == "| snip | **75.0 (n=1)** | 60.0 (n=1) |"


def test_allocation_groups_kept_fractions_by_role_and_block():
    import torch
    from tiny_models import tiny

    from hf_px.pruning.masks import init_masks
    from hf_px.pruning.targets import collect_targets

    module = load_script("bench_allocation")
    model = tiny("bert")
    targets = collect_targets(model)
    masks = init_masks(targets)
    for t in targets:
        if t.role == "ffn_in" and t.block == 0:
            masks[t.key] = torch.zeros_like(masks[t.key])
        if t.role == "q":
            masks[t.key].view(-1)[: masks[t.key].numel() // 4] = False
    out = module.allocation(masks, model)
    n_blocks = len({t.block for t in targets})
    assert out["by_role"]["q"] == 0.75
    assert out["by_role"]["ffn_in"] == (n_blocks - 1) / n_blocks
    assert out["by_role"]["v"] == 1.0
    block0 = [t for t in targets if t.block == 0]
    total = sum(masks[t.key].numel() for t in block0)
    kept = sum(int(masks[t.key].sum()) for t in block0)
    assert out["by_block"]["0"] == kept / total < 1.0
    assert out["by_matrix"]["0.ffn_in"] == 0.0 and out["by_matrix"]["1.ffn_in"] == 1.0
    assert out["by_matrix"]["0.q"] == out["by_matrix"]["1.q"] == 0.75


def test_records_replace_only_their_own_key():
    bench = _bench()
    old = [_rec("px", 0.8, 0, 0.70), _rec("px", 0.8, 1, 0.71)]
    rerun = _rec("px", 0.8, 0, 0.75)
    floor = dict(_rec("px", 0.8, 0, 0.60), min_density_ratio=0.3)  # another experiment: must not replace seed 0
    merged = bench.replace_records(bench.replace_records(old, [rerun]), [floor])
    assert sorted((r["seed"], r["accuracy_after_finetune"], r.get("min_density_ratio", 0.1)) for r in merged) == [
        (0, 0.6, 0.3), (0, 0.75, 0.1), (1, 0.71, 0.1)]
