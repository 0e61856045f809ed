"""The ``hf-px`` command line: one sub-command per job, each defined in ``hf_px.commands.<name>``.

An :class:`~hf_px.HfPxError` (bad input) is one line, with the command's flag names for config keys, and exit code
2; anything else is a bug in hf_px and shows its traceback (exit code 1). ``--debug`` shows the traceback of an
``HfPxError`` too.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys
import traceback

# Each module exposes ``register(subparsers)``, which adds its parser and sets ``func=run``.
COMMANDS = [
    "hf_px.commands.push",
    "hf_px.commands.prune",
    "hf_px.commands.demo",
    "hf_px.commands.finetune",
    "hf_px.commands.run",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-px",
        description="Prune Hugging Face checkpoints for a downstream task with PX (Path eXclusion) saliency, "
        "shrink widths with PCN projections, fine-tune with Accelerate and push to the Hub.",
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error in the input as well (before the command).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def _unknown_flags_error(parser: argparse.ArgumentParser, command: str | None, extras: list[str]) -> str:
    """argparse's "unrecognized arguments" message, plus the closest flag of the sub-command for each misspelling."""
    options = [o for a in parser._actions for o in a.option_strings]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            options += [o for a in action.choices[command]._actions for o in a.option_strings]
    hints = []
    for word in extras:
        flag = word.split("=", 1)[0]
        close = difflib.get_close_matches(flag, options, n=1, cutoff=0.6) if flag.startswith("--") else []
        if close:
            hints.append(f"{close[0]} instead of {flag}")
    return f"unrecognized arguments: {' '.join(extras)}" + (f"; did you mean {', '.join(hints)}?" if hints else "")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
