"""The global threshold over scores spread across processes gives the single-process masks, exactly.

One ``torch.distributed.run`` launch of two gloo CPU ranks runs this file as its worker (``__main__`` below) and
checks, for tiny BERT / GPT-2 (fused c_attn) / Llama (gated MLP, GQA) targets, three kinds of scores
(continuous, heavily tied, real PX scores) and three layouts (whole targets per rank, every target cut in two,
and a mix with uneven pieces and a rank holding the later piece first), over four rounds with and without the
layer-collapse floor, that every rank's piece of ``select_masks_sharded`` equals its slice of ``select_masks``
and the kept count is exact. It also records how often a target's scores had to be gathered (only for runs of
equal scores at a per-target top-k). Then ``hf_px.prune`` on FSDP2-sharded tiny BERT and Llama models, each rank
with half the calibration batches: the masks equal one process's, every local shard carries its slice of them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
DENSITIES = (0.7, 0.4, 0.1, 0.03)


# ------------------------------------------------------------------------------------------------ worker
def _layout(name: str, i: int, n: int, rank: int) -> tuple[int, int] | None:
    """This rank's [start, stop) of target i (n entries) under layout ``name`` (2 ranks); None: nothing."""
    if name == "whole":
        return (0, n) if i % 2 == rank else None
    if name == "halves":
        cut = (n + 1) // 2
        return (0, cut) if rank == 0 else (cut, n)
    # mixed: whole on rank 1; cut at a third with rank 1 holding the first piece; all but the last entry on rank 0
    kind = i % 3
    if kind == 0:
        return (0, n) if rank == 1 else None
    cut = n // 3 if kind == 1 else n - 1
    first, second = (1, 0) if kind == 1 else (0, 1)
    return (0, cut) if rank == first else (cut, n) if rank == second else None


def _scores(kind: str, model, targets, seed: int) -> dict[str, torch.Tensor]:
    from hf_px.pruning.masks import init_masks
    from hf_px.pruning.scoring.base import local_scoring
    from hf_px.pruning.scoring.px import transformer_scores

    g = torch.Generator().manual_seed(seed)
    if kind == "continuous":
        return {t.key: torch.rand(t.view(t.param).shape, generator=g, dtype=torch.float64) ** 4 for t in targets}
    if kind == "ties":  # four distinct values, zeros among them: ties at every cut
        return {t.key: torch.randint(0, 4, t.view(t.param).shape, generator=g).double() for t in targets}
    from tiny_models import tiny_batches

    with local_scoring():  # each rank scores all batches itself: the single-process scores
        return transformer_scores(model, targets, init_masks(targets), tiny_batches(model),
                                  generator=torch.Generator().manual_seed(seed))[0]


def _check_case(family: str, kind: str, layout: str, ratio: float, rank: int, failures: list) -> None:
    import torch.distributed as dist
    from tiny_models import tiny

    from hf_px.pruning.masks import ScoreShard, _keep_count, init_masks, select_masks, select_masks_sharded
    from hf_px.pruning.targets import collect_targets

    model = tiny(family)
    targets = collect_targets(model)
    scores = _scores(kind, model, targets, seed=7)
    flat = {t.key: scores[t.key].flatten() for t in targets}
    pieces = {t.key: _layout(layout, i, t.numel(), rank) for i, t in enumerate(targets)}
    masks = init_masks(targets)
    alive = {}
    for t in targets:
        if pieces[t.key]:
            start, stop = pieces[t.key]
            alive[t.key] = t.view(masks[t.param_name]).flatten()[start:stop]
    total = sum(t.numel() for t in targets)
    for d in DENSITIES:
        masks = select_masks(targets, scores, masks, d, ratio)
        shards = {k: ScoreShard(p[0], flat[k][p[0]:p[1]], alive[k]) for k, p in pieces.items() if p}
        got = select_masks_sharded(targets, shards, d, ratio)
        case = f"{family}/{kind}/{layout}/ratio={ratio}/d={d}/rank{rank}"
        if set(got) != set(shards):
            failures.append(f"{case}: pieces returned for {sorted(set(got) ^ set(shards))[:3]}")
            return
        for t in targets:
            if t.key in got:
                start, stop = pieces[t.key]
                want = t.view(masks[t.param_name]).flatten()[start:stop]
                if not torch.equal(got[t.key], want):
                    failures.append(f"{case}: {t.key} differs in {int((got[t.key] != want).sum())} entries")
        kept = torch.tensor([sum(int(m.sum()) for m in got.values())])
        dist.all_reduce(kept)
        if int(kept) != _keep_count(d, total):
            failures.append(f"{case}: kept {int(kept)}, want {_keep_count(d, total)}")
        alive = got


def _fsdp_prune(rank: int) -> list[str]:
    """hf_px.prune on FSDP2-sharded tiny models, each rank with half the batches, against one process."""
    from tiny_models import tiny, tiny_batches
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import hf_px
    from hf_px.finetuning import fixed_masks
    from hf_px.pruning.scoring.base import local_scoring

    failures = []
    config = hf_px.PruneConfig(sparsity=0.9, rounds=3, options={"qk_score": "magnitude"})
    for family in ("bert", "llama"):
        reference = tiny(family)
        batches = tiny_batches(reference, n_batches=4)
        with local_scoring():
            want = hf_px.prune(reference, batches, config, progress=False).masks
        model = tiny(family)
        blocks = model.bert.encoder.layer if family == "bert" else model.model.layers
        mesh = init_device_mesh("cpu", (2,))
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        got = hf_px.prune(model, batches[rank::2], config, progress=False)
        if set(got.masks) != set(want) or any(not torch.equal(got.masks[n], m) for n, m in want.items()):
            failures.append(f"{family}: sharded masks differ from the single-process masks")
        for param, mask in fixed_masks.bind_masks(got.model, got.masks):
            local, keep = param.to_local(), mask.to_local()
            if local.shape != keep.shape or bool((local[~keep] != 0).any()) or not bool((local[keep] != 0).all()):
                failures.append(f"{family}: a local shard does not carry its mask")
                break
        if got.model is not model or type(next(model.parameters())).__name__ != "DTensor":
            failures.append(f"{family}: the sharded model was not pruned in place")
        if abs(got.report["achieved_sparsity"] - 0.9) > 1e-3:
            failures.append(f"{family}: sparsity {got.report['achieved_sparsity']}")
    try:
        hf_px.prune(model, batches[rank::2], hf_px.PruneConfig(sparsity=0.5, rounds=1, pcn=hf_px.PCNConfig()),
                    progress=False)
        failures.append("PCN on a sharded model was not refused")
    except ValueError as err:
        if "before fully_shard" not in str(err):
            failures.append(f"PCN refusal: {err}")
    return failures


def worker(out: str) -> None:
    import torch.distributed as dist

    from hf_px.pruning import ranking

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    gathers = {"n": 0}
    resolve = ranking._resolve_by_gathering

    def counting(values, groups, *args, **kwargs):
        gathers["n"] += len(groups)
        return resolve(values, groups, *args, **kwargs)

    ranking._resolve_by_gathering = counting
    failures: list[str] = []
    per_kind = {}
    for kind in ("continuous", "ties", "px"):
        before = gathers["n"]
        for family in ("bert", "gpt2", "llama"):
            for layout in ("whole", "halves", "mixed"):
                for ratio in (0.0, 0.1):
                    _check_case(family, kind, layout, ratio, rank, failures)
        per_kind[kind] = gathers["n"] - before
    fsdp = _fsdp_prune(rank)
    everything = [None, None]
    dist.all_gather_object(everything, {"failures": failures, "gathers": per_kind, "fsdp": fsdp})
    if rank == 0:
        Path(out).write_text(json.dumps({"world": dist.get_world_size(), "ranks": everything}))
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo teardown in torch 2.13 sometimes aborts after a clean finish (docs/offline.md §5)


# ------------------------------------------------------------------------------------------------- tests
@pytest.mark.slow
def test_two_ranks_give_the_single_process_masks(tmp_path):
    out = tmp_path / "result.json"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(Path(__file__).resolve()), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for _attempt in range(2):  # one retry for the known gloo teardown abort
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if proc.returncode == 0 and out.exists():
            break
    assert out.exists(), proc.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["world"] == 2
    for r, result in enumerate(got["ranks"]):
        assert result["failures"] == [], (r, result["failures"][:5])
        # continuous scores never need a gather; runs of equal scores at a split target's top-k do, and match
        assert result["gathers"]["continuous"] == 0, result["gathers"]
        assert result["gathers"]["ties"] > 0, result["gathers"]
        assert result["fsdp"] == [], (r, result["fsdp"])


def test_one_process_sharded_call_equals_select_masks():
    """Without torch.distributed the sharded entry point is select_masks on whole pieces."""
    from tiny_models import tiny

    from hf_px.pruning.masks import ScoreShard, init_masks, select_masks, select_masks_sharded
    from hf_px.pruning.targets import collect_targets

    model = tiny("gpt2")
    targets = collect_targets(model)
    g = torch.Generator().manual_seed(0)
    scores = {t.key: torch.randint(0, 3, t.view(t.param).shape, generator=g).double() for t in targets}
    masks = init_masks(targets)
    for d in DENSITIES:
        shards = {t.key: ScoreShard(0, scores[t.key].flatten(), t.view(masks[t.param_name]).flatten())
                  for t in targets}
        masks = select_masks(targets, scores, masks, d, 0.1)
        got = select_masks_sharded(targets, shards, d, 0.1)
        for t in targets:
            assert torch.equal(got[t.key], t.view(masks[t.param_name]).flatten()), (d, t.key)


def test_sharded_call_refuses_gaps_and_the_reference_rule():
    from tiny_models import tiny

    from hf_px.pruning.masks import ScoreShard, init_masks, select_masks_sharded
    from hf_px.pruning.targets import collect_targets

    targets = collect_targets(tiny("bert"))
    masks = init_masks(targets)
    shards = {t.key: ScoreShard(0, torch.rand(t.numel()), t.view(masks[t.param_name]).flatten()) for t in targets}
    with pytest.raises(ValueError, match="keep_rule='exact' only"):
        select_masks_sharded(targets, shards, 0.5, keep_rule="reference")
    first = targets[0].key
    cut = {**shards, first: ScoreShard(0, shards[first].scores[:-1], shards[first].alive[:-1])}
    with pytest.raises(ValueError, match="exactly one process"):
        select_masks_sharded(targets, cut, 0.5)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    worker(sys.argv[1])
