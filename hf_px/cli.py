"""The ``hf-px`` command line: one sub-command per job, each defined in ``hf_px.commands.<name>``.

An :class:`~hf_px.HfPxError` (bad input) is one line, with the command's flag names for config keys, and exit code
2; anything else is a bug in hf_px and shows its traceback (exit code 1). ``--debug`` shows the traceback of an
``HfPxError`` too.

Start-up is lazy: only the chosen sub-command's module is imported (they pull in torch and transformers, seconds
of start-up), so ``hf-px --help`` and ``hf-px --version`` import nothing of hf_px beyond this file. The top-level
help lists the commands from :data:`COMMANDS`, whose one-line help a test keeps equal to each module's own.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys
import traceback
from collections.abc import Iterable

# name -> (module exposing ``register(subparsers)``, which adds its parser and sets ``func=run``; one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("hf_px.commands.run", "the whole pipeline from a YAML/JSON config (resumable, one folder per stage)"),
    "prune": ("hf_px.commands.prune", "prune a checkpoint to a target sparsity with PX (or a baseline)"),
    "finetune": ("hf_px.commands.finetune", "fine-tune a pruned checkpoint with its masks held fixed"),
    "push": ("hf_px.commands.push", "upload a saved checkpoint folder to the Hugging Face Hub"),
    "demo": ("hf_px.commands.demo",
             "dense vs PX-pruned + distilled MiniLM on the built-in Rotten Tomatoes data (offline)"),
}
GLOBAL_SWITCHES = ("--debug",)  # top-level options that take no value: skipped when finding the command


def version() -> str:
    """The installed distribution's version (the package's own when it is not installed, e.g. a source tree)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("hf-px")
    except PackageNotFoundError:
        from . import __version__

        return __version__


def command_of(argv: list[str]) -> str | None:
    """The sub-command named on the command line (the first word that is not a top-level switch), or None."""
    for word in argv:
        if word in GLOBAL_SWITCHES:
            continue
        return word if word in COMMANDS else None
    return None


def build_parser(full: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The ``hf-px`` parser. ``full``: the sub-commands whose own parser is built (their modules imported); the
    others get a stub that only carries their one-line help. None: every sub-command in full."""
    parser = argparse.ArgumentParser(
        prog="hf-px",
        description="Prune Hugging Face checkpoints for a downstream task with PX (Path eXclusion) saliency, "
        "shrink widths with PCN projections, fine-tune with Accelerate and push to the Hub.",
        epilog="hf-px COMMAND --help explains a command's flags.",
    )
    parser.add_argument("--version", action="version", version=f"hf-px {version()}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error in the input as well (before the command).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = set(COMMANDS) if full is None else set(full)
    for name, (module, help_text) in COMMANDS.items():
        if name in wanted:
            importlib.import_module(module).register(sub)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _unknown_flags_error(parser: argparse.ArgumentParser, command: str | None, extras: list[str]) -> str:
    """argparse's "unrecognized arguments" message, plus the closest flag of the sub-command for each misspelling."""
    def visible(actions: list[argparse.Action]) -> list[str]:  # deprecated aliases are never suggested
        return [o for a in actions if not getattr(a, "deprecated_alias", False) for o in a.option_strings]

    options = visible(parser._actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            options += visible(action.choices[command]._actions)
    hints = []
    for word in extras:
        flag = word.split("=", 1)[0]
        close = difflib.get_close_matches(flag, options, n=1, cutoff=0.6) if flag.startswith("--") else []
        if close:
            hints.append(f"{close[0]} instead of {flag}")
    return f"unrecognized arguments: {' '.join(extras)}" + (f"; did you mean {', '.join(hints)}?" if hints else "")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = command_of(argv)
    parser = build_parser(full=(command,) if command else ())
    args, extras = parser.parse_known_args(argv)
    if extras:
        parser.error(_unknown_flags_error(parser, getattr(args, "command", None), extras))
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .commands.flags import translate
    from .errors import HfPxError

    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("hf-px: interrupted; nothing was written to the output directory.", file=sys.stderr)
        return 130
    except HfPxError as err:
        if args.debug:
            traceback.print_exc()
        print(f"hf-px {args.command}: error: {translate(str(err), getattr(args, 'flags', ()))}", file=sys.stderr)
        return 2
    except Exception:  # noqa: BLE001 - a bug: its traceback is what a report needs
        traceback.print_exc()
        print(f"hf-px {args.command}: internal error (a bug in hf-px; the traceback above locates it).",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
