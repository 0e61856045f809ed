"""Flags that stand for run-config keys, as ``HfArgumentParser`` does with dataclass fields.

``hf-px prune`` and ``hf-px finetune`` keep their familiar flag names, but each flag is only a name for config
keys: its help is the config field's own documentation, its value goes into the :class:`~hf_px.RunConfig` the
command runs, and library errors, written with config keys, are shown with the flag names.

Help is plain text: the field docstrings are written for the Python API (reST markup, names of functions and
modules), so :func:`key_help` strips the markup, and :data:`CLI_HELP` says in a user's terms what a few fields'
docstrings say by pointing into the code. A renamed flag keeps its old name as a hidden alias that still works
and prints a deprecation note (:func:`add_deprecated_alias`).

This module imports only the standard library at import time: every command's parser uses it.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
import sys
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
        aliases: former names, still accepted (hidden from ``--help``, with a deprecation note when used).
        help: the flag's own help, when the key's documentation (written for the run config) would mislead
            for this command.
    """

    name: str
    keys: tuple[str, ...]
    const: bool | None = None
    choices: tuple[str, ...] | None = None
    required: bool = False
    aliases: tuple[str, ...] = ()
    help: str | None = None

    @property
    def dest(self) -> str:
        return self.name.lstrip("-").replace("-", "_")


def flag(name: str, *keys: str, const: bool | None = None, choices: Iterable[str] | None = None,
         required: bool = False, aliases: Iterable[str] = (), help: str | None = None) -> Flag:
    return Flag(name, keys, const, tuple(choices) if choices is not None else None, required, tuple(aliases), help)


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


# Command-line help for the fields whose API docstring points into the code (a module, a constant, a script, a
# docs section); the others' docstrings, stripped of markup, are their help. tests/test_cli.py fails on any help
# text that points into the code, so a new docstring of that kind gets its entry here (or a plainer docstring).
CLI_HELP: dict[str, str] = {
    "prune.rounds": "number of iterative rounds, 1 to 10,000; density follows d_r = d^(r/R) with one global "
    "threshold. Each round re-scores the whole model (PX on MiniLM: about 1.5 s a round on a laptop CPU, so the "
    "paper's 100 take minutes); 10 rounds recovered as well as 100 in the recovery benchmark.",
    "prune.source": "the weights the run compresses (PCN and pruning): pretrained, the checkpoint as loaded (the "
    "PX paper's setting: scores from the pretrained weights on downstream batches); teacher, the dense model "
    "after the run's teacher stage fine-tuned it on the task; or auto (default): the teacher when the run has a "
    "teacher stage, else pretrained. The teacher kept more accuracy on all three seeds measured.",
    "prune.options": "the method's own settings as a mapping, e.g. {a_gate: bound} for px or {per_row: false} for "
    "wanda; null: the method's defaults. Each one is also a key of its own (prune.options.KEY, listed with the "
    "methods that have it). Unknown keys are errors.",
    "prune.options.b_length": "encoders: sequence length of the B pass, which sets how much attention "
    "(token-route) paths count against skip and MLP paths. null: the calibration set's mean real length; 1: no "
    "token-route factor.",
    "pcn.mode": "structured (FFN neuron selection; stock transformers reloads the result) or projection (frozen "
    "per-block Q/K/V input basis; BERT family; reloading needs hf-px installed and import hf_px.pcn, or "
    "trust_remote_code).",
    "pcn.score": "neuron score in structured mode: leverage (sum of squared loadings on the top-k directions), l1 "
    "(PCN's rule), weighted (squared loadings weighted by the eigenvalues) or output (weighted times the squared "
    "norm of the neuron's output column; the default: it beat leverage on MiniLM before and after fine-tuning).",
    "finetune.freeze_embeddings": "keep the input embeddings (word, position and token-type; ViT patch and "
    "position) fixed: no gradient and no optimizer state.",
}
_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")  # :class:`~a.b.C` -> C, :func:`f` -> f
_PY_CONSTANT = re.compile(r"\b(None|True|False)\b")
_YAML = {"None": "null", "True": "true", "False": "false"}


def plain_text(doc: str) -> str:
    """A docstring fragment as plain text: no reST roles or double backquotes, one line, and Python's
    None/True/False as they are written in the YAML config and on the command line (null/true/false)."""
    text = _ROLE.sub(lambda m: m.group(1).rsplit(".", 1)[-1] if m.group(0).count("~") else m.group(1), doc)
    text = _PY_CONSTANT.sub(lambda m: _YAML[m.group(1)], text)
    return " ".join(text.replace("``", "").split())


def key_help(key: str) -> str:
    """The plain-text help of a config key: :data:`CLI_HELP`, else its field's docstring."""
    if key in CLI_HELP:
        return CLI_HELP[key]
    if key == "prune.method":  # the docstring names the function that lists them; the help lists them
        from ..pruning.scoring import SCORERS

        return f"scoring method: {', '.join(sorted(SCORERS))}."
    cls, f = key_field(key)
    return plain_text(arg_docs(cls).get(f.name, ""))


def key_default(key: str) -> Any:
    _, f = key_field(key)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def format_default(value: Any) -> str:
    """A default as it would be written in the YAML config: true, null, [a, b], bare strings."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_default(v) for v in value) + "]"
    return str(value)


def off_section(key: str) -> str | None:
    """The section of ``key`` when that section is off unless asked for (pcn, teacher, distill), else None: its
    defaults apply only once it is on, and the help says so."""
    from ..pipeline.config import OPTIONAL

    section = key.split(".", 1)[0]
    return section if section in OPTIONAL else None


def default_text(key: str, default: Any) -> str:
    """``default X`` for the help of ``key``; empty for no default (null or an empty list)."""
    if default is None or default in ("", (), []):
        return ""
    section = off_section(key)
    return f"default {format_default(default)}" + (f" when {section} is on" if section else "")


def _number(text: str) -> int | float:
    return int(text) if re.fullmatch(r"[+-]?\d+", text) else float(text)


def _value_kwargs(key: str) -> dict[str, Any]:
    """argparse's ``type``/``nargs`` from the field's annotation."""
    from ..pipeline.config_schema import _field_hints

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
        if key is None or action.help == argparse.SUPPRESS:
            return action.help or ""
        if isinstance(action, argparse._StoreConstAction):
            where = f"sets {key}: {format_default(action.const)}"
        else:
            default = default_text(key.split(", ")[0], getattr(action, "config_default", None))
            where = key + (f", {default}" if default else "")
        return f"{action.help or ''} [{where}]".replace("%", "%%")


def _deprecated(action_class: type[argparse.Action]) -> type[argparse.Action]:
    """``action_class`` that also prints, when its flag is used, that the flag was renamed."""

    class Deprecated(action_class):  # type: ignore[valid-type, misc]
        def __init__(self, *args: Any, replacement: str, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.replacement = replacement
            self.deprecated_alias = True  # the unknown-flag hints never suggest it

        def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                     option_string: str | None = None) -> None:
            print(f"hf-px: {option_string} is deprecated; use {self.replacement}.", file=sys.stderr)
            super().__call__(parser, namespace, values, option_string)

    return Deprecated


_DEPRECATED_STORE = _deprecated(argparse._StoreAction)
_DEPRECATED_CONST = _deprecated(argparse._StoreConstAction)


def add_deprecated_alias(container: Any, alias: str, action: argparse.Action) -> argparse.Action:
    """Accept ``alias`` as a hidden, deprecated name of ``action``'s flag: same destination, type and value."""
    kwargs: dict[str, Any] = {"dest": action.dest, "default": action.default, "help": argparse.SUPPRESS,
                              "replacement": action.option_strings[0]}
    if isinstance(action, argparse._StoreConstAction):
        kwargs.update(action=_DEPRECATED_CONST, const=action.const)
    else:
        kwargs.update(action=_DEPRECATED_STORE, type=action.type, nargs=action.nargs, choices=action.choices,
                      metavar=action.metavar)
    return container.add_argument(alias, **kwargs)


def add_flags(parser: argparse.ArgumentParser, groups: dict[str, tuple[Flag, ...]]) -> None:
    for title, flags in groups.items():
        group = parser.add_argument_group(title)
        for f in flags:
            kwargs: dict[str, Any] = {"dest": f.dest, "default": argparse.SUPPRESS,
                                      "help": f.help or key_help(f.keys[0])}
            if f.const is not None:
                kwargs.update(action="store_const", const=f.const)
            else:
                kwargs.update(_value_kwargs(f.keys[0]), choices=f.choices, required=f.required,
                              metavar=None if f.choices else f.dest.upper())
            action = group.add_argument(f.name, **kwargs)
            action.config_key = ", ".join(f.keys)
            action.config_default = None if f.required else key_default(f.keys[0])
            for alias in f.aliases:
                add_deprecated_alias(group, alias, action)


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
