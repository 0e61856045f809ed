"""Flags that stand for run-config keys, as ``HfArgumentParser`` does with dataclass fields.

``hf-px prune`` and ``hf-px finetune`` keep their familiar flag names, but each flag is only a name for config
keys: its help is the config field's own documentation, its value goes into the :class:`~hf_px.RunConfig` the
command runs, and library errors, written with config keys, are shown with the flag names.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Flag:
    """One command-line flag and the config keys it sets.

    Args:
        name: the flag, e.g. ``--sparsity``.
        keys: the config keys it sets; the first one's documentation is its help (several keys when one value
            applies to each, e.g. ``--seed``).
        const: a switch's value (``True``; ``False`` for a ``--no-X`` flag); None: the flag takes a value.
        choices: the values it accepts, listed in ``--help``.
        required: the command cannot run without it.
    """

    name: str
    keys: tuple[str, ...]
    const: bool | None = None
    choices: tuple[str, ...] | None = None
    required: bool = False

    @property
    def dest(self) -> str:
        return self.name.lstrip("-").replace("-", "_")


def flag(name: str, *keys: str, const: bool | None = None, choices: Iterable[str] | None = None,
         required: bool = False) -> Flag:
    return Flag(name, keys, const, tuple(choices) if choices is not None else None, required)


def arg_docs(cls: type) -> dict[str, str]:
    """``name: text`` entries of a Google-style ``Args:`` block (``a, b: text`` documents both)."""
    doc = cls.__doc__ or ""
    if "Args:" not in doc:
        return {}
    out: dict[str, str] = {}
    names: list[str] = []
    for line in doc.split("Args:", 1)[1].splitlines()[1:]:
        m = re.match(r"^\s{8}([\w, ]+):\s*(.*)$", line)
        if m:
            names = [n.strip() for n in m.group(1).split(",")]
            for n in names:
                out[n] = m.group(2)
        elif line.startswith(" " * 12) and names:
            for n in names:
                out[n] += " " + line.strip()
        elif line.strip() and not line.startswith(" " * 8):
            break
    return out


def key_field(key: str) -> tuple[type, dataclasses.Field]:
    """The dataclass and field behind a config key (``prune.options.KEY``: the first method that has it)."""
    from ..pipeline.config import SECTIONS, option_fields, section_fields

    if key.startswith("prune.options."):
        from ..pruning.scoring import SCORERS

        method, f = option_fields()[key][0]
        return SCORERS[method].options_class, f
    section, name = key.split(".", 1)
    return SECTIONS[section][0], next(f for f in section_fields(section) if f.name == name)


def key_help(key: str) -> str:
    cls, f = key_field(key)
    return arg_docs(cls).get(f.name, "")


def key_default(key: str) -> Any:
    _, f = key_field(key)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _number(text: str) -> int | float:
    return int(text) if re.fullmatch(r"[+-]?\d+", text) else float(text)


def _value_kwargs(key: str) -> dict[str, Any]:
    """argparse's ``type``/``nargs`` from the field's annotation."""
    from ..pipeline.config import _field_hints

    cls, f = key_field(key)
    hint = _field_hints(cls)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    if any(typing.get_origin(a) in (list, tuple) or a in (list, tuple) for a in args):
        return {"nargs": "+", "type": str}
    if int in args and float in args:
        return {"type": _number}
    return {"type": next((t for t in (float, int) if t in args), str)}


class ConfigHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows after each flag's documentation the config key it sets and that key's default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        key = getattr(action, "config_key", None)
        if key is None:
            return action.help or ""
        if isinstance(action, argparse._StoreConstAction):
            where = f"sets {key}: {str(action.const).lower()}"
        else:
            default = getattr(action, "config_default", None)
            default = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
            where = key + (f", default {default}" if default not in (None, "") else "")
        return f"{action.help or ''} [{where}]".replace("%", "%%")


def add_flags(parser: argparse.ArgumentParser, groups: dict[str, tuple[Flag, ...]]) -> None:
    for title, flags in groups.items():
        group = parser.add_argument_group(title)
        for f in flags:
            kwargs: dict[str, Any] = {"dest": f.dest, "default": argparse.SUPPRESS, "help": key_help(f.keys[0])}
            if f.const is not None:
                kwargs.update(action="store_const", const=f.const)
            else:
                kwargs.update(_value_kwargs(f.keys[0]), choices=f.choices, required=f.required,
                              metavar=None if f.choices else f.dest.upper())
            action = group.add_argument(f.name, **kwargs)
            action.config_key = ", ".join(f.keys)
            action.config_default = None if f.required else key_default(f.keys[0])


def overrides(args: argparse.Namespace, flags: Iterable[Flag]) -> dict[str, Any]:
    """``{config key: value}`` for every flag given on the command line."""
    given = vars(args)
    return {key: given[f.dest] for f in flags if f.dest in given for key in f.keys}


_SET = re.compile(r"\bset (?P<key>[a-z_]+(?:\.[a-z_]+)+): (?P<value>[^\s,;]+?)(?=[.,;)]?(?:\s|$))")
_KEY = re.compile(r"(?<![\w./-])(?P<key>[a-z_]+(?:\.[a-z_]+)+)(?![\w/-]|\.\w)")


def translate(message: str, flags: Iterable[Flag]) -> str:
    """A library message with config keys, in flags: ``set model.num_labels: 3`` -> ``set --num-labels 3``,
    ``set model.allow_pickle: true`` -> ``pass --allow-pickle``; keys without a flag stay as they are."""
    by_key = {key: f for f in flags for key in f.keys}

    def setting(m: re.Match) -> str:
        f = by_key.get(m["key"])
        if f is None:
            return m[0]
        if f.const is None:
            return f"set {f.name} {m['value']}"
        return f"{'pass' if m['value'] == str(f.const).lower() else 'drop'} {f.name}"

    message = _SET.sub(setting, message)
    return _KEY.sub(lambda m: by_key[m["key"]].name if m["key"] in by_key else m[0], message)


def quiet_progress() -> None:
    """transformers' and datasets' own bars (loading, saving, map) go too."""
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def run_stages(args: argparse.Namespace, flags: Iterable[Flag], config: dict[str, Any]) -> Any:
    """:func:`hf_px.run` on ``config`` with the given flags on top; the stage folders go to a hidden run folder
    beside ``--output-dir``, which :func:`discard` removes once the command has read it (a failed run keeps it,
    so the same command resumes from its complete stages)."""
    from ..pipeline import run

    if args.no_progress:
        quiet_progress()
    out = Path(args.output_dir).expanduser().absolute()
    config = {**config, "output": {**config.get("output", {}), "output_dir": str(out.parent / f".{out.name}.hf-px-run")}}
    return run(config, progress=not args.no_progress, overrides=overrides(args, flags))


def discard(result: Any) -> None:
    if result.is_main_process:
        shutil.rmtree(result.output_dir, ignore_errors=True)
