"""Fine-tuning a pruned model with Accelerate while its masks stay fixed.

One training loop runs unchanged on one CPU, several CPU processes (gloo), one GPU, several GPUs (DDP) or FSDP2:
every device decision is Accelerate's. After each optimizer step the masks are re-applied on every process and
the gradients of pruned weights are zeroed before the step, so pruned weights stay exactly zero (AdamW's
decoupled weight decay and its moment estimates included) and the final sparsity equals the pruned one.

Example:
    >>> import datasets, torch
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> from hf_px.finetuning.loop import FinetuneConfig, finetune
    >>> model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2,
    ...     num_attention_heads=2, intermediate_size=64, vocab_size=100))
    >>> ds = datasets.Dataset.from_dict({"input_ids": [[1, 5, 7, 2]] * 16, "attention_mask": [[1] * 4] * 16,
    ...                                  "label": [0, 1] * 8})
    >>> out = finetune(model, ds, ds, FinetuneConfig(max_steps=2, batch_size=8, progress_bar=False))
    >>> sorted(out.metrics)
    ['eval_accuracy', 'eval_loss']
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import FinetuneConfig
from ..errors import ConfigError
from ..modeling import Task, task_of
from . import evaluation, fixed_masks, optim, outputs
from .accelerator import make_accelerator, refuse_deepspeed
from .data import LengthGroupedSampler, make_collate, prepare_datasets, sequence_lengths


@dataclass
class FinetuneOutput:
    """What :func:`finetune` returns.

    ``model`` is the fine-tuned model (unwrapped; merged if LoRA with ``merge_lora``), ``metrics`` the final
    evaluation (empty without an evaluation set), ``history`` the logged records (training loss, learning rate,
    evaluations), ``sparsity`` the kept/total counts of the masked weights before and after training, ``masks``
    the masks held at the end (tightened by gradual pruning; None with unmerged LoRA adapters).
    """

    model: nn.Module
    metrics: dict[str, float]
    history: list[dict[str, Any]]
    global_step: int
    sparsity: dict[str, Any]
    world_size: int = 1
    masks: dict[str, torch.Tensor] | None = None
    resumed_from: str | None = None
    output_dir: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)


def _unpack(model_or_result: Any, tokenizer: Any) -> tuple[nn.Module, Any, Any]:
    if isinstance(model_or_result, nn.Module):
        return model_or_result, None, tokenizer
    if hasattr(model_or_result, "model") and isinstance(model_or_result.model, nn.Module):
        return (model_or_result.model, getattr(model_or_result, "masks", None),
                tokenizer if tokenizer is not None else getattr(model_or_result, "tokenizer", None))
    raise TypeError(f"finetune expects a model (nn.Module) or a PruneResult, got {type(model_or_result).__name__}.")


def finetune(
    model_or_result: Any,
    train_dataset: Any,
    eval_dataset: Any = None,
    config: FinetuneConfig | None = None,
    tokenizer: Any = None,
    masks: dict[str, torch.Tensor] | None = None,
    accelerator: Any = None,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
    calibration: list[dict[str, torch.Tensor]] | None = None,
) -> FinetuneOutput:
    """Fine-tune a pruned model with its masks held fixed.

    Args:
        model_or_result: a ``PruneResult`` (``.model``, ``.masks``, ``.tokenizer``) or a model.
        train_dataset, eval_dataset: ``datasets.Dataset`` with raw text and label columns (tokenized with
            ``tokenizer``) or already tokenized (``input_ids``, ``attention_mask``, ``labels``/``label``).
        config: a :class:`FinetuneConfig` (default settings when None).
        tokenizer: needed for raw datasets; its pad id is used for padding.
        masks: parameter name -> bool mask; default: the result's masks, else the model's zeros.
        accelerator: an ``accelerate.Accelerator`` to use; default: one built from ``config``.
        on_step: called after every optimizer step as ``on_step(step, record)`` on every process (custom
            logging, early stop by raising).
        calibration: batches that ``config.gradual`` scores at every pruning step (e.g. the ones
            ``hf_px.prune`` used); default: ``config.gradual.calibration_batches`` seeded training batches.

    Returns:
        A :class:`FinetuneOutput`.

    Example:
        >>> out = finetune(result, ds["train"], ds["test"], FinetuneConfig(epochs=1))  # doctest: +SKIP
        >>> out.metrics["eval_accuracy"]                                                # doctest: +SKIP
    """
    config = config if config is not None else FinetuneConfig()
    if not isinstance(config, FinetuneConfig):
        raise TypeError(f"config must be a FinetuneConfig, got {type(config).__name__}.")
    from accelerate.utils import set_seed

    model, result_masks, tokenizer = _unpack(model_or_result, tokenizer)
    masks = fixed_masks.resolve_masks(model, result_masks, masks)
    if config.gradual is not None and config.peft:
        raise ConfigError("gradual pruning cannot run with peft='lora' (the adapters' delta is masked by fixed "
                          "masks); prune one-shot before LoRA fine-tuning, or fine-tune all weights.")
    if config.gradual is not None:
        masks = {n: m.clone() for n, m in masks.items()}  # tightened in place: leave the caller's masks alone
    task = task_of(model)
    metric_names = config.metrics or (("perplexity",) if task is Task.CAUSAL_LM else ("accuracy",))
    own_accelerator = accelerator is None
    if own_accelerator:
        accelerator = make_accelerator(config)
    else:
        refuse_deepspeed(accelerator)
        accelerator.gradient_accumulation_steps = config.gradient_accumulation_steps
    set_seed(config.seed)
    kept_before = sum(int(m.sum()) for m in masks.values())
    total_masked = sum(m.numel() for m in masks.values())

    # masks keyed by the names of the model that is trained (peft renames wrapped weights)
    id_to_mask = {id(p): masks[n] for n, p in model.named_parameters() if n in masks}
    if config.peft == "lora":
        from .lora import apply_lora

        model = apply_lora(model, masks, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout)
    train_masks = {n: id_to_mask[id(p)] for n, p in model.named_parameters() if id(p) in id_to_mask}
    from .distill import build_distiller

    distiller = build_distiller(config.distill, model, accelerator)  # None without distillation

    with accelerator.main_process_first():
        train_ds, eval_ds = prepare_datasets(train_dataset, eval_dataset, tokenizer, config, task, model)
    lengths = sequence_lengths(train_ds) if config.group_by_length else None
    if distiller is not None:
        train_ds = distiller.wrap_dataset(train_ds)  # example ids key the teacher-logit cache
    collate = make_collate(tokenizer, model, task)
    if lengths is not None:
        sampler = LengthGroupedSampler(lengths, config.batch_size, seed=config.seed)
        train_dl = torch.utils.data.DataLoader(train_ds, batch_size=config.batch_size, sampler=sampler,
                                               collate_fn=collate)
    else:
        # a private generator: creating a data iterator must not draw from the global RNG that dropout uses,
        # or a resumed run (which creates its iterator mid-epoch) would see different dropout masks
        train_dl = torch.utils.data.DataLoader(train_ds, batch_size=config.batch_size, shuffle=True,
                                               collate_fn=collate, generator=torch.Generator().manual_seed(config.seed))
    eval_dl = None
    if eval_ds is not None:
        eval_dl = torch.utils.data.DataLoader(eval_ds, batch_size=config.eval_batch_size or config.batch_size,
                                              shuffle=False, collate_fn=collate)
    frozen = optim.freeze_embeddings(model) if config.freeze_embeddings else []
    optimizer = torch.optim.AdamW(optim.param_groups(model, config.weight_decay, exclude=frozen),
                                  lr=config.learning_rate)
    if eval_dl is not None:
        model, optimizer, train_dl, eval_dl = accelerator.prepare(model, optimizer, train_dl, eval_dl)
    else:
        model, optimizer, train_dl = accelerator.prepare(model, optimizer, train_dl)
    if len(train_dl) == 0:
        raise ValueError("the training set is empty after sharding over processes; give it more examples.")

    steps_per_epoch = math.ceil(len(train_dl) / config.gradient_accumulation_steps)
    total_steps = config.max_steps or config.epochs * steps_per_epoch
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    # not prepared: Accelerate's scheduler wrapper would step once per process
    scheduler = optim.linear_schedule(optimizer, int(config.warmup_ratio * total_steps), total_steps)
    pruner = None
    if config.gradual is not None:
        pruner = _gradual_pruner(config, accelerator, model, masks, calibration, train_ds, collate, total_steps)
        train_masks = dict(masks)  # the pruner adds masks for prunable weights that had none
        kept_before = sum(int(m.sum()) for m in masks.values())
        total_masked = sum(m.numel() for m in masks.values())
    pairs = fixed_masks.bind_masks(model, train_masks)
    fixed_masks.reapply_masks(pairs)

    out_dir = config.output_dir
    ckpt_root = os.path.join(out_dir, "checkpoints") if out_dir else None
    logger = outputs.JsonlLogger(os.path.join(out_dir, "logs", "metrics.jsonl")
                           if out_dir and accelerator.is_main_process and "jsonl" in config.log_with else None)
    if own_accelerator and accelerator.log_with:
        accelerator.init_trackers("hf_px_finetune", config={k: str(v) for k, v in config.to_dict().items()})
    metrics = evaluation.load_metrics(metric_names, accelerator) if eval_dl is not None else {}
    num_labels = int(getattr(getattr(accelerator.unwrap_model(model), "config", None), "num_labels", 0) or 0)

    global_step, start_epoch, skip, history, resumed_from = 0, 0, 0, [], None
    if config.resume:
        resumed_from = outputs.find_resume_point(ckpt_root, warn=accelerator.is_main_process)
        if resumed_from is None:
            warnings.warn(f"resume=True but {ckpt_root} holds no complete, intact checkpoint; starting from step 0.",
                          stacklevel=2)
        else:
            state, saved_masks = outputs.load_checkpoint_meta(resumed_from)
            if pruner is not None and set(saved_masks) == set(masks) and all(
                    not bool((saved_masks[n] & ~masks[n]).any()) for n in masks):
                for n in masks:  # gradual pruning has gone further since the start: continue from the saved masks
                    masks[n].copy_(saved_masks[n])
                pairs = fixed_masks.bind_masks(model, train_masks)
            elif set(saved_masks) != set(masks) or any(not torch.equal(saved_masks[n], masks[n]) for n in masks):
                raise ConfigError(f"the masks of {resumed_from} differ from this model's masks: resume with the same "
                                  "pruned model, or start a fresh run (set finetune.resume: false or choose another "
                                  "finetune.output_dir).")
            outputs.load_checkpoint_state(resumed_from, accelerator, model, optimizer, scheduler)
            fixed_masks.reapply_masks(pairs)
            global_step, start_epoch, skip = state["global_step"], state["epoch"], state["batches_in_epoch"]
            if state.get("total_steps", total_steps) != total_steps:
                warnings.warn(f"{resumed_from} was written by a run of {state['total_steps']} steps, this one has "
                              f"{total_steps}: the learning-rate schedule changes from here on.", stacklevel=2)
            history = state.get("history", [])
            if skip >= len(train_dl):
                start_epoch, skip = start_epoch + 1, 0
            logger.log({"event": "resume", "checkpoint": resumed_from, "step": global_step})

    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=global_step, desc="fine-tune",
               disable=not (config.progress_bar and accelerator.is_local_main_process))
    t0, samples, loss_sum, loss_n = time.perf_counter(), 0, torch.zeros((), device=accelerator.device), 0

    def log_record(record: dict[str, Any]) -> None:
        history.append(record)
        logger.log(record)
        if accelerator.log_with:
            accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])

    last_eval = [-1]

    def run_eval() -> dict[str, float]:
        res = evaluation.evaluate_model(accelerator, model, eval_dl, task, metrics, num_labels)
        log_record({"step": global_step, "event": "eval", **res})
        last_eval[0] = global_step
        return res

    def prune_if_due() -> None:
        nonlocal pairs
        if pruner is None or not pruner.due(global_step) or any(r["step"] == global_step for r in pruner.records):
            return
        log_record(pruner.prune_step(global_step))
        pairs = fixed_masks.bind_masks(model, train_masks)  # off-CPU masks are copies: bind the new ones
        fixed_masks.reapply_masks(pairs)

    if pruner is not None and not resumed_from:
        prune_if_due()  # a schedule starting at step 0 prunes before the first update
    model.train()
    final_metrics: dict[str, float] = {}
    for epoch in range(start_epoch, num_epochs):
        if global_step >= total_steps:
            break
        train_dl.set_epoch(epoch)  # seeds this epoch's shuffle, shared by every process and by a resume
        loader = accelerator.skip_first_batches(train_dl, skip) if skip else train_dl
        batch_in_epoch = skip
        skip = 0
        for batch in loader:
            with accelerator.accumulate(model):
                loss = distiller.loss(model, batch) if distiller is not None else model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    fixed_masks.zero_masked_grads(pairs)
                    if config.max_grad_norm:
                        accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            batch_in_epoch += 1
            loss_sum += loss.detach().float()
            loss_n += 1
            samples += batch["labels"].shape[0] if "labels" in batch else config.batch_size
            if not accelerator.sync_gradients:
                continue
            fixed_masks.reapply_masks(pairs)  # every process, after every step: pruned weights are exactly zero
            scheduler.step()
            global_step += 1
            bar.update(1)
            prune_if_due()
            record = {"step": global_step, "epoch": epoch, "lr": scheduler.get_last_lr()[0]}
            if global_step % config.log_every == 0 or global_step == total_steps:
                mean_loss = accelerator.reduce(loss_sum / max(loss_n, 1), reduction="mean")
                record["loss"] = float(mean_loss)
                if distiller is not None:
                    record.update(distiller.logged_means(accelerator))  # loss_ce, loss_kd, loss_hidden
                log_record(dict(record))
                bar.set_postfix(loss=f"{record['loss']:.4f}")
                loss_sum.zero_()
                loss_n = 0
            if eval_dl is not None and config.eval_every and global_step % config.eval_every == 0:
                final_metrics = run_eval()
            if ckpt_root and config.save_every and global_step % config.save_every == 0:
                state = {"global_step": global_step, "epoch": epoch, "batches_in_epoch": batch_in_epoch,
                         "history": history, "total_steps": total_steps}
                outputs.save_checkpoint(accelerator, ckpt_root, global_step, state, masks, config.save_total_limit,
                                              model, optimizer, scheduler)
            if on_step is not None:
                on_step(global_step, record)
            if global_step >= total_steps:
                break
    bar.close()
    train_time = time.perf_counter() - t0
    if eval_dl is not None and last_eval[0] != global_step:
        final_metrics = run_eval()

    model = accelerator.unwrap_model(model)
    if config.peft == "lora" and config.merge_lora:
        from .lora import merge_lora

        model = merge_lora(model)
    # unmerged adapters keep peft's parameter names: the plain-model check does not apply
    final_model_masks = {} if config.peft and not config.merge_lora else masks
    sparsity = fixed_masks.check_sparsity(model, final_model_masks, kept_before, total_masked)
    output = FinetuneOutput(
        model=model, metrics=final_metrics, history=history, global_step=global_step, sparsity=sparsity,
        masks=masks if final_model_masks else None,
        world_size=accelerator.num_processes, resumed_from=resumed_from, output_dir=out_dir,
        extras={"train_time_s": train_time, "train_samples_per_s_per_process": samples / max(train_time, 1e-9),
                "total_steps": total_steps, "steps_per_epoch": steps_per_epoch, "task": task,
                "distributed_type": str(accelerator.distributed_type), "mixed_precision": accelerator.mixed_precision},
    )
    if pruner is not None:
        output.extras["gradual"] = [r for r in history if r.get("event") == "prune"]
    if out_dir:
        outputs.save_outputs(accelerator, output, config, masks if final_model_masks else None, tokenizer)
    if own_accelerator and accelerator.log_with:
        accelerator.end_training()
    return output


def _gradual_pruner(config: FinetuneConfig, accelerator: Any, model: nn.Module, masks: dict[str, torch.Tensor],
                    calibration: list | None, train_ds: Any, collate: Any, total_steps: int) -> Any:
    from accelerate.utils import DistributedType

    from .gradual import GradualPruner, calibration_from

    if accelerator.distributed_type == DistributedType.FSDP:
        raise ConfigError("gradual pruning does not run under FSDP yet (scores need whole parameters); prune "
                          "one-shot with hf_px.prune before an FSDP fine-tune, or use DDP.")
    gradual = config.gradual
    if calibration is None:
        calibration = calibration_from(train_ds, collate, gradual.calibration_batches, config.batch_size, config.seed)
    batches = [{k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in b.items()} for b in calibration]
    return GradualPruner(gradual, accelerator.unwrap_model(model), masks, batches, total_steps)
