"""``RunConfig``: one YAML/JSON file that describes a whole ``hf-px run``, validated into dataclasses.

Sections map onto the dataclasses the library already has (``prune`` -> :class:`~hf_px.PruneConfig`, ``pcn`` ->
:class:`~hf_px.pcn.PCNConfig`, ``finetune`` -> :class:`~hf_px.config.FinetuneConfig`) plus the small sections
below. A section set to ``null`` (or ``enabled: false``) skips its stage. Unknown keys are errors that name the
closest valid key.

Example:
    >>> cfg = RunConfig.from_dict({"model": {"name_or_path": "builtin:minilm"},
    ...                            "prune": {"sparsity": 0.8, "rounds": 10},
    ...                            "output": {"output_dir": "runs/minilm"}})
    >>> cfg.prune.sparsity, cfg.finetune.epochs
    (0.8, 1)
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from ..config import FinetuneConfig, PruneConfig, short_repr
from ..finetuning.distill import DistillConfig
from ..finetuning.gradual import GradualConfig
from ..modeling import Task
from ..pcn.config import PCNConfig
from ..pruning.scoring import SCORERS
from ..speed.plan import SpeedConfig
from .config_files import ConfigError, check_size, key_text, read_config_file

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
    report and the model card compare the pruned model with; ``distill`` learns from it and ``prune.source:
    teacher`` compresses it. The section is switched on by either of those, or by being present.

    Args:
        checkpoint: a dense checkpoint already fine-tuned on this task (same labels) to use instead of training
            one; the stage then only evaluates it.
    """

    checkpoint: str | None = None


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


# key -> (dataclass, fields the pipeline owns and a user must not set)
SECTIONS: dict[str, tuple[type, tuple[str, ...]]] = {
    "model": (ModelSection, ()),
    "data": (DataSection, ()),
    "pcn": (PCNConfig, ()),
    "speed": (SpeedConfig, ()),
    "prune": (PruneConfig, ("pcn",)),
    "gradual": (GradualConfig, ("prune",)),
    "teacher": (TeacherSection, ()),
    "finetune": (FinetuneConfig, ("max_length", "text_column", "label_column", "metrics", "distill", "gradual")),
    "distill": (DistillConfig, ("teacher",)),
    "evaluate": (EvaluateSection, ()),
    "output": (OutputSection, ()),
    "push": (PushSection, ()),
    "report": (ReportSection, ()),
}
# keys the pipeline fills from another section, so that one value applies to every stage
SHARED_KEYS = {"finetune.max_length": "data.max_length", "finetune.text_column": "data.text_column",
               "finetune.label_column": "data.label_column", "finetune.metrics": "evaluate.metrics"}
# sections that are off unless present in the file; the others get their defaults when absent
OPTIONAL = ("pcn", "speed", "gradual", "teacher", "distill")
# sections that ``null`` or ``enabled: false`` switches off (the others cannot be null)
SWITCHABLE = ("pcn", "speed", "prune", "gradual", "teacher", "finetune", "distill")


def section_fields(section: str) -> list[dataclasses.Field]:
    cls, owned = SECTIONS[section]
    return [f for f in dataclasses.fields(cls) if f.name not in owned]


def option_fields() -> dict[str, list[tuple[str, dataclasses.Field]]]:
    """``prune.options.KEY`` -> [(method, field)] over every method's options class (a key may serve several)."""
    out: dict[str, list[tuple[str, dataclasses.Field]]] = {}
    for method in sorted(SCORERS):
        for f in dataclasses.fields(SCORERS[method].options_class):
            out.setdefault(f"prune.options.{f.name}", []).append((method, f))
    return out


def all_keys() -> list[str]:
    """Every valid ``section.key``, and ``prune.options.KEY`` for every method's options."""
    return [f"{s}.{f.name}" for s in SECTIONS for f in section_fields(s)] + list(option_fields())


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else f" Valid keys: {', '.join(choices)}."


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple) or hint in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return True


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("NoneType", "null").replace("<class '", "").replace("'>", "")


def _field_hints(cls: type) -> dict[str, Any]:
    """Each field's annotation, evaluated; one naming a class imported only for type checkers counts as Any."""
    namespace = vars(sys.modules[cls.__module__])
    hints: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        try:
            # the strings are this package's own source annotations (``from __future__ import annotations``)
            hints[f.name] = eval(f.type, namespace) if isinstance(f.type, str) else f.type
        except NameError:
            hints[f.name] = Any
    return hints


def build_section(section: str, values: dict[str, Any] | None) -> Any:
    """Validate one section's dict into its dataclass; every error names ``section.key``."""
    cls, owned = SECTIONS[section]
    values = dict(values or {})
    names = [f.name for f in section_fields(section)]
    hints = _field_hints(cls)
    for key, value in values.items():
        if key in owned:
            where = SHARED_KEYS.get(f"{section}.{key}")
            raise ConfigError(f"{section}.{key} is set by the pipeline"
                              + (f" from {where}; set {where} instead." if where else "; remove it from the config."))
        if key not in names:
            raise ConfigError(f"unknown key {section}.{key_text(key)}.{_suggest(str(key)[:100], names)}")
        if not _type_ok(value, hints[key]):
            raise ConfigError(f"{section}.{key} must be {_type_name(hints[key])}, got {short_repr(value)} "
                              f"({type(value).__name__}).")
    if section == "prune" and values.get("options") is not None:
        _check_options(values.get("method", PruneConfig.method), values["options"])
    if section == "finetune" and isinstance(values.get("log_with"), list):
        values["log_with"] = tuple(values["log_with"])
    # without finetune.output_dir the pipeline keeps checkpoints in the stage's work folder: a stand-in lets
    # FinetuneConfig accept save_every and resume
    stand_in = section == "finetune" and values.get("output_dir") is None
    if section == "gradual":
        values["prune"] = None  # RunConfig fills it from the prune section, then validates the schedule
    try:
        built = cls(**({**values, "output_dir": "(the stage's work folder)"} if stand_in else values))
        if stand_in:
            built.output_dir = None
        return built
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        msg = str(err)
        raise ConfigError(msg if msg.startswith(section) else f"{section}: {msg}") from err


def _check_options(method: Any, options: Any) -> None:
    """``prune.options`` against ``prune.method``'s options class; each error names ``prune.options.KEY``."""
    if not isinstance(options, dict):
        raise ConfigError(f"prune.options must be a mapping of {method}'s options, got {short_repr(options)}.")
    if method not in SCORERS:
        return  # PruneConfig names the valid methods
    cls = SCORERS[method].options_class
    names = [f.name for f in dataclasses.fields(cls)]
    for key, value in options.items():
        if key not in names:
            raise ConfigError(f"unknown key prune.options.{key_text(key)} for method {method}."
                              + (_suggest(str(key)[:100], names) if names else " It takes no options."))
        try:  # one field at a time, so the error is that field's
            cls(**{key: value})
        except (TypeError, ValueError) as err:
            raise ConfigError(f"prune.options.{key}: {err}") from err


@dataclass
class RunConfig:
    """The whole pipeline: load -> calibrate -> PCN -> PX -> fine-tune -> evaluate -> save -> report -> card -> push.

    ``teacher``, ``pcn``, ``prune``, ``finetune`` and ``distill`` are ``None`` when switched off.
    """

    model: ModelSection
    data: DataSection = field(default_factory=DataSection)
    teacher: TeacherSection | None = None
    pcn: PCNConfig | None = None
    speed: SpeedConfig | None = None
    prune: PruneConfig | None = field(default_factory=PruneConfig)
    gradual: GradualConfig | None = None
    finetune: FinetuneConfig | None = field(default_factory=FinetuneConfig)
    distill: DistillConfig | None = None
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)
    output: OutputSection = field(default_factory=OutputSection)
    push: PushSection = field(default_factory=PushSection)
    report: ReportSection = field(default_factory=ReportSection)

    def __post_init__(self) -> None:
        wants_teacher = self.distill is not None or (self.prune is not None and self.prune.source == "teacher")
        if self.teacher is None and wants_teacher:
            self.teacher = TeacherSection()
        if self.speed is not None and self.pcn is not None:
            raise ConfigError("speed plans the FFN widths itself (structured PCN at the width it measures); remove "
                              "the pcn section, or remove speed and choose the widths with pcn.")
        if self.speed is not None and self.distill is not None and self.distill.hidden_weight > 0 \
                and self.speed.blocks_removed != 0:
            raise ConfigError("distill.hidden_weight matches block i of the student with block i of the teacher, "
                              "but speed may remove blocks; set distill.hidden_weight: 0 (logits only) or "
                              "speed.blocks_removed: 0.")
        if self.gradual is not None:
            if self.prune is None or self.finetune is None:
                raise ConfigError("gradual keeps pruning while fine-tuning, up to prune.sparsity with prune.method: it "
                                  "needs both the prune and the finetune sections.")
            try:  # the final sparsity and method come from the prune section
                self.gradual = dataclasses.replace(self.gradual, prune=dataclasses.replace(self.prune, pcn=None))
            except ValueError as err:
                raise ConfigError(f"gradual: {err}") from err
        if self.distill is not None and self.finetune is None:
            raise ConfigError("distill learns from the teacher while fine-tuning, but the finetune section is off; "
                              "add a finetune section or remove distill.")
        if self.teacher is not None and self.teacher.checkpoint is None and self.finetune is None:
            raise ConfigError("the teacher stage fine-tunes the dense model with the finetune section's recipe, but "
                              "finetune is off; add a finetune section or set teacher.checkpoint.")
        if self.model.task == Task.FEATURES and (self.finetune or self.evaluate.enabled or self.teacher is not None):
            raise ConfigError("model.task features loads the bare trunk, which has no head to fine-tune or evaluate; "
                              "set finetune: null and evaluate.enabled: false, or choose a task with a head.")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        if not isinstance(raw, dict):
            raise ConfigError(f"a run config is a mapping of sections ({', '.join(SECTIONS)}), got "
                              f"{type(raw).__name__}.")
        for section, values in raw.items():  # name the key at fault when there is one
            for key, value in (values.items() if isinstance(values, dict) else ()):
                check_size(value, f"{section}.{key_text(key)}")
        check_size(raw, "the run config")
        for key in raw:
            if key not in SECTIONS:
                raise ConfigError(f"unknown section {short_repr(key)}.{_suggest(str(key)[:100], list(SECTIONS))}")
        if "model" not in raw or raw["model"] is None:
            raise ConfigError("the config needs a model section (model.name_or_path or model.from_config).")
        kwargs: dict[str, Any] = {}
        for section in SECTIONS:
            if section not in raw:
                if section in OPTIONAL:
                    kwargs[section] = None
                continue
            values = raw[section]
            if values is None or (isinstance(values, dict) and values.get("enabled") is False
                                  and section in SWITCHABLE):
                if section not in SWITCHABLE:
                    raise ConfigError(f"section {section!r} cannot be null; remove it to get the defaults.")
                kwargs[section] = None
                continue
            if not isinstance(values, dict):
                raise ConfigError(f"section {section!r} must be a mapping of keys, got {short_repr(values)}.")
            values = {k: v for k, v in values.items() if not (k == "enabled" and section in SWITCHABLE)}
            kwargs[section] = build_section(section, values)
        return cls(**kwargs)

    @classmethod
    def from_file(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
        """Read YAML (``.yaml``/``.yml``) or JSON; ``overrides`` maps ``section.key`` to a value."""
        return cls.from_dict(apply_overrides(read_config_file(path), overrides or {}))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for section in SECTIONS:
            obj = getattr(self, section)
            out[section] = None if obj is None else {f.name: _plain(getattr(obj, f.name))
                                                     for f in section_fields(section)}
        return out


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # prune.options
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return list(value) if isinstance(value, tuple) else value


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``{"prune.sparsity": 0.8}`` applied onto the raw dict (a null section is switched on by an override)."""
    raw = dict(raw) if isinstance(raw, dict) else raw
    valid = all_keys()
    for key, value in overrides.items():
        if key not in valid:
            raise ConfigError(f"unknown key {key_text(key)}.{_suggest(str(key)[:100], valid)}")
        section, name = key.split(".", 1)
        current = raw.get(section)
        current = dict(current) if isinstance(current, dict) else {}
        if name.startswith("options."):  # prune.options.KEY sets one option, keeping the file's others
            inner = current.get("options")
            value = {**(inner if isinstance(inner, dict) else {}), name.split(".", 1)[1]: value}
            name = "options"
        raw[section] = {**current, name: value}
    return raw
