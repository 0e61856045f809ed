"""``RunConfig``: one YAML/JSON file that describes a whole ``hf-px run``, validated into dataclasses.

Sections map onto the dataclasses the library already has (``prune`` -> :class:`~hf_px.PruneConfig`, ``pcn`` ->
:class:`~hf_px.pcn.PCNConfig`, ``finetune`` -> :class:`~hf_px.config.FinetuneConfig`) plus the small sections
of :mod:`.sections`; :mod:`.config_schema` lists them and checks each one's keys. A section set to ``null``
(or ``enabled: false``) skips its stage. Unknown keys are errors that name the closest valid key.

Example:
    >>> cfg = RunConfig.from_dict({"model": {"name_or_path": "builtin:minilm"},
    ...                            "prune": {"sparsity": 0.8, "rounds": 10},
    ...                            "output": {"output_dir": "runs/minilm"}})
    >>> cfg.prune.sparsity, cfg.finetune.epochs
    (0.8, 1)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import FinetuneConfig, PruneConfig, short_repr
from ..finetuning.distill import DistillConfig
from ..finetuning.gradual import GradualConfig
from ..modeling import Task
from ..pcn.config import PCNConfig
from ..speed.plan import SpeedConfig
from .config_files import ConfigError, check_size, key_text, read_config_file
from .config_schema import (
    OPTIONAL,
    SECTIONS,
    SHARED_KEYS,
    SWITCHABLE,
    _suggest,
    all_keys,
    build_section,
    option_fields,
    section_fields,
)
from .sections import (
    TASKS,
    DataSection,
    EvaluateSection,
    ModelSection,
    OutputSection,
    PushSection,
    ReportSection,
    TeacherSection,
)

# the run config's public names, wherever they are defined
__all__ = [
    "OPTIONAL", "SECTIONS", "SHARED_KEYS", "SWITCHABLE", "TASKS", "ConfigError", "DataSection", "EvaluateSection",
    "ModelSection", "OutputSection", "PushSection", "ReportSection", "RunConfig", "TeacherSection", "all_keys",
    "apply_overrides", "build_section", "option_fields", "section_fields",
]


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
