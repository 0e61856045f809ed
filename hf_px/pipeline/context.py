"""What every pipeline stage sees: the run's config, its checked plan and its folders (:class:`Context`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checks import Plan
from .config import RunConfig
from .stages import Stage


@dataclass
class Context:
    cfg: RunConfig
    plan: Plan
    root: Path
    folders: dict[str, str]  # stage name -> its folder's name under root
    stages: dict[str, Stage] = field(default_factory=dict)  # completed or enabled stages by name
    progress: bool = True
    is_main: bool = True
    _processor: Any = None

    def stage_path(self, name: str) -> Path:
        return self.root / self.folders[name]

    def work_dir(self, name: str) -> Path:
        """Where a resumable stage keeps its checkpoints until it is complete."""
        return self.root / f"{self.folders[name]}.work"

    def training_dir(self, name: str) -> Path:
        """Where a training stage's loop writes checkpoints, logs, results and its model: the user's
        ``finetune.output_dir`` (kept, resumed only with ``finetune.resume``) or the stage's work folder."""
        given = self.cfg.finetune.output_dir if name == "finetune" else None
        return Path(given).expanduser().absolute() if given else self.work_dir(name)

    def has(self, name: str) -> bool:
        return name in self.stages

    def processor(self):
        if self._processor is None:
            from ..modeling import load_processor

            self._processor = load_processor(self.plan.tokenizer_path, self.plan.task,
                                             gguf_file=self.cfg.model.gguf_file)
            if getattr(self._processor, "pad_token", "x") is None:
                self._processor.pad_token = self._processor.eos_token
        return self._processor

    def latest_model_dir(self) -> Path | None:
        for name in ("finetune", "prune", "shrink", "pcn"):
            if self.has(name):
                return self.stage_path(name) / "model"
        return self.teacher_dir() if self.compresses_teacher() else None

    def teacher_dir(self) -> Path:
        return self.stage_path("teacher") / "model"

    def compresses_teacher(self) -> bool:
        """PCN, the shrink stage and pruning start from the teacher stage's fine-tuned weights (``prune.source:
        teacher``, or ``auto`` with a teacher stage; a run that shrinks without a prune section counts as ``auto``)."""
        cfg = self.cfg  # the config, not the stages so far: a stage asks this before it is itself among them
        if not self.has("teacher") or (cfg.pcn is None and cfg.speed is None and cfg.prune is None):
            return False
        return self.cfg.prune is None or self.cfg.prune.source in ("teacher", "auto")


# ------------------------------------------------------------------------------------------ models
def random_init_config(ctx: Context):
    """The transformers config of a ``model.from_config`` model (vocab from the tokenizer, labels from the data)."""
    import transformers

    from ..data.labels import set_label_names
    from ..modeling import CLASSIFICATION_TASKS

    fields = dict(ctx.cfg.model.from_config)
    model_type = fields.pop("model_type")
    tok = ctx.processor()
    if "vocab_size" not in fields and hasattr(tok, "__len__"):
        fields["vocab_size"] = len(tok)
    if ctx.plan.task in CLASSIFICATION_TASKS:
        fields["num_labels"] = ctx.plan.num_labels
    fields.setdefault("pad_token_id", getattr(tok, "pad_token_id", None))
    config = transformers.AutoConfig.for_model(model_type, **fields)
    config._attn_implementation = "eager"
    if ctx.plan.task in CLASSIFICATION_TASKS:
        set_label_names(config, ctx.plan.labels)
    return config
