"""The run config's own sections: the model, data, evaluate, output, teacher, push and report dataclasses.

The other sections reuse the library's dataclasses (``prune``, ``pcn``, ``finetune``...); :mod:`.config_schema`
lists them all. Each section checks its own values when it is built and raises :class:`ConfigError` naming the
key at fault.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import short_repr
from ..modeling import Task
from .config_files import ConfigError, check_size

TASKS = ("auto", *(t.value for t in Task))


@dataclass
class ModelSection:
    """Which checkpoint to start from.

    Args:
        name_or_path: Hub id, local checkpoint folder, or ``builtin:minilm`` (the packaged all-MiniLM-L6-v2).
        from_config: build a randomly initialised model from this config dict instead (``model_type`` plus
            fields, e.g. ``{model_type: bert, hidden_size: 32}``); needs ``tokenizer``.
        task: auto (the checkpoint's own head) | sequence-classification | image-classification | causal-lm |
            features (the bare trunk: prune only, nothing to fine-tune or evaluate).
        num_labels: classes of a classification head (default: the dataset's). Set it to replace a trained
            head that has a different number of labels.
        tokenizer: tokenizer/processor location when it is not next to the model (``builtin:minilm`` works).
        gguf_file: a GGUF file inside ``name_or_path`` (dequantized to float32).
        trust_remote_code: allow model code from the checkpoint.
        allow_pickle: allow pickle (``*.bin``) weights, which can run code when loaded.
    """

    name_or_path: str | None = None
    from_config: dict[str, Any] | None = None
    task: str = "auto"
    num_labels: int | None = None
    tokenizer: str | None = None
    gguf_file: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False

    def __post_init__(self) -> None:
        if (self.name_or_path is None) == (self.from_config is None):
            raise ConfigError("model: give exactly one of model.name_or_path (a checkpoint) and model.from_config "
                              "(a random model built from a config dict).")
        if self.from_config is not None:
            check_size(self.from_config, "model.from_config")
        if self.from_config is not None and "model_type" not in self.from_config:
            raise ConfigError("model.from_config needs a model_type key (e.g. model_type: bert).")
        if self.from_config is not None and self.tokenizer is None:
            raise ConfigError("model.from_config builds a model without a tokenizer: set model.tokenizer "
                              "(a folder, a Hub id or builtin:minilm).")
        if self.task not in TASKS:
            raise ConfigError(f"model.task must be one of {', '.join(TASKS)}, got {short_repr(self.task)}.")
        if self.num_labels is not None and self.num_labels < 1:
            raise ConfigError(f"model.num_labels must be >= 1, got {self.num_labels}.")


@dataclass
class DataSection:
    """The downstream data: calibration examples for PX/PCN, training and evaluation splits.

    Args:
        dataset: builtin:rotten_tomatoes | builtin:tweets | a csv/tsv/json/jsonl/parquet/txt file or folder |
            an image folder | a Hub dataset id.
        dataset_config: Hub dataset configuration (e.g. sst2 for glue).
        train_split: split for calibration and fine-tuning.
        eval_split: split to evaluate on (default: the first of validation, dev, test, eval).
        eval_holdout: when the dataset has no evaluation split, hold out this seeded fraction of the training
            split for evaluation (e.g. 0.1 for a single text file); null: no evaluation then.
        text_column: the text column (default: detected: text, sentence, ... or the first string column).
        label_column: the label column (null: unlabelled data).
        image_column: the image column of vision data (default: detected).
        max_train_samples, max_eval_samples: seeded subsets of the splits.
        per_class: class-balanced calibration examples per class (the PX paper uses 10).
        num_batches: unlabelled data: calibration batches to draw instead of per_class.
        calibration_batch_size: examples per calibration batch.
        max_length: token truncation length.
        drop_empty_text: drop rows whose text is empty instead of refusing the dataset.
        seed: seed for subsets and the calibration sample.
    """

    dataset: str = "builtin:rotten_tomatoes"
    dataset_config: str | None = None
    train_split: str = "train"
    eval_split: str | None = None
    eval_holdout: float | None = None
    text_column: str | None = None
    label_column: str | None = "label"
    image_column: str | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    per_class: int | None = 10
    num_batches: int | None = None
    calibration_batch_size: int = 16
    max_length: int = 128
    drop_empty_text: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("max_train_samples", "max_eval_samples", "per_class", "num_batches"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"data.{name} must be >= 1 or null, got {v}.")
        for name in ("calibration_batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {getattr(self, name)}.")
        if self.eval_holdout is not None and not 0 < self.eval_holdout < 1:
            raise ConfigError(f"data.eval_holdout must be in (0, 1), got {self.eval_holdout}.")
        if self.per_class is None and self.num_batches is None:
            raise ConfigError("data: set data.per_class (labelled data) or data.num_batches (unlabelled data) to "
                              "size the calibration set.")


@dataclass
class EvaluateSection:
    """Evaluation of the final model on the eval split.

    Args:
        enabled: run the evaluate stage.
        metrics: metric names (accuracy, f1, perplexity) or evaluate script paths (default: accuracy for
            classification, perplexity for causal LMs).
        batch_size: evaluation batch size.
    """

    enabled: bool = True
    metrics: list[str] | None = None
    batch_size: int = 32

    def __post_init__(self) -> None:
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"evaluate.batch_size must be an integer >= 1, got {short_repr(self.batch_size)}; "
                              "e.g. 32.")
        if self.metrics is not None and not all(isinstance(m, str) and m for m in self.metrics):
            raise ConfigError(f"evaluate.metrics must be a list of metric names or script paths, got "
                              f"{short_repr(self.metrics)}; e.g. [accuracy, f1].")


@dataclass
class OutputSection:
    """Where the run writes.

    Args:
        output_dir: the run folder; every stage writes its own sub-folder with a manifest.
        format: dense (stock safetensors with zeros) or sparse (packed values + bitmasks).
        model_dir: also publish the final model folder here, renamed into place once complete (null: it stays
            in the run folder only).
        overwrite: let model_dir replace an earlier hf-px checkpoint (a folder holding hf_px.json); folders with
            other files, or holding an input, are never replaced.
    """

    output_dir: str = "hf-px-run"
    format: str = "dense"
    model_dir: str | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.format not in ("dense", "sparse"):
            raise ConfigError(f"output.format must be 'dense' or 'sparse', got {short_repr(self.format)}.")


@dataclass
class TeacherSection:
    """The dense teacher: the starting model fine-tuned on the task with the ``finetune`` section's recipe (no
    masks, no distillation), before anything is pruned. Its evaluation is the run's dense baseline, which the
    report and the model card compare the pruned model with; ``distill`` learns from it, and PCN, the speed shrink
    and pruning start from it (``prune.source: auto``/``teacher``). The section is switched on by either of those,
    or by being present.

    Args:
        checkpoint: a dense checkpoint already fine-tuned on this task (same labels) to use instead of training
            one; the stage then only evaluates it.
        epochs: the teacher's passes over the training data instead of ``finetune.epochs`` (and its max_steps),
            e.g. 1 with ``finetune.epochs: 3`` to give only the compressed student the longer recovery.
    """

    checkpoint: str | None = None
    epochs: int | None = None

    def __post_init__(self) -> None:
        if self.epochs is not None and (isinstance(self.epochs, bool) or not isinstance(self.epochs, int)
                                        or self.epochs < 1):
            raise ConfigError(f"teacher.epochs must be an integer >= 1 or null, got {self.epochs!r}.")


@dataclass
class PushSection:
    """Upload of the final folder (model, card, plots) to the Hub.

    Args:
        enabled: run the push stage (token: HF_TOKEN; endpoint: HF_ENDPOINT).
        hub_model_id: repo id, e.g. user/minilm-px80.
        private: create the repo as private.
    """

    enabled: bool = False
    hub_model_id: str | None = None
    private: bool = False

    def __post_init__(self) -> None:
        if self.enabled and not self.hub_model_id:
            raise ConfigError("push.enabled needs push.hub_model_id (e.g. user/minilm-px80).")


@dataclass
class ReportSection:
    """The human-readable report.

    Args:
        plots: draw PNG plots with matplotlib (density per layer, PCN variance, curves, sizes).
    """

    plots: bool = True
