"""Validated configuration dataclasses."""

from __future__ import annotations

import math
import reprlib
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .finetuning.distill import DistillConfig
    from .finetuning.gradual import GradualConfig

# each round re-scores the whole model, so even 1,000 rounds take hours on a large checkpoint; the cap keeps a
# typo (1e9) from running for ever
MAX_ROUNDS = 10_000
# what hf-px run compresses: the loaded checkpoint, its fine-tuned teacher, or the teacher whenever there is one
SOURCES = ("auto", "pretrained", "teacher")


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters with an ellipsis: error messages stay one short line.

    ``reprlib`` visits only a few items per level and a few levels, so a huge or alias-shared value costs
    nothing to show.

    Example:
        >>> short_repr("x" * 200, limit=10)
        "'xxxxxx..."
    """
    shorten = reprlib.Repr()
    shorten.maxstring = shorten.maxother = shorten.maxlong = limit + 2
    shorten.maxlist = shorten.maxtuple = shorten.maxdict = shorten.maxset = 6
    shorten.maxlevel = 3
    text = " ".join((repr(value[: limit + 1]) if isinstance(value, str) else shorten.repr(value)).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class PruneConfig:
    """How to prune.

    Args:
        method: scoring method, a name from ``hf_px.pruning.scoring.available_methods()`` (``px`` by default).
        sparsity: fraction of the prunable weights to remove, in [0, 1).
        rounds: number of iterative rounds, 1 to ``MAX_ROUNDS`` (10,000); density follows d_r = d^(r/R) with one
            global threshold. Each round re-scores the whole model (PX on MiniLM: about 1.5 s a round on a laptop
            CPU, so the paper's 100 take minutes); 10 rounds recovered as well as 100 in scripts/bench_recovery.py.
        min_density_ratio: layer-collapse guard: every prunable matrix keeps at least this fraction of the round's
            density (its best-scored weights). 0 gives pure global-threshold PX; residual branches can then be
            pruned away entirely, because paths can bypass a block through the skip connection.
        keep_rule: how the global threshold counts: exact (keep round(density × N) weights, ties at the cut broken
            by position) or reference (prune int((1 − density) × N) and every weight tied with the threshold, as the
            reference PX code does; reproduces its masks, may keep a few weights fewer).
        generic: prune unregistered architectures (every Linear in the repeated blocks).
        seed: seed for random scores and probes.
        pcn: optional PCN width reduction applied before PX (``hf_px.pcn.PCNConfig``).
        source: the weights ``hf-px run`` compresses (PCN and pruning): ``pretrained``, the checkpoint as loaded
            (the PX paper's setting: scores from the pretrained weights on downstream batches); ``teacher``, the
            dense model after the run's teacher stage fine-tuned it on the task (switches the teacher stage on); or
            ``auto`` (default): the teacher when the run has a teacher stage, else the pretrained weights. Pruning
            the teacher kept more accuracy on all three seeds measured (PX 80%, Rotten Tomatoes, 90.0% against
            85.9% of dense), and so did shrinking it (the fast preset: 97.4% against 92.9%); a run with a
            ``speed`` section and no ``prune`` section shrinks the teacher too. :func:`hf_px.prune` itself prunes whatever model it is given.
        options: the method's own settings: its options object (``hf_px.PXOptions``, ``NTKDiagOptions``,
            ``WandaOptions``, ``GraspOptions``, ``SynflowOptions``) or a dict of its fields, e.g. {a_gate: bound}
            for px or {per_row: false} for wanda; None: the method's defaults. Unknown keys are errors.

    Example:
        >>> PruneConfig(method="px", sparsity=0.9, rounds=20).density
        0.09999999999999998
        >>> PruneConfig(method="wanda", options={"per_row": False}).options
        WandaOptions(per_row=False)
    """

    method: str = "px"
    sparsity: float = 0.9
    rounds: int = 100
    min_density_ratio: float = 0.1
    keep_rule: str = "exact"
    generic: bool = False
    seed: int = 0
    pcn: Any = None
    source: str = "auto"
    options: Any = None

    def __post_init__(self) -> None:
        from .pruning.scoring import method_options

        self.options = method_options(self.method, self.options)  # also refuses an unknown method
        if not _finite(self.sparsity) or not 0.0 <= float(self.sparsity) < 1.0:
            raise ValueError(
                f"sparsity must be in [0, 1) (the fraction of prunable weights removed), got "
                f"{short_repr(self.sparsity)}; e.g. 0.9 keeps 10% of the weights."
            )
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1:
            raise ValueError(f"rounds must be an integer >= 1, got {short_repr(self.rounds)}.")
        if self.rounds > MAX_ROUNDS:
            raise ValueError(f"rounds must be at most {MAX_ROUNDS:,}, got {self.rounds:,}; 100 rounds already track "
                             "the exponential schedule closely.")
        if not _finite(self.min_density_ratio) or not 0.0 <= self.min_density_ratio <= 1.0:
            raise ValueError(f"min_density_ratio must be in [0, 1], got {short_repr(self.min_density_ratio)}.")
        from .pruning.masks import check_keep_rule

        check_keep_rule(self.keep_rule)
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {short_repr(self.source)}.")

    @property
    def density(self) -> float:
        return 1.0 - float(self.sparsity)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.pcn is not None and hasattr(self.pcn, "to_dict"):
            out["pcn"] = self.pcn.to_dict()
        return out


_PRECISIONS = (None, "no", "fp16", "bf16")
_LOGGERS = ("jsonl", "tensorboard")


@dataclass
class FinetuneConfig:
    """How to fine-tune.

    Args:
        epochs: passes over the training data.
        max_steps: total optimizer steps; when set it overrides ``epochs`` (the data are cycled as needed).
        learning_rate: AdamW's peak learning rate.
        weight_decay: AdamW's weight decay (none on biases and norm weights).
        batch_size: examples per process per micro-batch.
        eval_batch_size: examples per process per evaluation batch (None: batch_size).
        gradient_accumulation_steps: micro-batches per optimizer step.
        warmup_ratio: fraction of the steps with linear warm-up; then linear decay to 0.
        max_grad_norm: gradient clipping (None: off).
        seed: seeds weights of new heads, dropout and the data order (reproducible across resumes).
        mixed_precision: None picks bf16/fp16 on a GPU that supports it, else "no" (a launch config's
            ``mixed_precision`` is respected); "fp16" needs a GPU.
        eval_every: optimizer steps between evaluations (None: evaluate at the end only).
        save_every: optimizer steps between checkpoints (None: no checkpoints).
        log_every: optimizer steps between logged losses.
        save_total_limit: keep only the latest N checkpoints.
        output_dir: where checkpoints (``checkpoints/step_N``), logs (``logs/metrics.jsonl``), the final model
            (``model/``) and ``results.json`` go.
        resume: continue from the latest complete checkpoint in ``output_dir/checkpoints``.
        peft: None (train all weights) or "lora" (adapters on the prunable matrices, masked delta).
        lora_r: rank of the LoRA adapters.
        lora_alpha: LoRA scaling numerator (the update is scaled by lora_alpha / lora_r).
        lora_dropout: dropout on the LoRA adapters' input.
        merge_lora: merge the adapters into the weights and return the plain model (False: keep the adapters).
        metrics: metric names or script paths for ``hf_px.finetuning.metrics.load_metric``; None: accuracy for
            classification, perplexity for causal LMs.
        max_length, text_column, label_column: how raw datasets are tokenized.
        log_with: "jsonl" (always written when ``output_dir`` is set) and/or "tensorboard" (if installed).
        progress_bar: tqdm bar on the main process.
        group_by_length: batch examples of similar length together (seeded windows of 50 batches sorted by
            length, batch order shuffled), so dynamic padding pads little; text datasets only.
        freeze_embeddings: keep the input embeddings (word/position/token-type; ViT patch/position) fixed: no
            gradient and no AdamW state (``hf_px.finetuning.optim.embedding_parameters`` lists them).
        distill: a :class:`hf_px.DistillConfig` to learn from a dense teacher as well as the labels (None: off).
        gradual: a :class:`hf_px.GradualConfig` to keep pruning while training, on a cubic schedule up to its final
            sparsity (None: the masks stay as given).

    Example:
        >>> FinetuneConfig(epochs=3, peft="lora").lora_r
        8
    """

    epochs: int = 1
    max_steps: int | None = None
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    batch_size: int = 16
    eval_batch_size: int | None = None
    gradient_accumulation_steps: int = 1
    warmup_ratio: float = 0.1
    max_grad_norm: float | None = 1.0
    seed: int = 0
    mixed_precision: str | None = None
    eval_every: int | None = None
    save_every: int | None = None
    log_every: int = 10
    save_total_limit: int | None = None
    output_dir: str | None = None
    resume: bool = False
    peft: str | None = None
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    merge_lora: bool = True
    metrics: tuple[str, ...] | None = None
    max_length: int = 128
    text_column: str | None = None
    label_column: str = "label"
    log_with: tuple[str, ...] = ("jsonl",)
    progress_bar: bool = True
    group_by_length: bool = False
    freeze_embeddings: bool = False
    distill: DistillConfig | None = None
    gradual: GradualConfig | None = None

    def __post_init__(self) -> None:
        def positive_int(name: str, allow_none: bool = False) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1{' or None' if allow_none else ''}, "
                                 f"got {short_repr(v)}.")

        positive_int("epochs")
        positive_int("batch_size")
        positive_int("gradient_accumulation_steps")
        positive_int("log_every")
        positive_int("lora_r")
        positive_int("max_length")
        for name in ("max_steps", "eval_every", "save_every", "save_total_limit", "eval_batch_size"):
            positive_int(name, allow_none=True)
        # inf or nan would train "successfully" into nan weights, reported much later as broken masks
        if not (_finite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be a finite number > 0, got {short_repr(self.learning_rate)}; "
                             "e.g. 5e-5.")
        if not (_finite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {short_repr(self.weight_decay)}; "
                             "e.g. 0.01.")
        if not (_finite(self.warmup_ratio) and 0.0 <= self.warmup_ratio < 1.0):
            raise ValueError(f"warmup_ratio must be in [0, 1), got {short_repr(self.warmup_ratio)}; e.g. 0.1.")
        if not (_finite(self.lora_dropout) and 0.0 <= self.lora_dropout < 1.0):
            raise ValueError(f"lora_dropout must be in [0, 1), got {short_repr(self.lora_dropout)}.")
        if self.max_grad_norm is not None and not (_finite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be a finite number > 0 or None, got "
                             f"{short_repr(self.max_grad_norm)}.")
        if self.mixed_precision not in _PRECISIONS:
            raise ValueError(f"mixed_precision must be None, 'no', 'fp16' or 'bf16', got "
                             f"{short_repr(self.mixed_precision)}.")
        if self.peft not in (None, "lora"):
            raise ValueError(f"peft must be None or 'lora', got {short_repr(self.peft)}.")
        if isinstance(self.metrics, str):
            self.metrics = (self.metrics,)
        if self.metrics is not None:
            self.metrics = tuple(self.metrics)
        if isinstance(self.log_with, str):
            self.log_with = (self.log_with,)
        self.log_with = tuple(self.log_with)
        bad = [x for x in self.log_with if x not in _LOGGERS]
        if bad:
            raise ValueError(f"unknown log_with entries {short_repr(bad)}; choose from {', '.join(_LOGGERS)}.")
        if self.save_every and not self.output_dir:
            raise ValueError("save_every needs output_dir (checkpoints go to output_dir/checkpoints/step_N).")
        if self.resume and not self.output_dir:
            raise ValueError("resume=True needs output_dir, the folder of the interrupted run.")
        if isinstance(self.gradual, dict):
            from .finetuning.gradual import GradualConfig

            self.gradual = GradualConfig(**self.gradual)

    def to_dict(self) -> dict[str, Any]:
        # asdict would deep-copy a teacher module held by distill
        out = asdict(replace(self, distill=None, gradual=None))
        out["distill"] = self.distill.to_dict() if hasattr(self.distill, "to_dict") else self.distill
        out["gradual"] = self.gradual.to_dict() if self.gradual is not None else None
        return out
