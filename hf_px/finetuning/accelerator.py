"""The Accelerate ``Accelerator`` that fine-tuning and evaluation run under: device, mixed precision, logging."""

from __future__ import annotations

import os
import warnings

import torch

from ..config import FinetuneConfig
from ..errors import ConfigError


def _mixed_precision(requested: str | None) -> str | None:
    cuda = torch.cuda.is_available()
    if requested is None:
        if os.environ.get("ACCELERATE_MIXED_PRECISION"):
            return None  # set by `accelerate launch` / its config file
        if cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "no"
    if requested == "fp16" and not cuda:
        raise ConfigError("finetune.mixed_precision fp16 needs a CUDA GPU; set it to bf16 or no on a CPU.")
    return requested


def has_device() -> bool:
    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or bool(mps and mps.is_available()) or bool(xpu and xpu.is_available())


DEEPSPEED_REFUSED = (
    "DeepSpeed is not supported: ZeRO partitions and flattens the parameters, so hf_px could not hold its masks on "
    "the live weights and pruned weights would regrow. Shard with FSDP2 instead, which hf_px keeps the masks under: "
    "accelerate launch --config_file scripts/configs/accelerate_fsdp2.yaml ... (fsdp_version: 2), or use DDP."
)


def refuse_deepspeed(accelerator=None) -> None:
    """Stop a DeepSpeed launch (or a DeepSpeed ``Accelerator``) before any training, pointing to FSDP2."""
    asked = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if accelerator is not None:
        asked = asked or getattr(accelerator.distributed_type, "value", "") == "DEEPSPEED"
    if asked:
        raise ConfigError(DEEPSPEED_REFUSED)


def make_accelerator(config: FinetuneConfig):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, is_tensorboard_available

    refuse_deepspeed()  # before Accelerator(): without deepspeed installed it would fail with an unrelated error

    log_with = []
    if "tensorboard" in config.log_with and config.output_dir:
        if is_tensorboard_available():
            log_with.append("tensorboard")
        else:
            warnings.warn("log_with includes 'tensorboard' but tensorboard is not installed "
                          "(pip install tensorboard); logging to JSON lines only.", stacklevel=3)
    accelerator = Accelerator(
        cpu=not has_device(),  # CPU processes need this to form a gloo group (docs/offline.md §5)
        mixed_precision=_mixed_precision(config.mixed_precision),
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
        log_with=log_with or None,
        project_dir=config.output_dir,
    )
    _warn_if_fsdp_fell_back(accelerator)
    return accelerator


def _warn_if_fsdp_fell_back(accelerator) -> None:
    """Accelerate (1.15) runs an FSDP launch on CPU processes as DDP and says nothing: say it."""
    from accelerate.utils import DistributedType

    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if asked and accelerator.distributed_type != DistributedType.FSDP and accelerator.is_main_process:
        warnings.warn(f"the launch asked for FSDP, but Accelerate runs these processes as "
                      f"{accelerator.distributed_type.value} (it shards only on GPUs and other accelerators): every "
                      "process holds the whole model and the run is plain data parallel.", stacklevel=3)
