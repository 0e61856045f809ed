"""The run config's schema: its sections and keys, and one section's values checked into its dataclass.

:data:`SECTIONS` maps each section to its dataclass and to the fields the pipeline fills itself; every error of
:func:`build_section` names ``section.key`` and, for an unknown key, the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from typing import Any, Union

from ..config import FinetuneConfig, PruneConfig, short_repr
from ..finetuning.distill import DistillConfig
from ..finetuning.gradual import GradualConfig
from ..pcn.config import PCNConfig
from ..pruning.scoring import SCORERS
from ..speed.plan import SpeedConfig
from .config_files import ConfigError, key_text
from .sections import (
    DataSection,
    EvaluateSection,
    ModelSection,
    OutputSection,
    PushSection,
    ReportSection,
    TeacherSection,
)

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
