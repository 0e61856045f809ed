"""The errors hf_px raises for bad input: one hierarchy under :class:`HfPxError`.

An ``HfPxError`` is one line that names the problem and the fix, in the library's terms (config keys such as
``prune.sparsity``); the command line prints it with its own flag names and exits 2. Anything else is a bug and
gets a traceback. Each class also derives from the built-in exception its callers have always caught
(``ValueError``, ``FileNotFoundError``...), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

_MESSAGE_CHARS = 1_000


class HfPxError(Exception):
    """Bad input or environment, reported in one line; never a bug in hf_px."""


class ConfigError(HfPxError, ValueError):
    """A config value, or an input it names, the run cannot use; one line, bounded however long the value."""

    def __init__(self, message: str = "") -> None:
        text = " ".join(str(message).split())
        if len(text) > _MESSAGE_CHARS:  # keep the start (the key) and the end (the fix)
            text = text[: _MESSAGE_CHARS // 2] + " ... " + text[-_MESSAGE_CHARS // 2:]
        super().__init__(text)


class DataError(HfPxError, ValueError):
    """A dataset, column or label the task cannot use."""


class InputNotFoundError(HfPxError, FileNotFoundError):
    """A model, tokenizer or data file that is not where the config says."""


__all__ = ["ConfigError", "DataError", "HfPxError", "InputNotFoundError"]
