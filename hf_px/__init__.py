"""hf_px: prune Hugging Face checkpoints for a downstream task with PX saliency and PCN projections.

The package follows the pipeline: :mod:`hf_px.data` (datasets, labels, calibration batches),
:mod:`hf_px.pruning` (the PX loop, scorers, masks), :mod:`hf_px.pcn` (width reduction), :mod:`hf_px.finetuning`
(Accelerate loop with fixed masks, evaluation, distillation, LoRA), :mod:`hf_px.export` (save/load, sparse
format, model card, Hub) and :mod:`hf_px.pipeline` (``hf-px run``); :mod:`hf_px.registry` knows the architectures.

Every public name below is importable from ``hf_px`` directly. They load on first use, so ``import hf_px`` does
not import torch or transformers.

Example:
    >>> import hf_px
    >>> hf_px.PruneConfig(method="px", sparsity=0.9).rounds
    100
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "DistillConfig",
    "FinetuneConfig",
    "FinetuneOutput",
    "GradualConfig",
    "GraspOptions",
    "HfPxError",
    "KernelReport",
    "NTKDiagOptions",
    "PCNConfig",
    "PCNReport",
    "PXOptions",
    "PruneConfig",
    "PruneResult",
    "RunConfig",
    "SpeedConfig",
    "SynflowOptions",
    "WandaOptions",
    "apply_lora",
    "apply_masks",
    "apply_pcn",
    "available_methods",
    "build_card",
    "calibration_batches",
    "choose_kernels",
    "collapsed_blocks",
    "densify",
    "evaluate",
    "finetune",
    "load",
    "load_dataset_any",
    "load_metric",
    "load_model",
    "masks_from_model",
    "measure_latency",
    "merge_lora",
    "plan_speed",
    "prune",
    "push_to_hub",
    "rank_blocks",
    "rank_heads",
    "register_architecture",
    "register_scorer",
    "remove_blocks",
    "remove_heads",
    "run",
    "save_pretrained",
    "sparsify_for_cpu",
    "sparsity_report",
    "supported_architectures",
]

# public name -> the module that defines it (imported on first access)
_SOURCES = {
    "PruneConfig": "config",
    "FinetuneConfig": "config",
    "load_model": "modeling",
    "HfPxError": "errors",
    "register_architecture": "registry",
    "supported_architectures": "registry",
    "calibration_batches": "data",
    "load_dataset_any": "data",
    "prune": "pruning.loop",
    "PruneResult": "pruning.loop",
    "apply_masks": "pruning.masks",
    "masks_from_model": "pruning.masks",
    "sparsity_report": "pruning.report",
    "available_methods": "pruning.scoring",
    "register_scorer": "pruning.scoring",
    "PXOptions": "pruning.scoring",
    "NTKDiagOptions": "pruning.scoring",
    "WandaOptions": "pruning.scoring",
    "GraspOptions": "pruning.scoring",
    "SynflowOptions": "pruning.scoring",
    "PCNConfig": "pcn",
    "PCNReport": "pcn",
    "apply_pcn": "pcn",
    "finetune": "finetuning.loop",
    "FinetuneOutput": "finetuning.loop",
    "evaluate": "finetuning.evaluation",
    "DistillConfig": "finetuning.distill",
    "SpeedConfig": "speed",
    "measure_latency": "speed",
    "plan_speed": "speed",
    "choose_kernels": "inference",
    "KernelReport": "inference",
    "densify": "inference",
    "collapsed_blocks": "structure",
    "rank_blocks": "structure",
    "rank_heads": "structure",
    "remove_blocks": "structure",
    "remove_heads": "structure",
    "GradualConfig": "finetuning.gradual",
    "apply_lora": "finetuning.lora",
    "merge_lora": "finetuning.lora",
    "load_metric": "finetuning.metrics",
    "load": "export.serialization",
    "save_pretrained": "export.serialization",
    "build_card": "export.card",
    "push_to_hub": "export.hub",
    "sparsify_for_cpu": "export.sparse_inference",
    "run": "pipeline",
    "RunConfig": "pipeline",
}

if TYPE_CHECKING:  # what IDEs and type checkers see; at run time __getattr__ imports on demand
    from .config import FinetuneConfig, PruneConfig
    from .data import calibration_batches, load_dataset_any
    from .errors import HfPxError
    from .export.card import build_card
    from .export.hub import push_to_hub
    from .export.serialization import load, save_pretrained
    from .export.sparse_inference import sparsify_for_cpu
    from .finetuning.distill import DistillConfig
    from .finetuning.evaluation import evaluate
    from .finetuning.gradual import GradualConfig
    from .finetuning.loop import FinetuneOutput, finetune
    from .finetuning.lora import apply_lora, merge_lora
    from .finetuning.metrics import load_metric
    from .inference import KernelReport, choose_kernels, densify
    from .modeling import load_model
    from .pcn import PCNConfig, PCNReport, apply_pcn
    from .pipeline import RunConfig, run
    from .pruning.loop import PruneResult, prune
    from .pruning.masks import apply_masks, masks_from_model
    from .pruning.report import sparsity_report
    from .pruning.scoring import (
        GraspOptions,
        NTKDiagOptions,
        PXOptions,
        SynflowOptions,
        WandaOptions,
        available_methods,
        register_scorer,
    )
    from .registry import register_architecture, supported_architectures
    from .speed import SpeedConfig, measure_latency, plan_speed
    from .structure import collapsed_blocks, rank_blocks, rank_heads, remove_blocks, remove_heads


def __getattr__(name: str) -> Any:
    source = _SOURCES.get(name)
    if source is not None:
        value = getattr(importlib.import_module(f"{__name__}.{source}"), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    # a submodule used as ``hf_px.<module>`` without importing it first (``hf_px.registry.get_arch``)
    if not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
