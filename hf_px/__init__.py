"""hf_px: prune Hugging Face checkpoints for a downstream task with PX saliency and PCN projections.

Example:
    >>> import hf_px
    >>> hf_px.PruneConfig(method="px", sparsity=0.9).rounds
    100
"""

from .config import PruneConfig
from .masks import apply_masks, masks_from_model
from .prune import PruneResult, prune
from .registry import register_architecture, supported_architectures
from .report import sparsity_report
from .scoring import available_methods, register_scorer

__version__ = "0.1.0"

__all__ = [
    "PruneConfig",
    "PruneResult",
    "apply_masks",
    "available_methods",
    "masks_from_model",
    "prune",
    "register_architecture",
    "register_scorer",
    "sparsity_report",
    "supported_architectures",
]


def __getattr__(name: str):
    # Optional parts are imported on first use so that `import hf_px` stays light.
    lazy = {
        "calibration_batches": ("data", "calibration_batches"),
        "load_dataset_any": ("data", "load_dataset_any"),
        "load": ("serialization", "load"),
        "finetune": ("train", "finetune"),
        "FinetuneConfig": ("config", "FinetuneConfig"),
        "DistillConfig": ("distill", "DistillConfig"),
        "PCNConfig": ("pcn", "PCNConfig"),
        "apply_pcn": ("pcn", "apply_pcn"),
        "PCNReport": ("pcn", "PCNReport"),
        "load_model": ("modeling", "load_model"),
        "save_pretrained": ("serialization", "save_pretrained"),
        "push_to_hub": ("hub", "push_to_hub"),
        "build_card": ("card", "build_card"),
        "sparsify_for_cpu": ("sparse_inference", "sparsify_for_cpu"),
        "FinetuneOutput": ("train", "FinetuneOutput"),
        "load_metric": ("metrics", "load_metric"),
        "apply_lora": ("lora", "apply_lora"),
        "merge_lora": ("lora", "merge_lora"),
        "run": ("pipeline", "run"),
        "RunConfig": ("pipeline", "RunConfig"),
        "evaluate": ("evaluation", "evaluate"),
    }
    if name in lazy:
        import importlib

        module, attr = lazy[name]
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
