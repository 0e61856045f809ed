"""Loading checkpoints with the ``transformers`` Auto classes, from a Hub id, a local folder or a ``builtin:`` name,
and the one :class:`Task` enum every part of hf_px (command line, run config, loader, training, model card) speaks.

torch and transformers are imported where they are used, not at import time: the run config and the command
line's help import :class:`Task`, and should not pay seconds of torch start-up for an enum.
"""

from __future__ import annotations

import enum
import os
from pathlib import Path
from typing import Any

from .builtin import resolve_model
from .errors import ConfigError, InputNotFoundError
from .export.checkpoint_files import CheckpointFileError, check_checkpoint_files


class Task(str, enum.Enum):
    """What a checkpoint is loaded for: its head, the data it needs and its Hub pipeline tag."""

    SEQUENCE_CLASSIFICATION = "sequence-classification"
    IMAGE_CLASSIFICATION = "image-classification"
    CAUSAL_LM = "causal-lm"
    FEATURES = "features"  # the bare trunk: no head, nothing to train or evaluate

    def __str__(self) -> str:
        return self.value

    @property
    def auto_class(self) -> type:
        from transformers import (
            AutoModel,
            AutoModelForCausalLM,
            AutoModelForImageClassification,
            AutoModelForSequenceClassification,
        )

        return {Task.SEQUENCE_CLASSIFICATION: AutoModelForSequenceClassification,
                Task.IMAGE_CLASSIFICATION: AutoModelForImageClassification,
                Task.CAUSAL_LM: AutoModelForCausalLM, Task.FEATURES: AutoModel}[self]

    @property
    def pipeline_tag(self) -> str:
        return {Task.SEQUENCE_CLASSIFICATION: "text-classification", Task.IMAGE_CLASSIFICATION: "image-classification",
                Task.CAUSAL_LM: "text-generation", Task.FEATURES: "feature-extraction"}[self]


CLASSIFICATION_TASKS = (Task.SEQUENCE_CLASSIFICATION, Task.IMAGE_CLASSIFICATION)  # the tasks with a num_labels head
# class-name endings of the heads hf_px trains; transformers names every head class this way
_HEADS = ((("ForCausalLM", "LMHeadModel"), Task.CAUSAL_LM), (("ForImageClassification",), Task.IMAGE_CLASSIFICATION),
          (("ForSequenceClassification",), Task.SEQUENCE_CLASSIFICATION))


def task_of(model_or_config: Any) -> Task:
    """The task of a model (its class) or of a transformers config (``architectures``); FEATURES when neither
    names a head hf_px trains.

    Example:
        >>> from transformers import GPT2Config
        >>> task_of(GPT2Config(architectures=["GPT2LMHeadModel"]))
        <Task.CAUSAL_LM: 'causal-lm'>
    """
    import torch

    if isinstance(model_or_config, torch.nn.Module):  # a model, or a peft wrapper around one
        names = [type(getattr(model_or_config, "get_base_model", lambda: model_or_config)()).__name__]
    else:
        names = list(getattr(model_or_config, "architectures", None) or [])
    return next((task for suffixes, task in _HEADS if any(n.endswith(suffixes) for n in names)), Task.FEATURES)


def resolve_task(task: str | Task, config: Any) -> Task:
    """``task``, or for ``auto`` the checkpoint's own task; a checkpoint without one of hf_px's heads gets its
    registry family's task (ViT: image classification), else a sequence-classification head."""
    if task != "auto":
        if task not in {t.value for t in Task}:
            raise ConfigError(f"unknown task {task!r}; model.task is one of auto, {', '.join(Task)}.")
        return Task(task)
    found = task_of(config)
    if found is not Task.FEATURES:
        return found
    from .registry import default_task

    return Task(default_task(config) or Task.SEQUENCE_CLASSIFICATION)


def _looks_local(name: str) -> bool:
    # a Hub id is "name" or "org/name"; anything else that does not exist locally is a missing path
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or name.endswith("/")


def check_model_source(name_or_path: str, allow_pickle: bool = False, key: str = "model.name_or_path") -> None:
    """Fail early, before any download or load, when a local checkpoint folder is missing or unusable.

    ``builtin:`` names are checked as the folder they stand for.

    Raises :class:`~hf_px.errors.InputNotFoundError` or
    :class:`~hf_px.export.checkpoint_files.CheckpointFileError` (pickle-only or stray weights, a truncated
    safetensors file, an invalid index, a shard outside the folder), one line naming ``key`` or the file and the fix.
    """
    name_or_path = resolve_model(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointFileError(f"{key} {name_or_path!r} is a file; set it to the checkpoint folder that holds "
                                      "config.json.")
        if not (path / "config.json").exists() and not any(path.glob("*.gguf")):
            raise InputNotFoundError(
                f"{path} has no config.json: not a Hugging Face checkpoint folder (save one with save_pretrained)."
            )
        safe = sorted(p.name for p in path.glob("*.safetensors"))
        pickles = any(path.glob("*.bin"))
        if not safe and pickles and not allow_pickle:
            raise CheckpointFileError(
                f"{path} only holds pickle weights (*.bin), which can run arbitrary code when loaded. Convert them to "
                "safetensors, or set model.allow_pickle: true if you trust the source."
            )
        standard = ("model.safetensors", "model.safetensors.index.json", "model.sparse.safetensors")
        if safe and not any((path / name).exists() for name in standard) and not (pickles and allow_pickle):
            raise CheckpointFileError(f"{path} has no model.safetensors (nor a sharded index); {', '.join(safe[:3])} "
                                      "hold no model weights. Save the model there with save_pretrained.")
        # headers only: a truncated shard or an index naming files outside the folder is refused before loading
        check_checkpoint_files(path)
        return
    if _looks_local(name_or_path):
        raise InputNotFoundError(f"{key} {name_or_path!r} does not exist; pass a checkpoint folder or a Hub id.")


def register_pcn_types(folder: str | os.PathLike) -> None:
    """A saved PCN projection model (``model_type: pcn_*``) needs hf_px's classes registered with the Auto ones."""
    try:
        import json

        model_type = str(json.loads((Path(folder).expanduser() / "config.json").read_text()).get("model_type", ""))
    except (OSError, ValueError, AttributeError):
        return  # a Hub id, or a config the loader reports itself
    if model_type.startswith("pcn_"):
        import hf_px.pcn  # noqa: F401 - registers the pcn_* classes with the Auto factories


def load_model(
    name_or_path: str,
    task: str | Task = "auto",
    num_labels: int | None = None,
    *,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    gguf_file: str | None = None,
    **kwargs: Any,
):
    """Load a model for ``task`` (``auto``: :func:`resolve_task`) with the Auto classes, eager attention, float32;
    hf_px's sparse format too. A trained head of another size than ``num_labels`` is re-initialised.

    ``name_or_path`` is a Hub id, a local folder or a ``builtin:`` name (``builtin:minilm``: the packaged
    all-MiniLM-L6-v2).

    Example:
        >>> load_model("builtin:minilm", "sequence-classification", num_labels=2).config.num_labels
        2
    """
    from transformers import AutoConfig

    name_or_path = resolve_model(name_or_path)
    check_model_source(name_or_path, allow_pickle=allow_pickle)
    register_pcn_types(name_or_path)
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, gguf_file=gguf_file)
    task = resolve_task(task, config)
    if num_labels is not None and task in CLASSIFICATION_TASKS:
        kwargs["num_labels"] = num_labels
        if config.num_labels != num_labels and task_of(config) in CLASSIFICATION_TASKS:
            kwargs["ignore_mismatched_sizes"] = True
    if (Path(name_or_path).expanduser() / "model.sparse.safetensors").exists():
        from .export.serialization import load

        model = load(name_or_path, task_class=task.auto_class, trust_remote_code=trust_remote_code, **kwargs)
    else:
        if not allow_pickle:
            kwargs.setdefault("use_safetensors", None if gguf_file else True)
        try:
            model = task.auto_class.from_pretrained(name_or_path, trust_remote_code=trust_remote_code,
                                                    gguf_file=gguf_file, **kwargs)
        except OSError as err:
            raise InputNotFoundError(
                f"could not load {name_or_path!r} ({str(err).splitlines()[0][:200]}); if it is a Hub id, the Hub may "
                "be unreachable: set model.name_or_path to a local folder (one written by save_pretrained)."
            ) from err
    if task is Task.SEQUENCE_CLASSIFICATION and getattr(model.config, "pad_token_id", None) is None:  # ResNet has none
        model.config.pad_token_id = getattr(model.config, "eos_token_id", None)
    return model.eval()


def load_processor(name_or_path: str, task: str | Task = Task.SEQUENCE_CLASSIFICATION, gguf_file: str | None = None,
                   **kwargs: Any):
    """The tokenizer (text) or image processor (vision) saved with a checkpoint (a folder, a Hub id or a
    ``builtin:`` name)."""
    from transformers import AutoImageProcessor, AutoTokenizer

    name_or_path = resolve_model(name_or_path)
    try:
        if task == Task.IMAGE_CLASSIFICATION:
            return AutoImageProcessor.from_pretrained(name_or_path, **kwargs)
        return AutoTokenizer.from_pretrained(name_or_path, gguf_file=gguf_file, **kwargs)
    except (OSError, ValueError) as err:
        raise InputNotFoundError(
            f"no {'image processor' if task == Task.IMAGE_CLASSIFICATION else 'tokenizer'} found for {name_or_path!r}: "
            f"{err}. Save one next to the model (tokenizer.save_pretrained(folder)) or set model.tokenizer."
        ) from err
