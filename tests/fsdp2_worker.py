"""FSDP2 (``fully_shard``, DTensor parameters) fine-tuning with fixed masks on gloo CPU ranks, for test_fsdp2.py.

Accelerate 1.15 runs an FSDP config as DDP when the processes are on CPU, so this worker gets FSDP2 two ways:

1. ``direct``: it calls ``fully_shard`` on each BERT block and the root itself and drives hf_px's mask,
   checkpoint and save code step by step, as the fine-tuning loop does;
2. ``loop``: it runs hf_px's ``finetune`` with an Accelerator switched to FSDP after construction (the one
   thing Accelerate does differently on GPUs), so ``accelerator.prepare`` shards the model with Accelerate's own
   FSDP2 code and the plugin built from ``scripts/configs/accelerate_fsdp2.yaml``; the run is resumed from a
   mid-run checkpoint in the same processes.

Launched with ``accelerate launch --config_file scripts/configs/accelerate_fsdp2.yaml --num_processes 2
--mixed_precision no tests/fsdp2_worker.py OUT``. Every rank asserts its own checks; rank 0 writes
``OUT/result.json`` and ``OUT/full.safetensors`` (the gathered weights of part 1). The helpers (model, masks,
data, one step) are shared with the test's 1-process reference runs.
"""

from __future__ import annotations

import json
import os
import sys
import types

import torch

sys.path.insert(0, os.path.dirname(__file__))
from tiny_models import VOCAB, tiny  # noqa: E402

from hf_px.finetuning import fixed_masks, optim  # noqa: E402

STEPS = 6
CKPT_STEP = 3
PER_RANK = 4  # examples per rank and step; the 1-process reference takes both ranks' rows at once
WORLD = 2
LR = 1e-2
WEIGHT_DECAY = 0.1  # on, as in real runs: decoupled decay only scales weights, so zeros regrow from gradients


def build(seed: int = 0) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The tiny BERT, dropout off (ranks draw different dropout masks than one process), pruned to 40% density."""
    from hf_px.pruning.masks import apply_masks
    from hf_px.pruning.targets import collect_targets

    model = tiny("bert", seed=seed, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).train()
    g = torch.Generator().manual_seed(123)  # the same masks whatever the init seed
    masks = {t.param_name: torch.rand(t.param.shape, generator=g) < 0.4 for t in collect_targets(model)}
    # the 3-row head splits 2 + 1 over two ranks: a mask must follow FSDP's uneven shards too
    masks["classifier.weight"] = torch.rand(model.classifier.weight.shape, generator=g) < 0.5
    with torch.no_grad():
        apply_masks(model, masks)
    return model, masks


def global_batch(step: int) -> dict[str, torch.Tensor]:
    """Step ``step``'s batch over all ranks: WORLD * PER_RANK rows of one length (no padding to differ)."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(3, VOCAB, (WORLD * PER_RANK, 8), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[:, 0] % 3}


def rank_batch(step: int, rank: int) -> dict[str, torch.Tensor]:
    return {k: v[rank * PER_RANK:(rank + 1) * PER_RANK] for k, v in global_batch(step).items()}


def make_optimizer(model: torch.nn.Module):
    opt = torch.optim.AdamW(optim.param_groups(model, WEIGHT_DECAY), lr=LR)
    return opt, optim.linear_schedule(opt, 1, STEPS)


def step(model, opt, sched, pairs, batch, on_grads=None) -> torch.Tensor:
    """One optimizer step as hf_px's loop takes it: pruned gradients zeroed before, weights re-masked after.

    ``on_grads()`` is called with the raw gradients and again with the zeroed ones.
    """
    loss = model(**batch).loss
    loss.backward()
    if on_grads is not None:
        on_grads()
    fixed_masks.zero_masked_grads(pairs)
    if on_grads is not None:
        on_grads()
    opt.step()
    opt.zero_grad(set_to_none=True)
    fixed_masks.reapply_masks(pairs)
    sched.step()
    return loss.detach()


def whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (a collective: every rank calls it), or the tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def loop_dataset():
    """The rows of every step's global batch, for hf_px's loop (its seeded sampler deals them out)."""
    import datasets

    rows = [global_batch(s) for s in range(STEPS)]
    ids = torch.cat([r["input_ids"] for r in rows])
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
                                       "label": torch.cat([r["labels"] for r in rows]).tolist()})


def loop_config(output_dir: str, batch_size: int, resume: bool = False):
    from hf_px.config import FinetuneConfig

    return FinetuneConfig(max_steps=STEPS, batch_size=batch_size, learning_rate=LR, weight_decay=WEIGHT_DECAY,
                          warmup_ratio=0.0, mixed_precision="no", output_dir=output_dir, save_every=CKPT_STEP,
                          log_every=1, progress_bar=False, seed=0, resume=resume)


def fsdp2_accelerator(config):
    """hf_px's Accelerator for ``config``, switched to Accelerate's FSDP2 on these CPU processes."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from hf_px.finetuning.accelerator import make_accelerator

    accelerator = make_accelerator(config)
    assert accelerator.distributed_type in (DistributedType.MULTI_CPU, DistributedType.FSDP)  # FSDP: forced before
    # On GPUs AcceleratorState sets these from the launch; on CPU it never does. Both singletons hold the type:
    # Accelerate copies PartialState's over AcceleratorState's whenever it builds one again.
    PartialState().distributed_type = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the config file's FSDP_* variables
    assert accelerator.is_fsdp2
    return accelerator


def run_loop(out: str) -> dict:
    """Part 2: hf_px's finetune under Accelerate's own FSDP2 preparation, then a resume from its checkpoint."""
    import shutil

    from hf_px.finetuning.loop import finetune

    model, masks = build(0)
    config = loop_config(f"{out}/loop", PER_RANK)
    accelerator = fsdp2_accelerator(config)
    first = finetune(model, loop_dataset(), None, config, masks=masks, accelerator=accelerator)
    assert type(next(first.model.parameters())).__name__ == "DTensor"  # Accelerate really sharded it
    assert first.sparsity["nonzero_after"] == first.sparsity["kept_before"] > 0, first.sparsity
    if accelerator.is_main_process:  # as if killed after the step-3 checkpoint
        shutil.copytree(f"{out}/loop/checkpoints/step_{CKPT_STEP}",
                        f"{out}/loop_resumed/checkpoints/step_{CKPT_STEP}")
    accelerator.wait_for_everyone()
    model2, _ = build(1)  # other initial weights: everything must come from the checkpoint
    # a new Accelerator, as a new run has: one that prepared two models trips over Accelerate's FSDP clip_grad_norm_
    config = loop_config(f"{out}/loop_resumed", PER_RANK, resume=True)
    second = finetune(model2, loop_dataset(), None, config, masks=masks, accelerator=fsdp2_accelerator(config))
    assert second.resumed_from and second.resumed_from.endswith(f"step_{CKPT_STEP}")
    want = second.model.state_dict()
    for name, value in first.model.state_dict().items():  # resumed bit for bit
        assert torch.equal(whole(value), whole(want[name])), name
    return {"distributed_type": first.extras["distributed_type"], "sparsity": first.sparsity}


def main() -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from hf_px.config import FinetuneConfig
    from hf_px.finetuning import outputs

    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == WORLD, world
    mesh = init_device_mesh("cpu", (world,))
    # the part of an Accelerator that hf_px's checkpoint and save code use
    acc = types.SimpleNamespace(is_main_process=rank == 0, process_index=rank, num_processes=world, step=0,
                                wait_for_everyone=dist.barrier, unwrap_model=lambda m: m, scaler=None)

    def sharded(seed: int):
        model, masks = build(seed)
        for layer in model.bert.encoder.layer:  # one FSDP unit per block, then the root (embeddings, head)
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt, sched = make_optimizer(model)
        pairs = fixed_masks.bind_masks(model, masks)
        fixed_masks.reapply_masks(pairs)
        return model, masks, opt, sched, pairs

    def pruned_nonzero(pairs, grads: bool = False) -> int:
        """Non-zero gradients or weights at pruned positions, over all ranks (each counts its own shard)."""
        count = torch.tensor(sum(int((((p.grad if grads else p).to_local() != 0) & ~m.to_local()).sum())
                                 for p, m in pairs))
        dist.all_reduce(count)
        return int(count)

    def global_loss(loss: torch.Tensor) -> float:
        loss = loss.clone()
        dist.all_reduce(loss)
        return float(loss) / world

    # part 1: fully_shard called here
    model, masks, opt, sched, pairs = sharded(0)
    kept_before = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())

    # the masks are bound to the live sharded parameters: DTensors placed like their weights, each rank's slice
    # of the mask the slice of the weight that rank holds
    assert len(pairs) == len(masks)
    named = {id(p): n for n, p in model.named_parameters()}
    for param, mask in pairs:
        name = named[id(param)]
        assert isinstance(param, DTensor) and isinstance(mask, DTensor), name
        assert mask.placements == param.placements and mask.device_mesh == param.device_mesh, name
        assert mask.to_local().shape == param.to_local().shape, name
        assert torch.equal(mask.full_tensor().cpu(), masks[name]), name
    uneven = [n for n, m in masks.items() if m.shape[0] % world]
    sharded_rows = sum(p.to_local().shape[0] for p, _ in pairs)
    assert sharded_rows < sum(m.shape[0] for m in masks.values())  # each rank really holds only a part

    losses, pruned_grads = [], []
    for s in range(STEPS):
        # first step: count non-zero gradients at pruned positions, before (the masks have work to do) and after
        # zeroing (none left)
        on_grads = (lambda: pruned_grads.append(pruned_nonzero(pairs, grads=True))) if s == 0 else None
        losses.append(global_loss(step(model, opt, sched, pairs, rank_batch(s, rank), on_grads)))
        if s + 1 == CKPT_STEP:
            state = {"global_step": CKPT_STEP, "epoch": 0, "batches_in_epoch": CKPT_STEP, "history": []}
            outputs.save_checkpoint(acc, f"{out}/checkpoints", CKPT_STEP, state, masks, None, model, opt, sched)
    assert pruned_grads[0] > 0 and pruned_grads[1] == 0, pruned_grads

    # every rank: every pruned weight exactly zero, kept weights all non-zero, sparsity counted on whole tensors
    info = fixed_masks.check_sparsity(model, masks, kept_before, total)
    assert info["pruned_all_zero"] and info["nonzero_after"] == kept_before > 0, info
    full = {n: whole(p).detach().clone() for n, p in model.state_dict().items()}
    for name, mask in masks.items():
        assert torch.all(full[name][~mask] == 0) and torch.all(full[name][mask] != 0), name

    # resume: a differently initialised model loads the step-3 checkpoint and finishes bit for bit the same
    model2, _, opt2, sched2, pairs2 = sharded(1)
    outputs.load_checkpoint_state(outputs.find_resume_point(f"{out}/checkpoints"), acc, model2, opt2, sched2)
    fixed_masks.reapply_masks(pairs2)
    resumed_losses = [global_loss(step(model2, opt2, sched2, pairs2, rank_batch(s, rank)))
                      for s in range(CKPT_STEP, STEPS)]
    for n, p in model2.state_dict().items():
        assert torch.equal(whole(p), full[n]), n

    # re-masking on its own: with zeroed gradients and fresh moments the weights above could not move anyway,
    # but moments carried over (a resume, new masks) would move them, so push every weight off zero and re-mask
    with torch.no_grad():
        for param, _ in pairs2:
            param.to_local().add_(1.0)
    assert pruned_nonzero(pairs2) > 0
    fixed_masks.reapply_masks(pairs2)
    assert pruned_nonzero(pairs2) == 0

    # the final save: whole tensors gathered from the shards, written by rank 0 with hf_px's save_pretrained
    config = FinetuneConfig(output_dir=out, max_steps=STEPS)
    output = types.SimpleNamespace(model=model, metrics={}, global_step=STEPS, sparsity=info, world_size=world,
                                   resumed_from=None, extras={})
    outputs.save_outputs(acc, output, config, masks, None)
    # the save swapped nothing: the masks are still bound to the parameters that the model and optimizer use
    live = {id(p) for p in model.parameters()} & {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(isinstance(p, DTensor) and id(p) in live for p, _ in pairs)

    loop = run_loop(out)
    if rank == 0:
        save_file({n: t.contiguous() for n, t in full.items()}, f"{out}/full.safetensors")
        with open(f"{out}/result.json", "w") as fh:
            json.dump({"world": world, "losses": losses, "resumed_losses": resumed_losses, "sparsity": info,
                       "pruned_grads": pruned_grads[0], "uneven": uneven, "loop": loop}, fh)
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # torch 2.13's gloo teardown sometimes aborts a finished rank (docs/offline.md §5)


if __name__ == "__main__":
    main()
